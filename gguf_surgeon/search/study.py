"""Find the best surgery automatically: spaces of candidate edits, an Optuna study, staged scoring.

    result = run_search("base.gguf", load_space("phase1"), SearchOptions(budget=60))
    result.champion.recipe      # "delete 10; swap 11 12"

How it works:
- A **space** (a preset or a TOML file) lists families of *moves*: single deletions, adjacent
  swaps, duplications, bridges, interpolations, windows of n blocks deleted or repeated,
  expert counts of a mixture-of-experts base (ranked once per study by REAP saliency). A
  move names blocks of the *base* model, so moves compose: ``delete 10`` then ``swap 12 13``
  (base indices) becomes the recipe ``delete 10; swap 11 12``. Candidates that give the same
  layer plan are one candidate.
- **Guided**: `rank` scores (Block Influence, angular distance, or ablation KLD when given)
  order every family, most promising first, and `prune` drops the least promising.
- **Engine**: one Optuna study holds everything, in SQLite by default (or any --storage URL:
  PostgreSQL/MySQL for many machines). Exhaustive spaces are brute force: every candidate is
  enqueued in rank order and workers take them one at a time; combination spaces too large
  for that are sampled with TPE over "step1..stepK" choices. The best candidates are then
  combined (beam search; width 1 is greedy), phase after phase.
- **Staged**: every candidate gets the KL divergence to the base on a short text
  (llama-perplexity through gguf_surgeon.evaluate, base logits cached by hash); only the
  leaders get the full eval suite, whose overall score picks the champion and gives the
  verdict against the base.
- **Resumable**: each result is stored when it finishes. A rerun re-enqueues what is missing
  or failed (Ctrl-C fails the running trial) and never re-evaluates a finished candidate.
  Candidate files live in the work folder only while they are scored, unless `keep`.

The parts: `moves` (moves, families, candidates), `space` (spaces and presets), `order`
(candidates in rank order), `scorer` (the KLD and full-eval stages), `storage` (options, the
Optuna storage and study), `phases` (grid and beam phases), `worker` (the trial loop, in this
process or --jobs processes); this module runs the whole search and gives the leaderboard.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import SearchError
from .phases import PHASE_ATTR, first_phase, scored_trials
from .scorer import CandidateScorer
from .space import SearchSpace
from .storage import (
    SearchEvent,
    SearchOptions,
    SearchProgress,
    StudyContext,
    count_evaluated,
    create_or_load,
    load_optuna,
    open_storage,
    redact_url,
    study_trials,
    worker_host,
)
from .worker import Worker, make_scorer, run_processes


@dataclass(frozen=True)
class Entry:
    """One scored candidate of the leaderboard."""

    number: int  # Optuna trial number
    recipe: str
    key: str
    phase: str
    blocks: int
    kld: float
    kld_low: float
    kld_high: float
    same_top: float
    worker: str
    full: dict | None  # stage-2 summary (score, delta, verdict, factual, ...) for leaders
    ladder: str | None = None  # the KLD placed on the base's quantization ladder (search --yardstick)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchResult:
    study_name: str
    storage: str
    base: str
    space: str
    budget: int | None
    evaluated: int  # candidates scored (stage 1) in the whole study
    evaluated_now: int  # of those, by this run
    candidates: int | None  # size of the exhaustive space (None: sampled with TPE)
    leaderboard: tuple[Entry, ...]  # best first
    champion: Entry | None
    verdict: str  # the champion against the base, in words
    seconds: float
    interrupted: bool = False
    leaders: Leaders | None = None  # who got the full eval (None: the run stopped before stage 2)

    def to_dict(self) -> dict:
        return {
            "study_name": self.study_name,
            "storage": self.storage,
            "base": self.base,
            "space": self.space,
            "budget": self.budget,
            "evaluated": self.evaluated,
            "evaluated_now": self.evaluated_now,
            "candidates": self.candidates,
            "seconds": round(self.seconds, 2),
            "interrupted": self.interrupted,
            "champion": self.champion.to_dict() if self.champion else None,
            "verdict": self.verdict,
            "measures": champion_measures(self.champion),
            "leaders": self.leaders.to_dict() if self.leaders else None,
            "leaderboard": [e.to_dict() for e in self.leaderboard],
        }


def full_attr(key: str) -> str:
    """The study attribute holding the full eval of the candidate with this plan key."""
    return "full:" + hashlib.sha256(key.encode()).hexdigest()[:20]


YARDSTICK_ATTR = "yardstick"  # study attribute: the base's ladder on the short text (search --yardstick)


def leaderboard(study: Any) -> list[Entry]:
    """Every scored candidate, best (lowest KLD) first, with its place on the base's
    quantization ladder when the study has one."""
    from ..evaluation.yardstick import Yardstick

    out = []
    fulls = study.user_attrs
    stick = Yardstick.from_dict(fulls[YARDSTICK_ATTR]) if YARDSTICK_ATTR in fulls else None
    for t in scored_trials(study):
        a = t.user_attrs
        out.append(
            Entry(
                t.number,
                a["recipe"],
                a["key"],
                a.get("phase", "?"),
                a.get("blocks", 0),
                float(t.value),
                a.get("kld_low", math.nan),
                a.get("kld_high", math.nan),
                a.get("same_top", math.nan),
                a.get("worker", "?"),
                fulls.get(full_attr(a["key"])),
                stick.place(float(t.value)) if stick else None,
            )
        )
    return out


def pick_champion(entries: Sequence[Entry]) -> Entry | None:
    """The best overall score among leaders with a full eval (lower KLD breaks ties), else the
    lowest KLD."""
    full = [e for e in entries if e.full]
    if full:
        return max(full, key=lambda e: (e.full["score"][0], -e.kld))
    return entries[0] if entries else None


VERDICT_WORDS = {
    "better": "better than the base",
    "worse": "worse than the base",
    "equivalent": "equivalent to the base within the margins",
    "inconclusive": "inconclusive against the base",
}


def verdict_text(champion: Entry | None) -> str:
    """The champion's verdict against the base in one line, with the overall score's interval."""
    if champion is None:
        return "no candidate scored yet"
    if not champion.full:
        return (
            f"KL divergence {champion.kld:.4f} nats/token to the base on the short text; "
            "no full eval yet (leaders = 0 or budget spent): no verdict"
        )
    f = champion.full
    s, b, d = f["score"], f["base_score"], f["delta"]
    return (
        f"{VERDICT_WORDS.get(f['verdict'], f['verdict'])}: overall score {s[0]:.1f} [{s[1]:.1f}, {s[2]:.1f}] "
        f"vs {b[0]:.1f} [{b[1]:.1f}, {b[2]:.1f}] (Δ {d[0]:+.1f}, 95% interval [{d[1]:+.1f}, {d[2]:+.1f}])"
    )


def champion_measures(champion: Entry | None) -> list[str]:
    """Each measure of the champion's full eval against the base: its difference with the
    interval, the test, the smallest detectable difference and the verdict (none without a
    full eval)."""
    from ..evaluation.records import Difference
    from ..evaluation.report import measure_lines

    if champion is None or not champion.full or "differences" not in champion.full:
        return []
    f = champion.full
    lines = measure_lines([Difference.from_dict(d) for d in f["differences"]])
    if f.get("ladder"):
        k = f["kld"]
        lines.append(f"KL divergence {k[0]:.4f} [{k[1]:.4f}, {k[2]:.4f}] nats/token costs {f['ladder']}")
    return lines


def overlaps(a: Entry, b: Entry) -> bool:
    """Whether the short-KLD 95% intervals of two candidates overlap (an unknown bound cannot
    set them apart)."""
    return not (a.kld_high < b.kld_low or b.kld_high < a.kld_low)


@dataclass(frozen=True)
class Leaders:
    """Who gets the full eval: every candidate whose short-KLD interval overlaps the best
    one's (the short stage cannot tell them apart), best first, at most `cap`."""

    cap: int
    overlapping: tuple[str, ...]  # recipes whose interval overlaps the best one's, best first
    chosen: tuple[str, ...]  # the first `cap` of them

    @property
    def left_out(self) -> int:
        """Overlapping candidates the cap kept from the full eval."""
        return len(self.overlapping) - len(self.chosen)

    def to_dict(self) -> dict:
        return {"cap": self.cap, "overlapping": list(self.overlapping), "chosen": list(self.chosen)}


