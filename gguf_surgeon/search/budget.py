"""search --target-size: layer plans and per-tensor types chosen together, as a Pareto front.

A multi-objective Optuna study (file size, KL divergence to the base), each trial one candidate
surgery of the space (or none) and one file-byte budget between a lower size and the target:
- the candidate's sensitivity is the base's, inherited tensor by tensor
  (budget.sensitivity.inherited_sensitivity: the base is measured once, each edit only gets its
  menu of weight errors), so a deleted block's bytes go to the tensors that buy most quality;
- the allocated mix is written with llama-quantize and its KLD to the **base** measured on the
  calibration text: that is what the study optimizes (TPE, multi-objective);
- when the trials are done, every point of the study's front is rebuilt from its stored mix and
  measured on the held-out text, with the base's uniform llama-quantize types (Q3_K_M, Q4_K_M,
  Q5_K_M) as reference rows: the table, the comparisons and the plot are held-out numbers only.

The study lives in SQLite in the work folder by default (or --storage): a rerun continues it and
never measures a finished trial again; the first trials are the base at the smallest and largest
budget and at the uniform types' sizes, so each comparison with a uniform type has the allocated
base at its size.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..budget.allocate import allocate
from ..budget.menu import CANDIDATES, least_tensor_bytes
from ..budget.sensitivity import (
    Sensitivity,
    bundled_texts,
    edit_sources,
    inherited_sensitivity,
    measure_sensitivity,
    text_options,
)
from ..edit import EditOptions, edit
from ..errors import OptionError, SearchError
from ..evaluation.cache import EvalCache
from ..evaluation.records import Estimate
from ..evaluation.runner import kl_divergence
from ..evaluation.suite import DEFAULT_OPTIONS, EvalOptions
from ..files import format_size
from ..llama.quantize import output_path, quantize_ladder, quantize_mix, requantize_warning
from ..reader import Model
from ..records import Record
from .storage import load_optuna, open_storage, redact_url

UNIFORM = ("Q3_K_M", "Q4_K_M", "Q5_K_M")  # the base's uniform mixes drawn as reference rows
BUDGET_VERSION = 1  # part of the study's identity: bump when a trial's meaning changes
IDENTITY_WORDS = {  # the study identity's keys as a user knows them, for the error of a rerun that differs
    "version": "the study format", "base_sha256": "BASE", "choices": "the surgeries of --space", "low": "--min-size",
    "limit": "--target-size", "calibration": "the calibration text", "name": "the release name",
    "candidates": "the candidate types", "ctx": "the context size",
}  # fmt: skip
LOW_SHARE = 0.8  # default smallest budget: this share of the target
FrontProgress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass(frozen=True)
class FrontPoint(Record):
    """One measured file: a point of the study's front, or a uniform type of the base."""

    label: str  # "no surgery @ 93.5 MB", "delete 16 @ 90.1 MB", "uniform Q4_K_M"
    recipe: str | None  # None for a uniform row; "" for the base itself
    budget: int | None  # the file-byte budget the mix was allocated under (None: uniform)
    size: int  # file bytes, read from the written file
    bits_per_weight: float
    kld: Estimate  # KL(base || file) on the held-out text, 95% interval over chunks
    search_kld: float | None  # the study's objective: mean KLD on the calibration text
    predicted_kld: float | None  # the allocation's predicted quantization KLD (calibration text)
    on_front: bool  # among the rows: no other is at most as large and as far, and better in one
    trial: int | None  # the study's trial number
    types: dict[str, str] | None = None  # tensor -> requested type (a --tensor-type-file's lines)


@dataclass(frozen=True)
class Comparison(Record):
    """A uniform type of the base against the best front point no larger than it."""

    uniform: str
    size: int
    kld: Estimate
    point: str | None  # the front point's label; None when no point is that small
    point_size: int | None
    point_kld: Estimate | None
    ratio: float | None  # point KLD / uniform KLD
    beats: bool  # the point's interval lies wholly below the uniform type's


@dataclass(frozen=True)
class BudgetFront(Record):
    base: Path
    target: str  # as given, e.g. "112M"
    limit: int  # the largest budget (file bytes)
    low: int  # the smallest budget
    study_name: str
    storage: str  # redacted URL
    trials: int  # finished trials in the study
    trials_now: int  # of which this run measured
    refused: int  # trials whose budget the candidate could not meet (no file written)
    candidates: int  # surgeries the study chooses among, the base included
    points: tuple[FrontPoint, ...]  # the study's front by size, then the uniform rows
    comparisons: tuple[Comparison, ...]
    kld_text: str  # the held-out text
    seconds: float

    def point(self, number: int) -> FrontPoint:
        """Front point `number` as the table numbers them (1 = the smallest file)."""
        front = [p for p in self.points if p.recipe is not None]
        if not 1 <= number <= len(front):
            raise OptionError(f"--point {number}: the front has points 1 to {len(front)}")
        return front[number - 1]


