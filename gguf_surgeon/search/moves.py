"""Moves (one edit named in base-model block indices), the families they come in, and candidates:
compositions of moves with the recipe and layer plan they give on the base."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SearchError, SurgeonError
from ..operations import format_fraction, format_layer_spec, parse_layer_spec
from ..plan import LayerPlan, LayerSource
from ..recipe import parse_recipe

FAMILIES = ("delete", "swap", "duplicate", "bridge", "interpolate", "delete-window", "repeat-window")


@dataclass(frozen=True)
class Move:
    """One edit named in base-model block indices, placeable into any current block order."""

    op: str  # one of FAMILIES
    blocks: tuple[int, ...]  # base blocks it acts on: (i,), (a, a+1), (a, b) or a window's blocks
    t: float | None = None  # blend weight (bridge, interpolate)

    @property
    def label(self) -> str:
        """Stable text in base indices, e.g. 'swap 11 12', 'delete-window 12-14', 'bridge 11 t=0.5'."""
        if self.op in ("delete-window", "repeat-window"):
            body = f"{self.blocks[0]}-{self.blocks[-1]}"
        else:
            body = " ".join(map(str, self.blocks))
        return f"{self.op} {body}" + (f" t={self.t:g}" if self.t is not None else "")

    @staticmethod
    def from_label(label: str) -> Move:
        parts = label.split()
        op, t = parts[0], None
        rest = []
        for p in parts[1:]:
            if p.startswith("t="):
                t = float(p[2:])
            else:
                rest.append(p)
        blocks = tuple(i for p in rest for i in parse_layer_spec(p))
        return Move(op, blocks, t)

    def step(self, layers: Sequence[LayerSource]) -> str | None:
        """The recipe step doing this move on the current `layers`, or None when it cannot
        (a block it names is gone, or blocks that must be adjacent no longer are)."""
        where = {}
        for pos, l in enumerate(layers):
            if l.is_copy and l.parts[0][0] not in where:
                where[l.parts[0][0]] = pos
        if not all(b in where for b in self.blocks):
            return None
        pos = [where[b] for b in self.blocks]
        if self.op == "delete":
            return f"delete {pos[0]}"
        if self.op == "swap":
            return f"swap {pos[0]} {pos[1]}"
        if self.op == "duplicate":
            return f"duplicate {pos[0]}"
        if self.op == "bridge":
            return f"bridge {pos[0]} --t {format_fraction(self.t)}" if pos[1] == pos[0] + 1 else None
        if self.op == "interpolate":
            return f"interpolate {pos[0]} {pos[1]} --t {format_fraction(self.t)} --replace {pos[0]}"
        contiguous = pos == list(range(pos[0], pos[0] + len(pos)))
        if self.op == "delete-window":
            return f"delete {format_layer_spec(tuple(sorted(pos))).replace(',', ' ')}"
        if self.op == "repeat-window" and contiguous:
            end = pos[-1]
            order = list(range(0, end + 1)) + pos + list(range(end + 1, len(layers)))
            return f"keep {format_layer_spec(tuple(order))}"
        return None


@dataclass(frozen=True)
class Candidate:
    """A composition of moves and the recipe and layer plan it gives on the base."""

    moves: tuple[Move, ...]
    recipe: str
    key: str  # the layer plan as text: candidates with equal keys are the same model
    blocks: int  # output block count


def compose(moves: Sequence[Move], block_count: int) -> Candidate | None:
    """Apply moves in order (each placed where its base blocks are now); None when one cannot
    be placed or the plan leaves the base unchanged."""
    layers = tuple(LayerSource.copy(i) for i in range(block_count))
    steps: list[str] = []
    for m in moves:
        text = m.step(layers)
        if text is None:
            return None
        steps.append(text)
        try:
            layers = _apply(text, layers)
        except SurgeonError:
            return None
    plan = LayerPlan(parse_recipe("; ".join(steps)), block_count, layers)
    if plan.is_identity:
        return None
    return Candidate(tuple(moves), "; ".join(steps), plan_key(plan), len(layers))


def _apply(step_text: str, layers: tuple[LayerSource, ...]) -> tuple[LayerSource, ...]:
    from ..operations import REGISTRY

    (step,) = parse_recipe(step_text)
    out = REGISTRY[step.op].apply(step.args, layers)
    if not out:
        raise SearchError(f"{step_text!r} leaves no block")
    return out


def plan_key(plan: LayerPlan) -> str:
    return ",".join(l.describe().replace(" ", "") for l in plan.layers)


@dataclass(frozen=True)
class Family:
    """One kind of move and where it may act."""

    op: str  # one of FAMILIES
    blocks: tuple[int, ...] | None = None  # first blocks it may start at (None: all)
    t: tuple[float, ...] = (0.5,)  # blend weights (bridge, interpolate)
    sizes: tuple[int, ...] = (2, 3)  # window sizes (delete-window, repeat-window)


def family_moves(family: Family, block_count: int) -> list[Move]:
    """Every move of a family on a model of `block_count` blocks."""
    starts = range(block_count) if family.blocks is None else [b for b in family.blocks if 0 <= b < block_count]
    out: list[Move] = []
    for s in starts:
        if family.op == "delete" and block_count > 1:
            out.append(Move("delete", (s,)))
        elif family.op == "duplicate":
            out.append(Move("duplicate", (s,)))
        elif family.op == "swap" and s + 1 < block_count:
            out.append(Move("swap", (s, s + 1)))
        elif family.op in ("bridge", "interpolate") and s + 1 < block_count:
            out += [Move(family.op, (s, s + 1), t) for t in family.t]
        elif family.op in ("delete-window", "repeat-window"):
            for n in family.sizes:
                if s + n <= block_count and (family.op == "repeat-window" or n < block_count):
                    out.append(Move(family.op, tuple(range(s, s + n))))
    return out
