"""One search worker: takes trials from the study and scores them (heartbeats, retries of failed
and stale trials, the budget), in this process or in --jobs worker processes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import OutputError, SearchError, SurgeonError, ToolNotFoundError
from .moves import Candidate, compose
from .phases import Phase, beam_phase, first_phase, publish_phase, stored_phase
from .scorer import CandidateScorer
from .storage import (
    SearchEvent,
    SearchProgress,
    StudyContext,
    count_claimed,
    count_evaluated,
    load_optuna,
    open_storage,
    study_trials,
    worker_id,
)

MAX_REUSED_IN_A_ROW = 50  # TPE proposing only known candidates this often: the space is used up
POLL_S = 0.5  # waiting for other workers to finish a phase


class Worker:
    """Scores the trials of one study until its budget is spent or its phases are done: a grid
    phase's queued candidates, or TPE samples, then the beam phases built from the results."""

    def __init__(self, ctx: StudyContext, scorer: CandidateScorer, progress: SearchProgress | None):
        self.ctx = ctx
        self.scorer = scorer
        self.progress = progress or (lambda e: None)
        self.optuna = load_optuna()
        self.storage = open_storage(ctx.url)
        self.evaluated_now = 0
        self.id = worker_id()

    def study(self, phase: Phase) -> Any:
        o = self.optuna
        if phase.name == "tpe":
            n_startup = max(4, min(10, (self.ctx.options.budget or 40) // 4))
            sampler = o.samplers.TPESampler(seed=self.ctx.options.seed, n_startup_trials=n_startup)
        else:
            grid = {phase.param: [c.recipe for c in phase.candidates]}
            sampler = o.samplers.GridSampler(grid, seed=self.ctx.options.seed)
        return o.load_study(study_name=self.ctx.study_name, storage=self.storage, sampler=sampler)

    def run_one(self, study: Any, objective: Callable[[Any], float]) -> None:
        """Take one trial (a queued one first) and run it, as Study.optimize would: a heartbeat
        while it runs, PRUNED/FAIL/COMPLETE at the end, and any other exception re-raised
        after the trial is failed (so Ctrl-C loses only the running candidate)."""
        with self.claim_lock():
            self.optuna.storages.fail_stale_trials(study)
            trial = study.ask()
        try:
            from optuna.storages._heartbeat import get_heartbeat_thread
        except ImportError:  # pragma: no cover  (older or newer optuna: no heartbeat, same results)

            def get_heartbeat_thread(*_: Any) -> Any:
                return contextlib.nullcontext()

        with get_heartbeat_thread(trial._trial_id, self.storage):
            try:
                value = objective(trial)
            except self.optuna.TrialPruned:
                study.tell(trial, state=self.optuna.trial.TrialState.PRUNED)
                return
            except BaseException:
                study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                raise
        study.tell(trial, value)

    def claim_lock(self) -> Any:
        """Serialize taking a trial between the workers of a SQLite study. SQLite ignores the
        row lock Optuna asks for, so two processes could pop the same queued trial; a lock
        file next to the database (one machine) prevents it. Server databases lock rows."""
        if not self.ctx.url.startswith("sqlite:///"):
            return contextlib.nullcontext()
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (Windows: one worker per SQLite study)
            return contextlib.nullcontext()
        lock_path = Path(self.ctx.url.removeprefix("sqlite:///") + ".lock")

        @contextlib.contextmanager
        def locked() -> Iterator[None]:
            with open(lock_path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

        return locked()

    def budget_left(self, study: Any) -> bool:
        b = self.ctx.options.budget
        return b is None or count_claimed(study) < b

    def emit(self, kind: str, phase: str, recipe: str | None, study: Any, **detail: Any) -> None:
        done = count_evaluated(study) + (kind == "scored")  # the scored trial is told complete just after
        self.progress(SearchEvent(kind, phase, recipe, done, self.ctx.options.budget, detail))

    # grid phases: every candidate enqueued in order, workers pop them
    def enqueue_missing(self, study: Any, phase: Phase) -> None:
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

        while self.budget_left(study) and self.waiting(study):
            self.run_one(study, objective)

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
            cand = compose(moves, self.ctx.block_count) if moves else None
            if cand is None:
                trial.set_user_attr("phase", "tpe")
                raise self.optuna.TrialPruned("no applicable move")
            return self.score(study, trial, "tpe", cand)

        while self.budget_left(study) and reused_in_a_row < MAX_REUSED_IN_A_ROW:
            before = self.evaluated_now
            self.run_one(study, objective)
            reused_in_a_row = 0 if self.evaluated_now > before else reused_in_a_row + 1

    def score(self, study: Any, trial: Any, phase: str, cand: Candidate) -> float:
        trial.set_user_attr("phase", phase)
        trial.set_user_attr("recipe", cand.recipe)
        trial.set_user_attr("key", cand.key)
        trial.set_user_attr("moves", [m.label for m in cand.moves])
        trial.set_user_attr("blocks", cand.blocks)
        trial.set_user_attr("worker", self.id)
        for t in study_trials(study):
            if t.number == trial.number or t.user_attrs.get("key") != cand.key:
                continue
            if t.state.name == "COMPLETE" and t.user_attrs.get("evaluated"):
                for k in ("kld_low", "kld_high", "same_top"):
                    trial.set_user_attr(k, t.user_attrs.get(k))
                trial.set_user_attr("reused_from", t.number)
                self.emit("reused", phase, cand.recipe, study)
                return float(t.value)
            if t.state.name == "RUNNING" and t.user_attrs.get("scoring") and t.number < trial.number:
                raise self.optuna.TrialPruned(f"being scored by trial {t.number}")
        if not self.budget_left(study):
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
        for k, v in (
            ("kld_low", s.low),
            ("kld_high", s.high),
            ("same_top", s.same_top),
            ("seconds", s.seconds),
            ("evaluated", True),
        ):
            trial.set_user_attr(k, v)
        self.evaluated_now += 1
        self.emit("scored", phase, cand.recipe, study, kld=s.kld)
        return s.kld

    def wait_for_others(self, study: Any) -> None:
        """Block until no trial is RUNNING (other workers finishing the phase); stale ones are failed."""
        while True:
            self.optuna.storages.fail_stale_trials(study)
            if not any(t.state.name == "RUNNING" for t in study_trials(study)):
                return
            if self.waiting(study) and self.budget_left(study):
                return  # re-enqueued work: the caller goes round again
            self.progress(SearchEvent("waiting", "", None, count_evaluated(study), self.ctx.options.budget))
            time.sleep(POLL_S)

    def run(self) -> None:
        phase = first_phase(self.ctx)
        study = self.study(phase)
        if phase.name == "tpe":
            self.run_tpe(phase)
            return
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


def make_scorer(ctx: StudyContext) -> CandidateScorer:
    o = ctx.options
    threads = o.threads or max(1, (os.cpu_count() or 1) // max(1, o.jobs))
    return CandidateScorer(
        ctx.base,
        Path(o.work_dir),
        llama_bin=o.llama_bin,
        ctx=o.ctx,
        short_chars=o.short_chars,
        threads=threads,
        full_questions=o.full_questions,
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
        w.enqueue_missing(grid_study, publish_phase(grid_study, phase))
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
            now = count_evaluated(study)
            if progress and now != seen:
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
