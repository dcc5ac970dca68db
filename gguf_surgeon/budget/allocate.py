"""Choose a type per tensor under a size budget, write it with llama-quantize, measure the result.

The allocator minimizes the predicted KLD, sum over tensors of cost(tensor, type)
(sensitivity.Sensitivity.cost: measured cost at the probe type scaled by the weight error), under
a budget of file bytes (`--target-size`) or of tensor bytes (`--target-bpw`, bits per weight as
the quantize report measures it). It is the greedy of the multiple-choice knapsack: every tensor
starts at its smallest type; the upgrade with the largest predicted KLD saved per byte that still
fits is taken, one at a time, along each tensor's lower convex hull of (bytes, cost); then any
upgrade off the hull that still fits fills the rest. Sizes are those of the types llama-quantize
writes (fallbacks included), so the written file's size is the predicted one to the byte.
"""

from __future__ import annotations

import heapq
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionError, OutputError
from ..evaluation.records import Estimate
from ..evaluation.runner import kl_divergence
from ..evaluation.suite import DEFAULT_OPTIONS, EvalOptions
from ..files import format_size, signals_deferred
from ..llama.quantize import quantize_mix, write_tensor_type_file
from ..reader import Model, align
from ..records import Record
from .menu import CANDIDATES, Slot, least_tensor_bytes, plan_slots
from .sensitivity import PROBE, Progress, Sensitivity, bundled_texts, measure_sensitivity, text_options

BASE_TYPE = "Q8_0"


@dataclass(frozen=True)
class Allocation(Record):
    """A type per tensor and what it is predicted to cost."""

    requested: dict[str, str]  # tensor -> the type named in the tensor-type file
    written: dict[str, str]  # tensor -> the type llama-quantize writes for it
    predicted_kld: float  # sum of the tensors' predicted costs (calibration text)
    predicted_size: int  # exact file size of the llama-quantize output
    predicted_tensor_bytes: int  # all tensors' bytes (bits per weight = this * 8 / parameters)
    limit: int  # the budget, in the unit of `unit`
    unit: str  # "file bytes" or "tensor bytes"


