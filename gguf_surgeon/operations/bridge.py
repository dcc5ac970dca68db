"""bridge I [--t 0.5]: interpolate I and I+1, inserted between them."""

from __future__ import annotations

from typing import NamedTuple

from . import interpolate
from .base import (
    Layers,
    Operation,
    Param,
    block_index,
    check_blocks,
    expect_count,
    format_fraction,
    fraction,
    split_options,
)


class Bridge(NamedTuple):
    block: int
    t: float  # weight of block + 1


def parse(tokens: list[str]) -> Bridge:
    pos, opts = split_options(tokens, {"t"})
    expect_count(pos, 1, "bridge I [--t 0.5]")
    return Bridge(block_index(pos[0]), fraction(opts.get("t", "0.5")))


def apply(args: Bridge, layers: Layers) -> Layers:
    i = args.block
    check_blocks(layers, i, i + 1)
    return interpolate.apply(interpolate.Interpolate(i, i + 1, args.t, "at", i + 1), layers)


OPERATION = Operation(
    name="bridge",
    usage="bridge I [--t 0.5]",
    summary="interpolate I and I+1, inserted between them",
    parse=parse,
    apply=apply,
    canonical=lambda a: f"{a.block} --t {format_fraction(a.t)}",
    describe=lambda a: f"**Bridge layers {a.block} and {a.block + 1}** (their t = {a.t:g} blend inserted between them)",
    params=(Param("block"), Param("t", "option", "Blend weight of BLOCK+1.", default="0.5")),
    help="Interpolate BLOCK and BLOCK+1 and insert the blend between them.",
    example="gguf-surgeon bridge 11 in.gguf out.gguf",
)
