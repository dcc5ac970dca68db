"""One search worker: takes trials from the study and scores them (heartbeats, retries of failed
and stale trials, the budget), in this process or in --jobs worker processes."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import OutputError, SearchError, SurgeonError, ToolNotFoundError
from .moves import Candidate, compose
from .phases import Phase, beam_phase, first_phase, publish_phase, stored_phase
from .scorer import CandidateScorer
from .storage import (
    SearchEvent,
    SearchOptions,
    SearchProgress,
    StudyContext,
    count_claimed,
    count_evaluated,
    is_connection_error,
    load_optuna,
    notice,
    open_storage,
    set_user_attrs,
    study_lock,
    study_trials,
    timing,
    worker_id,
)

MAX_REUSED_IN_A_ROW = 50  # TPE proposing only known candidates this often: the space is used up
POLL_S = 0.5  # waiting for other workers to finish a phase


class Heartbeat:
    """While a trial runs: its heartbeat in the storage every interval, from a thread. A beat
    that cannot reach the database is skipped (the grace period is several beats long)."""

    def __init__(self, storage: Any, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def beat(self) -> None:
        once = getattr(self.storage, "record_heartbeat_once", None)
        try:
            if once is not None:
                once(self.trial_id)
            else:
                self.storage.record_heartbeat(self.trial_id)
        except Exception as e:
            if not is_connection_error(e):  # SQLite busy or a server away: a missed beat
                raise

    def loop(self) -> None:
        while not self.stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self.beat()
            self.thread = threading.Thread(target=self.loop, name=f"heartbeat-{self.trial_id}", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


class Worker:
    """Scores the trials of one study until its budget is spent or its phases are done: a grid
    phase's queued candidates, or TPE samples, then the beam phases built from the results."""

    def __init__(self, ctx: StudyContext, scorer: CandidateScorer, progress: SearchProgress | None):
        self.ctx = ctx
        self.scorer = scorer
        self.progress = progress
        self.stale_checked = -math.inf
        self.check_every = min(5.0, timing(ctx.options).heartbeat_s)
        self.optuna = load_optuna()
        self.storage = open_storage(ctx.url, ctx.options, wait=True)
        self.evaluated_now = 0
        self.id = worker_id()

    def study(self, phase: Phase) -> Any:
        o = self.optuna
        if phase.name == "tpe":
            n_startup = max(4, min(10, (self.ctx.options.budget or 40) // 4))
            sampler = o.samplers.TPESampler(seed=self.ctx.options.seed, n_startup_trials=n_startup)
        else:
            # grid phases only run enqueued trials, whose fixed parameters any sampler keeps; a
            # GridSampler would read the whole study again after every trial
            sampler = o.samplers.RandomSampler(seed=self.ctx.options.seed)
        return o.load_study(study_name=self.ctx.study_name, storage=self.storage, sampler=sampler)

    def run_one(self, study: Any, objective: Callable[[Any], float], queued_only: bool = False) -> bool:
        """Take one trial (a queued one first) and run it, as Study.optimize would: a heartbeat
        while it runs, PRUNED/FAIL/COMPLETE at the end, and any other exception re-raised
        after the trial is failed (so Ctrl-C loses only the running candidate). A trial that
        the other workers failed meanwhile (this worker was cut off from the database for
        longer than the grace period) is left to them: it is scored again. With `queued_only`
        (grid phases) a trial is taken only from the queue, and only while the budget lasts:
        False when there is none to take."""
        o = self.optuna
        with self.claim_lock():
            self.fail_stale(study)
            if queued_only:
                trials = study_trials(study)
                if not any(t.state.name == "WAITING" for t in trials) or not self.budget_left(study, trials):
                    return False
            trial = study.ask()
        finished = o.exceptions.UpdateFinishedTrialError
        state, value = o.trial.TrialState.COMPLETE, None
        with Heartbeat(self.storage, trial._trial_id):
            try:
                trial.set_user_attr("worker", self.id)
                value = objective(trial)
            except o.TrialPruned:
                state = o.trial.TrialState.PRUNED
            except finished:
                self.taken_over(trial)
                return True
            except BaseException:
                with contextlib.suppress(finished):
                    study.tell(trial, state=o.trial.TrialState.FAIL, skip_if_finished=True)
                raise
        try:
            told = study.tell(
                trial, value if state == o.trial.TrialState.COMPLETE else None, state=state, skip_if_finished=True
            )
        except finished:
            self.taken_over(trial)
            return True
        if told.state != state:
            self.taken_over(trial)
        return True

    def taken_over(self, trial: Any) -> None:
        recipe = trial.user_attrs.get("recipe") or trial.params.get("candidate") or f"trial {trial.number}"
        notice(
            f"search ({self.id}): {recipe} was failed by the other workers while this one could not reach "
            "the database for longer than the grace period; it is scored again"
        )

    def claim_lock(self) -> Any:
        """Serialize taking a trial, checking the budget and enqueueing between all the workers of
        the study: an advisory lock on PostgreSQL; a lock file next to a SQLite database (one
        machine), as SQLite ignores the row locks Optuna asks for."""
        return study_lock(self.ctx.url, self.storage, "claim:" + self.ctx.study_name)

    def fail_stale(self, study: Any, force: bool = False) -> None:
        """Fail the trials of dead workers (heartbeat older than the grace period); looked for at
        most every few seconds, which is often enough against a grace period of many seconds."""
        if force or time.monotonic() - self.stale_checked >= self.check_every:
            self.optuna.storages.fail_stale_trials(study)
            self.stale_checked = time.monotonic()

    def budget_left(self, study: Any, trials: Any = None) -> bool:
        b = self.ctx.options.budget
        return b is None or count_claimed(study, trials) < b

    def emit(self, kind: str, phase: str, recipe: str | None, study: Any, **detail: Any) -> None:
        if self.progress is None:
            return
        done = count_evaluated(study) + (kind == "scored")  # the scored trial is told complete just after
        self.progress(SearchEvent(kind, phase, recipe, done, self.ctx.options.budget, detail))

    # grid phases: every candidate enqueued in order, workers pop them
    def enqueue_missing(self, study: Any, phase: Phase) -> None:
        with self.claim_lock():  # two hosts starting together enqueue the phase once
            self._enqueue_missing(study, phase)

    def _enqueue_missing(self, study: Any, phase: Phase) -> None:
        taken = set()
        for t in study_trials(study):
            # a PRUNED trial is settled only when its candidate is broken; one pruned as a
            # duplicate or at the budget's end may still need scoring
            if t.state.name in ("COMPLETE", "RUNNING", "WAITING") or (
                t.state.name == "PRUNED" and "error" in t.user_attrs
            ):
                # a WAITING trial has its value only in fixed_params until a worker takes it
                taken.add(t.system_attrs.get("fixed_params", t.params).get(phase.param))
                taken.add(t.user_attrs.get("recipe"))
        for c in phase.candidates:
            if c.recipe not in taken:  # FAIL (Ctrl-C, dead worker) or never tried: (re)enqueue
                study.enqueue_trial({phase.param: c.recipe}, user_attrs={"phase": phase.name})

    def waiting(self, study: Any) -> int:
        return sum(1 for t in study_trials(study, (self.optuna.trial.TrialState.WAITING,)))

    def run_grid(self, phase: Phase) -> None:
        study = self.study(phase)
        self.enqueue_missing(study, phase)
        self.emit("phase", phase.name, None, study, candidates=len(phase.candidates))

        def objective(trial: Any) -> float:
            # a queued trial names its phase: another worker may already have enqueued the next one
            name = trial.user_attrs.get("phase", phase.name)
            ph = phase if name == phase.name else stored_phase(study, name)
            if ph is None:
                raise SearchError(f"study {self.ctx.study_name!r}: trial {trial.number} of unknown phase {name!r}")
            recipe = trial.suggest_categorical(ph.param, [c.recipe for c in ph.candidates])
            return self.score(study, trial, ph.name, ph.candidate(recipe))

        while self.run_one(study, objective, queued_only=True):
            pass

    # a sampled phase: TPE over step1..stepK, each a move or "none"
    def run_tpe(self, phase: Phase) -> None:
        study = self.study(phase)
        labels = [m.label for m in self.ctx.moves] + ["none"]
        by_label = {m.label: m for m in self.ctx.moves}
        self.emit("phase", phase.name, None, study, candidates=None)
        reused_in_a_row = 0
        if not any(t.user_attrs.get("phase") == "tpe" for t in study_trials(study)):
            # warm start: the best-ranked single moves first
            for m in self.ctx.moves[: max(1, min(5, (self.ctx.options.budget or 20) // 4))]:
                params = {f"step{i + 1}": (m.label if i == 0 else "none") for i in range(self.ctx.space.max_steps)}
                study.enqueue_trial(params, user_attrs={"phase": "tpe"}, skip_if_exists=True)

        def objective(trial: Any) -> float:
            picked = [trial.suggest_categorical(f"step{i + 1}", labels) for i in range(self.ctx.space.max_steps)]
            moves = [by_label[p] for p in picked if p != "none"]
            cand = compose(moves, self.ctx.block_count, self.ctx.experts) if moves else None
            if cand is None:
                trial.set_user_attr("phase", "tpe")
                raise self.optuna.TrialPruned("no applicable move")
            return self.score(study, trial, "tpe", cand)

        while self.budget_left(study) and reused_in_a_row < MAX_REUSED_IN_A_ROW:
            before = self.evaluated_now
            self.run_one(study, objective)
            reused_in_a_row = 0 if self.evaluated_now > before else reused_in_a_row + 1

    def score(self, study: Any, trial: Any, phase: str, cand: Candidate) -> float:
        set_user_attrs(
            trial,
            {
                "phase": phase,
                "recipe": cand.recipe,
                "key": cand.key,
                "moves": [m.label for m in cand.moves],
                "blocks": cand.blocks,
            },
        )
        with self.claim_lock():  # the budget and duplicates are checked and claimed by one worker at a time
            trials = study_trials(study)
            for t in trials:
                if t.number == trial.number or t.user_attrs.get("key") != cand.key:
                    continue
                if t.state.name == "COMPLETE" and t.user_attrs.get("evaluated"):
                    kept = {k: t.user_attrs.get(k) for k in ("kld_low", "kld_high", "same_top")}
                    set_user_attrs(trial, {**kept, "reused_from": t.number})
                    self.emit("reused", phase, cand.recipe, study)
                    return float(t.value)
                if t.state.name == "RUNNING" and t.user_attrs.get("scoring"):
                    raise self.optuna.TrialPruned(f"being scored by trial {t.number}")
            if not self.budget_left(study, trials):
                raise self.optuna.TrialPruned("budget reached")
            trial.set_user_attr("scoring", True)
        try:
            # the file name is unique per candidate: evaluate memoizes hashes by path, size and mtime
            s = self.scorer.short(cand.recipe, f"{trial.number}-{hashlib.sha256(cand.key.encode()).hexdigest()[:12]}")
        except SurgeonError as e:
            if isinstance(e, (OutputError, ToolNotFoundError)):
                raise  # the machine's fault (disk full, missing tool), not the candidate's: a rerun retries it
            trial.set_user_attr("error", str(e))  # this candidate is broken (NaN logits): never retried
            raise self.optuna.TrialPruned(str(e)) from None
        set_user_attrs(
            trial,
            {"kld_low": s.low, "kld_high": s.high, "same_top": s.same_top, "seconds": s.seconds, "evaluated": True},
        )
        self.evaluated_now += 1
        self.emit("scored", phase, cand.recipe, study, kld=s.kld)
        return s.kld

    def wait_for_others(self, study: Any) -> None:
        """Block until no trial is RUNNING (other workers finishing the phase); stale ones are failed."""
        while True:
            self.fail_stale(study)
            trials = study_trials(study)
            if not any(t.state.name == "RUNNING" for t in trials):
                return
            if any(t.state.name == "WAITING" for t in trials) and self.budget_left(study, trials):
                return  # re-enqueued work: the caller goes round again
            if self.progress is not None:
                self.progress(SearchEvent("waiting", "", None, count_evaluated(study), self.ctx.options.budget))
            time.sleep(POLL_S)

    def run(self) -> None:
        phase = first_phase(self.ctx)
        study = self.study(phase)
        if phase.name == "tpe":
            self.run_tpe(phase)
            return
        with self.claim_lock():
            phase = publish_phase(study, phase)
        while True:
            self.run_grid(phase)
            if not self.budget_left(study):
                return
            self.wait_for_others(study)
            if self.waiting(study):
                continue  # a stale trial was failed and re-enqueued
            failed = [
                t for t in study_trials(study) if t.state.name == "FAIL" and t.user_attrs.get("phase") == phase.name
            ]
            if failed and self.retry_failed(study, phase):
                continue
            depth = int(phase.name[4:]) + 1 if phase.name.startswith("beam") else 2
            if self.ctx.space.beam_width < 1 or depth > self.ctx.space.beam_depth or phase.name == "combos":
                return
            nxt = beam_phase(self.ctx, study, depth, phase.name if phase.name.startswith("beam") else "singles")
            if nxt is None:
                return
            with self.claim_lock():
                phase = publish_phase(study, nxt)

    def retry_failed(self, study: Any, phase: Phase) -> bool:
        before = self.waiting(study)
        self.enqueue_missing(study, phase)
        return self.waiting(study) > before


def worker_main(ctx: StudyContext, barrier: Any | None) -> None:
    """Entry point of a --jobs worker process."""
    if barrier is not None:
        barrier.wait(timeout=300)  # start together: each takes its share from the first candidate on
    scorer = make_scorer(ctx)
    with contextlib.suppress(KeyboardInterrupt):  # the trial is already failed; the parent reports
        Worker(ctx, scorer, None).run()


def worker_threads(options: SearchOptions) -> int:
    """llama.cpp threads of each worker (and of the leaders' full eval): the option, else the
    cores shared by the jobs."""
    return options.threads or max(1, (os.cpu_count() or 1) // max(1, options.jobs))


def make_scorer(ctx: StudyContext) -> CandidateScorer:
    o = ctx.options
    threads = worker_threads(o)
    return CandidateScorer(
        ctx.base,
        Path(o.work_dir),
        llama_bin=o.llama_bin,
        ctx=o.ctx,
        short_chars=o.short_chars,
        threads=threads,
        full_questions=o.full_questions,
        yardstick=o.yardstick,
        benches=o.leader_benches,
        keep=o.keep,
        cache_dir=o.cache_dir,
    )


def run_processes(ctx: StudyContext, study: Any, progress: SearchProgress | None) -> None:
    import multiprocessing

    mp = multiprocessing.get_context("spawn")  # no inherited database connections or threads
    # the first phase's queue is filled once, here, before the workers race for it
    w = Worker(ctx, CandidateScorer(ctx.base, Path(ctx.options.work_dir)), None)
    phase = first_phase(ctx)
    if phase.name != "tpe":
        grid_study = w.study(phase)
        with w.claim_lock():
            phase = publish_phase(grid_study, phase)
        w.enqueue_missing(grid_study, phase)
    barrier = mp.Barrier(ctx.options.jobs)
    procs = [
        mp.Process(target=worker_main, args=(ctx, barrier), name=f"gguf-surgeon-search-{i}")
        for i in range(ctx.options.jobs)
    ]
    for p in procs:
        p.start()
    seen = count_evaluated(study)
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(POLL_S)
            if progress is None:
                continue
            now = count_evaluated(study)
            if now != seen:
                seen = now
                progress(SearchEvent("scored", "workers", None, now, ctx.options.budget))
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise SearchError(
            f"{len(bad)} of {len(procs)} search workers failed (exit status {bad[0]}); "
            "rerun to continue: finished results are kept"
        )
