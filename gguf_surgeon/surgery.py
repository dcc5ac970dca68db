"""From a layer plan and a model to a complete description of the output file (still no bytes).

A `Surgery` lists every output key-value and tensor, with the source bytes or blend each
tensor comes from, so a dry run can report the exact output size and the writer can stream.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import PlanError
from .experts import check_expert_plan, expert_pieces, expert_shape
from .hazards import check_hazards
from .metadata import MetadataChange, OutputField, plan_metadata
from .operations import REGISTRY
from .operations.delete import windows
from .plan import LayerPlan, LayerSource
from .reader import MAX_NAME, Model, TensorInfo
from .vocab import GGML_QUANT_SIZES, GGMLQuantizationType

MAX_ALIGNMENT = 1 << 20  # larger alignments only waste space (and would be padding held in memory)

# types gguf.quants can write; a blend of any other type is written as F16
QUANTIZABLE = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1,
    }
)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output and where its bytes come from."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    sources: tuple[tuple[TensorInfo, float], ...]  # one (tensor, 1.0): a byte copy; more: a blend
    pieces: tuple[tuple[int, int], ...] | None = (
        None  # a copy of only these [start, end) bytes of its source (kept experts)
    )
    healed: bool = False  # rewritten by a heal: sources holds the tensor it replaces, data its new bytes
    data: bytes | None = None  # a healed tensor's bytes, computed outside the core (analysis.heal)

    @property
    def is_copy(self) -> bool:
        return len(self.sources) == 1 and not self.healed

    @property
    def is_computed(self) -> bool:
        return self.data is not None

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


@dataclass(frozen=True)
class Surgery:
    """Everything the writer needs, and everything a dry run reports."""

    source: Path
    plan: LayerPlan
    alignment: int
    fields: tuple[OutputField, ...]
    tensors: tuple[OutputTensor, ...]
    changes: tuple[MetadataChange, ...]
    warnings: tuple[str, ...]
    conversions: tuple[str, ...]  # blended or healed tensors written in another type than their source
    heal_windows: tuple[HealWindow, ...] = ()  # the healed deletions of the plan
    healed: tuple[str, ...] = ()  # output tensors a heal rewrites (computed bytes, or still to compute)

    @property
    def needs_heal_data(self) -> bool:
        """A healed deletion whose corrected tensors were not given: the writer refuses it."""
        by_name = {t.name: t for t in self.tensors}
        return any(not by_name[n].is_computed for n in self.healed)


HEAL_TENSOR = "ffn_down.weight"  # the kept block's tensor a heal folds its correction into


@dataclass(frozen=True)
class HealWindow:
    """One healed deletion window: the source blocks it removes and the kept block before it."""

    kept: int  # source block the correction is folded into
    deleted: tuple[int, ...]  # source blocks of the window: kept + 1 ... kept + n
    outputs: tuple[int, ...]  # output blocks that hold `kept` (each gets the corrected tensor)

    def tensor_names(self) -> tuple[str, ...]:
        return tuple(f"blk.{i}.{HEAL_TENSOR}" for i in self.outputs)


def heal_windows(plan: LayerPlan) -> tuple[HealWindow, ...]:
    """The healed deletion windows of `plan`, replayed step by step in source-block terms.

    Each window must follow a kept block that is a plain copy (not a blend) and that is still in
    the output; a block may take at most one window's correction."""
    layers: tuple[LayerSource, ...] = tuple(LayerSource.copy(i) for i in range(plan.source_block_count))
    found: list[tuple[int, tuple[int, ...], str]] = []
    for n, step in enumerate(plan.steps, 1):
        if step.op == "delete" and getattr(step.args, "heal", False):
            for first, last in windows(step.args.blocks):
                if first == 0:
                    raise PlanError(f"step {n} {step.text!r}: heal: window {first}-{last} has no block before it")
                kept, window = layers[first - 1], layers[first : last + 1]
                if not kept.is_copy or not all(l.is_copy for l in window):
                    raise PlanError(
                        f"step {n} {step.text!r}: heal needs plain copied blocks around window {first}-{last}, "
                        "not blends"
                    )
                k, deleted = kept.parts[0][0], tuple(l.parts[0][0] for l in window)
                if deleted != tuple(range(k + 1, k + 1 + len(deleted))):
                    # the correction maps what K's successors did in the base; reordered, there is none
                    raise PlanError(
                        f"step {n} {step.text!r}: heal needs window {first}-{last} to be the blocks right after "
                        f"the one before it in the source's order (source blocks {list(deleted)} follow {k}); "
                        "heal the deletion before reordering"
                    )
                found.append((k, deleted, step.text))
        layers = REGISTRY[step.op].apply(step.args, layers)
    out: list[HealWindow] = []
    seen: set[int] = set()
    for kept, deleted, text in found:
        if kept in seen:
            raise PlanError(f"{text!r}: heal: block {kept} would take two corrections; heal one window per block")
        seen.add(kept)
        outputs = tuple(i for i, l in enumerate(plan.layers) if l == LayerSource.copy(kept))
        if not outputs:
            raise PlanError(f"{text!r}: heal: block {kept}, which takes the correction, is not in the output")
        out.append(HealWindow(kept, deleted, outputs))
    return tuple(out)


