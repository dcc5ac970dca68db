"""rank: Block Influence, angular distance windows and ablation KLD from the numpy reference pass."""

from __future__ import annotations

import json
import math
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gguf_surgeon.cli.search  # noqa: F401  (registers rank, search, release, card, modelfile)
from gguf_surgeon.analysis import rank as rank_mod
from gguf_surgeon.analysis.plot import plot_ranking
from gguf_surgeon.analysis.rank import RankError, Ranking, rank_model, tokenize
from gguf_surgeon.analysis.reference import ReferenceModel, log_softmax
from gguf_surgeon.cli import main
from gguf_surgeon.cli.search import bar, bar_scale
from gguf_surgeon.errors import ToolError
from gguf_surgeon.reader import Model

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [9, 150, 23, 260, 77, 4, 199, 42, 88, 270, 31, 64]  # plain byte/merge tokens of the tiny vocabulary
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_scores_follow_their_definitions(tiny: Path):
    r = rank_model(tiny, tokens=TOKENS)
    with Model(tiny) as m:
        hidden = ReferenceModel(m).forward(TOKENS).hidden
    assert [b.index for b in r.blocks] == list(range(6)) and r.n_tokens == len(TOKENS)
    for k, b in enumerate(r.blocks):  # ShortGPT: BI_k = 1 - E_t cos(x_k, x_k+1)
        assert b.block_influence == pytest.approx(1 - cosine(hidden[k], hidden[k + 1]).mean(), abs=1e-9)
        assert b.ablation_kld is None
    assert len(r.windows) == 6 * 7 // 2  # every window of every size
    for start, size in ((0, 1), (2, 3), (0, 6)):  # Gromov: d = E_t arccos(cos(x_l, x_l+n)) / pi
        want = (np.arccos(np.clip(cosine(hidden[start], hidden[start + size]), -1, 1)) / math.pi).mean()
        assert r.window(start, size).angular_distance == pytest.approx(want, abs=1e-9)
    best = r.best_windows()
    assert [w.size for w in best] == list(range(1, 7))
    for w in best:
        assert w.angular_distance == min(x.angular_distance for x in r.windows if x.size == w.size)
    assert sorted(r.least_important()) == list(range(6))
    back = Ranking.from_dict(json.loads(json.dumps(r.to_dict())))  # what `rank --save` writes and search reads
    assert (back.blocks, back.windows, back.tokenizer) == (r.blocks, r.windows, r.tokenizer)


def test_ablation_kld_equals_deleting_the_block(tiny: Path):
    """The joint pass (all N ablations advanced together) gives exactly what a forward pass
    of the model without block i gives, for every i."""
    r = rank_model(tiny, tokens=TOKENS, ablation=True)
    with Model(tiny) as m:
        ref = ReferenceModel(m)
        base = log_softmax(ref.forward(TOKENS).logits)
        for i in range(6):
            q = log_softmax(ref.forward(TOKENS, [j for j in range(6) if j != i]).logits)
            want = (np.exp(base) * (base - q)).sum(-1).mean()
            assert r.blocks[i].ablation_kld == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert r.least_important()[0] == min(r.blocks, key=lambda b: b.ablation_kld).index


def test_one_block_dequantized_at_a_time(monkeypatch, tmp_path: Path):
    """Bounded memory: the 28-block F16 fixture is ranked (with ablation) holding at most one
    block's float32 weights at any moment."""
    alive: set[int] = set()
    peak = 0
    original = ReferenceModel.load_block

    def tracking(self, index):  # noqa: ANN001
        nonlocal peak
        w = original(self, index)
        alive.add(id(w))
        weakref.finalize(w, alive.discard, id(w))
        peak = max(peak, len(alive))
        return w

    monkeypatch.setattr(ReferenceModel, "load_block", tracking)
    r = rank_model(ROOT / "fixtures" / "tiny-qwen3-28.gguf", tokens=TOKENS, ablation=True)
    assert r.block_count == 28 and all(b.ablation_kld is not None for b in r.blocks)
    assert peak == 1


def test_approximate_tokenizer_without_llama_server(tiny: Path, monkeypatch):
    def missing(name, llama_bin=None):  # noqa: ANN001
        raise ToolError(f"{name} not found")

    monkeypatch.setattr(rank_mod, "find_tool", missing)
    ids, how = tokenize(tiny, "hello world, hello")
    assert how.startswith("approximate") and len(ids) >= 3
    with Model(tiny) as m:
        tokens = m.value("tokenizer.ggml.tokens")
    assert "".join(tokens[i] for i in ids) == "helloĠworld,Ġhello"  # GPT-2 byte spelling, nothing dropped


def test_too_short_text_and_missing_matplotlib(tiny: Path, monkeypatch, tmp_path: Path):
    with pytest.raises(RankError, match="gives 1 token"):
        rank_model(tiny, tokens=[5])
    r = rank_model(tiny, tokens=TOKENS[:4])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RankError, match=r"--plot needs matplotlib: pip install 'gguf-surgeon\[plot\]'"):
        plot_ranking(r, tmp_path / "r.png")


def test_bars():
    assert bar(1.0, 1.0, width=4) == "████"
    assert bar(0.5, 1.0, width=4) == "██"
    assert bar(0.3, 1.0, width=4) == "█▎"  # 1.2 cells: one full cell and 2/8 (9.6 eighths, rounded)
    assert bar(2.0, 1.0, width=4) == "███▶"  # past the scale
    assert bar(0.0, 1.0) == "" and bar(1.0, 0.0) == ""
    assert bar_scale([1.0, 0.02, 0.03, 0.025, 0.04]) == pytest.approx(0.12)  # 4 x median: the outlier is capped
    assert bar_scale([0.1, 0.2, 0.3]) == 0.3


@pytest.mark.slow
def test_rank_cli_on_smollm2_gives_one_score_per_block_and_a_png(smollm2: Path, tmp_path: Path, llama_bin: Path):
    png = tmp_path / "rank.png"
    saved = tmp_path / "rank.json"
    r = CliRunner().invoke(
        main,
        [
            "rank",
            str(smollm2),
            "--tokens",
            "32",
            "--plot",
            str(png),
            "--save",
            str(saved),
            "--llama-bin",
            str(llama_bin),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["tokenizer"] == "llama.cpp" and data["n_tokens"] == 32
    assert [b["index"] for b in data["blocks"]] == list(range(30))
    assert all(0 < b["block_influence"] < 2 for b in data["blocks"])
    assert len(data["windows"]) == 30 * 31 // 2 and len(data["best_windows"]) == 30
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert json.loads(saved.read_text())["blocks"] == data["blocks"]
    # the terminal view: one bar row per block
    r = CliRunner().invoke(
        main, ["rank", str(smollm2), "--tokens", "16", "--windows", "3", "--llama-bin", str(llama_bin)]
    )
    assert r.exit_code == 0, r.output
    rows = [l for l in r.output.splitlines() if l[:2].strip().isdigit() and "█" in l]
    assert len(rows) == 30
    assert "Least important first (by block influence):" in r.output
