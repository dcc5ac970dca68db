"""Hazards of a plan: architectures whose blocks behave differently by index, and blocks placed
where the source had a different tensor set."""

from __future__ import annotations

from .errors import PlanError
from .plan import LayerPlan
from .reader import Model
from .vocab import Keys

# Architectures whose blocks behave differently by index: moving blocks changes behaviour.
INDEX_HAZARDS: dict[str, str] = {
    "gemma2": "gemma2 alternates sliding-window and global attention by block index",
    "gemma3": "gemma3 uses global attention on every 6th block by index (sliding-window pattern)",
    "gemma3n": "gemma3n's sliding-window pattern, per-layer inputs and KV sharing depend on the block index",
    "cohere2": "cohere2 uses global attention on every 4th block by index (sliding-window pattern)",
    "llama4": "llama4 interleaves NoPE/RoPE attention and MoE/dense blocks by block index",
}


def check_hazards(model: Model, plan: LayerPlan, block_suffixes: list[frozenset[str]], force: bool) -> list[str]:
    """Warnings for architectures whose behaviour depends on the block index.

    A block moved to a position whose source tensor set differs (a dense block where an MoE
    block was, say) is refused with PlanError unless `force`.
    """
    if plan.is_identity:
        return []
    arch = model.architecture
    warnings = []
    if arch in INDEX_HAZARDS:
        warnings.append(
            f"hazard: {INDEX_HAZARDS[arch]}; the edited model may behave differently than the order suggests"
        )
    dense_key = model.arch_key(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)
    if model.has(dense_key):
        warnings.append(
            f"hazard: {dense_key} = {model.value(dense_key)}: the first blocks are dense, the rest MoE; llama.cpp decides which by index"
        )
    for out_i, src in enumerate(plan.layers):
        expected_at = out_i if out_i < len(block_suffixes) else len(block_suffixes) - 1
        for i, _ in src.parts:
            if block_suffixes[i] != block_suffixes[expected_at]:
                diff = sorted(block_suffixes[i] ^ block_suffixes[expected_at])
                msg = (
                    f"block {i} goes to position {out_i}, whose tensor set differs "
                    f"(differs in: {', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''})"
                )
                if not force:
                    raise PlanError(
                        f"{model.path}: {msg}; llama.cpp would reject or misuse it (use --force to write it anyway)"
                    )
                warnings.append("forced: " + msg)
    return warnings