def heal_type(t: TensorInfo) -> GGMLQuantizationType:
    """The type a healed tensor is written in: its source type where gguf can quantize it, else F16."""
    return t.ggml_type if t.ggml_type in QUANTIZABLE else GGMLQuantizationType.F16


def block_suffix_sets(blocks: list[list[TensorInfo]]) -> list[frozenset[str]]:
    return [frozenset(t.block_suffix for t in b) for b in blocks]  # type: ignore[misc]


@functools.cache
def can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    """Whether gguf.quants reads this type as floats (it does not for F64, I8..I64, Q8_K, ...)."""
    import numpy as np
    from gguf.quants import dequantize

    _, size = GGML_QUANT_SIZES[ggml_type]
    try:
        dequantize(np.zeros(size, np.uint8), ggml_type)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def check_names(tensors: list[OutputTensor], path: Path) -> None:
    """llama.cpp refuses tensor names of MAX_NAME bytes or more; renumbering lengthens names."""
    for t in tensors:
        n = len(t.name.encode())
        if n >= MAX_NAME:
            raise PlanError(
                f"{path}: output tensor {t.name!r} would be {n} bytes; llama.cpp allows at most {MAX_NAME - 1} "
                "(a renumbered block index lengthens the name)"
            )


def blend_type(parts: list[TensorInfo]) -> GGMLQuantizationType:
    """The type a blend of `parts` is written in: their shared type when gguf can quantize it, else F16."""
    types = {t.ggml_type for t in parts}
    if len(types) == 1 and parts[0].ggml_type in QUANTIZABLE:
        return parts[0].ggml_type
    return GGMLQuantizationType.F16


