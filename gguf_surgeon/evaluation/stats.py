"""Bootstrap statistics: paired index draws per item kind, percentile intervals, and the
verdict on a difference (better, worse, or not distinguishable when its interval holds 0)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

from .records import Difference, Estimate

CONFIDENCE = 0.95
VERDICTS = ("better", "worse", "not distinguishable")

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


def _verdict(delta: Estimate, higher_is_better: bool) -> str:
    if not (math.isfinite(delta.low) and math.isfinite(delta.high)) or delta.low <= 0 <= delta.high:
        return "not distinguishable"
    up = delta.low > 0
    return "better" if up == higher_is_better else "worse"


def _difference(metric: str, higher_is_better: bool, model: Estimated, base: Estimated) -> Difference:
    """Model minus base, paired draw by draw, with its verdict."""
    d = _interval(model[0] - base[0], model[1] - base[1])
    return Difference(metric, higher_is_better, d, _verdict(d, higher_is_better))
