"""search: spaces, rank guidance, the Optuna study (brute force, TPE, beams), resuming, workers.

Scoring runs the real llama-perplexity KL divergence through gguf_surgeon.evaluation.runner, with the
eval cache in tmp_path so nothing is reused from other runs. Budgets and texts are small.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import gguf_surgeon.cli.search  # noqa: F401  (registers rank, search, release, card, modelfile)
from gguf_surgeon.analysis.expert_rank import ExpertOrder
from gguf_surgeon.analysis.rank import rank_model
from gguf_surgeon.cli import main
from gguf_surgeon.edit import edit
from gguf_surgeon.errors import SearchError
from gguf_surgeon.evaluation.metrics import METRICS
from gguf_surgeon.evaluation.runner import kl_divergence
from gguf_surgeon.evaluation.suite import EvalOptions
from gguf_surgeon.evaluation.yardstick import Yardstick
from gguf_surgeon.search.moves import Family, Move, compose, expert_counts
from gguf_surgeon.search.order import ordered_moves
from gguf_surgeon.search.scorer import CandidateScorer
from gguf_surgeon.search.space import PRESETS, load_space
from gguf_surgeon.search.storage import SearchOptions, create_or_load
from gguf_surgeon.search.study import Entry, choose_leaders, run_search, search_status

TINY_CTX, TINY_CHARS = 32, 700  # the tiny vocabulary spells ~1 token per 2 characters: 5+ chunks
# one llama.cpp thread: ggml's worker threads spin while waiting, and on a busy 2-core machine two
# spinning threads make a 0.05 s run take 1.5 s
THREADS = 1


def tiny_options(tmp_path: Path, **kw) -> SearchOptions:
    kw.setdefault("threads", THREADS)
    return SearchOptions(
        work_dir=tmp_path / "work", ctx=TINY_CTX, short_chars=TINY_CHARS, leaders=0, cache_dir=tmp_path / "cache", **kw
    )


class CountingScorer(CandidateScorer):
    """The real scorer, recording every stage-1 evaluation; optionally Ctrl-C at call N."""

    def __init__(self, *args, interrupt_at: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.calls: list[str] = []
        self.interrupt_at = interrupt_at

    def short(self, recipe: str, tag: str):
        self.calls.append(recipe)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        return super().short(recipe, tag)


def scorer_for(base: Path, tmp_path: Path, **kw) -> CountingScorer:
    return CountingScorer(
        base,
        tmp_path / "work",
        ctx=TINY_CTX,
        short_chars=TINY_CHARS,
        cache_dir=tmp_path / "cache",
        threads=THREADS,
        **kw,
    )


# spaces and moves (no llama.cpp) -------------------------------------------------------------


def test_moves_compose_in_post_edit_indices():
    # the reference card: delete layer 10, then swap original 12 and 13 = "swap 11 12" after the deletion
    c = compose([Move("delete", (10,)), Move("swap", (12, 13))], 28)
    assert c.recipe == "delete 10; swap 11 12" and c.blocks == 27
    assert c.key.split(",")[10:13] == ["11", "13", "12"]
    assert compose([Move("delete", (10,)), Move("swap", (10, 11))], 28) is None  # block 10 is gone
    assert compose([Move("repeat-window", (3, 4))], 6).recipe == "keep 0-4,3-5"
    assert compose([Move("delete-window", (2, 3, 4))], 6).recipe == "delete 2-4"
    assert compose([Move("bridge", (2, 3), 0.5)], 6).recipe == "bridge 2 --t 0.5"
    assert compose([Move("interpolate", (2, 3), 0.25)], 6).recipe == "interpolate 2 3 --t 0.25 --replace 2"
    assert compose([Move("swap", (1, 2)), Move("swap", (1, 2))], 6) is None  # back to the base: no candidate
    for m in (Move("swap", (1, 2)), Move("bridge", (4, 5), 0.5), Move("delete-window", (2, 3))):
        assert Move.from_label(m.label) == m


def test_spaces_presets_and_toml(tmp_path: Path):
    assert {f.op for f in PRESETS["phase1"].families} == {"delete", "swap", "duplicate", "bridge", "interpolate"}
    # the card's phase-1 sweep on a 28-block model: 150+ configurations with the combinations
    assert len(ordered_moves(PRESETS["phase1"], 28, None)) == 28 + 27 + 28 + 27 + 27
    space = tmp_path / "s.toml"
    space.write_text(
        'name = "mine"\nprune = 0.5\nleaders = 1\n[[family]]\nop = "delete"\nblocks = "2-5"\n'
        '[[family]]\nop = "delete-window"\nsizes = [2]\n[beam]\nwidth = 1\ndepth = 3\n'
    )
    s = load_space(str(space))
    assert (s.name, s.prune, s.leaders, s.beam_width, s.beam_depth) == ("mine", 0.5, 1, 1, 3)
    assert s.families[0].blocks == (2, 3, 4, 5) and s.families[1].sizes == (2,)
    for text, message in (
        ('[[family]]\nop = "explode"\n', "'op' must be one of"),
        ('colour = 1\n[[family]]\nop = "delete"\n', "unknown key(s) colour"),
        ('name = "x"\n', "needs at least one [[family]]"),
        ('[[family]]\nop = "bridge"\nt = [1.5]\n', "strictly between 0 and 1"),
    ):
        space.write_text(text)
        with pytest.raises(SearchError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            load_space(str(space))
    with pytest.raises(SearchError, match="neither a preset"):
        load_space("nonsense")


def test_rank_orders_and_prunes(tiny: Path):
    ranking = rank_model(tiny, tokens=[9, 150, 23, 260, 77, 4, 199, 42])
    by_bi = [b.index for b in sorted(ranking.blocks, key=lambda b: b.block_influence)]
    moves = ordered_moves(load_space("deletions"), 6, ranking)
    assert [m.blocks[0] for m in moves] == by_bi
    pruned = ordered_moves(PRESETS["deletions"].__class__("d", PRESETS["deletions"].families, prune=0.5), 6, ranking)
    assert [m.blocks[0] for m in pruned] == by_bi[:3]
    mixed = ordered_moves(load_space("windows"), 6, ranking)  # families interleave: best of each first
    assert [m.op for m in mixed[:2]] == ["delete-window", "repeat-window"]


# the study (real llama.cpp) --------------------------------------------------------------------


@pytest.mark.slow
def test_search_finds_the_brute_force_best_deletion(smollm2: Path, tmp_path: Path, llama_bin: Path):
    """On SmolLM2, search over single deletions (blocks 25-28, budget = the whole space) picks
    the deletion with the lowest KL divergence, the one a brute-force loop finds by editing
    each model and measuring it against the base with the eval suite's KLD."""
    space = tmp_path / "late.toml"
    space.write_text('name = "late-deletions"\nleaders = 0\n[[family]]\nop = "delete"\nblocks = "25-28"\n')
    options = SearchOptions(
        budget=4,
        work_dir=tmp_path / "work",
        ctx=64,
        short_chars=900,
        llama_bin=llama_bin,
        cache_dir=tmp_path / "cache",
        threads=THREADS,
    )
    result = run_search(smollm2, load_space(str(space)), options)
    assert result.evaluated == 4 and result.candidates == 4
    assert not list((tmp_path / "work" / "candidates").glob("*.gguf"))  # deleted after scoring

    # brute force: a separate cache, every deletion written and measured
    brute = CandidateScorer(
        smollm2,
        tmp_path / "brute",
        llama_bin=llama_bin,
        ctx=64,
        short_chars=900,
        cache_dir=tmp_path / "brute-cache",
        threads=THREADS,
    )
    kld = {}
    for block in range(25, 29):
        path = tmp_path / f"delete-{block}.gguf"
        edit(smollm2, path, f"delete {block}")
        kld[f"delete {block}"] = brute.score_file(path).kld
        path.unlink()
    best = min(kld, key=kld.get)
    assert result.champion.recipe == best
    assert {e.recipe: e.kld for e in result.leaderboard} == pytest.approx(kld)
    assert "no verdict" in result.verdict


