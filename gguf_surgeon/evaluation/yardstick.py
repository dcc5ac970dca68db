"""A KLD yardstick users understand: the base's own quantization ladder (Q8_0 ... Q2_K made by
llama-quantize), each rung's KL divergence to the base measured once per base and cached, so any
model's KLD can be placed on it ("costs about as much as Q3_K_M").

For a quantized base only the rungs with fewer bits per weight than the base apply (a Q8_0 made
from a Q4_1 base is the base again, not a measure of anything)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..llama.quantize import QuantResult, measure, quantize_ladder, quantized_tensor
from ..reader import Model
from ..records import Record
from .cache import EvalCache, cache_key
from .runner import identify, kl_divergence
from .suite import DEFAULT_OPTIONS, SUITE_VERSION, EvalOptions, default_cache_dir, load_suite

LADDER = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")
NEAR = 1.5  # within this factor of a rung's KLD: "about as much as" that rung


@dataclass(frozen=True)
class Rung(Record):
    type: str
    kld: float  # mean KL(base || rung) per token, nats
    bits_per_weight: float
    size: int


@dataclass(frozen=True)
class Yardstick(Record):
    base_sha256: str
    base_bits_per_weight: float
    rungs: tuple[Rung, ...]  # in LADDER order (KLD growing)

    @staticmethod
    def from_dict(data: dict) -> Yardstick:
        """The inverse of to_dict()."""
        return Yardstick(data["base_sha256"], data["base_bits_per_weight"], tuple(Rung(**r) for r in data["rungs"]))

    def place(self, kld: float) -> str:
        """Where a KLD lies on the ladder, in words."""
        rungs = sorted(self.rungs, key=lambda r: r.kld)
        if not rungs or not math.isfinite(kld):
            return "no yardstick"
        near = min(rungs, key=lambda r: abs(math.log(max(kld, 1e-9) / max(r.kld, 1e-9))))
        if max(kld, near.kld) <= NEAR * max(min(kld, near.kld), 1e-9):
            return f"about as much as {near.type} ({near.kld:.4f})"
        if kld < rungs[0].kld:
            return f"less than {rungs[0].type} ({rungs[0].kld:.4f})"
        if kld > rungs[-1].kld:
            return f"more than {rungs[-1].type} ({rungs[-1].kld:.4f})"
        lo = max((r for r in rungs if r.kld <= kld), key=lambda r: r.kld)
        hi = min((r for r in rungs if r.kld >= kld), key=lambda r: r.kld)
        return f"between {lo.type} ({lo.kld:.4f}) and {hi.type} ({hi.kld:.4f})"


def yardstick(
    base: str | Path,
    options: EvalOptions = DEFAULT_OPTIONS,
    types: tuple[str, ...] = LADDER,
    progress: Callable[[str], None] | None = None,
) -> Yardstick:
    """The base's quantization ladder with each rung's KLD to the base (cached by base hash)."""
    base = Path(base)
    cache = EvalCache(options.cache_dir, options.use_cache)
    try:
        sha = identify(base, cache).sha256
    finally:
        cache.close()
    # the KLDs are of the options' text and settings: a ladder measured on another text is another one
    text = cache_key(SUITE_VERSION, load_suite(options).text_sha256, options.ctx, options.batch, options.threads)
    key = Path(options.cache_dir or default_cache_dir()) / "yardstick" / f"{sha}-{'-'.join(types)}-{text}.json"
    if options.use_cache and key.is_file():
        return Yardstick.from_dict(json.loads(key.read_text(encoding="utf-8")))
    base_bpw = measure(base, "base", 0.0).bits_per_weight
    with Model(base) as m:
        quantized = quantized_tensor(m) is not None
    rungs = []
    with tempfile.TemporaryDirectory(prefix="gguf-surgeon-yardstick-") as work:
        report = quantize_ladder(
            base, types, work, name="rung", allow_requantize=quantized, llama_bin=options.llama_bin
        )
        for q in report.results:
            if quantized and q.bits_per_weight >= base_bpw:
                continue  # a rung as wide as the base measures nothing
            if progress:
                progress(f"yardstick: KLD of {q.type}")
            kld = kl_divergence(q.path, base, options)
            rungs.append(_rung(q, kld.mean.value))
    stick = Yardstick(sha, base_bpw, tuple(rungs))
    if options.use_cache:
        from ..files import write_text_atomic

        key.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(key, json.dumps(stick.to_dict()), force=True)
    return stick


def _rung(q: QuantResult, kld: float) -> Rung:
    return Rung(q.type, kld, q.bits_per_weight, q.size)
