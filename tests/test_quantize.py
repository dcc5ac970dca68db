"""quantize: one llama-quantize run per type, NAME-TYPE.gguf outputs, measured bits per weight."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

from gguf_surgeon.cli import main
from gguf_surgeon.edit import edit
from gguf_surgeon.errors import ModelError
from gguf_surgeon.llama.quantize import DEFAULT_LADDER, default_name, quant_types, quantize_ladder, resolve_types
from gguf_surgeon.llama.server import LlamaServer
from gguf_surgeon.llama.tools import ENV_VAR, HOW_TO_GET
from gguf_surgeon.reader import Model

# ChatML as SmolLM2's chat template renders one user turn (with its default system prompt)
SMOLLM2_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def k_model(make_model) -> Path:
    """A 6-block F32 qwen3 whose rows are 256 long, so K-quants apply without fallbacks."""
    return make_model("k.gguf", n_embd=256, ff=512, n_head=4, n_head_kv=2)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def independent_bpw(path: Path) -> float:
    """Bits per weight via gguf.GGUFReader, to check the report's own measurement."""
    r = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in r.tensors) * 8 / sum(int(t.n_elements) for t in r.tensors)


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


# --- without llama.cpp ------------------------------------------------------------------


def test_default_ladder_is_the_seed_cards():
    assert DEFAULT_LADDER == ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")


def test_default_name_drops_gguf_and_split_suffix():
    assert default_name(Path("a/Model-v1.gguf")) == "Model-v1"
    assert default_name(Path("Model-00001-of-00003.gguf")) == "Model"


def test_resolve_types_is_case_insensitive_and_dedupes():
    assert resolve_types(["q8_0", "Q4_K_M", "Q8_0"], ["Q8_0", "Q4_K_M"]) == ("Q8_0", "Q4_K_M")


def test_quantized_input_needs_allow_requantize(make_model, tmp_path: Path):
    src = make_model("q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    out = tmp_path / "out"
    result = run_cli("quantize", str(src), "--types", "Q4_0", "--out-dir", str(out))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {src}: is already quantized (blk.0.attn_q.weight is Q8_0); requantizing compounds "
        "the quantization error: quantize from the F16/BF16/F32 source, or pass --allow-requantize\n"
    )
    assert not out.exists()
    with pytest.raises(ModelError):
        quantize_ladder(src, ["Q4_0"], out)


def test_extra_args_must_start_with_an_option(tiny: Path, tmp_path: Path):
    result = run_cli("quantize", str(tiny), "--out-dir", str(tmp_path / "o"), "Q8_0")
    assert result.exit_code == 1
    assert (
        result.stderr == "Error: extra llama-quantize arguments must start with an option (like --pure), got 'Q8_0'\n"
    )


def test_missing_llama_quantize(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv(ENV_VAR, raising=False)
    result = run_cli("quantize", str(tiny), "--out-dir", str(tmp_path / "o"), "--llama-bin", str(empty))
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"Error: llama-quantize not found (looked in --llama-bin {empty}, PATH); to get it, {HOW_TO_GET}\n"
    )
    assert not (tmp_path / "o").exists()


def test_missing_input(tmp_path: Path):
    result = run_cli("quantize", str(tmp_path / "nope.gguf"))
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'nope.gguf'}: no such file\n"


# --- with llama-quantize ----------------------------------------------------------------


@pytest.mark.slow
def test_ladder_writes_one_file_per_type(k_model: Path, tmp_path: Path, llama_bin: Path):
    out = tmp_path / "quants"
    seen: dict[str, list[tuple[int, int]]] = {}
    report = quantize_ladder(
        k_model, out_dir=out, llama_bin=llama_bin, progress=lambda t, i, n: seen.setdefault(t, []).append((i, n))
    )
    assert files_in(out) == sorted(f"k-{t}.gguf" for t in DEFAULT_LADDER)  # nothing else: no temp files
    assert [r.type for r in report.results] == list(DEFAULT_LADDER)
    assert report.warnings == ()
    n_tensors = 6 * 11 + 3
    for r in report.results:
        assert r.path == out / f"k-{r.type}.gguf"
        assert seen[r.type][-1] == (n_tensors, n_tensors)
        assert r.size == r.path.stat().st_size
        assert r.bits_per_weight == pytest.approx(independent_bpw(r.path))
        with Model(r.path) as m:
            assert len(m.blocks()) == 6
            assert m.value("general.file_type") == int(getattr(gguf.LlamaFileType, "MOSTLY_" + r.type))
    bpw = {r.type: r.bits_per_weight for r in report.results}
    # F32 norms add a little on a model this small
    assert 8.5 <= bpw["Q8_0"] < 8.7
    assert 6.56 <= bpw["Q6_K"] < 6.8
    assert 4.5 <= bpw["Q4_K_M"] < 5.5
    assert 3.4 <= bpw["Q3_K_M"] < 4.5
    assert 2.6 <= bpw["Q2_K"] < 3.6
    assert list(bpw.values()) == sorted(bpw.values(), reverse=True)
    q8 = report.results[0].tensor_types
    assert q8 == {"F32": 25, "Q8_0": 44}


