"""delete I [J-K ...]: remove blocks."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import RecipeError
from .base import Layers, Operation, Param, check_blocks, format_layer_spec, parse_layer_spec, split_options


class Delete(NamedTuple):
    blocks: tuple[int, ...]  # sorted, distinct


def parse(tokens: list[str]) -> Delete:
    pos, _ = split_options(tokens, set())
    if not pos:
        raise RecipeError("missing argument; usage: delete I [J-K ...]")
    return Delete(tuple(sorted(set(i for tok in pos for i in parse_layer_spec(tok)))))


def apply(args: Delete, layers: Layers) -> Layers:
    check_blocks(layers, *args.blocks)
    drop = set(args.blocks)
    return tuple(l for i, l in enumerate(layers) if i not in drop)


def describe(args: Delete) -> str:
    what = format_layer_spec(args.blocks).replace(",", ", ")
    return f"**Delete layer{'s' if len(args.blocks) > 1 else ''} {what}**"


OPERATION = Operation(
    name="delete",
    usage="delete I [J-K ...]",
    summary="remove blocks",
    parse=parse,
    apply=apply,
    canonical=lambda a: " ".join(format_layer_spec(a.blocks).split(",")),
    describe=describe,
    params=(Param("blocks", "arguments"),),
    help="Delete one or more blocks or ranges (10 12-14).",
    example="gguf-surgeon delete 10 12-14 in.gguf out.gguf",
)