def pareto(points: Sequence[tuple[int, float]]) -> list[bool]:
    """For each (size, kld): whether no other point is at most as large and as far, and better in one."""
    return [
        not any(s2 <= s and k2 <= k and (s2 < s or k2 < k) for j, (s2, k2) in enumerate(points) if j != i)
        for i, (s, k) in enumerate(points)
    ]


def compare(points: Sequence[FrontPoint]) -> tuple[Comparison, ...]:
    """Each uniform row against the front point with the least held-out KLD no larger than it."""
    front = [p for p in points if p.recipe is not None]
    out = []
    for u in (p for p in points if p.recipe is None):
        fits = [p for p in front if p.size <= u.size]
        best = min(fits, key=lambda p: p.kld.value) if fits else None
        out.append(
            Comparison(
                u.label.removeprefix("uniform "),
                u.size,
                u.kld,
                best.label if best else None,
                best.size if best else None,
                best.kld if best else None,
                best.kld.value / u.kld.value if best and u.kld.value > 0 else None,
                bool(best and best.kld.high < u.kld.low),
            )
        )
    return tuple(out)


def point_label(recipe: str, budget: int) -> str:
    return f"{recipe or 'no surgery'} @ {format_size(budget)}"


class _Candidates:
    """Edited files of the study's surgeries in the work folder, each with its inherited sensitivity."""

    def __init__(self, base: Path, sens: Sensitivity, work: Path, name: str, options: EvalOptions, **kw: Any):
        self.base, self.sens, self.work, self.name, self.options, self.kw = base, sens, work, name, options, kw
        self._made: dict[str, tuple[Path, Sensitivity]] = {}

    def get(self, recipe: str) -> tuple[Path, Sensitivity]:
        if not recipe:
            return self.base, self.sens
        if recipe not in self._made:
            path = self.work / f"candidate-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.gguf"
            edit(self.base, path, recipe, EditOptions(name=self.name, overwrite=True))
            sens = inherited_sensitivity(
                self.sens, path, edit_sources(self.base, recipe), options=self.options, **self.kw
            )
            self._made[recipe] = (path, sens)
        return self._made[recipe]

    def remove(self) -> None:
        for path, _ in self._made.values():
            path.unlink(missing_ok=True)
        self._made.clear()