@pytest.mark.slow
def test_interrupted_search_resumes_without_reevaluating(tiny: Path, tmp_path: Path, llama_bin: Path):
    options = tiny_options(tmp_path, llama_bin=llama_bin)
    first = scorer_for(tiny, tmp_path, llama_bin=llama_bin, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_search(tiny, load_space("deletions"), options, scorer=first)
    done_before = first.calls[:2]
    assert not list((tmp_path / "work" / "candidates").glob("*.gguf"))
    again = scorer_for(tiny, tmp_path, llama_bin=llama_bin)
    result = run_search(tiny, load_space("deletions"), options, scorer=again)
    assert not set(again.calls) & set(done_before)  # finished candidates were not evaluated again
    assert sorted(again.calls + done_before) == sorted(f"delete {i}" for i in range(6))
    assert (result.evaluated, result.evaluated_now) == (6, 4), [(e.number, e.recipe) for e in result.leaderboard]
    # a third run has nothing left to do
    third = scorer_for(tiny, tmp_path, llama_bin=llama_bin)
    assert run_search(tiny, load_space("deletions"), options, scorer=third).evaluated_now == 0 and not third.calls


@pytest.mark.slow
def test_two_workers_share_a_study(tiny: Path, tmp_path: Path, llama_bin: Path):
    space = tmp_path / "s.toml"
    space.write_text('name = "del-swap"\nleaders = 0\n[[family]]\nop = "delete"\n[[family]]\nop = "swap"\n')
    result = run_search(tiny, load_space(str(space)), tiny_options(tmp_path, jobs=2, llama_bin=llama_bin))
    assert result.evaluated == result.candidates == 11
    recipes = [e.recipe for e in result.leaderboard]
    assert len(recipes) == len(set(recipes)) == 11  # each candidate scored exactly once
    assert len({e.worker for e in result.leaderboard}) == 2  # by both workers
    db = tmp_path / "work" / "search.db"
    (studies,) = sqlite3.connect(db).execute("select count(*) from studies").fetchone()
    assert studies == 1 and result.storage == f"sqlite:///{db}"
    assert [e.recipe for e in search_status(result.storage, result.study_name)] == recipes


@pytest.mark.slow
def test_large_spaces_are_sampled_with_tpe_and_beams_combine_the_best(tiny: Path, tmp_path: Path, llama_bin: Path):
    space = tmp_path / "pairs.toml"
    space.write_text(
        'name = "pairs"\nmax_steps = 2\nexhaustive_limit = 10\nleaders = 0\n'
        '[[family]]\nop = "delete"\n[[family]]\nop = "swap"\n'
    )
    result = run_search(tiny, load_space(str(space)), tiny_options(tmp_path, budget=6, llama_bin=llama_bin))
    assert result.candidates is None and result.evaluated == 6  # 66 combinations > 10: sampled, to the budget
    assert {e.phase for e in result.leaderboard} == {"tpe"}
    greedy = tmp_path / "greedy.toml"
    greedy.write_text(
        'name = "greedy"\nleaders = 0\n[[family]]\nop = "delete"\nblocks = "3-5"\n'
        "[beam]\nwidth = 1\ndepth = 2\ntop = 3\n"
    )
    result = run_search(tiny, load_space(str(greedy)), tiny_options(tmp_path, llama_bin=llama_bin))
    singles = sorted((e for e in result.leaderboard if e.phase == "singles"), key=lambda e: e.kld)
    pairs = [e for e in result.leaderboard if e.phase == "beam2"]
    assert len(singles) == 3 and len(pairs) == 2  # greedy: the best single, extended by each other one
    best = int(singles[0].recipe.split()[1])
    for e in pairs:
        assert e.recipe.startswith(f"delete {best}; delete ")


@pytest.mark.slow
def test_search_cli_json_and_a_study_of_another_base(tiny: Path, make_model, tmp_path: Path, llama_bin: Path):
    runner = CliRunner()
    args = [
        "--space",
        "swaps",
        "--work-dir",
        str(tmp_path / "work"),
        "--ctx",
        str(TINY_CTX),
        "--short-chars",
        str(TINY_CHARS),
        "--leaders",
        "0",
        "--threads",
        "1",
        "--budget",
        "2",
        "--llama-bin",
        str(llama_bin),
    ]
    r = runner.invoke(main, ["search", str(tiny), *args, "--json"], env={"GGUF_SURGEON_CACHE": str(tmp_path / "c")})
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["evaluated"] == 2 and data["budget"] == 2 and data["champion"]["recipe"].startswith("swap ")
    assert np.isfinite(data["champion"]["kld"])
    # a larger budget continues the same study: only the difference is scored
    r = runner.invoke(
        main,
        ["search", str(tiny), *args[:-4], "--budget", "4", "--llama-bin", str(llama_bin), "--json"],
        env={"GGUF_SURGEON_CACHE": str(tmp_path / "c")},
    )
    assert r.exit_code == 0, r.output
    assert (json.loads(r.output)["evaluated"], json.loads(r.output)["evaluated_now"]) == (4, 2)
    other = make_model("tiny.gguf", seed=1, n_blocks=5)  # same file name, other model
    r = runner.invoke(main, ["search", str(other), *args], env={"GGUF_SURGEON_CACHE": str(tmp_path / "c")})
    assert r.exit_code == 1
    assert (
        r.output.startswith("Error: study 'tiny:swaps' in sqlite:///") and "made for another base or space" in r.output
    )


# stage 2: the adaptive leaders ----------------------------------------------------------------


def _entry(recipe: str, kld: float, low: float, high: float) -> Entry:
    return Entry(0, recipe, recipe, "singles", 5, kld, low, high, 90.0, "w", None)


def test_leaders_are_the_candidates_whose_interval_overlaps_the_best():
    nan = float("nan")
    entries = [
        _entry("a", 0.10, 0.08, 0.12),
        _entry("b", 0.11, 0.09, 0.14),
        _entry("c", 0.13, 0.121, 0.15),  # starts just above the best's upper bound
        _entry("d", 0.14, 0.12, 0.20),  # touches it
        _entry("e", 0.20, nan, nan),  # an unknown interval cannot be told apart
    ]
    lead = choose_leaders(entries, 10)
    assert lead.overlapping == lead.chosen == ("a", "b", "d", "e") and lead.left_out == 0
    capped = choose_leaders(entries, 2)
    assert capped.chosen == ("a", "b") and capped.left_out == 2
    assert choose_leaders(entries, 0).chosen == () and choose_leaders([], 3).overlapping == ()


def _study_rows(db: Path) -> dict[str, tuple[int, float, float, float]]:
    """recipe -> (trial number, KLD, low, high) of every scored trial, read from the SQLite file
    with sqlite3 (Optuna's schema), not through Optuna or the search code."""
    con = sqlite3.connect(db)
    rows: dict[int, dict] = {}
    for tid, key, value in con.execute("select trial_id, key, value_json from trial_user_attributes"):
        rows.setdefault(tid, {})[key] = json.loads(value)
    out = {}
    for tid, number, state in con.execute("select trial_id, number, state from trials"):
        a = rows.get(tid, {})
        if state == "COMPLETE" and a.get("evaluated"):
            (value,) = con.execute("select value from trial_values where trial_id = ?", (tid,)).fetchone()
            out[a["recipe"]] = (number, value, a["kld_low"], a["kld_high"])
    return out


@pytest.mark.slow
def test_adaptive_leaders_get_the_full_eval_and_show_their_verdicts(tiny: Path, tmp_path: Path, llama_bin: Path):
    """Stage 2 gives the full eval to exactly the candidates whose short-KLD interval overlaps
    the best one's, as read from the study's database; the leaderboard shows their score and
    difference with intervals, the champion each measure with interval, test, power and verdict."""
    work = tmp_path / "work"
    env = {"GGUF_SURGEON_CACHE": str(tmp_path / "c"), "COLUMNS": "400"}
    args = ["search", str(tiny), "--space", "deletions", "--work-dir", str(work), "--ctx", str(TINY_CTX)]
    args += ["--short-chars", str(TINY_CHARS), "--threads", "1", "--questions", "1", "--llama-bin", str(llama_bin)]
    r = CliRunner().invoke(main, [*args, "--leaders", "6", "--json"], env=env)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)

    stored = _study_rows(work / "search.db")
    assert len(stored) == 6
    best = min(stored, key=lambda k: (stored[k][1], stored[k][0]))
    _, _, low, high = stored[best]
    expected = {k for k, (_, _, lo, hi) in stored.items() if lo <= high and hi >= low}
    assert 1 < len(expected) < 6, stored  # the fixture's intervals leave some out: the rule is not trivial
    assert set(data["leaders"]["chosen"]) == set(data["leaders"]["overlapping"]) == expected
    assert {e["recipe"] for e in data["leaderboard"] if e["full"]} == expected
    assert data["champion"]["recipe"] in expected

    # a cap below the overlapping count: nothing runs again, the text says what the cap left out
    r = CliRunner().invoke(main, [*args, "--leaders", "1"], env=env)
    assert r.exit_code == 0, r.output
    out = r.output
    assert (
        f"Full eval: 1 leader(s), every candidate whose KLD interval overlaps the best one's; "
        f"the cap --leaders 1 left out {len(expected) - 1} more that overlap" in out
    )
    champ = data["champion"]
    full = champ["full"]
    s, d = full["score"], full["delta"]
    assert f"Champion: {champ['recipe']} — " in out
    assert f"overall score {s[0]:.1f} [{s[1]:.1f}, {s[2]:.1f}] vs {full['base_score'][0]:.1f}" in out
    assert f"(Δ {d[0]:+.1f}, 95% interval [{d[1]:+.1f}, {d[2]:+.1f}])" in out
    # every measure of the champion: its difference with the interval, its verdict and power
    lines = {l.strip().split(":")[0]: l.strip() for l in out.splitlines() if l.startswith("  ") and ": Δ " in l}
    assert set(lines) == {x["metric"] for x in full["differences"]}
    for x in full["differences"]:
        line = lines[x["metric"]]
        assert re.search(r": Δ [+-]?[\d.]+ \[[+-][\d.]+, [+-][\d.]+\] " + x["verdict"] + r" \(p ", line), line
        if x["detectable"] is not None:
            assert "detects ±" in line, line
        if x["discordant"] is not None:  # the exact McNemar p-value, from the counts
            g, lost = x["discordant"]
            m = g + lost
            p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(min(g, lost) + 1)) / 2**m)
            assert f"{g} gained, {lost} lost of {x['items']}" in line and x["p_value"] == pytest.approx(p)
    # the exported card: the champion's eval again (the same settings: from the cache), every
    # measure's line as the search printed it
    rel = tmp_path / "rel"
    r = CliRunner().invoke(main, [*args, "--leaders", "2", "--export", str(rel), "--json"], env=env)
    assert r.exit_code == 0, r.output
    card = (rel / "README.md").read_text(encoding="utf-8")
    for line in json.loads(r.output)["measures"]:
        assert "- " + line.replace("[", "\\[").replace("]", "\\]") + "\n" in card, line
    assert f"Champion `{champ['recipe']}`" in card and f"the {len(expected)} whose KL-divergence interval" in card
    # each leader's row: score and difference with their intervals, and the verdict
    for e in data["leaderboard"]:
        if e["full"]:
            f = e["full"]
            assert (
                f"{f['score'][0]:.1f} [{f['score'][1]:.1f}, {f['score'][2]:.1f}] vs {f['base_score'][0]:.1f}: "
                f"Δ {f['delta'][0]:+.1f} [{f['delta'][1]:+.1f}, {f['delta'][2]:+.1f}]"
            ) in out


