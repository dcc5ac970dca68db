"""Mixture-of-experts blocks: which tensors hold one slice per expert, and the checks, slices and
metadata of a plan that keeps a subset of each block's experts (prune-experts).

llama.cpp stacks a block's experts along the LAST dimension of every per-expert tensor
(ffn_gate_exps ne {n_embd, n_ff_exp, n_expert}, ffn_gate_inp ne {n_embd, n_expert}, ...), and
ggml quantizes along ne0 only, so expert e is one contiguous byte range of n_bytes / n_expert
bytes for every type, K-quants included: pruning is byte slicing, never requantization.
`<arch>.expert_count` is one number checked against every such tensor, so every MoE block of
the output keeps the same count (which experts survive may differ per block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import PlanError
from .plan import LayerPlan
from .reader import Model, TensorInfo
from .vocab import GGUFValueType, Keys

# per-expert tensors by stem (the name between "blk.N." and ".weight"/".bias"/".scale"/...)
EXPERT_STEMS = frozenset(
    {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps", "ffn_gate_inp", "exp_probs_b"}
)
# expert-indexed tensors whose layout this module does not know, or that hold expert ids as
# values (deepseek4's token -> expert table): refused rather than written wrong. Tensors of the
# expert path that are not per expert (arctic's ffn_norm_exps {n_embd}, nemotron-h's
# ffn_latent_*) are copied whole like any other.
UNSUPPORTED_STEMS = ("_chexps", "exp_probs_b_vl", "ffn_gate_tid2eid")
# architectures whose router does not renormalize the top-k weights: the survivors' weights grow
NO_RENORM = {"olmoe": "olmoe does not renormalize its top-k router weights: surviving experts' weights grow"}
KERNEL_MULTIPLE = 32  # expert counts off this multiple reach kernel edge cases on some GPU backends

KEPT_KEY = "surgery.experts_kept"  # per output block: the ORIGINAL model's experts it keeps ("0,3,5"; "" if dense)
SOURCE_COUNT_KEY = "surgery.expert_count_source"  # the original model's expert_count


def tensor_stem(t: TensorInfo) -> str:
    """'ffn_gate_exps' for blk.3.ffn_gate_exps.weight."""
    return (t.block_suffix or t.name).rsplit(".", 1)[0]


def is_expert_tensor(t: TensorInfo) -> bool:
    return tensor_stem(t) in EXPERT_STEMS


@dataclass(frozen=True)
class ExpertShape:
    """The expert hyperparameters of a model, read from its metadata."""

    count: int  # <arch>.expert_count (0: a dense model)
    used: tuple[int, ...]  # <arch>.expert_used_count per source block (one value repeated, or the array)
    groups: int  # <arch>.expert_group_count (0 or 1: no groups)
    nextn: int  # <arch>.nextn_predict_layers (MTP blocks)

    @property
    def per_group(self) -> int:
        return self.count // self.groups if self.groups > 1 else self.count


def expert_shape(model: Model) -> ExpertShape:
    count = model.value(model.arch_key(Keys.LLM.EXPERT_COUNT)) or 0
    used = model.value(model.arch_key(Keys.LLM.EXPERT_USED_COUNT)) or 0
    n = model.block_count
    used_t = tuple(int(u) for u in used) if isinstance(used, list) else (int(used),) * n
    return ExpertShape(
        int(count),
        used_t,
        int(model.value(model.arch_key(Keys.LLM.EXPERT_GROUP_COUNT)) or 0),
        int(model.value(model.arch_key(Keys.LLM.NEXTN_PREDICT_LAYERS)) or 0),
    )


def expert_blocks(blocks: list[list[TensorInfo]]) -> tuple[int, ...]:
    """Indices of the blocks that hold experts (deepseek2's leading dense blocks do not)."""
    return tuple(i for i, b in enumerate(blocks) if any(is_expert_tensor(t) for t in b))


def kept_counts(plan: LayerPlan) -> set[int]:
    """How many experts the pruned blocks keep (one number in a valid plan; empty: no pruning)."""
    return {len(l.experts) for l in plan.layers if l.experts is not None}


def check_expert_plan(model: Model, plan: LayerPlan, blocks: list[list[TensorInfo]]) -> list[str]:
    """Refuse (PlanError) a pruning llama.cpp would not load; return warnings. No-op without pruning."""
    pruned = [(i, l) for i, l in enumerate(plan.layers) if l.experts is not None]
    if not pruned:
        return []
    path = model.path
    shape = expert_shape(model)
    count_key = model.arch_key(Keys.LLM.EXPERT_COUNT)
    if shape.count <= 0:
        raise PlanError(
            f"{path}: a dense model ({count_key} is not set); prune-experts needs a mixture-of-experts model"
        )
    if shape.nextn > 0:
        raise PlanError(
            f"{path}: {model.arch_key(Keys.LLM.NEXTN_PREDICT_LAYERS)} = {shape.nextn}: models with MTP/nextn "
            "layers are not pruned yet"
        )
    moe = set(expert_blocks(blocks))
    counts = kept_counts(plan)
    if len(counts) > 1:
        raise PlanError(f"{path}: blocks keep different numbers of experts {sorted(counts)}; {count_key} is one number")
    n = counts.pop()
    used_key = model.arch_key(Keys.LLM.EXPERT_USED_COUNT)
    used = max((shape.used[l.parts[0][0]] for _, l in pruned), default=0)
    if n < used:
        raise PlanError(f"{path}: prune-experts {n}: fewer experts than {used_key} = {used} routed per token")
    if shape.groups > 1:
        group_key = model.arch_key(Keys.LLM.EXPERT_GROUP_COUNT)
        if n % shape.groups:
            raise PlanError(f"{path}: prune-experts {n}: not divisible by {group_key} = {shape.groups}")
        if n // shape.groups < 2:
            raise PlanError(
                f"{path}: prune-experts {n}: llama.cpp scores each of the {shape.groups} groups by its best two "
                "experts, so every group must keep at least 2"
            )
    for out_i, layer in enumerate(plan.layers):
        src = layer.parts[0][0]
        if layer.experts is None:
            if src in moe and n != shape.count:
                raise PlanError(
                    f"{path}: output block {out_i} keeps all {shape.count} experts while others keep {n}; "
                    f"{count_key} is one number for every block"
                )
            continue
        if src not in moe:
            raise PlanError(f"{path}: output block {out_i} (source block {src}) has no experts; leave it out")
        bad = [e for e in layer.experts if not 0 <= e < shape.count]
        if bad:
            raise PlanError(f"{path}: expert {bad[0]} out of range (the model has experts 0-{shape.count - 1})")
        for t in blocks[src]:
            stem = tensor_stem(t)
            if any(u in stem for u in UNSUPPORTED_STEMS):
                raise PlanError(f"{path}: {t.name}: prune-experts does not know how to slice this expert tensor")
            if stem in EXPERT_STEMS and (not t.shape or t.shape[-1] != shape.count):
                raise PlanError(
                    f"{path}: {t.name} {list(t.shape)}: its last dimension is not {count_key} = {shape.count}"
                )
        if shape.groups > 1:
            per_group = [0] * shape.groups
            for e in layer.experts:
                per_group[e // shape.per_group] += 1
            if len(set(per_group)) > 1:
                raise PlanError(
                    f"{path}: output block {out_i} keeps {per_group} experts in its {shape.groups} groups; "
                    "prune the same number in every group"
                )
    warnings = []
    if n % KERNEL_MULTIPLE and shape.count >= KERNEL_MULTIPLE:
        warnings.append(
            f"{n} experts is not a multiple of {KERNEL_MULTIPLE}: some GPU backends' MoE kernels hit edge cases; "
            f"prefer {max(KERNEL_MULTIPLE, n // KERNEL_MULTIPLE * KERNEL_MULTIPLE)}"
        )
    if model.architecture in NO_RENORM:
        warnings.append(NO_RENORM[model.architecture])
    return warnings


def expert_pieces(t: TensorInfo, experts: tuple[int, ...] | None, count: int) -> tuple[tuple[int, ...], Any]:
    """(output shape, byte ranges of `t` to copy in order) keeping `experts` of `t`'s `count`;
    ranges None means the whole tensor (not per-expert, nothing pruned, or every expert kept)."""
    if experts is None or not is_expert_tensor(t) or experts == tuple(range(count)):
        return t.shape, None
    stride = t.n_bytes // count
    ranges: list[list[int]] = []
    for e in experts:
        if ranges and ranges[-1][1] == e * stride:
            ranges[-1][1] += stride  # neighbouring experts: one copy
        else:
            ranges.append([e * stride, (e + 1) * stride])
    return t.shape[:-1] + (len(experts),), tuple((a, b) for a, b in ranges)


def _kept_lists(model: Model) -> list[list[int] | None] | None:
    """The source's own KEPT_KEY (a model pruned before), one list per block; None when absent."""
    old = model.value(KEPT_KEY)
    if not isinstance(old, list) or len(old) != model.block_count:
        return None
    return [[int(v) for v in s.split(",")] if s else None for s in old]


def expert_values(model: Model, plan: LayerPlan) -> dict[str, tuple[GGUFValueType, Any, GGUFValueType | None]]:
    """New metadata for a plan over an MoE model: expert_count and the kept experts per output block
    in the ORIGINAL model's numbering (composed with an earlier pruning's KEPT_KEY, re-indexed by the
    plan even when this plan prunes nothing). Empty for a plan and source without pruning."""
    old = _kept_lists(model)
    counts = kept_counts(plan)
    n = min(counts) if counts else None  # check_expert_plan ran first: one number
    if n is None and old is None:
        return {}
    shape = expert_shape(model)
    values: dict[str, tuple[GGUFValueType, Any, GGUFValueType | None]] = {}
    kept: list[str] = []
    for layer in plan.layers:
        src = layer.primary
        original = old[src] if old is not None else None
        here = layer.experts if layer.experts is not None else None
        if here is None and original is None:
            has_experts = any(is_expert_tensor(t) for t in model.blocks()[src])
            kept.append(",".join(map(str, range(shape.count))) if has_experts else "")
        elif here is None:
            kept.append(",".join(map(str, original)))  # type: ignore[arg-type]
        else:
            ids = [original[e] for e in here] if original is not None else list(here)
            kept.append(",".join(map(str, ids)))
    values[KEPT_KEY] = (GGUFValueType.ARRAY, kept, GGUFValueType.STRING)
    if n is not None:
        count_key = model.arch_key(Keys.LLM.EXPERT_COUNT)
        values[count_key] = (model.fields[count_key].type, n, None)
        if not model.has(SOURCE_COUNT_KEY):
            values[SOURCE_COUNT_KEY] = (GGUFValueType.UINT32, shape.count, None)
    return values
