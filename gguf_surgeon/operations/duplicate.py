"""duplicate I [--at POS]: insert a copy of a block."""

from __future__ import annotations

from typing import NamedTuple

from .base import (
    Layers,
    Operation,
    Param,
    block_index,
    check_blocks,
    check_position,
    expect_count,
    split_options,
)


class Duplicate(NamedTuple):
    block: int
    at: int  # position of the copy


def parse(tokens: list[str]) -> Duplicate:
    pos, opts = split_options(tokens, {"at"})
    expect_count(pos, 1, "duplicate I [--at POS]")
    i = block_index(pos[0])
    return Duplicate(i, block_index(opts["at"]) if "at" in opts else i + 1)


def apply(args: Duplicate, layers: Layers) -> Layers:
    check_blocks(layers, args.block)
    check_position(layers, args.at, "position")
    return layers[: args.at] + (layers[args.block],) + layers[args.at :]


def describe(args: Duplicate) -> str:
    where = "" if args.at == args.block + 1 else f" (copy inserted at {args.at})"
    return f"**Duplicate layer {args.block}**{where}"


OPERATION = Operation(
    name="duplicate",
    usage="duplicate I [--at POS]",
    summary="insert a copy of a block (default: right after it)",
    parse=parse,
    apply=apply,
    canonical=lambda a: f"{a.block} --at {a.at}",
    describe=describe,
    params=(Param("block"), Param("at", "option", "Position of the copy (default: right after BLOCK).")),
    help="Insert a copy of BLOCK (default: right after it).",
    example="gguf-surgeon duplicate 5 in.gguf out.gguf --at 9",
)