@pytest.mark.slow
def test_search_yardstick_places_each_kld_on_the_ladder_of_the_short_text(make_model, tmp_path: Path, llama_bin: Path):
    """search --yardstick: each candidate's short KLD is placed on the base's quantization ladder
    measured on the same short text (a rung's KLD equals a fresh llama-perplexity run of
    llama-quantize's own file of the base on that text, not the full eval text's)."""
    base = make_model("base.gguf", n_embd=256, n_head=4, n_head_kv=2, ff=512, n_blocks=3)
    work = tmp_path / "work"
    env = {"GGUF_SURGEON_CACHE": str(tmp_path / "c"), "COLUMNS": "400"}
    args = ["search", str(base), "--space", "deletions", "--work-dir", str(work), "--ctx", str(TINY_CTX)]
    args += ["--short-chars", str(TINY_CHARS), "--threads", "1", "--leaders", "0", "--llama-bin", str(llama_bin)]
    r = CliRunner().invoke(main, [*args, "--yardstick", "--json"], env=env)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    con = sqlite3.connect(work / "search.db")
    (raw,) = con.execute("select value_json from study_user_attributes where key = 'yardstick'").fetchone()
    stick = Yardstick.from_dict(json.loads(raw))
    assert [g.type for g in stick.rungs] == ["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"]
    assert stick.rungs[0].kld < stick.rungs[-1].kld
    assert [e["ladder"] for e in data["leaderboard"]] == [stick.place(e["kld"]) for e in data["leaderboard"]]

    q8 = tmp_path / "q8.gguf"
    subprocess.run([str(llama_bin / "llama-quantize"), str(base), str(q8), "Q8_0"], check=True, capture_output=True)
    short = EvalOptions(
        llama_bin=llama_bin,
        text=work / f"short-text-{TINY_CHARS}.txt",
        ctx=TINY_CTX,
        threads=1,
        cache_dir=tmp_path / "fresh",
    )
    assert kl_divergence(q8, base, short).mean.value == pytest.approx(stick.rungs[0].kld, rel=1e-6, abs=1e-9)

    r = CliRunner().invoke(main, args, env=env)  # the text: a ladder column, from the cache
    assert r.exit_code == 0, r.output
    assert "on the base's ladder" in r.output and data["leaderboard"][0]["ladder"] in r.output


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HELLASWAG = SHARED / "hellaswag_val_full.txt"