@pytest.mark.slow
def test_cli_table_and_json(k_model: Path, tmp_path: Path, llama_bin: Path):
    out = tmp_path / "q"
    result = run_cli(
        "quantize",
        str(k_model),
        "--types",
        "q8_0",
        "--types",
        "Q4_K_M",
        "--out-dir",
        str(out),
        "--name",
        "Tiny-v1",
        "--llama-bin",
        str(llama_bin),
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"Quantized {k_model} into {out}:"
    assert lines[1].split() == ["type", "bits/weight", "size", "time", "file"]
    q8 = lines[2].split()
    assert (q8[0], q8[1], q8[2:4], q8[-1]) == ("Q8_0", "8.53", ["3.77", "MiB"], "Tiny-v1-Q8_0.gguf")
    assert lines[3].split()[0] == "Q4_K_M" and lines[3].split()[-1] == "Tiny-v1-Q4_K_M.gguf"
    assert files_in(out) == ["Tiny-v1-Q4_K_M.gguf", "Tiny-v1-Q8_0.gguf"]

    result = run_cli(
        "quantize",
        str(k_model),
        "--types",
        "Q8_0",
        "--out-dir",
        str(out),
        "--name",
        "Tiny-v1",
        "--llama-bin",
        str(llama_bin),
        "--json",
        "--force",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (r,) = data["results"]
    assert (r["type"], r["path"], r["tensor_types"]) == (
        "Q8_0",
        str(out / "Tiny-v1-Q8_0.gguf"),
        {"F32": 25, "Q8_0": 44},
    )
    assert r["bits_per_weight"] == pytest.approx(independent_bpw(out / "Tiny-v1-Q8_0.gguf"), abs=1e-4)


@pytest.mark.slow
def test_extra_args_pass_through(k_model: Path, tmp_path: Path, llama_bin: Path):
    result = run_cli(
        "quantize",
        str(k_model),
        "--types",
        "Q4_K_M",
        "--out-dir",
        str(tmp_path),
        "--llama-bin",
        str(llama_bin),
        "--",
        "--pure",
    )
    assert result.exit_code == 0, result.output
    with Model(tmp_path / "k-Q4_K_M.gguf") as m:
        assert {t.ggml_type.name for t in m.tensors} == {"Q4_K", "F32"}  # --pure: no Q6_K mixture


@pytest.mark.slow
def test_unknown_type_lists_valid_ones(k_model: Path, tmp_path: Path, llama_bin: Path):
    result = run_cli(
        "quantize",
        str(k_model),
        "--types",
        "Q8_0,Q9_K",
        "--out-dir",
        str(tmp_path / "o"),
        "--llama-bin",
        str(llama_bin),
    )
    valid = quant_types(llama_bin / "llama-quantize")
    assert {"Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XS", "F16", "COPY"} <= set(valid)
    assert result.exit_code == 1
    assert result.stderr == f"Error: llama-quantize has no type 'Q9_K'; valid types: {', '.join(valid)}\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_existing_output_is_kept_without_force(k_model: Path, tmp_path: Path, llama_bin: Path):
    (tmp_path / "k-Q8_0.gguf").write_bytes(b"mine")
    result = run_cli(
        "quantize", str(k_model), "--types", "Q2_K,Q8_0", "--out-dir", str(tmp_path), "--llama-bin", str(llama_bin)
    )
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'k-Q8_0.gguf'}: exists; pass --force to overwrite\n"
    assert (tmp_path / "k-Q8_0.gguf").read_bytes() == b"mine"
    assert not (tmp_path / "k-Q2_K.gguf").exists()  # checked before any run


@pytest.mark.slow
def test_tool_failure_leaves_no_file(make_model, tmp_path: Path, llama_bin: Path):
    src = make_model("odd.gguf", arch="nosucharch")  # our reader takes it; llama.cpp does not know the arch
    out = tmp_path / "out"
    result = run_cli("quantize", str(src), "--types", "Q8_0", "--out-dir", str(out), "--llama-bin", str(llama_bin))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: llama-quantize failed (exit 1) for Q8_0 of {src}: "
        "llama_model_quantize: failed to quantize: unknown model architecture: 'nosucharch' | "
        f"llama_quantize: failed to quantize model from '{src.resolve()}'\n"
    )
    assert files_in(out) == []


