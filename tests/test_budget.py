"""Size budgets: the tensor-type file llama-quantize honours, the types and bytes it writes, the
sensitivity split, the allocator under a budget, and the whole quantize --target-size path."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from gguf_surgeon.budget.allocate import allocate, quantize_to_budget
from gguf_surgeon.budget.menu import Menu, Option, Slot, build_menu
from gguf_surgeon.budget.sensitivity import (
    GroupCost,
    Sensitivity,
    bundled_texts,
    design_batches,
    edit_sources,
    fit_table,
    inherited_sensitivity,
    split_costs,
    split_text,
)
from gguf_surgeon.cli import main
from gguf_surgeon.edit import edit
from gguf_surgeon.errors import OptionError, SearchError
from gguf_surgeon.evaluation.suite import EvalOptions
from gguf_surgeon.llama import quantize as quantize_module
from gguf_surgeon.llama.quantize import (
    mix_of_file,
    quantize_mix,
    read_tensor_type_file,
    tensor_bytes,
    write_tensor_type_file,
    written_type,
)
from gguf_surgeon.llama.server import LlamaServer
from gguf_surgeon.release.folder import ReleaseOptions, release
from gguf_surgeon.search.budget import budget_study

_QUANTIZE_ONE = quantize_module._quantize_one  # wrapped by a test to see each run's --imatrix
SMOLLM2_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def wide_model(make_model) -> Path:
    """A 6-block F32 qwen3 with 256-wide rows (K-quants apply) and a 288-wide ffn_down (they fall back)."""
    return make_model("wide.gguf", n_embd=256, ff=288, n_head=4, n_head_kv=2)


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


# --- without llama.cpp ------------------------------------------------------------------


def test_written_type_follows_llama_quantize_fallbacks():
    # SmolLM2's 576-wide rows: the 256-block K-quants become legacy 32-block types
    assert [written_type(t, 576) for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16)] == [
        T.Q4_0,
        T.Q4_0,
        T.Q5_0,
        T.Q5_1,
        T.Q8_0,
        T.Q8_0,
        T.F16,
    ]
    assert written_type(T.Q4_K, 1536) == T.Q4_K  # 6 x 256
    assert written_type(T.Q3_K, 40) == T.F16  # not even a multiple of 32
    assert tensor_bytes(T.Q4_K, (1536, 576)) == 1536 * 576 // 256 * 144


def test_tensor_type_file_round_trip(tmp_path: Path):
    mix = {"blk.0.attn_q.weight": "q4_K", "token_embd.weight": T.Q8_0, "blk.10.ffn_down.weight": "F16"}
    path = write_tensor_type_file(mix, tmp_path / "mix.txt")
    words = path.read_text().split()
    assert words[0] == r"^blk\.0\.attn_q\.weight$=Q4_K"
    assert read_tensor_type_file(path)[r"^token_embd\.weight$"] == T.Q8_0
    names = ["blk.0.attn_q.weight", "blk.0.attn_q.weightx", "blk.10.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert mix_of_file(path, names) == {"blk.0.attn_q.weight": T.Q4_K, "blk.10.ffn_down.weight": T.F16}


@pytest.mark.parametrize(
    "content, message",
    [
        ("blk.0=", "malformed"),
        ("=Q4_K", "malformed"),
        ("blk.0=Q9_X", "unknown ggml type"),
        ("blk(=Q4_K", "bad pattern"),
    ],
)
def test_bad_tensor_type_file_is_refused(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(OptionError, match=message):
        read_tensor_type_file(path)


def test_tensor_names_llama_quantize_cannot_match_are_refused(tmp_path: Path):
    for bad in ("Blk.0.attn_q.weight", "a b", "a=b"):
        with pytest.raises(OptionError):
            write_tensor_type_file({bad: "Q8_0"}, tmp_path / "m.txt")
    assert not (tmp_path / "m.txt").exists()


def test_fit_table_recovers_a_block_times_kind_table():
    rng = np.random.default_rng(1)
    seed = rng.uniform(0.5, 2.0, (5, 7))
    truth = np.outer(rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 7)) * seed
    fitted = fit_table(seed, truth.sum(1), truth.sum(0))
    np.testing.assert_allclose(fitted, truth, rtol=1e-6)


def test_halves_design_splits_a_block_whose_cost_sits_in_one_half():
    kinds = ("attn_q", "attn_v", "ffn_up", "ffn_down")
    slots = [Slot(f"blk.{b}.{k}.weight", b, k, (32, 32), ()) for b in range(4) for k in kinds]
    slots.append(Slot("token_embd.weight", None, "token_embd", (32, 8), ()))
    error = {s.name: 1.0 + 0.1 * i for i, s in enumerate(slots)}
    # truth: block 3's attention is nearly free, its feed-forward expensive; elsewhere kind x block
    truth = {s.name: error[s.name] * (1 + s.block) * (1 + kinds.index(s.kind)) for s in slots if s.block is not None}
    truth.update({f"blk.3.{k}.weight": 0.01 for k in ("attn_q", "attn_v")})
    truth["token_embd.weight"] = 5.0
    for design in ("batched", "halves"):
        batches = design_batches(slots, design)
        assert batches[-1][0] == "all" and set(batches[-1][1]) == {s.name for s in slots}
        measured = {label: sum(truth[n] for n in names) for label, names in batches}
        costs = split_costs(slots, measured, design, error)
        assert costs["token_embd.weight"] == 5.0
        assert sum(costs.values()) == pytest.approx(measured["all"])
        attn3 = costs["blk.3.attn_q.weight"] + costs["blk.3.attn_v.weight"]
        if design == "halves":
            assert len(batches) == 2 * 4 + len(kinds) + 1 + 1
            assert attn3 == pytest.approx(0.02)  # the half's own probe
        else:
            assert len(batches) == 4 + len(kinds) + 1 + 1
            assert attn3 > 1.0  # the block x kind fit gives it a kind-average share


def test_split_text_keeps_calibration_and_held_out_apart():
    calibration, held_out = bundled_texts()
    assert calibration.strip() and held_out.strip()
    assert not set(calibration.split("\n\n")) & set(held_out.split("\n\n"))
    assert 0.2 < len(calibration) / (len(calibration) + len(held_out)) < 0.45
    with pytest.raises(OptionError):
        split_text("one paragraph only", 0.5)


def synthetic(rng: np.random.Generator, n: int = 6) -> Sensitivity:
    """A Sensitivity over n made-up tensors: 3-5 options each, error falling with bytes."""
    slots, groups = [], []
    for i in range(n):
        k = int(rng.integers(3, 6))
        sizes = np.sort(rng.choice(np.arange(1, 40), k, replace=False)) * 32
        errors = np.sort(rng.uniform(0, 10, k))[::-1]
        errors[-1] = 0.0
        opts = tuple(Option(f"R{j}", f"W{j}", int(sizes[j]), float(errors[j])) for j in range(k))
        slots.append(Slot(f"t{i}", i, "kind", (32, 1), opts))
        groups.append(GroupCost(f"t{i}", i, "kind", "W0", float(errors[0]), float(rng.uniform(0.1, 2))))
    menu = Menu(tuple(slots), 1000, 32, 10_000, 0)
    return Sensitivity("m", "0" * 64, "each", "R0", 100, menu, tuple(groups), (), 1.0, 0.0)


def test_allocation_stays_in_budget_and_is_close_to_the_best_mix():
    rng = np.random.default_rng(7)
    for _ in range(20):
        sens = synthetic(rng)
        menu = sens.menu
        lo, hi = menu.smallest(), menu.largest()
        previous = None
        for limit in np.linspace(lo, hi, 7).astype(int):
            a = allocate(sens, int(limit))
            assert a.predicted_size == menu.file_size(a.written) <= limit
            if previous is not None:
                assert a.predicted_kld <= previous + 1e-12  # more bytes never predict more KLD
            previous = a.predicted_kld
            best = min(
                sum(sens.cost(s.name, o.written) for s, o in zip(menu.slots, combo))
                for combo in itertools.product(*(s.options for s in menu.slots))
                if menu.fixed_bytes + sum(o.nbytes for o in combo) <= limit
            )
            spread = max(sens.cost(s.name, s.options[0].written) for s in menu.slots)
            assert a.predicted_kld <= best + spread  # the greedy's bound: within one item of the optimum
        with pytest.raises(OptionError, match="over the budget"):
            allocate(sens, lo - 1)


@pytest.mark.parametrize("value", ["abc", "0", "-5M", "1.5X"])
def test_bad_target_size_is_one_error_line(tiny: Path, tmp_path: Path, value: str):
    r = run_cli("quantize", str(tiny), "--target-size", value, "--out-dir", str(tmp_path / "o"))
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and r.output.startswith("Error: Invalid value for --target-size: "), r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-size", "1K"], "the smallest types of these candidates take"),
        (["--target-bpw", "0"], "--target-bpw 0.0: must be above 0"),
        (["--target-bpw", "nan"], "must be above 0"),
        (["--target-size", "10M", "--target-bpw", "4"], "drop --target-size and --target-bpw together"),
        (["--target-size", "10M", "--types", "Q8_0"], "drop --types"),
        (["--target-size", "10M", "--candidates", "Q4_K,Q9_Z"], "unknown candidate type 'Q9_Z'"),
    ],
)
def test_impossible_budget_is_refused_before_any_work(tiny: Path, tmp_path: Path, args: list[str], message: str):
    out = tmp_path / "o"
    out.mkdir()
    r = run_cli("quantize", str(tiny), *args, "--out-dir", str(out))
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ") and message in r.output, r.output
    assert list(out.iterdir()) == []


def test_release_with_an_impossible_budget_leaves_nothing(tiny: Path, tmp_path: Path):
    out = tmp_path / "rel"
    r = run_cli("release", str(tiny), "--recipe", "delete 1", "--out", str(out), "--target-size", "1K")
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and "the smallest types of these candidates take" in r.output, r.output
    assert not out.exists()
    r = run_cli("release", str(tiny), "--recipe", "delete 1", "--out", str(out), "--target-size", "-5M")
    assert r.exit_code == 2 and r.output.startswith("Error: Invalid value for --target-size: "), r.output
    assert not out.exists()
    r = run_cli("release", str(tiny), "--recipe", "delete 1", "--out", str(out), "--inherit-costs")
    assert (
        r.exit_code == 1
        and r.output == "Error: --inherit-costs: needs --target-size (it chooses where the costs come from)\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_release_leaves_its_folder_as_it_was(tiny: Path, tmp_path: Path, existing: bool):
    """SIGTERM once the edit is written (search --export of a surgery point goes through release):
    a folder the release made is gone, a folder given with --force keeps only what it held."""
    import signal

    from gguf_surgeon.errors import Interrupted

    out = tmp_path / "rel"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    def stop(step: str) -> None:
        if step.startswith("allocating"):
            assert (out / "tiny-edited.gguf").exists()  # the edit is written when the signal comes
            raise Interrupted(signal.SIGTERM)

    with pytest.raises(Interrupted):
        release(
            tiny, "delete 1", out, ReleaseOptions(target_size=500_000, inherit_costs=True, force=True), progress=stop
        )
    assert (sorted(p.name for p in out.iterdir()) == ["notes.txt"]) if existing else not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--target-size", "1M", "--leaders", "2"],
            "--target-size: a size-and-KLD study has no full-eval stage; drop --leaders",
        ),
        (["--target-size", "1M", "--point", "2"], "--point: needs --export"),
        (["--plot", "f.png"], "--plot: needs --target-size"),
        (["--min-size", "1M"], "--min-size: needs --target-size"),
        (["--target-size", "1M", "--min-size", "2M"], "--min-size 2M: larger than --target-size 1M"),
        (["--target-size", "1M", "--plot", "f.svg"], "--plot f.svg: give a .png file name"),
        # refused before the study, not after its trials: a target no candidate's smallest mix fits,
        (["--target-size", "1K"], "tiny.gguf: the smallest mix of any candidate (delete 0) takes"),
        # a space with no move for the model or with healed moves, a plot or export with no place to go
        (["--target-size", "1M", "--space", "experts"], "--space experts: no move of it applies to tiny.gguf"),
        (["--target-size", "1M", "--space", "healed-deletions"], "--space healed-deletions: 'delete 1 heal' heals"),
        (["--target-size", "1M", "--plot", "no/f.png"], "--plot no/f.png: no: no such folder"),
        (["--target-size", "1M", "--plot", "tiny.gguf/f.png"], "--plot tiny.gguf/f.png: tiny.gguf: is not a folder"),
        (["--target-size", "1M", "--export", "tiny.gguf/a/b"], "--export tiny.gguf/a/b: tiny.gguf: is not a folder"),
    ],
)
def test_search_target_size_refuses_bad_options(tiny: Path, tmp_path: Path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    r = run_cli("search", str(tiny), *args, "--work-dir", str(tmp_path / "w"))
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: ") and message in r.output, r.output
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]  # no work folder, study or plot


def test_budget_search_refuses_a_study_of_another_search(tiny: Path, tmp_path: Path):
    """--study-name of a KLD search's study (one objective, no budget identity): refused, that study untouched."""
    optuna = pytest.importorskip("optuna")
    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="mine", storage=url, direction="minimize").set_user_attr("space", "deletions")
    with pytest.raises(SearchError, match=r"study 'mine' in sqlite:///.*other.db is not a budget search"):
        budget_study(tiny, ["delete 1"], limit=1_000_000, work_dir=tmp_path / "w", storage=url, study_name="mine")
    assert optuna.load_study(study_name="mine", storage=url).user_attrs == {"space": "deletions"}
    # one a budget search took over before this was refused (its identity set): refused too, not trials
    # failing on the number of objectives forever
    optuna.load_study(study_name="mine", storage=url).set_user_attr("identity", {"version": 1})
    with pytest.raises(SearchError, match="is not a budget search"):
        budget_study(tiny, ["delete 1"], limit=1_000_000, work_dir=tmp_path / "w", storage=url, study_name="mine")