@pytest.mark.slow
@pytest.mark.skipif(not HELLASWAG.is_file(), reason=f"{HELLASWAG} is absent (the shared test data)")
def test_leader_bench_adds_a_benchmark_to_the_leaders_full_eval(tiny: Path, tmp_path: Path, llama_bin: Path):
    """search --leader-bench hellaswag:FILE:N: the leaders' full eval scores N HellaSwag tasks
    (the accuracy llama-perplexity's own final line gives for the champion's file) paired with the
    base's, and the champion's lines show it with interval, test, power and verdict; a rerun with
    the benchmark gives a leader stored without it the full eval again."""
    space = tmp_path / "two.toml"
    space.write_text('name = "two"\n[[family]]\nop = "delete"\nblocks = "2-3"\n')
    env = {"GGUF_SURGEON_CACHE": str(tmp_path / "c"), "COLUMNS": "400"}
    args = ["search", str(tiny), "--space", str(space), "--work-dir", str(tmp_path / "w"), "--ctx", str(TINY_CTX)]
    args += ["--short-chars", str(TINY_CHARS), "--threads", "1", "--questions", "1", "--leaders", "1"]
    args += ["--llama-bin", str(llama_bin)]
    r = CliRunner().invoke(main, [*args, "--json"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["champion"]["full"]["benchmarks"] == []
    r = CliRunner().invoke(main, [*args, "--leader-bench", f"hellaswag:{HELLASWAG}:4"], env=env)
    assert r.exit_code == 0, r.output
    line = next(l.strip() for l in r.output.splitlines() if l.startswith("  HellaSwag accuracy: Δ "))
    assert re.search(
        r"\] (better|worse|equivalent|inconclusive) \(p [\d.e-]+; \d+ gained, \d+ lost of 4; detects ±", line
    )
    data = json.loads(
        CliRunner().invoke(main, [*args, "--leader-bench", f"hellaswag:{HELLASWAG}:4", "--json"], env=env).output
    )
    full = data["champion"]["full"]
    (bench,) = full["benchmarks"]
    assert full["benches"] == [f"hellaswag:{HELLASWAG}:4"] and (bench["label"], bench["tasks"]) == ("HellaSwag", 4)

    model = tmp_path / "champion.gguf"
    edit(tiny, model, data["champion"]["recipe"])
    # llama.cpp's own running accuracy after task 4 (its logger may drop the last lines at exit:
    # run again until the line is there, as gguf_surgeon.llama.perplexity does)
    for _ in range(6):
        own = subprocess.run(
            [str(llama_bin / "llama-perplexity"), "-m", str(model), "-c", "512", "-b", "512", "-t", "1", "--seed", "42"]
            + ["--hellaswag", "--hellaswag-tasks", "4", "-f", str(HELLASWAG)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if m := re.search(r"^4\t(\d+\.\d+)%", own.stdout + own.stderr, re.MULTILINE):
            break
    final = float(m.group(1))
    assert 100 * bench["correct"] / 4 == pytest.approx(final, abs=1e-3)

    METRICS.pop("hellaswag", None)  # registered by the eval above: other tests' tables list every metric
    r = CliRunner().invoke(main, ["search", str(tiny), "--leader-bench", "mc"], env=env)
    assert (
        r.exit_code == 1 and r.output.startswith("Error: --leader-bench mc: mc needs a file") and r.output[-1] == "\n"
    )


def test_a_study_continues_under_another_leader_cap(tiny: Path, tmp_path: Path):
    """The leader cap decides only who gets the full eval, so a space that differs in nothing
    else (or a preset whose default cap changed) continues the same study; another family does not."""
    options = tiny_options(tmp_path, use_rank=False)
    space = tmp_path / "s.toml"
    for leaders in (0, 5):
        space.write_text(f'name = "s"\nleaders = {leaders}\n[[family]]\nop = "delete"\n')
        assert create_or_load(tiny, load_space(str(space)), options).study_name == "tiny:s"
    space.write_text('name = "s"\n[[family]]\nop = "swap"\n')
    with pytest.raises(SearchError, match="made for another base or space .differs in: space"):
        create_or_load(tiny, load_space(str(space)), options)


# expert-count families (mixture-of-experts bases) ------------------------------------------------

MOE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-qwen3moe-q8_0.gguf"  # 6 blocks of 8 experts, 2 used


def _order(blocks: int, n_expert: int, reverse: bool = False) -> ExpertOrder:
    """A hand-made expert order: every block ranks its experts by index (or the reverse)."""
    one = tuple(range(n_expert))[:: -1 if reverse else 1]
    return ExpertOrder(n_expert, tuple(range(blocks)), {"saliency": (one,) * blocks})


def test_expert_families_counts_keys_and_refusals(tiny: Path, tmp_path: Path):
    space = tmp_path / "e.toml"
    space.write_text('name = "e"\n[[family]]\nop = "prune-experts"\nexperts = [6, 0.5]\n[[family]]\nop = "delete"\n')
    fam = load_space(str(space)).families[0]
    assert fam.experts == (6, 0.5) and expert_counts(fam, 8) == [6, 4]
    # shares round to a multiple of 32 where the model has 32 experts or more: 0.6 x 128 = 76.8 -> 64
    assert expert_counts(Family("prune-experts", experts=(0.75, 0.5, 0.6)), 128) == [96, 64]
    assert [m.label for m in ordered_moves(load_space(str(space)), 6, None, 8)][:3] == [
        "prune-experts 6",
        "delete 0",
        "prune-experts 4",
    ]
    assert [m.op for m in ordered_moves(load_space(str(space)), 6, None, 0)] == ["delete"] * 6
    assert Move.from_label("prune-experts 6") == Move("prune-experts", (), count=6)
    for text, message in (
        ('[[family]]\nop = "delete"\nexperts = [6]\n', "experts applies to op"),
        ('[[family]]\nop = "prune-experts"\nexperts = [6]\nblocks = "0-2"\n', "no blocks"),
        ('[[family]]\nop = "prune-experts"\nexperts = [0]\n', "experts must be expert counts"),
        ('[[family]]\nop = "prune-experts"\nexperts = [1.5]\n', "experts must be expert counts"),
        ('[[family]]\nop = "prune-experts"\n', "experts must be expert counts"),
    ):
        space.write_text(text)
        with pytest.raises(SearchError, match=message):
            load_space(str(space))

    # the plan key holds the kept experts: distinct prunings are distinct candidates
    by_index, reverse = _order(6, 8), _order(6, 8, reverse=True)
    p6 = compose([Move("prune-experts", (), count=6)], 6, by_index)
    assert p6.recipe == "prune-experts 6 --keep " + "/".join(["0-5"] * 6)
    assert p6.key == ",".join(f"{i}@0-5" for i in range(6))
    other = compose([Move("prune-experts", (), count=6)], 6, reverse)
    p4 = compose([Move("prune-experts", (), count=4)], 6, by_index)
    assert len({p6.key, other.key, p4.key}) == 3
    d_then_p = compose([Move("delete", (2,)), Move("prune-experts", (), count=6)], 6, by_index)
    p_then_d = compose([Move("prune-experts", (), count=6), Move("delete", (2,))], 6, by_index)
    assert d_then_p.key == p_then_d.key and d_then_p.blocks == 5 and d_then_p.recipe != p_then_d.recipe
    assert compose([Move("delete", (5,))], 6).key == "0,1,2,3,4"  # plans without pruning: keys as before
    assert compose([Move("prune-experts", (), count=4), Move("prune-experts", (), count=6)], 6, by_index) is None
    with pytest.raises(SearchError, match="no expert ranking"):
        compose([Move("prune-experts", (), count=6)], 6)

    # refusals, one Error: line, before the storage is touched
    work = tmp_path / "work"
    r = CliRunner().invoke(main, ["search", str(tiny), "--space", "experts", "--work-dir", str(work)])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: space 'experts' prunes experts") and "is a dense model" in r.output
    assert not work.exists()
    options = tiny_options(tmp_path, use_rank=False)
    for counts, message in (
        ("[8]", "has 8 experts per block; keep fewer"),
        ("[1]", "fewer experts than qwen3moe.expert_used_count = 2"),
    ):
        space.write_text(f'name = "e"\n[[family]]\nop = "prune-experts"\nexperts = {counts}\n')
        with pytest.raises(SearchError, match=message):
            create_or_load(MOE, load_space(str(space)), options)
    assert not work.exists()


def _kept_count(recipe: str) -> int:
    """The expert count a recipe leaves: its last prune-experts step's, else the base's 8."""
    counts = [int(s.split()[1]) for s in recipe.split("; ") if s.startswith("prune-experts ")]
    return counts[-1] if counts else 8


@pytest.mark.slow
def test_search_prunes_experts_and_releases_a_pruned_champion(tmp_path: Path, llama_bin: Path, gguf_loader):
    """A real search on the tiny qwen3moe: prune-experts of the asked counts composed with a
    deletion, the kept experts those the writer commands choose (REAP saliency), one score per
    distinct pruning; every candidate loads with its recipe's expert_count. Then an expert-only
    space judged by the full eval and the yardstick, its champion released and read back."""
    env = {"GGUF_SURGEON_CACHE": str(tmp_path / "c"), "COLUMNS": "400"}
    common = ["--ctx", str(TINY_CTX), "--short-chars", str(TINY_CHARS), "--threads", "1"]
    common += ["--llama-bin", str(llama_bin)]
    space = tmp_path / "moe.toml"
    space.write_text(
        'name = "moe"\nmax_steps = 2\n[[family]]\nop = "prune-experts"\nexperts = [6, 4]\n'
        '[[family]]\nop = "delete"\nblocks = "5"\n'
    )
    r = CliRunner().invoke(
        main,
        ["search", str(MOE), "--space", str(space), "--work-dir", str(tmp_path / "w1"), "--leaders", "0", "--json"]
        + common,
        env=env,
    )
    assert r.exit_code == 0, r.output
    board = json.loads(r.output)["leaderboard"]
    # what `plan` (the writer commands' own ranking) resolves each pruning to
    resolved = {}
    for text in ("prune-experts 6", "prune-experts 4", "delete 5; prune-experts 4", "prune-experts 6; delete 5"):
        p = CliRunner().invoke(main, ["plan", text, str(MOE), "--json"], env={"GGUF_SURGEON_LLAMA_BIN": str(llama_bin)})
        assert p.exit_code == 0, p.output
        resolved[text] = json.loads(p.output)["recipe"]
    # "prune-experts 6; prune-experts 4" keeps the top 4 of the top 6: the same plan as "prune-experts 4"
    assert sorted(e["recipe"] for e in board) == sorted([*resolved.values(), "delete 5"])
    assert len({e["key"] for e in board}) == len(board) == 5
    for e in board:
        out = tmp_path / "cand.gguf"
        edit(MOE, out, e["recipe"])
        assert gguf.GGUFReader(out).get_field("qwen3moe.expert_count").contents() == _kept_count(e["recipe"])
        assert gguf.GGUFReader(out).get_field("qwen3moe.block_count").contents() == e["blocks"]
        gguf_loader.assert_loads(out)
        out.unlink()

    # expert counts only (the preset's shares: 6 and 4 of 8): a leader's full eval, the yardstick, the release
    rel = tmp_path / "rel"
    args = ["search", str(MOE), "--space", "experts", "--work-dir", str(tmp_path / "w2"), "--leaders", "1"]
    args += ["--questions", "1", "--yardstick", "--export", str(rel), "--allow-requantize", "--json", *common]
    r = CliRunner().invoke(main, args, env=env)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert sorted(e["recipe"] for e in data["leaderboard"]) == sorted(
        [resolved["prune-experts 6"], resolved["prune-experts 4"]]
    )
    champ = data["champion"]
    assert champ["full"] and champ["full"]["verdict"] in ("better", "worse", "equivalent", "inconclusive")
    assert champ["full"]["ladder"] and all(e["ladder"] for e in data["leaderboard"])
    edited = Path(data["export"]["edited"])
    reader = gguf.GGUFReader(edited)
    assert reader.get_field("qwen3moe.expert_count").contents() == _kept_count(champ["recipe"]) < 8
    assert reader.get_field("surgery.recipe").contents() == champ["recipe"]
    gguf_loader.assert_loads(edited, *rel.glob("*-Q*.gguf"))


@pytest.mark.slow
def test_expert_families_are_sampled_by_tpe_in_worker_processes(tmp_path: Path, llama_bin: Path):
    """A combination space too large to enumerate: TPE in two worker processes, each given the
    study's stored expert order, builds prune-experts candidates with the lists the study's
    ranking gives (the same as composing with the stored order here)."""
    space = tmp_path / "t.toml"
    space.write_text(
        'name = "t"\nmax_steps = 2\nexhaustive_limit = 5\nleaders = 0\n'
        '[[family]]\nop = "prune-experts"\nexperts = [6, 4]\n[[family]]\nop = "delete"\n'
    )
    options = tiny_options(tmp_path, budget=4, jobs=2, llama_bin=llama_bin)
    result = run_search(MOE, load_space(str(space)), options)
    assert result.candidates is None and result.evaluated == 4
    assert {e.phase for e in result.leaderboard} == {"tpe"}
    ctx = create_or_load(MOE, load_space(str(space)), options)
    assert ctx.experts is not None and ctx.experts.n_expert == 8
    assert len({e.key for e in result.leaderboard}) == 4
    # the warm start is the first move of the space: its prune-experts family comes first
    assert any(e.recipe.startswith("prune-experts 6 --keep ") for e in result.leaderboard)
    for e in result.leaderboard:
        moves = [Move.from_label(label) for label in _moves_of(result, e)]
        assert compose(moves, 6, ctx.experts).recipe == e.recipe


def _moves_of(result, entry) -> list[str]:
    """The move labels the study stored for a leaderboard entry."""
    optuna = pytest.importorskip("optuna")
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    return next(t.user_attrs["moves"] for t in study.trials if t.number == entry.number)