def choose_leaders(entries: Sequence[Entry], cap: int) -> Leaders:
    """The leaders of a leaderboard (best first): the candidates whose interval overlaps the
    best one's, at most `cap` of them; none with a cap of 0."""
    if not entries:
        return Leaders(cap, (), ())
    overlapping = tuple(e.recipe for e in entries if overlaps(e, entries[0]))
    return Leaders(cap, overlapping, overlapping[:cap])


def leader_cap(ctx: StudyContext) -> int:
    return ctx.options.leaders if ctx.options.leaders is not None else ctx.space.leaders


def run_leaders(ctx: StudyContext, scorer: CandidateScorer, study: Any, progress: SearchProgress | None) -> Leaders:
    """Stage 2: the full eval suite for the leaders that lack it (stored in the study, so a
    rerun does not repeat it)."""
    entries = leaderboard(study)
    leaders = choose_leaders(entries, leader_cap(ctx))
    chosen = set(leaders.chosen)
    wanted = {str(b) for b in ctx.options.leader_benches}
    for e in entries:
        if e.recipe not in chosen or (e.full and wanted <= set(e.full.get("benches", ()))):
            continue  # a full eval already stored, with every benchmark asked for
        if progress:
            progress(SearchEvent("full", e.phase, e.recipe, count_evaluated(study), ctx.options.budget))
        summary = scorer.full(e.recipe, f"full-{e.number}-{hashlib.sha256(e.key.encode()).hexdigest()[:12]}")
        study.set_user_attr(full_attr(e.key), summary)  # a finished trial cannot take new attributes
    return leaders


