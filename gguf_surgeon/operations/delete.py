"""delete I [J-K ...] [heal]: remove blocks; `heal` folds a least-squares correction for each
deleted window into the kept block before it (computed by analysis.heal, see docs/heal.md)."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import PlanError, RecipeError
from .base import Layers, Operation, Param, check_blocks, format_layer_spec, parse_layer_spec, split_options


class Delete(NamedTuple):
    blocks: tuple[int, ...]  # sorted, distinct
    heal: bool = False  # fold a linear correction for each deleted window into the block before it


HEAL_TOKENS = ("heal", "--heal")


def windows(blocks: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Runs of consecutive deleted indices as (first, last): (3, 4, 7) -> ((3, 4), (7, 7))."""
    out: list[tuple[int, int]] = []
    for i in blocks:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return tuple(out)


def parse(tokens: list[str]) -> Delete:
    heal = any(tok in HEAL_TOKENS for tok in tokens)
    pos, _ = split_options([tok for tok in tokens if tok not in HEAL_TOKENS], set())
    if not pos:
        raise RecipeError("missing argument; usage: delete I [J-K ...] [heal]")
    return Delete(tuple(sorted(set(i for tok in pos for i in parse_layer_spec(tok)))), heal)


def apply(args: Delete, layers: Layers) -> Layers:
    check_blocks(layers, *args.blocks)
    if args.heal:
        for first, _ in windows(args.blocks):
            if first == 0:
                raise PlanError("heal: a window that starts at block 0 has no kept block before it to fold into")
    drop = set(args.blocks)
    return tuple(l for i, l in enumerate(layers) if i not in drop)


def describe(args: Delete) -> str:
    what = format_layer_spec(args.blocks).replace(",", ", ")
    healed = " (healed: a linear correction folded into the block before each window)" if args.heal else ""
    return f"**Delete layer{'s' if len(args.blocks) > 1 else ''} {what}**{healed}"


OPERATION = Operation(
    name="delete",
    usage="delete I [J-K ...] [heal]",
    summary="remove blocks",
    parse=parse,
    apply=apply,
    canonical=lambda a: " ".join(format_layer_spec(a.blocks).split(",")) + (" heal" if a.heal else ""),
    describe=describe,
    params=(
        Param("blocks", "arguments"),
        Param(
            "heal",
            "flag",
            help="Fold a least-squares correction for each deleted window into the kept block before it "
            "(calibrated with the reference forward pass; see docs/heal.md).",
        ),
    ),
    help="Delete one or more blocks or ranges (10 12-14); --heal corrects for them (docs/heal.md).",
    example="gguf-surgeon delete 10 12-14 in.gguf out.gguf\n  gguf-surgeon delete 12-15 --heal in.gguf out.gguf",
)