def test_search_target_size_with_a_bad_storage_leaves_no_work_folder(tiny: Path, tmp_path: Path):
    db = tmp_path / "notes.db"
    db.write_text("not a database\n" * 200)
    r = run_cli(
        "search", str(tiny), "--target-size", "1M", "--work-dir", str(tmp_path / "w"), "--storage", f"sqlite:///{db}"
    )
    assert r.exit_code == 1 and r.output == f"Error: --storage sqlite:///{db}: cannot open: file is not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db", "tiny.gguf"]
    assert db.read_text() == "not a database\n" * 200


def test_search_target_size_refuses_a_quantized_base_before_the_study(tmp_path: Path):
    base = tmp_path / "q8.gguf"
    base.write_bytes((Path(__file__).parent.parent / "fixtures" / "tiny-qwen3-q8_0.gguf").read_bytes())
    r = run_cli("search", str(base), "--target-size", "1M", "--work-dir", str(tmp_path / "w"))
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith(f"Error: {base}: is already quantized (blk.0.attn_q.weight is Q8_0)"), r.output
    assert [p.name for p in tmp_path.iterdir()] == ["q8.gguf"]  # no work folder, no study database


# --- llama.cpp --------------------------------------------------------------------------


def read_types(path: Path) -> dict[str, tuple[T, int]]:
    """name -> (type, bytes) with gguf's own reader."""
    return {t.name: (T(int(t.tensor_type)), int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_tensor_type_file_is_honoured_and_sized_to_the_byte(
    wide_model: Path, tmp_path: Path, llama_bin: Path, gguf_loader
):
    menu = build_menu(wide_model, llama_bin=llama_bin)
    # every option of every tensor once: tensor i takes option (i mod its options)
    requested = {s.name: s.options[i % len(s.options)].requested for i, s in enumerate(menu.slots)}
    written = {s.name: s.options[i % len(s.options)].written for i, s in enumerate(menu.slots)}
    assert {o.written for s in menu.slots for o in s.options} >= {"Q2_K", "Q3_K", "Q4_K", "Q4_0", "Q5_0", "Q8_0", "F16"}
    out = tmp_path / "mix.gguf"
    quantize_mix(wide_model, out, requested, llama_bin=llama_bin)
    gguf_loader.assert_loads(out)
    got = read_types(out)
    by_name = {s.name: s for s in menu.slots}
    for name, wt in written.items():
        assert got[name][0].name == wt, name
        assert got[name][1] == by_name[name].option(wt).nbytes == tensor_bytes(T[wt], by_name[name].shape), name
    assert out.stat().st_size == menu.file_size(written)
    for name, (qtype, _) in got.items():
        if name not in written:
            assert qtype == T.F32  # norms stay as they are
    # the weight error of each option is the one of the grid llama-quantize wrote
    assert all(s.options[-1].error < s.options[0].error for s in menu.slots)


@pytest.mark.slow
def test_quantize_target_size_end_to_end(make_model, tmp_path: Path, llama_bin: Path, gguf_loader, monkeypatch):
    # a tiny model's llama-perplexity exits within milliseconds of its last lines, and llama.cpp's
    # logger loses them about half the time on a loaded machine (llama/perplexity.py): more retries
    monkeypatch.setattr("gguf_surgeon.llama.perplexity.OUTPUT_ATTEMPTS", 16)
    model = make_model("wide.gguf", n_blocks=1, n_embd=256, ff=288, n_head=4, n_head_kv=2)
    calibration, held_out = bundled_texts()
    # 4 chunks of 256 each for the byte-level tiny vocab (as tests/test_eval.py): short runs
    texts = {"calibration": calibration[:1600], "held_out": held_out[:1600]}
    options = EvalOptions(llama_bin=llama_bin, threads=2, cache_dir=tmp_path / "cache" / "eval")
    budget = 560_000  # between the smallest (216 kB) and the largest (1.16 MB) mix of this model
    out = tmp_path / "q" / "wide-800K.gguf"
    result = quantize_to_budget(model, out, target_size=budget, options=options, **texts)
    assert result.types_file == tmp_path / "q" / "wide-800K.tensor-types.txt"
    gguf_loader.assert_loads(out)
    assert out.stat().st_size == result.size == result.allocation.predicted_size <= budget
    assert result.mismatches == ()
    got = read_types(out)
    assert {n: got[n][0].name for n in result.allocation.written} == result.allocation.written
    requested = result.allocation.requested
    assert mix_of_file(result.types_file, list(requested)) == {n: T[t] for n, t in requested.items()}
    assert len(set(result.allocation.written.values())) > 1  # a real mix, not one type
    assert result.kld is not None and result.kld.value >= 0
    # the saved mix reproduces the file through plain quantize --tensor-type-file
    again = run_cli(
        "quantize",
        str(model),
        "--types",
        "Q8_0",
        "--tensor-type-file",
        str(result.types_file),
        "--out-dir",
        str(tmp_path / "again"),
        "--llama-bin",
        str(llama_bin),
        "--json",
    )
    assert again.exit_code == 0, again.output
    path = Path(json.loads(again.output)["results"][0]["path"])
    assert read_types(path) == got and path.stat().st_size == out.stat().st_size
    # a second budget reuses the cached sensitivity, and a bits-per-weight budget holds on the file
    second = quantize_to_budget(
        model, tmp_path / "q" / "wide-6bpw.gguf", target_bpw=6.0, options=options, **texts, measure_kld=False
    )
    assert second.sensitivity_cached
    assert second.bits_per_weight <= 6.0
    # the CLI's sensitivity report on the same cache: table, JSON and heat map
    text = tmp_path / "calibration.txt"
    text.write_text(texts["calibration"], encoding="utf-8")
    plot = tmp_path / "sens.png"
    r = CliRunner().invoke(
        main,
        ["sensitivity", str(model), "--calibration", str(text), "--threads", "2", "--plot", str(plot), "--json"],
        env={"GGUF_SURGEON_CACHE": str(tmp_path / "cache"), "GGUF_SURGEON_LLAMA_BIN": str(llama_bin)},
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["cached"] and {g["name"] for g in data["groups"]} == set(requested)
    assert data["joint_kld"] > 0 and all(g["kld"] >= 0 for g in data["groups"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smollm2_allocated_mix_answers_like_the_base(smollm2: Path, tmp_path: Path, llama_bin: Path, gguf_loader):
    """The F16 base made from SmolLM2's Q4_1, a mix allocated at 5 bits per weight among three
    types (weight errors as the only sensitivity: this test checks the written mix, not the costs)."""
    import subprocess

    base = tmp_path / "smollm2-f16.gguf"
    subprocess.run(
        [str(llama_bin / "llama-quantize"), "--allow-requantize", str(smollm2), str(base), "F16"],
        check=True,
        capture_output=True,
    )
    menu = build_menu(base, ("Q3_K", "Q4_K", "Q6_K"), llama_bin=llama_bin, threads=2)
    groups = tuple(
        GroupCost(s.name, s.block, s.kind, s.options[0].written, 0.0, 1.0 / s.options[0].nbytes) for s in menu.slots
    )
    sens = Sensitivity(str(base), "", "each", "Q3_K", 0, menu, groups, (), 0.0, 0.0)
    a = allocate(sens, int(5.0 * menu.parameters / 8), "tensor bytes")
    out = tmp_path / "mix.gguf"
    report = quantize_mix(base, out, a.requested, llama_bin=llama_bin, threads=2)
    gguf_loader.assert_loads(out)
    assert report.results[0].bits_per_weight <= 5.0
    assert len(set(a.written.values())) >= 3
    assert out.stat().st_size == a.predicted_size
    assert {n: t.name for n, (t, _) in read_types(out).items() if n in a.written} == a.written
    with LlamaServer(llama_bin, out, ctx_size=512, threads=2) as server:
        answer = server.completion(SMOLLM2_PROMPT, n_predict=24)["content"]
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_tensor_type_file_with_an_unquantized_type_is_refused(tiny: Path, tmp_path: Path, llama_bin: Path):
    """llama-quantize would silently ignore the file with F16: refused before any run."""
    mix = write_tensor_type_file({"blk.0.attn_q.weight": "Q4_K"}, tmp_path / "mix.txt")
    r = run_cli(
        "quantize", str(tiny), "--types", "F16", "--tensor-type-file", str(mix),
        "--out-dir", str(tmp_path / "o"), "--llama-bin", str(llama_bin),
    )  # fmt: skip
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "ignores --tensor-type overrides for F16" in r.output
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


@pytest.mark.slow
def test_release_target_size_ships_the_allocated_mix(
    make_model, tmp_path: Path, llama_bin: Path, gguf_loader, monkeypatch
):
    monkeypatch.setattr("gguf_surgeon.llama.perplexity.OUTPUT_ATTEMPTS", 16)  # as in the end-to-end test above
    model = make_model("wide.gguf", n_blocks=2, n_embd=256, ff=288, n_head=4, n_head_kv=2)
    calibration, held_out = bundled_texts()
    budget = 397_312  # just under the uniform Q4_K_M file of the edited model (398,560 bytes)
    options = ReleaseOptions(
        types=("Q8_0", "Q4_K_M", "Q3_K_M"),
        llama_bin=llama_bin,
        target_size=budget,
        target_label="388K",
        budget_options=EvalOptions(llama_bin=llama_bin, threads=2, cache_dir=tmp_path / "cache" / "eval"),
        budget_texts=(calibration[:1600], held_out[:1600]),
    )
    folder = tmp_path / "rel"
    report = release(model, "delete 1", folder, options)
    b = report.budget
    out = folder / "wide-edited-388K.gguf"
    assert b.out == out and b.types_file == folder / "wide-edited-388K.tensor-types.txt"
    assert {out.name, b.types_file.name} <= {name for name, _ in report.files}
    gguf_loader.assert_loads(out)
    # the shipped file, read back with gguf's reader: the allocated types, within the budget
    reader = gguf.GGUFReader(out)
    got = {t.name: T(int(t.tensor_type)).name for t in reader.tensors}
    assert {n: got[n] for n in b.allocation.written} == b.allocation.written
    assert len(set(b.allocation.written.values())) > 1
    assert out.stat().st_size == b.size == b.allocation.predicted_size <= budget
    bpw = sum(int(t.n_bytes) for t in reader.tensors) * 8 / sum(int(t.n_elements) for t in reader.tensors)
    mix, *ladder = report.rows
    assert (mix.file, mix.size, mix.kld) == (out.name, b.size, b.kld)
    assert mix.bits_per_weight == pytest.approx(bpw)
    assert [q.file for q in ladder] == [f"wide-edited-{t}.gguf" for t in options.types]
    for q in ladder:
        assert q.size == (folder / q.file).stat().st_size and q.kld is not None
    # beaten: the uniform files of the same or larger size whose KLD interval lies above the mix's
    expected = [q for q in ladder if q.size >= b.size and q.kld.low > b.kld.high]
    assert mix.beats == tuple(q.type for q in sorted(expected, key=lambda q: -q.size))
    assert "Q4_K_M" in mix.beats  # measured: about half Q4_K_M's KLD at a smaller size
    # the card's row of the mix shows those numbers; the Modelfile ships the mix
    card = (folder / "README.md").read_text()
    row = next(line for line in card.splitlines() if f"[{out.name}]" in line)
    k = b.kld
    for cell in (f"{bpw:.2f}", f"{k.value:.4f} [{k.low:.4f}, {k.high:.4f}]", ", ".join(mix.beats) or "—"):
        assert f"| {cell} |" in row, (cell, row)
    assert f"{b.size / 1000:.2f} KB" in row
    for q in ladder:
        line = next(line for line in card.splitlines() if f"[{q.file}]" in line)
        assert f"| {q.kld.value:.4f} [{q.kld.low:.4f}, {q.kld.high:.4f}] |" in line
    assert f"FROM ./{out.name}" in (folder / "Modelfile").read_text()


@pytest.mark.slow
def test_inherited_sensitivity_takes_each_tensor_cost_from_its_source(
    wide_model: Path, tmp_path: Path, llama_bin: Path
):
    """An edit's tensors cost per unit of weight error what the base tensors they come from cost;
    their weight errors are the edit's own (a copied tensor: the same as its source's)."""
    options = EvalOptions(llama_bin=llama_bin, threads=2, cache_dir=tmp_path / "cache")
    menu = build_menu(wide_model, llama_bin=llama_bin)
    # a distinct slope per base tensor, so a wrong mapping shows
    groups = tuple(GroupCost(s.name, s.block, s.kind, "Q3_K", 0.0, float(i + 1)) for i, s in enumerate(menu.slots))
    base = Sensitivity(str(wide_model), "", "each", "Q3_K", 0, menu, groups, (), 1.0, 0.0)
    per = {g.name: g.per_error for g in groups}
    base_slots = {s.name: s for s in menu.slots}

    def moved(n: str, source_block: Callable[[int], int]) -> str:
        return re.sub(r"^blk\.(\d+)\.", lambda m: f"blk.{source_block(int(m.group(1)))}.", n)

    for recipe, expect in (
        ("delete 0", lambda n: per[moved(n, lambda b: b + 1)]),  # output block b is base block b + 1
        ("swap 0 1", lambda n: per[moved(n, lambda b: {0: 1, 1: 0}.get(b, b))]),
        # a blend of blocks 0 and 1 replacing block 0: the mean of the two slopes
        (
            "interpolate 0 1 --replace 0",
            lambda n: (per[n] + per[moved(n, lambda b: 1)]) / 2 if n.startswith("blk.0.") else per[n],
        ),
    ):
        edited = tmp_path / f"{recipe.split()[0]}.gguf"
        edit(wide_model, edited, recipe)
        sources = edit_sources(wide_model, recipe)
        sens = inherited_sensitivity(base, edited, sources, options=options)
        assert sens.joint_kld is None and sens.additivity is None
        assert [s.name for s in sens.menu.slots] == [g.name for g in sens.groups]
        for s, g in zip(sens.menu.slots, sens.groups):
            assert g.per_error == pytest.approx(expect(s.name)), (recipe, s.name)
            copied = sources[s.name]
            if len(copied) == 1:  # a byte copy: the same options, sizes and weight errors as its source
                assert s.options == base_slots[copied[0]].options, (recipe, s.name)
            assert g.kld == pytest.approx(g.per_error * s.option(g.probe_written).error)
        again = inherited_sensitivity(base, edited, sources, options=options)
        assert again.menu == sens.menu  # the menu comes from the cache the second time


@pytest.mark.slow
def test_search_target_size_study_front_and_export(
    make_model, tmp_path: Path, llama_bin: Path, monkeypatch, gguf_loader
):
    import subprocess

    monkeypatch.setattr("gguf_surgeon.llama.perplexity.OUTPUT_ATTEMPTS", 16)  # as in the end-to-end test above
    model = make_model("wide.gguf", n_blocks=2, n_embd=256, ff=288, n_head=4, n_head_kv=2)
    uniform = tmp_path / "uniform-Q4_K_M.gguf"
    subprocess.run(
        [str(llama_bin / "llama-quantize"), str(model), str(uniform), "Q4_K_M"], check=True, capture_output=True
    )
    limit = uniform.stat().st_size  # the largest budget: the size of the base's uniform Q4_K_M
    low = 300_000  # below the smallest mix of the whole model (328 kB), above that of one block (220 kB)
    # the bundled texts, as the CLI reads them (the CLI below continues this study)
    options = EvalOptions(llama_bin=llama_bin, threads=2, cache_dir=tmp_path / "cache" / "eval")
    kw = dict(
        limit=limit, low=low, work_dir=tmp_path / "work", uniform=("Q4_K_M",), options=options, name="wide-edited",
        enqueue=[("delete 1", limit), ("delete 1", low)],
    )  # fmt: skip
    front = budget_study(model, ["delete 0", "delete 1"], trials=8, **kw)
    assert front.trials + front.refused == 8 and front.trials_now == 8
    assert front.refused >= 1  # the whole model at 300 kB (a first trial): no mix that small, no file written
    assert not list((tmp_path / "work").glob("*.gguf"))  # no candidate, trial or uniform file left
    points = [p for p in front.points if p.recipe is not None]
    q4 = front.points[-1]
    assert q4.label == "uniform Q4_K_M" and q4.size == limit and q4.recipe is None
    for p in points:
        assert low <= p.budget <= limit and p.size <= p.budget
        assert p.types and set(p.types.values()) <= {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"}
    assert [p.size for p in points] == sorted(p.size for p in points)
    # only a deletion fits the smallest budget: the smallest file on the front is one
    assert points[0].recipe == "delete 1" and points[0].size <= low
    # the Pareto flags, against the held-out values
    for p in front.points:
        dominated = any(
            o.size <= p.size and o.kld.value <= p.kld.value and (o.size, o.kld.value) != (p.size, p.kld.value)
            for o in front.points
        )
        assert p.on_front == (not dominated), p
    # measured: the allocated base beats the uniform type of its size on held-out text
    (c,) = front.comparisons
    assert c.uniform == "Q4_K_M" and c.point_size <= limit and c.beats and c.ratio < 0.8
    # the deleted block's bytes went to the other tensors: more bits per weight under the same budget
    import optuna

    study = optuna.load_study(study_name=front.study_name, storage=f"sqlite:///{tmp_path / 'work' / 'budget-study.db'}")
    at_limit = {t.user_attrs["recipe"]: t.user_attrs for t in study.trials if t.params.get("budget") == limit}
    assert at_limit["delete 1"]["bits_per_weight"] > at_limit[""]["bits_per_weight"]
    assert at_limit["delete 1"]["size"] <= limit and at_limit[""]["size"] <= limit
    # a rerun continues the study: nothing measured again, the same front
    again = budget_study(model, ["delete 0", "delete 1"], trials=8, **kw)
    assert again.trials_now == 0 and again.points == front.points
    with pytest.raises(SearchError, match=r"holds another budget search \(not the same: --min-size\)"):
        budget_study(model, ["delete 0", "delete 1"], trials=8, **{**kw, "low": low + 1, "enqueue": ()})
    with pytest.raises(SearchError, match=r"\(not the same: the surgeries of --space\)"):
        budget_study(model, ["delete 1"], trials=8, **{**kw, "enqueue": ()})
    # the CLI on the same study: table, PNG, and the smallest front point (a deletion) released
    env = {"GGUF_SURGEON_CACHE": str(tmp_path / "cache"), "GGUF_SURGEON_LLAMA_BIN": str(llama_bin)}
    args = [
        "search", str(model), "--target-size", str(limit), "--min-size", str(low), "--budget", "8",
        "--work-dir", str(tmp_path / "work"), "--study-name", front.study_name, "--threads", "2",
    ]  # fmt: skip
    rel = tmp_path / "rel"
    r = CliRunner().invoke(
        main, [*args, "--plot", str(tmp_path / "f.png"), "--export", str(rel), "--point", "1", "--json"], env=env
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["trials_now"] == 0 and (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same front as the library's, with all three uniform types as reference rows
    assert [(p["label"], p["size"]) for p in data["points"]] == [(p.label, p.size) for p in points] + [
        (f"uniform {t}", p["size"]) for t, p in zip(("Q3_K_M", "Q4_K_M", "Q5_K_M"), data["points"][len(points) :])
    ]
    # a deletion point: a release folder whose mix is the point's, to the byte and the type
    first = points[0]
    out = Path(data["export"]["file"])
    assert out.parent == rel and {"README.md", "Modelfile", out.name} <= {f.name for f in rel.iterdir()}
    gguf_loader.assert_loads(out)
    assert out.stat().st_size == first.size
    types = {n: T[t] for n, t in first.types.items()}
    assert mix_of_file(Path(data["export"]["types_file"]), list(types)) == types
    predicted = data["export"]["release"]["budget"]["allocation"]["written"]
    assert {n: read_types(out)[n][0].name for n in predicted} == predicted
    # a no-surgery point: the base's mix and its tensor-type file
    n = next(i for i, p in enumerate(points, 1) if p.recipe == "")
    r = CliRunner().invoke(main, [*args, "--export", str(tmp_path / "rel2"), "--point", str(n), "--json"], env=env)
    assert r.exit_code == 0, r.output
    out2 = Path(json.loads(r.output)["export"]["file"])
    assert out2.stat().st_size == points[n - 1].size
    types = {name: T[t] for name, t in points[n - 1].types.items()}
    assert mix_of_file(Path(json.loads(r.output)["export"]["types_file"]), list(types)) == types
    # a point the front does not have: one line, nothing written
    r = CliRunner().invoke(main, [*args, "--export", str(tmp_path / "rel3"), "--point", "99"], env=env)
    assert r.exit_code == 1 and r.output.startswith("Error: --point 99: the front has points 1 to "), r.output
    assert not (tmp_path / "rel3").exists()


@pytest.mark.slow
def test_an_interrupted_budget_study_leaves_only_its_study_and_continues(
    make_model, tmp_path: Path, llama_bin: Path, monkeypatch
):
    """SIGTERM during a trial or the front's held-out measurement: no trial, front-point or
    uniform file is left in the work folder, and a rerun continues the study; an interrupted
    quantize --target-size leaves no mix; --export of a front with no point is one error line."""
    import signal

    from gguf_surgeon.errors import Interrupted
    from gguf_surgeon.search import budget as budget_module

    monkeypatch.setattr("gguf_surgeon.llama.perplexity.OUTPUT_ATTEMPTS", 16)  # as in the end-to-end test above
    model = make_model("wide.gguf", n_blocks=2, n_embd=256, ff=288, n_head=4, n_head_kv=2)
    options = EvalOptions(llama_bin=llama_bin, threads=2, cache_dir=tmp_path / "cache" / "eval")
    work = tmp_path / "work"
    kw = dict(limit=600_000, work_dir=work, uniform=("Q4_K_M",), options=options, trials=3)
    kld = budget_module.kl_divergence

    def signal_at(name: str):
        def measure(path, base, opts):  # SIGTERM arriving while llama.cpp measures `name`
            if Path(path).name == name:
                raise Interrupted(signal.SIGTERM)
            return kld(path, base, opts)

        return measure

    def left() -> list[str]:
        return sorted(p.name for p in work.iterdir() if not p.name.startswith("budget-study.db-"))  # sqlite journals

    monkeypatch.setattr(budget_module, "kl_divergence", signal_at("trial.gguf"))
    with pytest.raises(Interrupted):
        budget_study(model, ["delete 1"], **kw)
    assert left() == ["budget-study.db"]
    monkeypatch.setattr(budget_module, "kl_divergence", signal_at("front-point.gguf"))
    with pytest.raises(Interrupted):
        budget_study(model, ["delete 1"], **kw)  # the rerun measures its trials, then is stopped on the front
    assert left() == ["budget-study.db"]
    monkeypatch.setattr(budget_module, "kl_divergence", kld)
    front = budget_study(model, ["delete 1"], **kw)
    assert front.trials_now == 0 and front.trials + front.refused == 3 and left() == ["budget-study.db"]
    # quantize --target-size stopped while it measures the written mix: neither it nor its type file stays
    out = tmp_path / "q" / "m.gguf"

    def stop(step: str, done: int, total: int) -> None:
        if step.startswith("KL divergence"):
            raise Interrupted(signal.SIGTERM)

    with pytest.raises(Interrupted):
        quantize_to_budget(model, out, target_size=600_000, options=options, progress=stop)
    assert list(out.parent.iterdir()) == []
    # every trial over its budget (the base alone at 280-350 kB): --export says so in one line
    env = {"GGUF_SURGEON_CACHE": str(tmp_path / "cache"), "GGUF_SURGEON_LLAMA_BIN": str(llama_bin)}
    r = CliRunner().invoke(
        main,
        ["search", str(model), "--target-size", "350000", "--budget", "1", "--work-dir", str(tmp_path / "w2"),
         "--export", str(tmp_path / "rel"), "--threads", "2"],
        env=env,
    )  # fmt: skip
    assert r.exit_code == 1 and r.output.endswith(
        f"Error: --export {tmp_path / 'rel'}: the study's front has no point: every trial (1) was over its budget; "
        "pass a larger --budget\n"
    ), r.output
    assert not (tmp_path / "rel").exists()


@pytest.mark.slow
def test_an_imatrix_is_used_by_the_sensitivity_and_the_mix(
    make_model, tmp_path: Path, llama_bin: Path, monkeypatch, gguf_loader
):
    """With --imatrix, every probe and the written mix are quantized with it (llama-quantize records
    the file in the output's metadata), and the sensitivity is a cache entry of its own."""
    import subprocess

    monkeypatch.setattr("gguf_surgeon.llama.perplexity.OUTPUT_ATTEMPTS", 16)  # as in the end-to-end test above
    model = make_model("wide.gguf", n_blocks=1, n_embd=256, ff=288, n_head=4, n_head_kv=2)
    calibration, held_out = bundled_texts()
    (tmp_path / "calib.txt").write_text(calibration)
    imatrix = tmp_path / "wide.imatrix.gguf"
    run = subprocess.run(
        [str(llama_bin / "llama-imatrix"), "-m", str(model), "-f", str(tmp_path / "calib.txt"), "-o", str(imatrix),
         "-c", "64", "-t", "2", "--chunks", "8"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    options = EvalOptions(llama_bin=llama_bin, threads=2, cache_dir=tmp_path / "cache" / "eval")
    texts = {"calibration": calibration[:1600], "held_out": held_out[:1600]}
    plain = quantize_to_budget(model, tmp_path / "q" / "plain.gguf", target_size=560_000, options=options, **texts)
    seen = []
    monkeypatch.setattr(
        "gguf_surgeon.llama.quantize._quantize_one",
        lambda *a, **k: seen.append(a[5]) or _QUANTIZE_ONE(*a, **k),
    )
    weighted = quantize_to_budget(
        model, tmp_path / "q" / "im.gguf", target_size=560_000, options=options, imatrix=imatrix, **texts
    )
    assert not weighted.sensitivity_cached and weighted.imatrix == imatrix  # its own entry, not the plain one
    # every llama-quantize run of it (menu, probes, the mix) got the imatrix
    assert len(seen) > 5 and set(seen) == {str(imatrix.resolve())}
    gguf_loader.assert_loads(weighted.out)
    meta = gguf.GGUFReader(weighted.out).fields
    assert "quantize.imatrix.file" in meta and "quantize.imatrix.file" not in gguf.GGUFReader(plain.out).fields
    assert weighted.size <= 560_000 and weighted.kld is not None
    # an imatrix of another model is refused in one line before any run
    other = make_model("other.gguf", n_blocks=3, n_embd=256, ff=288, n_head=4, n_head_kv=2)
    r = CliRunner().invoke(
        main,
        ["quantize", str(other), "--target-size", "900K", "--imatrix", str(imatrix), "--out-dir", str(tmp_path / "o")],
        env={"GGUF_SURGEON_CACHE": str(tmp_path / "cache"), "GGUF_SURGEON_LLAMA_BIN": str(llama_bin)},
    )
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "imatrix covers 1 blocks" in r.output, r.output
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
