"""The operation registry: name -> Operation (parse, apply, canonical text, card words, CLI
parameters).

Each operation is one module here; the recipe language, build_plan, the CLI's writer
commands, the model card and the search's moves all read REGISTRY, so a new operation is one
module and one `register(...)` call (also from outside the package, before the CLI runs).
"""

from __future__ import annotations

from typing import Any

from ..errors import PlanError, RecipeError
from ..plan import LayerPlan, LayerSource, Step
from . import bridge, delete, duplicate, interpolate, keep, move, prune_experts, swap
from .base import (
    MAX_RANGE,
    Layers,
    Operation,
    Param,
    format_fraction,
    format_layer_spec,
    parse_layer_spec,
)

__all__ = [
    "MAX_RANGE",
    "REGISTRY",
    "Layers",
    "Operation",
    "Param",
    "build_plan",
    "format_fraction",
    "format_layer_spec",
    "make_step",
    "parse_layer_spec",
    "register",
    "step_of",
]

REGISTRY: dict[str, Operation] = {}


def register(operation: Operation, *, replace: bool = False) -> Operation:
    """Add an operation to the registry (a name already taken needs replace=True)."""
    # hyphens allowed between words (prune-experts), as in command names
    if not operation.name.replace("-", "_").isidentifier() or operation.name != operation.name.lower():
        raise RecipeError(f"operation name {operation.name!r} must be a lower-case identifier (hyphens allowed)")
    if operation.name in REGISTRY and not replace:
        raise RecipeError(f"operation {operation.name!r} is already registered")
    REGISTRY[operation.name] = operation
    return operation


for _module in (delete, swap, duplicate, move, keep, interpolate, bridge, prune_experts):
    register(_module.OPERATION)


def make_step(op: str, tokens: list[str]) -> Step:
    """Parse one step's tokens (after the operation name) into a Step with canonical text."""
    if op not in REGISTRY:
        raise RecipeError(f"unknown operation {op!r} (known: {', '.join(REGISTRY)})")
    return step_of(op, REGISTRY[op].parse(tokens))


def step_of(op: str, args: Any) -> Step:
    """The Step of an operation's args record, with its canonical text."""
    return Step(op, args, f"{op} {REGISTRY[op].canonical(args)}")


def build_plan(steps: tuple[Step, ...], block_count: int) -> LayerPlan:
    """Apply `steps` in order to the identity order of `block_count` blocks."""
    layers: Layers = tuple(LayerSource.copy(i) for i in range(block_count))
    for n, step in enumerate(steps, 1):
        try:
            layers = REGISTRY[step.op].apply(step.args, layers)
        except PlanError as e:
            raise PlanError(f"step {n} {step.text!r}: {e}") from None
        if not layers:
            raise PlanError(f"step {n} {step.text!r}: the recipe leaves no block")
    return LayerPlan(tuple(steps), block_count, layers)
