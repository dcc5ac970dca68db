"""What each tensor may become: for every tensor llama-quantize quantizes, the types it can be
given, the type llama-quantize actually writes for each (its fallback where the rows are not a
multiple of the type's block), the exact bytes, and the weight error of that type against the base.

The weight errors come from the written files themselves: the base is quantized once per
candidate type with `llama-quantize --pure` (every tensor that type, fallbacks included) and each
tensor is dequantized with gguf's own dequantizer and compared with the base, so the error is the
one of the grid llama-quantize writes, not of a re-implementation.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ..analysis.reference import dequantize_rows
from ..errors import OptionError, ToolError
from ..llama.quantize import quantizable, quantize_ladder, tensor_bytes, written_type
from ..reader import Model, align
from ..records import Record

# the K-quant family, Q8_0 and F16: what the allocator chooses among (docs/budget.md says why)
CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")
ROWS_PER_SLICE = 4096  # rows dequantized at once when measuring weight errors (bounded memory)

MenuProgress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass(frozen=True)
class Option(Record):
    """One type a tensor can be given."""

    requested: str  # the type named in the tensor-type file, e.g. "Q3_K"
    written: str  # the type llama-quantize writes for it, e.g. "Q4_0" on 576-wide rows
    nbytes: int  # bytes of the tensor in that type
    error: float  # sum of squared differences to the base weights, over all elements


@dataclass(frozen=True)
class Slot(Record):
    """One tensor llama-quantize gives a type: a group of the sensitivity measurement."""

    name: str
    block: int | None  # None for token_embd / output
    kind: str  # attn_q, ffn_down, ..., token_embd, output
    shape: tuple[int, ...]  # GGUF order, row length first
    options: tuple[Option, ...]  # distinct written types, fewest bytes first

    def option(self, written: str) -> Option:
        for o in self.options:
            if o.written == written:
                return o
        raise KeyError(f"{self.name}: no option writes {written}")


@dataclass(frozen=True)
class Menu(Record):
    """Every quantizable tensor of a model with its options, and what a written file adds."""

    slots: tuple[Slot, ...]
    fixed_bytes: int  # the rest of a llama-quantize output: header, metadata, unquantized tensors, padding
    alignment: int  # tensor data alignment of the written files
    parameters: int  # elements over all tensors (the denominator of bits per weight)
    other_tensor_bytes: int  # bytes of the tensors llama-quantize leaves as they are (norms)

    def file_size(self, written: Mapping[str, str]) -> int:
        """The exact size of a llama-quantize output giving each slot the written type `written[name]`."""
        by_name = {s.name: s for s in self.slots}
        return self.fixed_bytes + sum(align(by_name[n].option(t).nbytes, self.alignment) for n, t in written.items())

    def smallest(self) -> int:
        return self.fixed_bytes + sum(align(s.options[0].nbytes, self.alignment) for s in self.slots)

    def largest(self) -> int:
        return self.fixed_bytes + sum(align(s.options[-1].nbytes, self.alignment) for s in self.slots)

    @staticmethod
    def from_dict(d: dict) -> Menu:
        slots = tuple(
            Slot(s["name"], s["block"], s["kind"], tuple(s["shape"]), tuple(Option(**o) for o in s["options"]))
            for s in d["slots"]
        )
        return Menu(slots, d["fixed_bytes"], d["alignment"], d["parameters"], d["other_tensor_bytes"])


def kind_of(name: str, block: int | None, suffix: str | None) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q'; 'token_embd.weight' -> 'token_embd'."""
    return (suffix if block is not None and suffix else name).removesuffix(".weight")


def candidate_types(candidates: Sequence[str]) -> tuple[GGMLQuantizationType, ...]:
    out = []
    for c in candidates:
        try:
            out.append(GGMLQuantizationType[c.strip().upper()])
        except KeyError:
            raise OptionError(f"unknown candidate type {c!r}; choose among {', '.join(CANDIDATES)}") from None
    if not out:
        raise OptionError("no candidate type given")
    return tuple(dict.fromkeys(out))


def plan_slots(model: Model, candidates: Sequence[str] = CANDIDATES) -> list[tuple[str, int | None, str, tuple, dict]]:
    """(name, block, kind, shape, {written type: requested type}) of each quantizable tensor;
    where two requested types write the same type, the first candidate names it."""
    types = candidate_types(candidates)
    out = []
    for t in model.tensors:
        if not quantizable(t.name, len(t.shape)):
            continue
        written: dict[GGMLQuantizationType, GGMLQuantizationType] = {}
        for q in types:
            written.setdefault(written_type(q, t.shape[0]), q)
        out.append((t.name, t.block_index, kind_of(t.name, t.block_index, t.block_suffix), t.shape, written))
    if not out:
        raise OptionError(f"{model.path}: no tensor that llama-quantize quantizes")
    return out