def plan_surgery(
    model: Model,
    plan: LayerPlan,
    name: str | None = None,
    force: bool = False,
    alignment: int | None = None,
    computed: Mapping[str, tuple[GGMLQuantizationType, bytes]] | None = None,
    heal_metadata: Mapping[str, str | int] | None = None,
) -> Surgery:
    """Check `plan` against `model` and describe the output; raises PlanError when it cannot fit.

    `computed` maps output tensor names of healed tensors to (ggml type, bytes) computed outside
    the core (analysis.heal); `heal_metadata` adds `surgery.heal.*` keys recording how."""
    blocks = model.blocks()
    n = len(blocks)
    if plan.source_block_count != n:
        raise PlanError(f"{model.path}: plan was built for {plan.source_block_count} blocks, the model has {n}")
    declared = model.int_value(model.block_count_key)
    if declared is not None and declared != n:
        raise PlanError(f"{model.path}: {model.block_count_key} is {declared} but the tensors hold blocks 0-{n - 1}")
    suffixes = block_suffix_sets(blocks)
    warnings = check_hazards(model, plan, suffixes, force)
    if alignment is not None and (alignment < 8 or alignment & (alignment - 1)):
        raise PlanError(f"alignment {alignment} is not a power of two of at least 8")
    if alignment is not None and alignment > MAX_ALIGNMENT:
        raise PlanError(f"alignment {alignment} is too large: at most {MAX_ALIGNMENT} (1 MiB)")
    warnings += check_expert_plan(model, plan, blocks)
    n_expert = expert_shape(model).count
    try:
        windows_ = heal_windows(plan)
    except PlanError as e:
        raise PlanError(f"{model.path}: {e}") from None
    healed = tuple(n for w in windows_ for n in w.tensor_names())
    computed = dict(computed or {})
    unknown = sorted(set(computed) - set(healed))
    if unknown:
        raise PlanError(f"{model.path}: computed tensors {unknown} are not rewritten by a heal in this plan")
    fields, changes, meta_warnings = plan_metadata(model, plan, name, alignment, heal_metadata if healed else None)
    warnings += meta_warnings

    by_suffix = [{t.block_suffix: t for t in b} for b in blocks]
    block_tensors: list[OutputTensor] = []
    conversions: list[str] = []
    for out_i, src in enumerate(plan.layers):
        if src.is_copy:
            for t in blocks[src.parts[0][0]]:
                shape, pieces = expert_pieces(t, src.experts, n_expert)
                block_tensors.append(
                    OutputTensor(f"blk.{out_i}.{t.block_suffix}", shape, t.ggml_type, ((t, 1.0),), pieces)
                )
            continue
        first = src.parts[0][0]
        for i, _ in src.parts[1:]:
            if suffixes[i] != suffixes[first]:
                raise PlanError(f"{model.path}: cannot blend blocks {first} and {i}: their tensor sets differ")
        for t in blocks[first]:
            parts = [by_suffix[i][t.block_suffix] for i, _ in src.parts]
            for p in parts[1:]:
                if p.shape != t.shape:
                    raise PlanError(
                        f"{model.path}: cannot blend {t.name} {list(t.shape)} with {p.name} {list(p.shape)}: shapes differ"
                    )
            unreadable = sorted({p.ggml_type.name for p in parts if not can_dequantize(p.ggml_type)})
            if unreadable:
                raise PlanError(
                    f"{model.path}: cannot blend {t.name}: gguf cannot read {'/'.join(unreadable)} as numbers"
                )
            out_type = blend_type(parts)
            name_out = f"blk.{out_i}.{t.block_suffix}"
            if any(p.ggml_type != out_type for p in parts):
                conversions.append(
                    f"{name_out}: {'/'.join(sorted({p.ggml_type.name for p in parts}))} -> {out_type.name}"
                )
            block_tensors.append(
                OutputTensor(name_out, t.shape, out_type, tuple((p, w) for p, (_, w) in zip(parts, src.parts)))
            )

    # globals before the first block tensor stay before the blocks, the rest after them
    first_block = next(i for i, t in enumerate(model.tensors) if t.block_index is not None)
    head = [t for t in model.tensors[:first_block]]
    tail = [t for t in model.tensors[first_block:] if t.block_index is None]
    as_copy = lambda t: OutputTensor(t.name, t.shape, t.ggml_type, ((t, 1.0),))  # noqa: E731
    tensors = [as_copy(t) for t in head] + block_tensors + [as_copy(t) for t in tail]
    healed_set = set(healed)
    for i, t in enumerate(tensors):
        if t.name in healed_set:
            src = t.sources[0][0]
            if not can_dequantize(src.ggml_type):
                raise PlanError(f"{model.path}: cannot heal {src.name}: gguf cannot read {src.ggml_type.name}")
            ggml_type, data = computed.get(t.name, (heal_type(src), None))
            out_t = OutputTensor(t.name, t.shape, ggml_type, t.sources, healed=True, data=data)
            if data is not None and len(data) != out_t.n_bytes:
                raise PlanError(
                    f"{model.path}: computed {t.name} has {len(data)} bytes; {ggml_type.name} {list(t.shape)} needs {out_t.n_bytes}"
                )
            tensors[i] = out_t
            if ggml_type != src.ggml_type:
                conversions.append(f"{t.name}: {src.ggml_type.name} -> {ggml_type.name} (healed)")
    check_names(tensors, model.path)
    return Surgery(
        model.path,
        plan,
        alignment or model.file.alignment,
        tuple(fields),
        tuple(tensors),
        tuple(changes),
        tuple(warnings),
        tuple(conversions),
        windows_,
        healed,
    )