def run_search(
    base: str | Path,
    space: SearchSpace,
    options: SearchOptions | None = None,
    progress: SearchProgress | None = None,
    *,
    scorer: CandidateScorer | None = None,
    ranking: Any | None = None,
) -> SearchResult:
    """Search `space` on `base` until the budget is spent or the space is exhausted, then give
    the leaders the full eval and name a champion.

    With `options.jobs` > 1, that many worker processes share the study; with one, the search
    runs in this process (`scorer` may replace the default CandidateScorer there). A
    KeyboardInterrupt propagates after the running candidate is failed (a rerun retries it).
    Raises SearchError (space, storage, study of another base), and the evaluator's errors.
    """
    start = time.monotonic()
    options = options or SearchOptions()
    base = Path(base)
    if options.jobs < 1:
        raise SearchError(f"--jobs {options.jobs}: must be at least 1")
    if options.budget is not None and options.budget < 1:
        raise SearchError(f"--budget {options.budget}: must be at least 1")
    ctx = create_or_load(base, space, options, ranking)
    first = first_phase(ctx)
    if first.name == "tpe" and options.budget is None:
        raise SearchError(
            f"space {space.name!r} has more than {space.exhaustive_limit} combinations and is sampled "
            "with TPE: pass --budget"
        )
    scorer = scorer or make_scorer(ctx)
    scorer.prepare()
    optuna = load_optuna()
    study = optuna.load_study(study_name=ctx.study_name, storage=open_storage(ctx.url, options))
    before = count_evaluated(study)
    interrupted = False
    try:
        if options.jobs == 1:
            Worker(ctx, scorer, progress).run()
        else:
            run_processes(ctx, study, progress)
        if options.yardstick:
            study.set_user_attr(YARDSTICK_ATTR, scorer.short_yardstick().to_dict())
        leaders = run_leaders(ctx, scorer, study, progress)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if interrupted:
            _cleanup(scorer)
    entries = leaderboard(study)
    champion = pick_champion(entries)
    total = count_evaluated(study)
    return SearchResult(
        ctx.study_name,
        redact_url(ctx.url),
        str(base),
        space.name,
        options.budget,
        total,
        total - before,
        len(first.candidates) if first.candidates else None,
        tuple(entries),
        champion,
        verdict_text(champion),
        time.monotonic() - start,
        leaders=leaders,
    )


def _cleanup(scorer: CandidateScorer) -> None:
    if not scorer.keep and scorer.candidates_dir.is_dir():
        for p in scorer.candidates_dir.glob("candidate-*.gguf"):
            p.unlink(missing_ok=True)


def _load_study(storage: str, study_name: str | None) -> Any:
    optuna = load_optuna()
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise SearchError(f"no search database at {storage.removeprefix('sqlite:///')} (pass --storage or --work-dir)")
    st = open_storage(storage)
    if study_name is None:
        names = sorted(s.study_name for s in st.get_all_studies())
        if len(names) != 1:
            which = (
                f"{len(names)} studies ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
                if names
                else "no study"
            )
            raise SearchError(f"{redact_url(storage)} holds {which}: pass --study-name")
        study_name = names[0]
    try:
        return optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        raise SearchError(f"no study {study_name!r} in {redact_url(storage)}") from None


def search_status(storage: str, study_name: str | None) -> list[Entry]:
    """The leaderboard of an existing study, without running anything."""
    return leaderboard(_load_study(storage, study_name))


