"""Deletion that heals: the output has a plain deletion's tensors and shapes and differs from it
only in the rewritten ffn_down; a heal reproduces byte for byte; llama.cpp computes what the
reference pass computes from the healed weights; the heal brings the final hidden state closer
to the base's than the plain deletion; a healed SmolLM2 still answers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from make_fixtures import build_model  # fixtures/ is on sys.path via conftest
from test_faithfulness import DIFFERS, assert_agrees, llama_top, max_diff, reference_logprobs

from gguf_surgeon.analysis.heal import (
    ESTIMATORS,
    calibrate,
    calibration_text,
    chunks_of,
    compute_heal,
    fit,
    split_text,
)
from gguf_surgeon.analysis.reference import ReferenceModel
from gguf_surgeon.cli import main
from gguf_surgeon.edit import edit, prepare
from gguf_surgeon.errors import PlanError
from gguf_surgeon.metadata import HEAL_PREFIX
from gguf_surgeon.reader import Model
from gguf_surgeon.search.moves import Move, compose, family_moves
from gguf_surgeon.search.order import ordered_moves, singles
from gguf_surgeon.search.space import PRESETS, load_space

HEALED = "blk.2.ffn_down.weight"  # `delete 3 heal` folds block 3's window into block 2's ffn_down
TOKENS = [int(t) for t in np.random.default_rng(5).integers(0, 280, 512)]  # plain tiny-vocab ids


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def read(path: Path) -> tuple[dict[str, tuple], dict[str, bytes], dict]:
    """(name -> (shape, type), name -> bytes, surgery.heal.* values) through gguf's own reader."""
    r = gguf.GGUFReader(path)
    shapes = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in r.tensors}
    data = {t.name: bytes(t.data.tobytes()) for t in r.tensors}
    heal = {}
    for key, f in r.fields.items():
        if key.startswith(HEAL_PREFIX):
            v = f.contents()
            heal[key[len(HEAL_PREFIX) :]] = v
    return shapes, data, heal


def final_hidden(path: Path, tokens: list[int]) -> np.ndarray:
    """The reference pass's last hidden state on each 256-token chunk of `tokens` (as the heal's
    calibration runs them), stacked."""
    with Model(path) as model:
        ref = ReferenceModel(model)
        return np.concatenate([ref.forward(c).hidden[-1] for c in chunks_of(tokens, None)])


# the file (tiny F32 fixture, no llama.cpp model runs) ------------------------------------------


def test_healed_file_is_a_plain_deletion_but_for_one_tensor(tiny: Path, tmp_path: Path, gguf_loader):
    plain, healed = tmp_path / "plain.gguf", tmp_path / "healed.gguf"
    assert run("delete", 3, tiny, plain).exit_code == 0
    r = run("delete", 3, "--heal", "--calibration-tokens", 300, "--json", tiny, healed)
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    p_shapes, p_data, p_heal = read(plain)
    h_shapes, h_data, heal = read(healed)
    assert h_shapes == p_shapes and not p_heal  # same tensor set, shapes and types
    assert [n for n in p_data if p_data[n] != h_data[n]] == [HEALED]
    # what the file records is enough to redo the heal exactly
    assert heal["estimator"] == "auto" and heal["calibration_tokens"] == 300 and heal["tensors"] == HEALED
    assert heal["calibration_sha256"] == hashlib.sha256(calibration_text().encode()).hexdigest()
    assert heal["tokenizer"] == "llama.cpp" and heal["chunk_tokens"] == 256
    # the report: the rewritten tensor, its type, and the error requantization added (none for F32)
    (w,) = report["heal"]["windows"]
    assert (w["tensors"], w["ggml_type"], w["source_type"], w["deleted"]) == ([HEALED], "F32", "F32", [3])
    assert w["requantization_added"] == pytest.approx(0.0, abs=1e-9) and w["weight_error"] == 0.0
    assert 0 < w["healed_error"] < w["cv_error"] < 1  # overfits a little, still beats the plain deletion
    assert report["healed_tensors"] == [
        {"name": HEALED, "type": "F32", "source": HEALED, "source_type": "F32", "computed": True}
    ]
    gguf_loader.assert_loads(healed)
    # diff and verify understand it
    d = run("diff", "--json", tiny, healed)
    assert json.loads(d.output)["recipe"] == "delete 3 heal" and json.loads(d.output)["healed"] == [HEALED]
    v = run("verify", healed, "--against", tiny)
    assert v.exit_code == 0 and "1 healed tensor(s) checked for shape" in v.output
    bad = run("verify", healed, "--against", tiny, "--recipe", "delete 3")  # the heal is not a plain copy
    assert bad.exit_code == 1 and "1 differ, first blk.2.ffn_down.weight" in bad.output


