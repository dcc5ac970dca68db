"""What every operation module is made of: the Operation record, its command-line parameters as
data, and the parsing and range-check helpers the operations share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import PlanError, RecipeError
from ..plan import LayerSource

Layers = tuple[LayerSource, ...]


@dataclass(frozen=True)
class Param:
    """One command-line parameter of an operation's writer command (the CLI builds click
    parameters from these; the core never imports click)."""

    name: str  # the option or argument name, also the key of the parsed value
    kind: str = "argument"  # "argument", "arguments" (one or more), "option" (--name VALUE) or "flag" (--name)
    help: str = ""  # options and flags only
    default: str | None = None  # options only; shown in --help when set
    required: bool = False  # options only (arguments are always required)


@dataclass(frozen=True)
class Operation:
    """One surgery operation: how its recipe step is parsed, applied, written back and described.

    `args` below is the operation's frozen args record (a NamedTuple defined by its module)."""

    name: str
    usage: str  # recipe syntax, shown in errors and docs
    summary: str
    parse: Callable[[list[str]], Any]  # tokens after the name -> args record
    apply: Callable[[Any, Layers], Layers]  # args, current blocks -> new blocks
    canonical: Callable[[Any], str]  # args -> canonical recipe text, without the name
    describe: Callable[[Any], str]  # args -> the step in a model card's words (Markdown)
    params: tuple[Param, ...] = ()  # the writer command's parameters, in order
    help: str = ""  # the writer command's help (default: summary)
    example: str = ""  # one example invocation of the writer command


# argument parsing helpers -------------------------------------------------------------

MAX_RANGE = 1 << 16  # a range spec is expanded before it meets a model: bound what "0-99999999999" allocates


def block_index(tok: str) -> int:
    try:
        v = int(tok)
    except ValueError:
        raise RecipeError(f"{tok!r} is not a block index") from None
    if v < 0:
        raise RecipeError(f"{tok!r} is not a block index (negative)")
    return v


def fraction(tok: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise RecipeError(f"{tok!r} is not a number") from None
    if not math.isfinite(v):
        raise RecipeError(f"{tok!r} is not a finite number")
    return v


def format_fraction(t: float) -> str:
    """Shortest text that parses back to exactly `t` (0.5, 0.123456789, 0), for canonical recipes."""
    text = repr(float(t))
    return text[:-2] if text.endswith(".0") else text


def parse_layer_spec(spec: str) -> tuple[int, ...]:
    """'0-9,11,13,12' -> (0, ..., 9, 11, 13, 12); a descending range counts down."""
    out: list[int] = []
    for part in spec.replace(" ", ",").split(","):
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            a, b = block_index(lo), block_index(hi)
            if abs(b - a) >= MAX_RANGE:
                raise RecipeError(f"{part!r} spans {abs(b - a) + 1} blocks, more than any model has")
            out.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
        else:
            out.append(block_index(part))
    if not out:
        raise RecipeError(f"{spec!r} names no block")
    return tuple(out)


def format_layer_spec(indices: tuple[int, ...]) -> str:
    """Inverse of parse_layer_spec, collapsing ascending runs: (0,1,2,5) -> '0-2,5'."""
    parts: list[str] = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ",".join(parts)


def split_options(tokens: list[str], allowed: set[str]) -> tuple[list[str], dict[str, str]]:
    """Split `--name value` options (also `name=value`) from positional tokens."""
    pos: list[str] = []
    opts: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        name = value = None
        if tok.startswith("--"):
            name, _, value = tok[2:].partition("=")
            if not value:
                if i + 1 >= len(tokens):
                    raise RecipeError(f"option {tok!r} needs a value")
                value = tokens[i + 1]
                i += 1
        elif "=" in tok:
            name, _, value = tok.partition("=")
        if name is not None:
            if name not in allowed:
                raise RecipeError(
                    f"unknown option {tok!r}"
                    + (f" (allowed: {', '.join('--' + a for a in sorted(allowed))})" if allowed else "")
                )
            opts[name] = value  # type: ignore[assignment]
        else:
            pos.append(tok)
        i += 1
    return pos, opts


def expect_count(pos: list[str], n: int, usage: str) -> None:
    if len(pos) != n:
        extra = f"unexpected {pos[n]!r}" if len(pos) > n else "missing argument"
        raise RecipeError(f"{extra}; usage: {usage}")


def check_blocks(layers: Layers, *indices: int) -> None:
    for i in indices:
        if not 0 <= i < len(layers):
            raise PlanError(
                f"block {i} out of range (the model has {len(layers)} blocks at this step: 0-{len(layers) - 1})"
            )


def check_position(layers: Layers, pos: int, what: str) -> None:
    if not 0 <= pos <= len(layers):
        raise PlanError(f"{what} {pos} out of range (0-{len(layers)} at this step)")