@dataclass(frozen=True)
class HostProgress:
    """What one worker host did in a study (host = the part of the worker id before its pid)."""

    host: str
    workers: int  # worker processes seen
    done: int  # candidates scored (stage 1)
    running: int
    failed: int  # trials that failed there: killed, interrupted, cut off from the database
    retried: int  # of `done`, candidates that had failed before (here or on another host)
    reused: int  # duplicates answered from an earlier result
    rate: float | None  # candidates per minute, from its first start to its last finish
    last: str | None  # when it finished its last candidate (its own clock, ISO)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StudyProgress:
    """The progress of a study over all hosts, for `search status`."""

    study_name: str
    storage: str  # password hidden
    candidates: int | None  # in the grid phases published so far (None: sampled with TPE)
    budget: int | None  # of the latest run that gave one
    evaluated: int
    running: int
    waiting: int  # queued candidates no worker has taken yet
    failed: int
    remaining: int | None
    rate: float | None  # candidates per minute of the hosts running now
    eta_s: float | None
    hosts: tuple[HostProgress, ...]
    leaderboard: tuple[Entry, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hosts"] = [h.to_dict() for h in self.hosts]
        d["leaderboard"] = [e.to_dict() for e in self.leaderboard]
        return d


def study_progress(storage: str, study_name: str | None = None) -> StudyProgress:
    """Done, running, failed, retried, rate and ETA per worker host, read from the study."""
    study = _load_study(storage, study_name)
    trials = study_trials(study)
    attrs = study.user_attrs

    def recipe_of(t: Any) -> str | None:
        return t.user_attrs.get("recipe") or t.system_attrs.get("fixed_params", t.params).get("candidate")

    def scored(t: Any) -> bool:
        return t.state.name == "COMPLETE" and bool(t.user_attrs.get("evaluated"))

    first_fail: dict[str, int] = {}
    for t in trials:
        r = recipe_of(t)
        if t.state.name == "FAIL" and r is not None:
            first_fail.setdefault(r, t.number)
    by_host: dict[str, list[Any]] = {}
    for t in trials:
        if "worker" in t.user_attrs or t.state.name != "WAITING":
            by_host.setdefault(worker_host(t.user_attrs.get("worker")), []).append(t)
    hosts = []
    for host, ts in sorted(by_host.items()):
        done = [t for t in ts if scored(t)]
        rate = None
        stamps = [(t.datetime_start, t.datetime_complete) for t in done if t.datetime_start and t.datetime_complete]
        if stamps:
            span = (max(c for _, c in stamps) - min(s for s, _ in stamps)).total_seconds()
            rate = len(stamps) / span * 60 if span > 0 else None
        hosts.append(
            HostProgress(
                host,
                len({t.user_attrs["worker"] for t in ts if "worker" in t.user_attrs}),
                len(done),
                sum(t.state.name == "RUNNING" for t in ts),
                sum(t.state.name == "FAIL" for t in ts),
                sum(1 for t in done if first_fail.get(recipe_of(t), t.number) < t.number),
                sum(t.state.name == "COMPLETE" and not t.user_attrs.get("evaluated") for t in ts),
                rate,
                max(c for _, c in stamps).isoformat(timespec="seconds") if stamps else None,
            )
        )
    evaluated = sum(scored(t) for t in trials)
    phases = [v for k, v in attrs.items() if k.startswith(PHASE_ATTR)]
    candidates = sum(len(v["candidates"]) for v in phases) if phases else None
    settled = {t.user_attrs.get("key") for t in trials if scored(t) or "error" in t.user_attrs}
    remaining = None
    if phases:
        remaining = sum(1 for v in phases for c in v["candidates"] if c[2] not in settled)
    budget = attrs.get("budget")
    if budget is not None:
        remaining = max(0, budget - evaluated) if remaining is None else min(remaining, max(0, budget - evaluated))
    active = [h.rate for h in hosts if h.running and h.rate]
    rate = sum(active) if active else None
    eta = remaining / rate * 60 if remaining is not None and rate else (0.0 if remaining == 0 else None)
    return StudyProgress(
        study.study_name,
        redact_url(storage),
        candidates,
        budget,
        evaluated,
        sum(t.state.name == "RUNNING" for t in trials),
        sum(t.state.name == "WAITING" for t in trials),
        sum(t.state.name == "FAIL" for t in trials),
        remaining,
        rate,
        eta,
        tuple(hosts),
        tuple(leaderboard(study)),
    )
