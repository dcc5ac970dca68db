"""swap A B: exchange two blocks."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import RecipeError
from .base import Layers, Operation, Param, block_index, check_blocks, expect_count, split_options


class Swap(NamedTuple):
    a: int
    b: int


def parse(tokens: list[str]) -> Swap:
    pos, _ = split_options(tokens, set())
    expect_count(pos, 2, "swap A B")
    a, b = block_index(pos[0]), block_index(pos[1])
    if a == b:
        raise RecipeError(f"swap of block {a} with itself")
    return Swap(a, b)


def apply(args: Swap, layers: Layers) -> Layers:
    check_blocks(layers, args.a, args.b)
    out = list(layers)
    out[args.a], out[args.b] = out[args.b], out[args.a]
    return tuple(out)


OPERATION = Operation(
    name="swap",
    usage="swap A B",
    summary="exchange two blocks",
    parse=parse,
    apply=apply,
    canonical=lambda a: f"{a.a} {a.b}",
    describe=lambda a: f"**Swap layers {a.a} ↔ {a.b}**",
    params=(Param("a"), Param("b")),
    help="Exchange blocks A and B.",
    example="gguf-surgeon swap 11 12 in.gguf out.gguf",
)
