"""Paired statistics: bootstrap index draws per item kind and percentile intervals; for items
scored right or wrong, the exact McNemar test on the discordant pairs with its conditional
(Clopper-Pearson) interval; the smallest difference a measure could detect (80% power, 5%
two-sided); and the verdict: better, worse, equivalent (the interval inside the margin) or
inconclusive (neither)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

from .records import Difference, Estimate

CONFIDENCE = 0.95
VERDICTS = ("better", "worse", "equivalent", "inconclusive")
Z_TWO_SIDED = 1.959963984540054  # normal quantile for 5% two-sided
Z_POWER = 0.8416212335729143  # normal quantile for 80% power

Estimated = tuple[float, np.ndarray]
"""A measure's point value and its bootstrap replicates (one per draw)."""


class _Draws:
    """Bootstrap index draws per item kind, shared by a model and its base (paired); each
    kind's draws depend only on (seed, kind, item count), not on the order of use."""

    def __init__(self, seed: int, samples: int):
        self.seed = seed
        self.samples = samples
        self._by_kind: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, kind: str, n: int) -> np.ndarray:
        if (kind, n) not in self._by_kind:
            rng = np.random.default_rng([self.seed, zlib.crc32(kind.encode()), n])
            self._by_kind[(kind, n)] = (
                rng.integers(0, n, size=(self.samples, n)) if n else np.zeros((self.samples, 0), int)
            )
        return self._by_kind[(kind, n)]


def _interval(point: float, reps: np.ndarray) -> Estimate:
    """The point value with the CONFIDENCE percentile interval of its replicates."""
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return Estimate(point, float("nan"), float("nan"))
    a = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    return Estimate(float(point), float(min(lo, point)), float(max(hi, point)))


def _mean_reps(values: np.ndarray, draws: _Draws, kind: str) -> Estimated:
    """The mean of per-item values and its replicates over the draws of `kind`."""
    if values.size == 0:
        return float("nan"), np.full(draws.samples, np.nan)
    return float(values.mean()), values[draws(kind, values.size)].mean(axis=1)


def _nll_estimate(values: Sequence[float | None], draws: _Draws) -> Estimated | None:
    """exp(mean NLL) over prompts with a value; None when none has one."""
    arr = np.array([np.nan if v is None else v for v in values], float)
    if not np.isfinite(arr).any():
        return None
    vals = arr[draws("prompt", arr.size)]
    ok = np.isfinite(vals)
    counts = ok.sum(axis=1)
    reps = np.where(counts > 0, np.where(ok, vals, 0.0).sum(axis=1) / np.maximum(counts, 1), np.nan)
    return math.exp(float(arr[np.isfinite(arr)].mean())), np.exp(reps)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact enough for n up to 10^5)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion k/n."""
    a = (1 - confidence) / 2

    def solve(f, lo: float = 0.0, hi: float = 1.0) -> float:  # f decreasing in p
        for _ in range(60):
            mid = (lo + hi) / 2
            if f(mid) > a:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if k == 0 else 1 - solve(lambda q: binom_cdf(n - k, n, q))  # P(X >= k | p) = a
    high = 1.0 if k == n else solve(lambda p: binom_cdf(k, n, p))  # P(X <= k | p) = a
    return low, high


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: the discordant pairs against a fair coin."""
    m = gained + lost
    return 1.0 if m == 0 else min(1.0, 2 * binom_cdf(min(gained, lost), m, 0.5))


def binary_difference(model: np.ndarray, base: np.ndarray) -> tuple[Estimate, int, int, float]:
    """(difference in proportion right with its exact conditional interval, items only the model
    got right, items only the base got right, exact McNemar p) for paired 0/1 items."""
    n = model.size
    gained = int(np.sum((model > 0.5) & (base <= 0.5)))
    lost = int(np.sum((model <= 0.5) & (base > 0.5)))
    m = gained + lost
    point = (gained - lost) / n if n else float("nan")
    if m == 0:
        return Estimate(point, point, point), 0, 0, 1.0
    lo, hi = clopper_pearson(gained, m)  # of the share of discordant pairs the model wins
    return Estimate(point, m / n * (2 * lo - 1), m / n * (2 * hi - 1)), gained, lost, mcnemar_p(gained, lost)


def detectable_binary(n: int, discordant: int) -> float:
    """The smallest difference in proportion right that n paired items detect with 80% power
    at 5% two-sided, at the observed discordance (Connor's McNemar sample size, solved for d;
    at least one discordant pair is assumed so that a perfect match still states a limit)."""
    if n == 0:
        return float("nan")
    psi = max(discordant, 1) / n
    lo, hi = 0.0, 1.0
    for _ in range(60):
        d = (lo + hi) / 2
        need = (Z_TWO_SIDED * math.sqrt(psi) + Z_POWER * math.sqrt(max(psi - d * d, 0.0))) ** 2 / (d * d)
        if need > n:
            lo = d
        else:
            hi = d
    return hi


def detectable_continuous(reps: np.ndarray) -> float:
    """The smallest difference detected with 80% power at 5% two-sided, from the spread of the
    paired bootstrap replicates of the difference (normal approximation)."""
    reps = reps[np.isfinite(reps)]
    return float((Z_TWO_SIDED + Z_POWER) * reps.std()) if reps.size else float("nan")


def bootstrap_p(reps: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference: twice the share of replicates on the far
    side of 0 (1 when every replicate is 0)."""
    reps = reps[np.isfinite(reps)]
    if not reps.size or not reps.any():
        return 1.0
    far = min(np.mean(reps <= 0), np.mean(reps >= 0))
    return float(min(1.0, max(2 * far, 1 / reps.size)))


def judge(delta: Estimate, p_value: float, higher_is_better: bool, margin: float) -> str:
    """better or worse when the difference is significant (p below 5%, the interval excluding
    0); equivalent when its interval lies inside ±margin; inconclusive otherwise."""
    finite = math.isfinite(delta.low) and math.isfinite(delta.high)
    if finite and p_value < 1 - CONFIDENCE and not delta.low <= 0 <= delta.high:
        return "better" if (delta.value > 0) == higher_is_better else "worse"
    if finite and -margin <= delta.low and delta.high <= margin:
        return "equivalent"
    return "inconclusive"


def continuous_difference(
    metric: str, higher_is_better: bool, model: Estimated, base: Estimated, margin: float, items: int
) -> Difference:
    """Model minus base, paired draw by draw (bootstrap), with p-value, power and verdict."""
    reps = model[1] - base[1]
    d = _interval(model[0] - base[0], reps)
    p = bootstrap_p(reps)
    return Difference(
        metric,
        higher_is_better,
        d,
        judge(d, p, higher_is_better, margin),
        items,
        None,
        p,
        detectable_continuous(reps),
        margin,
    )


def paired_binary_difference(
    metric: str, higher_is_better: bool, model: np.ndarray, base: np.ndarray, margin: float
) -> Difference:
    """Model minus base on items scored 0/1: exact McNemar on the discordant pairs."""
    d, gained, lost, p = binary_difference(model, base)
    return Difference(
        metric,
        higher_is_better,
        d,
        judge(d, p, higher_is_better, margin),
        int(model.size),
        (gained, lost),
        p,
        detectable_binary(int(model.size), gained + lost),
        margin,
    )
