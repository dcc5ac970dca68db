"""Benchmarks through llama-perplexity (--bench): per-task results mapped to the right tasks,
judged by llama-perplexity's own output on the same data; the data formats as llama.cpp reads
them; the cache growing with N. HellaSwag uses the real file in ../shared/data (skipped, with
the reason, where it is absent); WinoGrande and multiple-choice files are written here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_surgeon.cli import main
from gguf_surgeon.errors import EvalError
from gguf_surgeon.evaluation import benchmarks
from gguf_surgeon.evaluation.benchmarks import (
    BENCH_CTX,
    MT19937,
    llama_hellaswag_order,
    mc_file_bytes,
    mc_task_bytes,
    parse_bench,
    read_bench_data,
    score_tasks,
)
from gguf_surgeon.evaluation.cache import EvalCache
from gguf_surgeon.evaluation.metrics import METRICS, benchmark_metric
from gguf_surgeon.evaluation.stats import mcnemar_p
from gguf_surgeon.llama.perplexity import PerplexityTool

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HELLASWAG = SHARED / "hellaswag_val_full.txt"
needs_hellaswag = pytest.mark.skipif(not HELLASWAG.is_file(), reason=f"{HELLASWAG} is absent (the shared test data)")
THREADS = 1  # on a shared 2-core machine two OpenMP threads wait on each other (test_eval.py)


def _tool(llama_bin: Path, runs: list | None = None) -> PerplexityTool:
    return PerplexityTool(
        llama_bin / "llama-perplexity",
        ctx=BENCH_CTX,
        batch=512,
        threads=THREADS,
        seed=42,
        timeout=900,
        on_time=(lambda load, compute: runs.append(compute)) if runs is not None else (lambda load, compute: None),
    )


def _llama_own(llama_bin: Path, model: Path, *args: str) -> str:
    """llama-perplexity's own output on a data file (its own task selection and order)."""
    out = subprocess.run(
        [str(llama_bin / "llama-perplexity"), "-m", str(model), "-c", str(BENCH_CTX), "-b", "512", "-t", str(THREADS),
         "--seed", "42", *args],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout + out.stderr


# --- fast: the selection, the formats, the spec ---------------------------------------------


def test_mt19937_is_the_standard_generator():
    rng = MT19937(5489)  # the C++ standard's check: the 10000th output of a default mt19937
    for _ in range(9999):
        rng.next()
    assert rng.next() == 4123659995


def test_hellaswag_order_is_a_prefix_and_a_permutation():
    full = llama_hellaswag_order(10042, 10042)
    assert sorted(full) == list(range(10042))
    assert llama_hellaswag_order(10042, 400) == full[:400]


def test_parse_bench_forms(tmp_path):
    f = tmp_path / "arc-easy-validation.bin"
    f.write_bytes(mc_file_bytes([mc_task_bytes("Q?", ["a", "b"], 0)]))
    spec = parse_bench(f"mc:{f}:30")
    assert (spec.kind, spec.file, spec.tasks, spec.name, spec.label) == ("mc", f, 30, "arc_easy_validation", f.stem)
    assert parse_bench(f"mc:{f}").tasks is None
    for bad, words in (
        ("hellaswag:0", "must be at least 1"),
        (f"mc:{tmp_path}/nope.bin", "is not a file"),
        ("mc", "mc needs a file"),
        ("piqa:10", "unknown benchmark"),
        ("winogrande:abc", "abc is not a file"),
        ("arc-easy:abc", "is not a task count"),
    ):
        with pytest.raises(EvalError, match=words):
            parse_bench(bad, tmp_path)


def test_formats_refuse_what_llama_cpp_cannot_read(tmp_path):
    bad = tmp_path / "h.txt"
    bad.write_text("ctx\n0\na\nb\nc\n")
    with pytest.raises(EvalError, match="not a multiple of 6"):
        read_bench_data("hellaswag", bad)
    mc = tmp_path / "m.bin"
    mc.write_bytes(mc_file_bytes([mc_task_bytes("Q?", ["a", "b"], 1)])[:-3])
    with pytest.raises(EvalError, match="ends inside task 1"):
        read_bench_data("mc", mc)
    wg = tmp_path / "w.csv"
    wg.write_text("index,sentence,option1,option2,answer\n")
    with pytest.raises(EvalError, match="no WinoGrande rows"):
        read_bench_data("winogrande", wg)


def test_benchmark_metric_is_registered_paired_per_task():
    m = benchmark_metric("test_bench_x", "Test set")
    assert METRICS["test_bench_x"] is m and m.binary and m.is_primary and m.weight == 0
    assert benchmark_metric("test_bench_x", "Test set") is m  # registered once


# --- slow: against llama-perplexity itself ----------------------------------------------------


@pytest.mark.slow
@needs_hellaswag
def test_hellaswag_per_task_results_match_llama_perplexity(smollm2, llama_bin, tmp_path):
    own = _llama_own(llama_bin, smollm2, "--hellaswag", "--hellaswag-tasks", "16", "-f", str(HELLASWAG))
    running = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^(\d+)\t(\d+\.\d+)%\t\[", own, re.M)}
    assert sorted(running) == list(range(1, 17))
    data = read_bench_data("hellaswag", HELLASWAG)
    cache = EvalCache(tmp_path / "cache")
    runs: list[float] = []
    tool = _tool(llama_bin, runs)

    # our run scores the 12 tasks from a 12-task file laid out for llama-perplexity's shuffle of
    # 12 (not of 10,042): the reproduced shuffle must map each line back to its task, so the
    # running accuracy after every task is llama-perplexity's own on the real file
    right12 = score_tasks(tool, cache, smollm2, "base", parse_bench(f"hellaswag:{HELLASWAG}:12"), data)
    assert [100 * np.mean(right12[:k]) for k in range(1, 13)] == pytest.approx([running[k] for k in range(1, 13)])
    assert 0 < sum(right12) < 12  # both outcomes occur, so a wrong mapping could not pass
    right16 = score_tasks(tool, cache, smollm2, "base", parse_bench(f"hellaswag:{HELLASWAG}:16"), data)
    assert 100 * np.mean(right16) == pytest.approx(running[16], abs=1e-6)  # its own last line
    assert right16[:12] == right12 and len(runs) == 2  # the grown N ran only the 4 new tasks


WINOGRANDE_ROWS = [
    "The trophy would not fit in the suitcase because _ was too big.,trophy,suitcase,1",
    "The trophy would not fit in the suitcase because _ was too small.,trophy,suitcase,2",
    "Anna poured water from the bottle into the cup until _ was full.,bottle,cup,2",
    "Anna poured water from the bottle into the cup until _ was empty.,bottle,cup,1",
    "The cat chased the mouse, so _ ran into a hole to hide.,cat,mouse,2",
    '"The man could not lift his son because _ was so weak.",man,son,1',
    "The man could not lift his son because _ was so heavy.,man,son,2",
    "The sun was warmer than the moon, so _ melted the snow.,sun,moon,1",
    "Tom gave Ben his umbrella because _ was going to get wet.,Tom,Ben,2",
    "The knife cut the bread easily because _ was sharp.,knife,bread,1",
    "The knife could not cut the stone because _ was hard.,knife,stone,2",
    "Maria taught Sara to swim because _ was a good swimmer.,Maria,Sara,1",
]


@pytest.mark.slow
def test_winogrande_results_match_llama_perplexity(smollm2, llama_bin, tmp_path, monkeypatch):
    csv = tmp_path / "wg.csv"
    rows = [f"{i},{r}" for i, r in enumerate(WINOGRANDE_ROWS)]
    # a header, a row without '_' and two rows with a comma in an unquoted sentence, which
    # llama.cpp skips, and a last line without a newline, which it drops: 10 tasks remain
    csv.write_text(
        "index,sentence,option1,option2,answer\n"
        + "\n".join(rows[:6] + ["99,No blank here.,a,b,1"] + rows[6:])
        + "\n12,Last _ row.,a,b,1"
    )
    own = _llama_own(llama_bin, smollm2, "--winogrande", "-f", str(csv))
    lines = re.findall(r"^(\d+)\t(\d+\.\d+)\t\s*\S+\s+\S+\s+([12])\s+([12])\s*$", own, re.M)
    assert [int(k) for k, *_ in lines] == list(range(1, 11))
    llama_right = tuple(a == b for *_, a, b in lines)

    data = read_bench_data("winogrande", csv)
    assert len(data.tasks) == 10
    cache = EvalCache(tmp_path / "cache")
    runs: list[float] = []
    tool = _tool(llama_bin, runs)
    first5 = score_tasks(tool, cache, smollm2, "m", parse_bench(f"winogrande:{csv}:5"), data)
    monkeypatch.setattr(benchmarks, "BENCH_CHUNK", 3)  # the 5 new tasks in two runs of 3 and 2
    every = score_tasks(tool, cache, smollm2, "m", parse_bench(f"winogrande:{csv}"), data)
    assert every == llama_right and first5 == llama_right[:5] and len(runs) == 3
    assert 100 * np.mean(every) == pytest.approx(float(lines[-1][1]), abs=1e-3)


MC_TASKS = [
    ("The capital of France is", ["Paris.", "Berlin.", "Madrid.", "Rome."], 0),
    ("Water freezes at a temperature of", ["zero degrees Celsius.", "fifty degrees Celsius."], 0),
    ("The largest planet in the solar system is", ["Mars.", "Jupiter.", "Venus."], 1),
    ("A week has", ["five days.", "six days.", "seven days.", "eight days.", "nine days.", "ten days."], 2),
    ("The colour of a clear daytime sky is", ["green.", "blue.", "red.", "purple.", "black."], 1),
    ("Cows drink", ["water.", "petrol."], 0),
    ("Two plus two equals", ["three.", "four.", "five.", "six."], 1),
    ("The opposite of hot is", ["warm.", "cold."], 1),
]


@pytest.mark.slow
def test_multiple_choice_results_match_llama_perplexity(smollm2, llama_bin, tmp_path):
    f = tmp_path / "mc.bin"
    f.write_bytes(mc_file_bytes([mc_task_bytes(*t) for t in MC_TASKS]))
    data = read_bench_data("mc", f)
    assert len(data.tasks) == 8 and data.max_answers == 6
    own = _llama_own(llama_bin, smollm2, "--multiple-choice", "-np", "6", "-bf", str(f))
    final = float(re.search(r"Final result: (\d+\.\d+)", own).group(1))
    cache = EvalCache(tmp_path / "cache")
    every = score_tasks(_tool(llama_bin), cache, smollm2, "m", parse_bench(f"mc:{f}"), data)
    assert 100 * np.mean(every) == pytest.approx(final, abs=1e-3)
    # a subset scored alone: each task keeps its result
    sub = data.task_file([5, 1, 3])
    (tmp_path / "sub.bin").write_bytes(sub[0])
    alone = _tool(llama_bin).task_results(smollm2, "mc", tmp_path / "sub.bin", 3, sub[1])
    assert alone == [every[5], every[1], every[3]]
    assert mcnemar_p(0, 0) == 1.0  # the paired test of a model with itself


@pytest.mark.slow
def test_eval_and_compare_with_benches_pair_per_task(tiny, llama_bin, tmp_path, monkeypatch):
    """A byte-identical copy through the CLI: each benchmark is a measure paired per task with
    the base (no discordant task: equivalent), in the JSON, the table and the verdict."""
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(tiny, copy)
    mc = tmp_path / "quiz.bin"
    mc.write_bytes(mc_file_bytes([mc_task_bytes(*t) for t in MC_TASKS]))
    wg = tmp_path / "wg.csv"
    wg.write_text("\n".join(f"{i},{r}" for i, r in enumerate(WINOGRANDE_ROWS)) + "\n\n")
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 120)
    monkeypatch.setenv("GGUF_SURGEON_CACHE", str(tmp_path / "cache"))
    common = ["--text", str(text), "--questions", "2", "--threads", "1", "--llama-bin", str(llama_bin)]
    benches = ["--bench", f"mc:{mc}", "--bench", f"winogrande:{wg}:4"]
    res = CliRunner().invoke(main, ["eval", str(copy), "--base", str(tiny), "--json", *benches, *common])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    got = {b["name"]: b for b in data["benchmarks"]}
    assert set(got) == {"quiz", "winogrande"} and got["quiz"]["tasks"] == 8 and got["winogrande"]["tasks"] == 4
    base = {b["name"]: b for b in data["versus_base"]["base"]["benchmarks"]}
    assert base["quiz"]["right"] == got["quiz"]["right"]
    diffs = {d["metric"]: d for d in data["versus_base"]["differences"]}
    for label, n in (("quiz accuracy", 8), ("WinoGrande accuracy", 4)):
        d = diffs[label]
        assert (d["items"], d["discordant"], d["p_value"], d["verdict"]) == (n, [0, 0], 1.0, "equivalent")
        assert d["margin"] == 0.03
    assert data["settings"]["benches"] == [f"mc:{mc}", f"winogrande:{wg}:4"]

    res = CliRunner().invoke(main, ["compare", str(tiny), str(copy), "--markdown", *benches, *common])
    assert res.exit_code == 0, res.output
    row = next(l for l in res.output.splitlines() if l.startswith("| quiz accuracy |"))
    right = sum(got["quiz"]["right"])
    assert row.count(f"{right}/8") == 2 and "equivalent" in row