def test_heal_reproduces_byte_for_byte_and_dry_run_is_exact(tiny: Path, tmp_path: Path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    dry = run("apply", "delete 3-4 heal", tiny, a, "--dry-run", "--json", "--calibration-tokens", 280)
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.output)
    assert not a.exists() and [t["name"] for t in planned["healed_tensors"]] == [HEALED]
    assert planned["healed_tensors"][0]["computed"] is False
    assert run("apply", "delete 3-4 heal", tiny, a, "--calibration-tokens", 280).exit_code == 0
    assert run("delete", "3-4", "--heal", tiny, b, "--calibration-tokens", 280).exit_code == 0
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size == planned["output_size"]
    text = run("plan", "delete 3-4 heal", tiny)
    assert f"Heal rewrites: {HEALED} (F32;" in text.output
    # another calibration text gives another heal, and says so
    calib = tmp_path / "calib.txt"
    calib.write_text(split_text(calibration_text())[1] * 3)
    args = ("--calibration", calib, "--calibration-tokens", 280, "--heal-estimator", "ridge")
    assert run("apply", "delete 3-4 heal", tiny, c, *args).exit_code == 0
    _, data_a, heal_a = read(a)
    _, data_c, heal_c = read(c)
    assert data_a[HEALED] != data_c[HEALED] and heal_c["estimator"] == "ridge"
    assert (
        heal_c["calibration_sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest() != heal_a["calibration_sha256"]
    )


def test_heal_errors_are_one_line_and_leave_nothing(tiny: Path, make_model, tmp_path: Path):
    out = tmp_path / "out.gguf"
    gpt2 = make_model("gpt2.gguf", arch="gpt2")
    mixtral = make_model("mixtral.gguf", arch="llama", n_expert=4)  # llama blocks with experts
    cases = [
        (("delete", "0-1", "--heal", tiny, out), "heal: a window that starts at block 0 has no kept block before it"),
        (
            ("delete", 3, "--heal", gpt2, out),
            "heal: architecture 'gpt2' is not supported (supported: llama, qwen3)",
        ),
        (("delete", 3, "--heal", "--dry-run", gpt2, out), "architecture 'gpt2' is not supported"),
        (
            ("delete", 3, "--heal", mixtral, out),
            "heal: block 0 is mixture-of-experts; heal folds into a dense ffn_down",
        ),
        (("apply", "swap 3 4; delete 4 heal", tiny, out), "heal the deletion before reordering"),
        (("apply", "delete 4 heal; delete 3 heal", tiny, out), "block 3, which takes the correction, is not in"),
        (("delete", 3, "--calibration-tokens", 50, tiny, out), "--calibration-tokens needs a recipe that heals"),
        (("delete", 3, "--heal", "--heal-estimator", "magic", tiny, out), "'magic' is not one of auto, ridge"),
        (("delete", 3, "--heal", "--calibration", tmp_path / "none.txt", tiny, out), "--calibration: no such file"),
    ]
    for args, message in cases:
        r = run(*args)
        assert r.exit_code != 0 and r.output.startswith("Error: ") and message in r.output, r.output
        assert r.output.count("\n") == 1 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf", "mixtral.gguf", "tiny.gguf"]
    # the library refuses to write a heal it was not given
    with pytest.raises(PlanError, match="were not computed"):
        edit(tiny, out, "delete 3 heal")
    assert not out.exists()


def test_heal_brings_the_final_hidden_state_closer_to_the_base(tiny: Path, tmp_path: Path):
    """On the calibration tokens, the healed model's final hidden state (the reference pass on
    the written files) is closer to the base's than the plain deletion's, for every estimator."""
    tokens = TOKENS[:300]
    with Model(tiny) as m:
        surgery = prepare(m, "delete 3 heal")
    cal = calibrate(tiny, surgery, tokens=tokens)
    base = final_hidden(tiny, tokens)
    plain = tmp_path / "plain.gguf"
    edit(tiny, plain, "delete 3")
    plain_err = float(np.sum((final_hidden(plain, tokens) - base) ** 2))
    errors = {}
    for estimator in ESTIMATORS:
        res = fit(cal, estimator)
        out = tmp_path / f"{estimator}.gguf"
        edit(tiny, out, "delete 3 heal", heal=res.data)
        errors[estimator] = float(np.sum((final_hidden(out, tokens) - base) ** 2)) / plain_err
    assert all(e < 1 for e in errors.values()), errors  # per channel (diagonal) only a little: ~0.95
    assert errors["auto"] < 0.7 and errors["lstsq"] < 0.3, errors  # lstsq fits 300 tokens closest (overfits)
    # fitting from the given tokens again gives the same bytes (and a hash of the token ids)
    again = compute_heal(tiny, surgery, tokens=tokens)
    assert again.data.tensors == fit(cal, "auto").data.tensors
    assert again.text_sha256 == hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()


def test_quantized_heal_reports_its_requantization(make_model, tmp_path: Path):
    src = make_model("q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    with Model(src) as m:
        surgery = prepare(m, "delete 3 heal")
    res = compute_heal(src, surgery, tokens=TOKENS)
    (f,) = res.fits
    assert (f.ggml_type, f.source_type) == ("Q8_0", "Q8_0")
    assert 0 < f.weight_error < 0.01 and abs(f.requantization_added) < 0.05 * f.healed_error
    out = tmp_path / "healed.gguf"
    edit(src, out, "delete 3 heal", heal=res.data)
    assert read(out)[0][HEALED][1] == gguf.GGMLQuantizationType.Q8_0


# search ----------------------------------------------------------------------------------------


def test_search_heal_flag_for_deletion_families(tmp_path: Path):
    moves = family_moves(PRESETS["healed-deletions"].families[0], 6)
    assert [m.label for m in moves[:3]] == ["delete 0", "delete 1", "delete 1 heal"]  # none healed at block 0
    m = Move("delete-window", (2, 3), heal=True)
    assert Move.from_label(m.label) == m and m.label == "delete-window 2-3 heal"
    assert compose([m, Move("swap", (4, 5))], 6).recipe == "delete 2-3 heal; swap 2 3"
    # the same layer plan, other bytes: two candidates, each scored (the preset scores both kinds)
    assert compose([Move("delete", (3,), heal=True)], 6).key == "0,1,2,4,5|heal=3"
    assert compose([Move("delete", (3,))], 6).key == "0,1,2,4,5"
    both = singles(ordered_moves(PRESETS["healed-deletions"], 6, None), 6)
    assert len(both) == 32 and sum(c.recipe.endswith(" heal") for c in both) == 14
    space = tmp_path / "s.toml"
    space.write_text('[[family]]\nop = "delete-window"\nsizes = [2]\nheal = [false, true]\n')
    assert load_space(str(space)).families[0].heal == (False, True)
    space.write_text('[[family]]\nop = "swap"\nheal = true\n')
    with pytest.raises(Exception, match="heal applies to deletions only"):
        load_space(str(space))


# llama.cpp ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_llama_cpp_runs_the_healed_weights(llama_bin: Path, tmp_path: Path, arch: str):
    """llama.cpp's next-token log-probabilities on a healed F32 model match the reference pass
    of the healed file (the tolerance of test_faithfulness), and differ from the plain deletion's."""
    source = build_model(tmp_path / f"{arch}.gguf", arch=arch, seed=3)
    with Model(source) as m:
        surgery = prepare(m, "delete 3 heal")
    out = tmp_path / "healed.gguf"
    edit(source, out, "delete 3 heal", heal=compute_heal(source, surgery, tokens=TOKENS).data)
    top = llama_top(llama_bin, out)
    assert_agrees(top, reference_logprobs(out))
    assert max_diff(top, reference_logprobs(source, [0, 1, 2, 4, 5])) > DIFFERS / 10


@pytest.mark.slow
def test_healed_smollm2_answers(smollm2: Path, tmp_path: Path, llama_bin: Path):
    from test_llama_loads import CHATML_FRANCE, generate

    out = tmp_path / "healed.gguf"
    # rank's best single block; the transform estimator solves in n_embd (576) dimensions, the
    # default's ridge in n_ff (1536): minutes less on a loaded CI machine (auto: tests above)
    args = ("--heal", "--calibration-tokens", 256, "--heal-estimator", "transform", "--json")
    r = run("delete", 14, *args, smollm2, out)
    assert r.exit_code == 0, r.output
    (w,) = json.loads(r.output)["heal"]["windows"]
    assert w["ggml_type"] == w["source_type"] == "Q4_1" and 0 < w["weight_error"] < 0.5
    assert w["cv_error"] < 1  # beats the plain deletion on calibration tokens it was not fitted to
    answer, _ = generate(llama_bin, out, CHATML_FRANCE, n=16)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_search_scores_healed_and_plain_deletions_alike(tiny: Path, tmp_path: Path, llama_bin: Path):
    """The search's scorer builds a healed candidate (calibrated when built) and scores it with
    the same short KLD as a plain one: on the tiny model the healed deletion scores lower."""
    from test_search import scorer_for

    scorer = scorer_for(tiny, tmp_path)
    healed, plain = scorer.short("delete 3 heal", "h"), scorer.short("delete 3", "p")
    assert 0 < healed.kld < plain.kld, (healed, plain)


def test_release_of_a_healed_deletion_ships_the_healed_tensor(tiny: Path, tmp_path: Path, gguf_loader):
    """release computes the heal as apply does with its defaults (it failed on 'not computed' before)."""
    applied = tmp_path / "applied.gguf"
    assert run("apply", "delete 3 heal", tiny, applied).exit_code == 0
    r = run("release", tiny, "--recipe", "delete 3 heal", "--out", tmp_path / "rel", "--no-quantize", "--json")
    assert r.exit_code == 0, r.output
    shipped = Path(json.loads(r.output)["edited"])
    gguf_loader.assert_loads(shipped)
    a_shapes, a_data, a_heal = read(applied)
    s_shapes, s_data, s_heal = read(shipped)
    assert s_shapes == a_shapes and s_data == a_data  # the same healed bytes, every tensor
    assert s_heal == a_heal and s_heal["tensors"] == HEALED
