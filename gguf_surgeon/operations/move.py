"""move I --to J: move a block so that it ends up at index J."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import RecipeError
from .base import Layers, Operation, Param, block_index, check_blocks, expect_count, split_options


class Move(NamedTuple):
    block: int
    to: int


def parse(tokens: list[str]) -> Move:
    pos, opts = split_options(tokens, {"to"})
    expect_count(pos, 1, "move I --to J")
    if "to" not in opts:
        raise RecipeError("missing --to; usage: move I --to J")
    return Move(block_index(pos[0]), block_index(opts["to"]))


def apply(args: Move, layers: Layers) -> Layers:
    check_blocks(layers, args.block, args.to)
    rest = layers[: args.block] + layers[args.block + 1 :]
    return rest[: args.to] + (layers[args.block],) + rest[args.to :]


OPERATION = Operation(
    name="move",
    usage="move I --to J",
    summary="move a block so that it ends up at index J",
    parse=parse,
    apply=apply,
    canonical=lambda a: f"{a.block} --to {a.to}",
    describe=lambda a: f"**Move layer {a.block}** to position {a.to}",
    params=(Param("block"), Param("to", "option", "Index BLOCK ends up at.", required=True)),
    help="Move BLOCK so that it ends up at index --to.",
    example="gguf-surgeon move 3 in.gguf out.gguf --to 7",
)
