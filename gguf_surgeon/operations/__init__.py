"""The operation registry: name -> parser and plan transform.

The CLI's single-operation commands and the recipe language both read this registry, so a
new operation is one `Operation(...)` entry with a parse and an apply function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import PlanError, RecipeError
from ..plan import LayerPlan, LayerSource, Step

Layers = tuple[LayerSource, ...]


@dataclass(frozen=True)
class Operation:
    name: str
    usage: str  # recipe syntax, shown in errors and docs
    summary: str
    parse: Callable[[list[str]], tuple]  # tokens after the name -> args
    apply: Callable[[tuple, Layers], Layers]
    canonical: Callable[[tuple], str]  # args -> canonical text (without the name)


# argument parsing helpers -------------------------------------------------------------

MAX_RANGE = 1 << 16  # a range spec is expanded before it meets a model: bound what "0-99999999999" allocates


def _index(tok: str) -> int:
    try:
        v = int(tok)
    except ValueError:
        raise RecipeError(f"{tok!r} is not a block index") from None
    if v < 0:
        raise RecipeError(f"{tok!r} is not a block index (negative)")
    return v


def _fraction(tok: str) -> float:
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
            a, b = _index(lo), _index(hi)
            if abs(b - a) >= MAX_RANGE:
                raise RecipeError(f"{part!r} spans {abs(b - a) + 1} blocks, more than any model has")
            out.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
        else:
            out.append(_index(part))
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


def _options(tokens: list[str], allowed: set[str]) -> tuple[list[str], dict[str, str]]:
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


def _count(pos: list[str], n: int, usage: str) -> None:
    if len(pos) != n:
        extra = f"unexpected {pos[n]!r}" if len(pos) > n else "missing argument"
        raise RecipeError(f"{extra}; usage: {usage}")


def _check(layers: Layers, *indices: int) -> None:
    for i in indices:
        if not 0 <= i < len(layers):
            raise PlanError(
                f"block {i} out of range (the model has {len(layers)} blocks at this step: 0-{len(layers) - 1})"
            )


def _check_position(layers: Layers, pos: int, what: str) -> None:
    if not 0 <= pos <= len(layers):
        raise PlanError(f"{what} {pos} out of range (0-{len(layers)} at this step)")


# the operations -------------------------------------------------------------------------


def _parse_delete(tokens: list[str]) -> tuple:
    pos, _ = _options(tokens, set())
    if not pos:
        raise RecipeError("missing argument; usage: delete I [J-K ...]")
    return tuple(sorted(set(i for tok in pos for i in parse_layer_spec(tok))))


def _apply_delete(args: tuple, layers: Layers) -> Layers:
    _check(layers, *args)
    drop = set(args)
    return tuple(l for i, l in enumerate(layers) if i not in drop)


def _parse_swap(tokens: list[str]) -> tuple:
    pos, _ = _options(tokens, set())
    _count(pos, 2, "swap A B")
    a, b = _index(pos[0]), _index(pos[1])
    if a == b:
        raise RecipeError(f"swap of block {a} with itself")
    return (a, b)


def _apply_swap(args: tuple, layers: Layers) -> Layers:
    a, b = args
    _check(layers, a, b)
    out = list(layers)
    out[a], out[b] = out[b], out[a]
    return tuple(out)


def _parse_duplicate(tokens: list[str]) -> tuple:
    pos, opts = _options(tokens, {"at"})
    _count(pos, 1, "duplicate I [--at POS]")
    i = _index(pos[0])
    return (i, _index(opts["at"]) if "at" in opts else i + 1)


def _apply_duplicate(args: tuple, layers: Layers) -> Layers:
    i, at = args
    _check(layers, i)
    _check_position(layers, at, "position")
    return layers[:at] + (layers[i],) + layers[at:]


def _parse_move(tokens: list[str]) -> tuple:
    pos, opts = _options(tokens, {"to"})
    _count(pos, 1, "move I --to J")
    if "to" not in opts:
        raise RecipeError("missing --to; usage: move I --to J")
    return (_index(pos[0]), _index(opts["to"]))


def _apply_move(args: tuple, layers: Layers) -> Layers:
    i, to = args
    _check(layers, i, to)
    rest = layers[:i] + layers[i + 1 :]
    return rest[:to] + (layers[i],) + rest[to:]


def _parse_keep(tokens: list[str]) -> tuple:
    pos, _ = _options(tokens, set())
    if not pos:
        raise RecipeError("missing argument; usage: keep SPEC (e.g. keep 0-9,11,13,12)")
    return tuple(i for tok in pos for i in parse_layer_spec(tok))


def _apply_keep(args: tuple, layers: Layers) -> Layers:
    _check(layers, *args)
    return tuple(layers[i] for i in args)


def _parse_interpolate(tokens: list[str]) -> tuple:
    pos, opts = _options(tokens, {"t", "at", "replace"})
    _count(pos, 2, "interpolate A B [--t 0.5] [--at POS | --replace I]")
    a, b = _index(pos[0]), _index(pos[1])
    t = _fraction(opts.get("t", "0.5"))
    if "at" in opts and "replace" in opts:
        raise RecipeError("--at and --replace exclude each other")
    if "replace" in opts:
        return (a, b, t, "replace", _index(opts["replace"]))
    return (a, b, t, "at", _index(opts["at"]) if "at" in opts else a + 1)


def _apply_interpolate(args: tuple, layers: Layers) -> Layers:
    a, b, t, mode, where = args
    _check(layers, a, b)
    new = LayerSource.blend(layers[a], layers[b], t)
    if mode == "replace":
        _check(layers, where)
        return layers[:where] + (new,) + layers[where + 1 :]
    _check_position(layers, where, "position")
    return layers[:where] + (new,) + layers[where:]


def _canon_interpolate(args: tuple) -> str:
    a, b, t, mode, where = args
    return f"{a} {b} --t {format_fraction(t)} --{mode} {where}"


def _parse_bridge(tokens: list[str]) -> tuple:
    pos, opts = _options(tokens, {"t"})
    _count(pos, 1, "bridge I [--t 0.5]")
    return (_index(pos[0]), _fraction(opts.get("t", "0.5")))


def _apply_bridge(args: tuple, layers: Layers) -> Layers:
    i, t = args
    _check(layers, i, i + 1)
    return _apply_interpolate((i, i + 1, t, "at", i + 1), layers)


REGISTRY: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation(
            "delete",
            "delete I [J-K ...]",
            "remove blocks",
            _parse_delete,
            _apply_delete,
            lambda a: " ".join(format_layer_spec(a).split(",")),
        ),
        Operation("swap", "swap A B", "exchange two blocks", _parse_swap, _apply_swap, lambda a: f"{a[0]} {a[1]}"),
        Operation(
            "duplicate",
            "duplicate I [--at POS]",
            "insert a copy of a block (default: right after it)",
            _parse_duplicate,
            _apply_duplicate,
            lambda a: f"{a[0]} --at {a[1]}",
        ),
        Operation(
            "move",
            "move I --to J",
            "move a block so that it ends up at index J",
            _parse_move,
            _apply_move,
            lambda a: f"{a[0]} --to {a[1]}",
        ),
        Operation(
            "keep",
            "keep SPEC",
            "the whole new order as a layer spec; a repeated index duplicates",
            _parse_keep,
            _apply_keep,
            lambda a: format_layer_spec(a),
        ),
        Operation(
            "interpolate",
            "interpolate A B [--t 0.5] [--at POS | --replace I]",
            "a new block (1-t)*A + t*B (default: inserted after A)",
            _parse_interpolate,
            _apply_interpolate,
            _canon_interpolate,
        ),
        Operation(
            "bridge",
            "bridge I [--t 0.5]",
            "interpolate I and I+1, inserted between them",
            _parse_bridge,
            _apply_bridge,
            lambda a: f"{a[0]} --t {format_fraction(a[1])}",
        ),
    )
}


def make_step(op: str, tokens: list[str]) -> Step:
    """Parse one step's tokens (after the operation name) into a Step with canonical text."""
    if op not in REGISTRY:
        raise RecipeError(f"unknown operation {op!r} (known: {', '.join(REGISTRY)})")
    operation = REGISTRY[op]
    args = operation.parse(tokens)
    return Step(op, args, f"{op} {operation.canonical(args)}")


def build_plan(steps: tuple[Step, ...], block_count: int) -> LayerPlan:
    """Apply `steps` in order to the identity order of `block_count` blocks."""
    layers = tuple(LayerSource.copy(i) for i in range(block_count))
    for n, step in enumerate(steps, 1):
        try:
            layers = REGISTRY[step.op].apply(step.args, layers)
        except PlanError as e:
            raise PlanError(f"step {n} {step.text!r}: {e}") from None
        if not layers:
            raise PlanError(f"step {n} {step.text!r}: the recipe leaves no block")
    return LayerPlan(tuple(steps), block_count, layers)
