"""keep SPEC: the whole new order as a layer spec; a repeated index duplicates."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import RecipeError
from .base import Layers, Operation, Param, check_blocks, format_layer_spec, parse_layer_spec, split_options


class Keep(NamedTuple):
    order: tuple[int, ...]  # source block of each output block


def parse(tokens: list[str]) -> Keep:
    pos, _ = split_options(tokens, set())
    if not pos:
        raise RecipeError("missing argument; usage: keep SPEC (e.g. keep 0-9,11,13,12)")
    return Keep(tuple(i for tok in pos for i in parse_layer_spec(tok)))


def apply(args: Keep, layers: Layers) -> Layers:
    check_blocks(layers, *args.order)
    return tuple(layers[i] for i in args.order)


OPERATION = Operation(
    name="keep",
    usage="keep SPEC",
    summary="the whole new order as a layer spec; a repeated index duplicates",
    parse=parse,
    apply=apply,
    canonical=lambda a: format_layer_spec(a.order),
    describe=lambda a: f"**Reorder layers** to {format_layer_spec(a.order)}",
    params=(Param("spec"),),
    help="The whole new block order as a layer spec; a repeated index duplicates.",
    example="gguf-surgeon keep 0-9,11,13,12,14-27 in.gguf out.gguf",
)