def budget_study(
    base: str | Path,
    recipes: Sequence[str],
    *,
    limit: int,
    low: int | None = None,
    trials: int = 20,
    work_dir: str | Path = "gguf-surgeon-search",
    storage: str | None = None,
    study_name: str | None = None,
    name: str | None = None,
    target_label: str | None = None,
    uniform: Sequence[str] = UNIFORM,
    options: EvalOptions = DEFAULT_OPTIONS,
    calibration: str | None = None,
    held_out: str | None = None,
    allow_requantize: bool = False,
    seed: int = 0,
    enqueue: Sequence[tuple[str, int]] = (),
    progress: FrontProgress | None = None,
) -> BudgetFront:
    """Run (or continue) the study until it holds `trials` finished trials, then measure its front
    on the held-out text against the base's `uniform` types (module docstring). `recipes` are the
    surgeries besides none; budgets are drawn between `low` (default LOW_SHARE x `limit`) and
    `limit` file bytes, a new study's first trials being the base at `low`, `limit` and the uniform
    types' sizes, then the (recipe, budget) pairs of `enqueue`; candidates are written with general.name `name` (the release's, so an
    export of a point rebuilds the same mix). Raises OptionError for impossible settings,
    SearchError for a study of another search, and llama.cpp's errors."""
    optuna = load_optuna()
    base, work = Path(base), Path(work_dir)
    low = int(LOW_SHARE * limit) if low is None else low
    if not 0 < low <= limit:
        raise OptionError(f"the smallest budget ({format_size(low)}) must be positive and at most the target")
    if any(r not in recipes and r or not low <= b <= limit for r, b in enqueue):
        raise OptionError(f"enqueued trials {list(enqueue)}: each must be one of the surgeries, within the budgets")
    step = progress or (lambda s, d, n: None)
    start = time.monotonic()
    calibration = bundled_texts()[0] if calibration is None else calibration
    held_name = "the held-out text given" if held_out is not None else "the held-out part of the bundled eval text"
    held_out = bundled_texts()[1] if held_out is None else held_out
    choices = ["", *dict.fromkeys(recipes)]
    _refuse_before_work(base, choices, limit, allow_requantize)
    store = open_storage(storage) if storage else None  # a bad --storage: refused before the work folder exists
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"{work}: cannot create the work folder: {e.strerror or e}") from None
    url = storage or f"sqlite:///{(work / 'budget-study.db').resolve()}"
    cache = EvalCache(options.cache_dir, options.use_cache)
    try:
        sha = cache.file_sha256([base])
    finally:
        cache.close()
    identity = {
        "version": BUDGET_VERSION, "base_sha256": sha, "choices": choices,
        "low": low, "limit": limit, "calibration": hashlib.sha256(calibration.encode()).hexdigest(),
        "name": name, "candidates": list(CANDIDATES), "ctx": options.ctx,
    }  # fmt: skip
    study_name = study_name or f"{base.stem}-budget-{format_size(limit).replace(' ', '')}"
    store = store or open_storage(url)
    study = optuna.create_study(
        storage=store,
        study_name=study_name,
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.TPESampler(seed=seed),
        load_if_exists=True,
    )
    held = study.user_attrs.get("identity")
    if len(study.directions) != 2 or (held is None and study.trials):  # e.g. a KLD search's study of that name
        raise SearchError(
            f"study {study_name!r} in {redact_url(url)} is not a budget search; pass another --study-name"
        )
    if held is None:
        study.set_user_attr("identity", identity)
    elif held != identity:
        differ = ", ".join(IDENTITY_WORDS.get(k, k) for k in identity if held.get(k) != identity[k])
        raise SearchError(
            f"study {study_name!r} in {redact_url(url)} holds another budget search (not the same: {differ}); "
            "pass another --study-name or --work-dir"
        )
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def finished() -> list[Any]:
        return study.get_trials(deepcopy=False, states=done_states)

    step("the base's sensitivity", 0, 1)
    sens = measure_sensitivity(
        base, calibration=calibration, options=options, allow_requantize=allow_requantize,
        progress=lambda s, d, n: step(f"the base's sensitivity: {s}", d, n or 1),
    )  # fmt: skip
    candidates = _Candidates(base, sens, work, name or base.stem, options, allow_requantize=allow_requantize)
    rows: list[FrontPoint] = []
    now = 0
    try:
        kld_dir = work / "texts"
        kld_dir.mkdir(exist_ok=True)
        search_opts = text_options(options, calibration, kld_dir)
        held_opts = text_options(options, held_out, kld_dir)
        step("the base's uniform types", 0, len(uniform))
        ladder = (
            quantize_ladder(
                base, tuple(uniform), work, name="uniform", allow_requantize=allow_requantize,
                llama_bin=options.llama_bin, threads=options.threads, force=True,
            ).results
            if uniform
            else []
        )  # fmt: skip
        if not study.trials:  # a new study starts at the base under the uniform types' sizes
            for size in sorted({r.size for r in ladder if low <= r.size <= limit} | {low, limit}):
                study.enqueue_trial({"recipe": "", "budget": size})
            for recipe, size in enqueue:
                study.enqueue_trial({"recipe": recipe, "budget": size})
        while len(finished()) < trials:
            step("trials (edit, allocate, llama-quantize, KLD on the calibration text)", len(finished()), trials)
            trial = study.ask()
            try:
                values = _trial(trial, choices, low, limit, candidates, base, work, search_opts, allow_requantize)
            except BaseException:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            if values is None:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, values)
            now += 1
        step("trials (edit, allocate, llama-quantize, KLD on the calibration text)", trials, trials)
        best = sorted(study.best_trials, key=lambda t: (t.values[0], t.values[1]))
        for i, t in enumerate(best):
            step("the front on the held-out text", i, len(best))
            a = t.user_attrs
            path, _ = candidates.get(a["recipe"])
            mix = work / "front-point.gguf"
            report = quantize_mix(
                path, mix, a["types"], base_type="Q8_0", allow_requantize=allow_requantize, force=True,
                llama_bin=options.llama_bin, threads=options.threads,
            )  # fmt: skip
            r = report.results[0]
            if r.size != a["size"]:
                raise SearchError(f"trial {t.number} rebuilt as {r.size} bytes, not the {a['size']} it measured")
            kld = kl_divergence(mix, base, held_opts).mean
            mix.unlink()
            rows.append(
                FrontPoint(
                    point_label(a["recipe"], a["budget"]), a["recipe"], a["budget"], r.size, r.bits_per_weight,
                    kld, t.values[1], a["predicted_kld"], False, t.number, a["types"],
                )
            )  # fmt: skip
        for r in ladder:
            step("the base's uniform types on the held-out text", 0, 1)
            kld = kl_divergence(r.path, base, held_opts).mean
            rows.append(
                FrontPoint(f"uniform {r.type}", None, None, r.size, r.bits_per_weight, kld, None, None, False, None)
            )
            r.path.unlink(missing_ok=True)
    finally:  # also on an error or a signal: nothing but the study is left in the work folder
        candidates.remove()
        shutil.rmtree(work / "texts", ignore_errors=True)
        for path in (
            work / "trial.gguf",
            work / "front-point.gguf",
            *(output_path(work, "uniform", t) for t in uniform),
        ):
            path.unlink(missing_ok=True)
    on = pareto([(p.size, p.kld.value) for p in rows])
    points = tuple(replace(p, on_front=f) for p, f in zip(rows, on))
    all_done = finished()
    return BudgetFront(
        base, target_label or format_size(limit), limit, low, study_name, redact_url(url),
        sum(t.state == optuna.trial.TrialState.COMPLETE for t in all_done), now,
        sum(t.state == optuna.trial.TrialState.PRUNED for t in all_done), len(choices),
        points, compare(points), held_name, time.monotonic() - start,
    )  # fmt: skip


