"""The metric registry: name -> Metric (weight in the overall score, direction, item kind,
how it is measured and paired with the base, comparison-table rows).

Scoring, the differences to the base with their verdicts, the report's weights and the
comparison table all iterate over METRICS, so a new metric is one `register(Metric(...))`
plus its per-item values (tests/test_eval.py registers one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import EvalError
from .records import (
    Answer,
    Continuation,
    Difference,
    Estimate,
    EvalReport,
    ModelInfo,
    ThinkingSample,
)
from .stats import Estimated, _Draws, _mean_reps, _nll_estimate, continuous_difference, paired_binary_difference

PPL_CEILING = 1000.0  # perplexity that scores 0; 1 scores 1; log scale in between
OVERALL = "overall score"  # the name of the overall score's difference (always first)
OVERALL_MARGIN = 3.0  # points of 100: a smaller change of the overall score counts as equivalent


@dataclass(frozen=True)
class Raw:
    """Per-item results of one model, the input of scoring."""

    info: ModelInfo
    answers: tuple[Answer, ...]
    chunk_nll: np.ndarray
    continuations: tuple[Continuation, ...]
    continuation_nll: tuple[float | None, ...]  # of each continuation under the base (with a base)
    self_nll: tuple[float | None, ...]  # of each continuation under the model itself
    thinking: tuple[ThinkingSample, ...]
    benches: dict[str, tuple[bool, ...]] = field(default_factory=dict)  # metric name -> per task


Pairing = Callable[[Raw, Raw, _Draws], tuple[Estimated | None, Estimated | None]]
"""pair(model raw, base raw, draws) -> (model's measure, base's measure), either None when absent."""


@dataclass(frozen=True)
class Row:
    """One row of the comparison table, rendered by report.comparison_table for each report.

    With `estimate`, a cell shows the report's Estimate as "value [low, high]" with `digits`
    (x100 with `pct`), or "—" where it is None; `text(report, shown)` rewrites that when
    given, and with `delta` the metric's difference to the first model follows. Without
    `estimate`, a cell is `text(report, "")`.
    """

    label: str
    estimate: Callable[[EvalReport], Estimate | None] | None = None
    digits: int = 2
    pct: bool = False
    delta: bool = False
    text: Callable[[EvalReport, str], str] | None = None


def _same(point: float, reps: np.ndarray) -> Estimated:
    return point, reps


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Metric:
    """One measure of a model.

    `items(raw)` gives one value per item of `kind` (the bootstrap resamples items of a kind,
    the same ones for a model and its base); the measure is `of_mean` of their mean and its
    replicates. A metric with a `weight` enters the overall score as `subscore(measure)` on a
    0-1 scale. With a base, the difference is `pair(...)` (default: each model's own measure)
    model minus base, judged by `higher_is_better`.
    """

    name: str  # key of the report's parts and weights
    label: str  # the name of its Difference to the base
    weight: float  # share of the overall score; 0: reported, not scored
    higher_is_better: bool
    kind: str  # the items it is measured over: question, chunk, prompt, thinking
    items: Callable[[Raw], Sequence[float]] | None = None  # None: measured only against a base (`pair`)
    of_mean: Callable[[float, np.ndarray], Estimated] = _same
    subscore: Callable[[Any], Any] = _identity  # float or replicate array -> 0-1 (higher is better)
    optional: bool = False  # a model without items has no value (else: the mean of nothing, NaN)
    pair: Pairing | None = None
    rows: tuple[Row, ...] = ()  # in the comparison table
    binary: bool = False  # items are 0/1 (right or wrong): compared by exact McNemar
    margin: Callable[[float], float] = lambda base: 0.0  # equivalence margin from the base's value
    primary: bool | None = None  # a significant loss makes the overall verdict worse (default: weighted)

    @property
    def is_primary(self) -> bool:
        return self.weight > 0 if self.primary is None else self.primary

    def measure(self, raw: Raw, draws: _Draws) -> Estimated | None:
        """The point value and bootstrap replicates of this model's measure, None when it has none."""
        if self.items is None:
            return None
        values = np.array(self.items(raw), float)
        if self.optional and not values.size:
            return None
        return self.of_mean(*_mean_reps(values, draws, self.kind))


METRICS: dict[str, Metric] = {}


def register(metric: Metric, *, replace: bool = False) -> Metric:
    """Add a metric to the registry (a name already taken needs replace=True); it is scored,
    compared and tabled after the ones registered before it."""
    if not metric.name.isidentifier():
        raise EvalError(f"metric name {metric.name!r} must be an identifier")
    if metric.name in METRICS and not replace:
        raise EvalError(f"metric {metric.name!r} is already registered")
    if not (metric.weight >= 0 and math.isfinite(metric.weight)):
        raise EvalError(f"metric {metric.name!r}: weight {metric.weight} must be finite and at least 0")
    METRICS[metric.name] = metric
    return metric


def weights() -> dict[str, float]:
    """Each scored metric's weight in the overall score (before renormalizing over the parts a model has)."""
    return {m.name: m.weight for m in METRICS.values() if m.weight}


# --- the suite's metrics ------------------------------------------------------------------


def ppl_subscore(ppl: np.ndarray | float) -> np.ndarray | float:
    """Perplexity on a 0-1 scale: 1 at PPL 1, 0 at PPL_CEILING and above, log-linear between."""
    return np.clip(1 - np.log(ppl) / math.log(PPL_CEILING), 0.0, 1.0)


def _exp(point: float, reps: np.ndarray) -> Estimated:
    return math.exp(point), np.exp(reps)


def _num(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v + 0.0:.{digits}f}"  # no "-0.0000"


def _mode(ok: bool | None, passed: int, total: int) -> str:
    return "n/a (no switch)" if ok is None else f"{'✅' if ok else '❌'} {passed}/{total}"


def _kld_median_p99(r: EvalReport, _: str) -> str:
    v = r.versus_base
    return "—" if not v else f"{_num(v.kld.median, 4)} / {_num(v.kld.p99, 4)}"


def _continuation_ppl(model: Raw, base: Raw, draws: _Draws) -> tuple[Estimated | None, Estimated | None]:
    """The base's perplexity of this model's continuations, against that of its own."""
    return _nll_estimate(model.continuation_nll, draws), _nll_estimate(base.self_nll, draws)


FACTUAL = Metric(
    "factual",
    "factual accuracy",
    0.40,
    True,
    "question",
    items=lambda raw: [a.correct for a in raw.answers],
    binary=True,
    margin=lambda base: 0.05,  # 5 points of accuracy
    rows=(
        Row(
            "Factual accuracy",
            lambda r: r.factual.accuracy,
            digits=0,
            pct=True,
            delta=True,
            text=lambda r, shown: f"{r.factual.correct}/{r.factual.total} ({shown}%)",
        ),
    ),
)
PERPLEXITY = Metric(
    "perplexity",
    "perplexity",
    0.20,
    False,
    "chunk",
    items=lambda raw: raw.chunk_nll,  # exp(mean NLL) over the chunks
    of_mean=_exp,
    subscore=ppl_subscore,
    margin=lambda base: 0.02 * base,  # 2% of the base's perplexity
    # the KL divergence to the first model is measured on the same text chunks
    rows=(
        Row("Perplexity", lambda r: r.perplexity.ppl, digits=2, delta=True),
        Row("KLD vs first (mean)", lambda r: r.versus_base.kld.mean if r.versus_base else None, digits=4),
        Row("KLD median / p99", text=_kld_median_p99),
        Row("Same top token %", lambda r: r.versus_base.kld.same_top if r.versus_base else None, digits=2),
    ),
)
COHERENCE = Metric(
    "coherence",
    "coherence",
    0.15,
    True,
    "prompt",
    items=lambda raw: [c.coherence for c in raw.continuations],
    margin=lambda base: 0.05,
    rows=(Row("Coherence", lambda r: r.generation.coherence, digits=3, delta=True),),
)
REPETITION = Metric(
    "repetition",
    "repetition",
    0.10,
    False,
    "prompt",
    items=lambda raw: [c.repetition for c in raw.continuations],
    subscore=lambda x: 1 - x,
    margin=lambda base: 0.05,
    rows=(Row("Repetition", lambda r: r.generation.repetition, digits=3, delta=True),),
)
THINKING = Metric(
    "thinking",
    "thinking checks",
    0.15,
    True,
    "thinking",
    items=lambda raw: [s.passed for s in raw.thinking],
    binary=True,
    margin=lambda base: 0.25,  # one check in four
    optional=True,  # only where the chat template has an enable_thinking switch
    rows=(
        Row(
            "Thinking mode",
            text=lambda r, _: _mode(r.thinking.thinking_ok, r.thinking.thinking_passed, r.thinking.per_mode),
        ),
        Row(
            "Non-thinking mode",
            text=lambda r, _: _mode(r.thinking.non_thinking_ok, r.thinking.non_thinking_passed, r.thinking.per_mode),
        ),
    ),
)
CONTINUATION = Metric(
    "continuation",
    "continuation perplexity under base",
    0.0,  # reported, not scored: the score must not need a base
    False,
    "prompt",
    pair=_continuation_ppl,
    margin=lambda base: 0.05 * base,
)

for _metric in (FACTUAL, PERPLEXITY, COHERENCE, REPETITION, THINKING, CONTINUATION):
    register(_metric)

BENCH_MARGIN = 0.03  # points of accuracy (3 of 100) within which a benchmark counts as equivalent


def _bench_row(name: str, label: str) -> Row:
    def result(r: EvalReport) -> Any:
        return next((b for b in r.benchmarks if b.name == name), None)

    return Row(
        f"{label} accuracy",
        lambda r: b.accuracy if (b := result(r)) else None,
        digits=1,
        pct=True,
        delta=True,
        text=lambda r, shown: f"{b.correct}/{b.tasks} ({shown}%)" if (b := result(r)) else shown,
    )


def benchmark_metric(name: str, label: str) -> Metric:
    """The metric of a benchmark (--bench), registered on first use: tasks right or wrong,
    paired per task with the base (exact McNemar), equivalent within ±BENCH_MARGIN; reported
    and primary (a significant loss makes the verdict worse) but outside the weighted score,
    so that overall scores stay comparable with and without benchmarks."""
    if name in METRICS:
        return METRICS[name]
    return register(
        Metric(
            name,
            f"{label} accuracy",
            0.0,
            True,
            f"bench:{name}",
            items=lambda raw: raw.benches.get(name, ()),
            binary=True,
            optional=True,
            margin=lambda base: BENCH_MARGIN,
            primary=True,
            rows=(_bench_row(name, label),),
        )
    )


# --- scoring and pairing ------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    report_parts: dict[str, float]  # metric -> 0-1 sub-score that entered the overall score
    overall: Estimated  # 0-100
    metrics: dict[str, Estimated]  # name -> (point, bootstrap replicates) of each measured metric


def score(raw: Raw, draws: _Draws) -> Scored:
    """Point values and bootstrap replicates of every metric and of the overall score:
    100 x sum(weight x subscore) / sum(weight) over the weighted metrics the model has."""
    measured: dict[str, Estimated] = {}
    for m in METRICS.values():
        v = m.measure(raw, draws)
        if v is not None:
            measured[m.name] = v
    sub = {
        m.name: (float(m.subscore(measured[m.name][0])), m.subscore(measured[m.name][1]))
        for m in METRICS.values()
        if m.weight and m.name in measured
    }
    w = {k: METRICS[k].weight for k in sub}
    wsum = sum(w.values())
    point = 100 * sum(w[k] * v[0] for k, v in sub.items()) / wsum
    reps = 100 * sum(w[k] * v[1] for k, v in sub.items()) / wsum
    return Scored({k: v[0] for k, v in sub.items()}, (point, reps), measured)


def paired(
    model: Raw, base: Raw, scored: Scored, base_scored: Scored, draws: _Draws
) -> dict[str, tuple[Estimated | None, Estimated | None]]:
    """Each metric's (model, base) measures, over the same items and draws."""
    return {
        m.name: m.pair(model, base, draws) if m.pair else (scored.metrics.get(m.name), base_scored.metrics.get(m.name))
        for m in METRICS.values()
    }


def differences(
    scored: Scored,
    base_scored: Scored,
    pairs: dict[str, tuple[Estimated | None, Estimated | None]],
    raw: Raw,
    base_raw: Raw,
) -> list[Difference]:
    """Model minus base with p-value, power and verdict: the overall score first, then each
    metric both have (items scored 0/1 by exact McNemar on the same items, the rest by the
    paired bootstrap)."""
    n_items = {m.kind: len(m.items(raw)) for m in METRICS.values() if m.items is not None}
    diffs = [
        continuous_difference(OVERALL, True, scored.overall, base_scored.overall, OVERALL_MARGIN, sum(n_items.values()))
    ]
    for m in METRICS.values():
        mv, bv = pairs[m.name]
        if mv is None or bv is None:
            continue
        margin = float(m.margin(bv[0]))
        if m.binary and m.items is not None:
            model_items, base_items = np.array(m.items(raw), float), np.array(m.items(base_raw), float)
            diffs.append(paired_binary_difference(m.label, m.higher_is_better, model_items, base_items, margin))
        else:
            diffs.append(continuous_difference(m.label, m.higher_is_better, mv, bv, margin, n_items.get(m.kind, 0)))
    return diffs


def overall_verdict(diffs: Sequence[Difference]) -> str:
    """worse when any primary measure is significantly worse, whatever the weighted score says;
    else the overall score's verdict, equivalent only when every primary measure is too."""
    primary = {m.label for m in METRICS.values() if m.is_primary}
    measures = [d for d in diffs[1:] if d.metric in primary]
    if any(d.verdict == "worse" for d in measures):
        return "worse"
    verdict = diffs[0].verdict
    if verdict == "equivalent" and not all(d.verdict == "equivalent" for d in measures):
        return "inconclusive"
    return verdict