@pytest.mark.slow
def test_rejected_extra_args_leave_no_file(k_model: Path, tmp_path: Path, llama_bin: Path):
    result = run_cli(
        "quantize",
        str(k_model),
        "--types",
        "Q8_0",
        "--out-dir",
        str(tmp_path / "o"),
        "--llama-bin",
        str(llama_bin),
        "--",
        "--no-such-flag",
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: llama-quantize rejected its arguments (extra arguments: --no-such-flag) for Q8_0 of {k_model}: usage: "
    )
    assert files_in(tmp_path / "o") == []


@pytest.mark.slow
def test_allow_requantize_warns(make_model, tmp_path: Path, llama_bin: Path):
    src = make_model("q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    result = run_cli(
        "quantize",
        str(src),
        "--types",
        "Q4_0",
        "--out-dir",
        str(tmp_path / "o"),
        "--allow-requantize",
        "--llama-bin",
        str(llama_bin),
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"warning: {src} is already quantized (Q8_0); requantizing compounds the quantization "
        "error, so outputs are worse than the same types made from an F16/BF16 source\n"
    )
    with Model(tmp_path / "o" / "q8-Q4_0.gguf") as m:
        assert m.tensor("blk.0.attn_q.weight").ggml_type == gguf.GGMLQuantizationType.Q4_0


# --- the real model -----------------------------------------------------------------------


def complete(llama_bin: Path, model: Path, prompt: str) -> str:
    # llama-server, not llama-completion: the latter's asynchronous log thread can drop output at exit
    with LlamaServer(llama_bin, model, ctx_size=512, threads=2) as server:
        return server.completion(prompt, n_predict=24)["content"]


@pytest.mark.slow
def test_smollm2_edited_and_quantized_still_answers(smollm2: Path, tmp_path: Path, llama_bin: Path):
    edited = tmp_path / "SmolLM2-135M-Instruct-d10.gguf"
    edit(smollm2, edited, "delete 10")
    report = quantize_ladder(
        edited, ["Q8_0", "Q4_K_M"], tmp_path / "quants", allow_requantize=True, llama_bin=llama_bin
    )
    assert len(report.warnings) == 1 and "already quantized (Q4_1)" in report.warnings[0]
    by_type = {r.type: r for r in report.results}
    # 576-wide rows are not a multiple of 256: Q4_K_M falls back to Q5_0 for most weights
    assert 8.5 <= by_type["Q8_0"].bits_per_weight < 8.6
    assert 5.5 <= by_type["Q4_K_M"].bits_per_weight < 6.5
    for r in report.results:
        with Model(r.path) as m:
            assert len(m.blocks()) == 29
            assert m.value("surgery.recipe") == "delete 10"
        answer = complete(llama_bin, r.path, SMOLLM2_PROMPT)
        assert "Paris" in answer, (r.type, answer)


FAKE_QUANTIZE = """#!{python}
import sys, time
if sys.argv[1] == "--help":
    print("usage: llama-quantize\\n allowed quantization types\\n   7  or  Q8_0    :  7.96G\\n   2  or  Q4_0    :  4.34G")
    sys.exit(1)
out = sys.argv[-2]
with open(out, "wb") as f:
    f.write(b"partial")
print("[   1/   2] blk.0.attn_q.weight - [64, 64], type = f32", flush=True)
time.sleep(30)
"""


def test_interrupt_kills_the_tool_and_leaves_no_file(tiny: Path, tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llama-quantize"
    fake.write_text(FAKE_QUANTIZE.format(python=sys.executable))
    fake.chmod(0o755)

    def interrupt(qtype: str, done: int, total: int) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        quantize_ladder(tiny, ["Q8_0"], out, llama_bin=bin_dir, progress=interrupt)
    assert time.monotonic() - start < 20  # the sleeping tool was killed, not waited for
    assert files_in(out) == []