def _refuse_before_work(base: Path, choices: Sequence[str], limit: int, allow_requantize: bool) -> None:
    """A quantized base without `allow_requantize`, or a target below the smallest mix of every
    candidate (no trial could write a file), refused before the work folder or the study exist."""
    from ..edit import plan_for
    from ..surgery import plan_surgery

    with Model(base) as m:
        requantize_warning(base, m, allow_requantize)
        least = {}
        for recipe in choices:
            tensors = plan_surgery(m, plan_for(m, recipe), force=True).tensors if recipe else m.tensors
            least[recipe] = least_tensor_bytes((t.name, t.shape, t.n_bytes) for t in tensors)
    smallest = min(least, key=least.__getitem__)
    if least[smallest] > limit:
        raise OptionError(
            f"{base}: the smallest mix of any candidate ({smallest or 'no surgery'}) takes "
            f"{format_size(least[smallest])} of tensors, over the target of {format_size(limit)}"
        )


def _trial(
    trial: Any,
    choices: Sequence[str],
    low: int,
    limit: int,
    candidates: _Candidates,
    base: Path,
    work: Path,
    kld_options: EvalOptions,
    allow_requantize: bool,
) -> tuple[int, float] | None:
    """One trial: (file size, KLD on the calibration text), or None when the candidate cannot meet
    the budget drawn (recorded as the trial's `refused`)."""
    recipe = trial.suggest_categorical("recipe", list(choices))
    budget = trial.suggest_int("budget", low, limit)
    path, sens = candidates.get(recipe)
    try:
        a = allocate(sens, budget)
    except OptionError as e:
        trial.set_user_attr("refused", str(e))
        return None
    mix = work / "trial.gguf"
    report = quantize_mix(
        path, mix, a.requested, base_type="Q8_0", allow_requantize=allow_requantize, force=True,
        llama_bin=kld_options.llama_bin, threads=kld_options.threads,
    )  # fmt: skip
    r = report.results[0]
    kld = kl_divergence(mix, base, kld_options).mean
    mix.unlink()
    for k, v in {
        "recipe": recipe, "budget": budget, "size": r.size, "bits_per_weight": r.bits_per_weight,
        "predicted_kld": a.predicted_kld, "kld_low": kld.low, "kld_high": kld.high, "types": a.requested,
    }.items():  # fmt: skip
        trial.set_user_attr(k, v)
    return r.size, kld.value


def plot_front(front: BudgetFront, out: str | Path) -> Path:
    """A PNG of held-out KLD against file size: the study's front as a line with intervals, the
    base's uniform types as labelled reference points."""
    from ..analysis.plot import pyplot, save_figure

    plt = pyplot(OptionError)
    fig, ax = plt.subplots(figsize=(8, 5))
    pts = [p for p in front.points if p.recipe is not None]
    uni = [p for p in front.points if p.recipe is None]
    for group, style, label in ((pts, "o-", "study front (allocated mixes)"), (uni, "s", "uniform llama-quantize")):
        if not group:
            continue
        x = [p.size / 1e6 for p in group]
        y = [p.kld.value for p in group]
        err = [[p.kld.value - p.kld.low for p in group], [p.kld.high - p.kld.value for p in group]]
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=label)
    for p in uni:
        ax.annotate(p.label.removeprefix("uniform "), (p.size / 1e6, p.kld.value), textcoords="offset points",
                    xytext=(6, 4))  # fmt: skip
    for i, p in enumerate(pts, 1):
        if p.recipe:
            ax.annotate(f"{i}: {p.recipe}", (p.size / 1e6, p.kld.value), textcoords="offset points", xytext=(6, -10),
                        fontsize=7)  # fmt: skip
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("KL divergence to the base (nats/token)")
    ax.set_title(
        f"{front.base.name}: budgets {format_size(front.low)} – {front.target}, {front.trials} trials\n"
        f"KLD on {front.kld_text}",
        fontsize=10,
    )
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, Path(out), OptionError)
