"""interpolate A B [--t 0.5] [--at POS | --replace I]: a new block (1-t)*A + t*B."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import RecipeError
from ..plan import LayerSource
from .base import (
    Layers,
    Operation,
    Param,
    block_index,
    check_blocks,
    check_position,
    expect_count,
    format_fraction,
    fraction,
    split_options,
)


class Interpolate(NamedTuple):
    a: int
    b: int
    t: float  # weight of B
    mode: str  # "at" (insert at `where`) or "replace" (replace block `where`)
    where: int


def parse(tokens: list[str]) -> Interpolate:
    pos, opts = split_options(tokens, {"t", "at", "replace"})
    expect_count(pos, 2, "interpolate A B [--t 0.5] [--at POS | --replace I]")
    a, b = block_index(pos[0]), block_index(pos[1])
    if a == b:
        raise RecipeError(f"interpolate of block {a} with itself (use duplicate {a} for a copy)")
    t = fraction(opts.get("t", "0.5"))
    if "at" in opts and "replace" in opts:
        raise RecipeError("--at and --replace exclude each other")
    if "replace" in opts:
        return Interpolate(a, b, t, "replace", block_index(opts["replace"]))
    return Interpolate(a, b, t, "at", block_index(opts["at"]) if "at" in opts else a + 1)


def apply(args: Interpolate, layers: Layers) -> Layers:
    check_blocks(layers, args.a, args.b)
    new = LayerSource.blend(layers[args.a], layers[args.b], args.t)
    if args.mode == "replace":
        check_blocks(layers, args.where)
        return layers[: args.where] + (new,) + layers[args.where + 1 :]
    check_position(layers, args.where, "position")
    return layers[: args.where] + (new,) + layers[args.where :]


def describe(args: Interpolate) -> str:
    where = f"replacing layer {args.where}" if args.mode == "replace" else f"inserted at {args.where}"
    a, b = args.a, args.b
    return f"**Interpolate layers {a} and {b}** ((1−t)·{a} + t·{b}, t = {args.t:g}), {where}"


OPERATION = Operation(
    name="interpolate",
    usage="interpolate A B [--t 0.5] [--at POS | --replace I]",
    summary="a new block (1-t)*A + t*B (default: inserted after A)",
    parse=parse,
    apply=apply,
    canonical=lambda a: f"{a.a} {a.b} --t {format_fraction(a.t)} --{a.mode} {a.where}",
    describe=describe,
    params=(
        Param("a"),
        Param("b"),
        Param("t", "option", "Blend weight of B: (1-t)*A + t*B.", default="0.5"),
        Param("at", "option", "Insert the new block at this position (default: right after A)."),
        Param("replace", "option", "Replace this block with the new one instead of inserting."),
    ),
    help="A new block (1-t)*A + t*B, blended in float32, written in the source type where gguf can "
    "quantize it, else F16 (the report lists conversions).",
    example="gguf-surgeon interpolate 11 12 in.gguf out.gguf --t 0.5 --replace 11",
)