def least_tensor_bytes(tensors: Iterable[tuple[str, tuple, int]], candidates: Sequence[str] = CANDIDATES) -> int:
    """Tensor bytes of the smallest mix of these tensors, (name, shape, bytes) each: every
    quantizable one at its smallest candidate type as llama-quantize writes it, the others as they are."""
    types = candidate_types(candidates)
    return sum(
        min(tensor_bytes(written_type(q, shape[0]), shape) for q in types) if quantizable(name, len(shape)) else n
        for name, shape, n in tensors
    )


def squared_error(base: Model, other: Model, name: str) -> float:
    """Sum of squared differences of tensor `name` between two models, dequantized slice by slice."""
    a, b = base.tensor(name), other.tensor(name)
    rows = a.n_elements // a.shape[0]
    total = 0.0
    for start in range(0, rows, ROWS_PER_SLICE):
        stop = min(rows, start + ROWS_PER_SLICE)
        d = dequantize_rows(base, a, start, stop).astype(np.float64) - dequantize_rows(other, b, start, stop)
        total += float(np.square(d).sum())
    return total


def build_menu(
    base: str | Path,
    candidates: Sequence[str] = CANDIDATES,
    *,
    allow_requantize: bool = False,
    llama_bin: str | Path | None = None,
    threads: int | None = None,
    progress: MenuProgress | None = None,
    imatrix: str | Path | None = None,
) -> Menu:
    """The menu of `base`: one `llama-quantize --pure` run per candidate type (skipped for a type
    every tensor of the base already has; with `imatrix` when given), each tensor's weight error
    read from its output."""
    base = Path(base)
    with Model(base) as model:
        planned = plan_slots(model, candidates)
        parameters = sum(t.n_elements for t in model.tensors)
        base_types = {t.name: t.ggml_type for t in model.tensors}
        quantized = {p[0] for p in planned}
        other = sum(t.n_bytes for t in model.tensors if t.name not in quantized)
    order = candidate_types(candidates)
    needed = sorted(
        {req for name, _, _, _, w in planned for wt, req in w.items() if wt != base_types[name]}, key=order.index
    )
    errors: dict[tuple[str, GGMLQuantizationType], float] = {}
    fixed = alignment = None
    with tempfile.TemporaryDirectory(prefix="gguf-surgeon-menu-") as work:
        for i, req in enumerate(needed):
            if progress:
                progress("weight errors (llama-quantize --pure per type)", i, len(needed))
            report = quantize_ladder(
                base,
                [req.name],
                Path(work),
                name="pure",
                extra_args=("--pure",),
                imatrix=imatrix,
                allow_requantize=allow_requantize,
                llama_bin=llama_bin,
                threads=threads,
                force=True,
            )
            path = report.results[0].path
            with Model(base) as b, Model(path) as q:
                for name, _, _, shape, w in planned:
                    wt = q.tensor(name).ggml_type
                    if wt != written_type(req, shape[0]):
                        raise ToolError(
                            f"llama-quantize wrote {name} as {wt.name} when asked for {req.name}; "
                            f"expected {written_type(req, shape[0]).name} (has its fallback rule changed?)"
                        )
                    if w.get(wt) == req:
                        errors[(name, wt)] = squared_error(b, q, name)
                if fixed is None:
                    alignment = q.shards[0].alignment
                    fixed = path.stat().st_size - sum(
                        align(t.n_bytes, alignment) for t in q.tensors if t.name in quantized
                    )
            path.unlink()
        if progress:
            progress("weight errors (llama-quantize --pure per type)", len(needed), len(needed))
    if fixed is None or alignment is None:  # every candidate is the base's own type: nothing to run
        with Model(base) as b:
            alignment = b.shards[0].alignment
            fixed = base.stat().st_size - sum(align(t.n_bytes, alignment) for t in b.tensors if t.name in quantized)
    slots = []
    for name, block, kind, shape, w in planned:
        opts = [
            Option(req.name, wt.name, tensor_bytes(wt, shape), 0.0 if wt == base_types[name] else errors[(name, wt)])
            for wt, req in w.items()
        ]
        slots.append(Slot(name, block, kind, tuple(shape), tuple(sorted(opts, key=lambda o: o.nbytes))))
    return Menu(tuple(slots), fixed, alignment, parameters, other)