def _hull(slot: Slot, sens: Sensitivity, size_of) -> list[tuple[int, float, int]]:
    """(bytes, cost, option index) of the slot's options on the lower convex hull of (bytes, cost),
    fewest bytes first: the options a ratio greedy walks through."""
    pts = sorted(
        ((size_of(o.nbytes), sens.cost(slot.name, o.written), i) for i, o in enumerate(slot.options)),
        key=lambda p: (p[0], p[1]),
    )
    hull: list[tuple[int, float, int]] = []
    for p in pts:
        if hull and p[1] >= hull[-1][1]:
            continue  # more bytes for no less KLD: never worth it
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(sens: Sensitivity, limit: int, unit: str = "file bytes") -> Allocation:
    """The mix with the least predicted KLD whose size (file bytes, or tensor bytes with
    unit="tensor bytes") is at most `limit`. Raises OptionError when even the smallest mix is larger."""
    menu = sens.menu
    if unit == "file bytes":
        fixed = menu.fixed_bytes

        def size_of(n: int) -> int:
            return align(n, menu.alignment)
    elif unit == "tensor bytes":
        fixed = menu.other_tensor_bytes

        def size_of(n: int) -> int:
            return n
    else:
        raise OptionError(f"unknown budget unit {unit!r}")
    slots = menu.slots
    hulls = [_hull(s, sens, size_of) for s in slots]
    at = [0] * len(slots)  # position on each hull
    choice = [h[0][2] for h in hulls]
    used = fixed + sum(h[0][0] for h in hulls)
    if used > limit:
        raise OptionError(
            f"the smallest mix of these types takes {format_size(used)} ({unit}), over the budget of {format_size(limit)}"
        )
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        h = hulls[i]
        if at[i] + 1 < len(h):
            (b0, c0, _), (b1, c1, _) = h[at[i]], h[at[i] + 1]
            heapq.heappush(heap, (-(c0 - c1) / max(1, b1 - b0), i))

    for i in range(len(slots)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        h = hulls[i]
        extra = h[at[i] + 1][0] - h[at[i]][0]
        if used + extra > limit:
            continue  # this tensor's next step does not fit; smaller steps of others may
        used += extra
        at[i] += 1
        choice[i] = h[at[i]][2]
        push(i)
    # fill what is left with any upgrade, on the hull or not, that fits: best KLD saved per byte first
    while True:
        best = None
        for i, s in enumerate(slots):
            cur = s.options[choice[i]]
            cur_size, cur_cost = size_of(cur.nbytes), sens.cost(s.name, cur.written)
            for j, o in enumerate(s.options):
                extra = size_of(o.nbytes) - cur_size
                gain = cur_cost - sens.cost(s.name, o.written)
                if extra > 0 and gain > 0 and used + extra <= limit:
                    ratio = gain / extra
                    if best is None or ratio > best[0]:
                        best = (ratio, i, j, extra)
        if best is None:
            break
        _, i, j, extra = best
        choice[i] = j
        used += extra
    requested = {s.name: s.options[choice[i]].requested for i, s in enumerate(slots)}
    written = {s.name: s.options[choice[i]].written for i, s in enumerate(slots)}
    tensor_bytes = menu.other_tensor_bytes + sum(s.options[choice[i]].nbytes for i, s in enumerate(slots))
    return Allocation(requested, written, sens.predict(written), menu.file_size(written), tensor_bytes, limit, unit)


@dataclass(frozen=True)
class BudgetResult(Record):
    """One allocated, written and measured model."""

    source: Path
    out: Path
    types_file: Path  # the mix as a --tensor-type-file, reusable with `quantize --tensor-type-file`
    target: str  # as given: "100M" or "4.5 bpw"
    allocation: Allocation
    size: int  # measured: the written file's size
    bits_per_weight: float  # measured: tensor bytes * 8 / parameters of the written file
    types: dict[str, int]  # written type -> tensor count, read back from the file
    mismatches: tuple[str, ...]  # tensors whose written type is not the predicted one (none expected)
    kld: Estimate | None  # measured KL(base || out) on the held-out text, interval over chunks
    kld_text: str  # which text the KLD is measured on
    sensitivity_design: str
    sensitivity_cached: bool
    seconds: dict[str, float]  # sensitivity, allocation, quantize, kld
    imatrix: Path | None = None  # the importance matrix the sensitivity and the mix were quantized with


def budget_of(target_size: int | None, target_bpw: float | None, parameters: int) -> tuple[int, str, str]:
    """(limit, unit, label) of a --target-size (bytes) or --target-bpw value; exactly one is given."""
    if (target_size is None) == (target_bpw is None):
        raise OptionError("give exactly one of --target-size and --target-bpw")
    if target_size is not None:
        if target_size <= 0:
            raise OptionError(f"--target-size {target_size}: must be positive")
        return int(target_size), "file bytes", format_size(target_size)
    assert target_bpw is not None
    if not 0 < target_bpw <= 32:
        raise OptionError(f"--target-bpw {target_bpw}: must be above 0 and at most 32")
    return int(target_bpw * parameters / 8), "tensor bytes", f"{target_bpw:g} bpw"


def quantize_to_budget(
    source: str | Path,
    out: str | Path,
    *,
    target_size: int | None = None,
    target_bpw: float | None = None,
    design: str = "batched",
    probe: str = PROBE,
    candidates: Sequence[str] = CANDIDATES,
    options: EvalOptions = DEFAULT_OPTIONS,
    calibration: str | None = None,
    held_out: str | None = None,
    measure_kld: bool = True,
    allow_requantize: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    sensitivity: Sensitivity | None = None,
    imatrix: str | Path | None = None,
) -> BudgetResult:
    """Measure (or load) the sensitivity of `source` (or take `sensitivity`, e.g. one inherited
    from the base `source` is an edit of), allocate a type per tensor under the
    budget, write `out` and its tensor-type file (OUT's stem + .tensor-types.txt), read the
    written types back, and measure the KLD of `out` to `source` on the held-out part of the
    bundled text (skipped without `measure_kld`); `calibration` and `held_out` replace the
    bundled text's parts. With `imatrix` (of `source`), the sensitivity and the mix are quantized
    with it. Nothing is written when the budget is
    impossible or `out` exists without `force`."""
    source, out = Path(source), Path(out)
    types_file = out.with_name(out.name.removesuffix(".gguf") + ".tensor-types.txt")
    with Model(source) as m:
        parameters = sum(t.n_elements for t in m.tensors)
        limit, unit, label = budget_of(target_size, target_bpw, parameters)
        plan_slots(m, candidates)  # a model with no quantizable tensor: refused here
        least = least_tensor_bytes(((t.name, t.shape, t.n_bytes) for t in m.tensors), candidates)
    if least > limit:  # refused before minutes of measuring: even the smallest types do not fit
        raise OptionError(
            f"{source}: the smallest types of these candidates take {format_size(least)} of tensors, "
            f"over the budget of {label} ({format_size(limit)})"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out.parent}: cannot create the output folder: {e.strerror or e}") from None
    for p in (out, types_file):
        if p.exists() and p.resolve() == source.resolve():
            raise OutputError(f"{p}: is the input")
        if p.exists() and not force:
            raise OutputError(f"{p}: exists; pass --force to overwrite")
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    sens = sensitivity or measure_sensitivity(
        source,
        design=design,
        probe=probe,
        candidates=candidates,
        calibration=calibration,
        options=options,
        allow_requantize=allow_requantize,
        progress=progress,
        imatrix=imatrix,
    )
    seconds["sensitivity"] = sensitivity.seconds if sensitivity is not None else time.monotonic() - t0
    t0 = time.monotonic()
    alloc = allocate(sens, limit, unit)
    seconds["allocation"] = time.monotonic() - t0
    t0 = time.monotonic()
    if progress:
        progress("writing the mix (llama-quantize)", 0, 1)
    report = quantize_mix(
        source,
        out,
        alloc.requested,
        base_type=BASE_TYPE,
        allow_requantize=allow_requantize,
        force=force,
        llama_bin=options.llama_bin,
        threads=options.threads,
        imatrix=imatrix,
    )
    try:  # an error or a signal once the mix is written leaves neither file
        write_tensor_type_file(alloc.requested, types_file)
        seconds["quantize"] = time.monotonic() - t0
        written = report.results[0]
        with Model(out) as m:
            got = {t.name: t.ggml_type.name for t in m.tensors}
        mismatches = tuple(f"{n}: {got.get(n)} (predicted {t})" for n, t in alloc.written.items() if got.get(n) != t)
        kld = None
        held_out_name = (
            "the held-out text given" if held_out is not None else "the held-out part of the bundled eval text"
        )
        if measure_kld:
            t0 = time.monotonic()
            if progress:
                progress("KL divergence on the held-out text", 0, 1)
            with tempfile.TemporaryDirectory(prefix="gguf-surgeon-budget-") as work:
                kld = kl_divergence(
                    out, source, text_options(options, bundled_texts()[1] if held_out is None else held_out, Path(work))
                ).mean
            seconds["kld"] = time.monotonic() - t0
    except BaseException:
        with signals_deferred():
            out.unlink(missing_ok=True)
            types_file.unlink(missing_ok=True)
        raise
    return BudgetResult(
        source,
        out,
        types_file,
        label,
        alloc,
        written.size,
        written.bits_per_weight,
        dict(Counter(got[n] for n in alloc.written)),
        mismatches,
        kld,
        held_out_name,
        sens.design,
        sens.cached,
        seconds,
        Path(imatrix) if imatrix is not None else None,
    )
