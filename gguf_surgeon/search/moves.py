"""Moves (one edit named in base-model block indices), the families they come in, and candidates:
compositions of moves with the recipe and layer plan they give on the base."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SearchError, SurgeonError
from ..experts import KERNEL_MULTIPLE
from ..operations import REGISTRY, parse_layer_spec, step_of
from ..operations.base import format_layer_spec
from ..operations.bridge import Bridge
from ..operations.delete import Delete
from ..operations.duplicate import Duplicate
from ..operations.interpolate import Interpolate
from ..operations.keep import Keep
from ..operations.prune_experts import PruneExperts
from ..operations.swap import Swap
from ..plan import LayerPlan, LayerSource, Step

FAMILIES = (
    "delete",
    "swap",
    "duplicate",
    "bridge",
    "interpolate",
    "delete-window",
    "repeat-window",
    "prune-experts",
)
HEALABLE = ("delete", "delete-window")  # families whose moves may be healed deletions


@dataclass(frozen=True)
class Move:
    """One edit named in base-model block indices, placeable into any current block order."""

    op: str  # one of FAMILIES
    blocks: tuple[int, ...]  # base blocks it acts on: (i,), (a, a+1), (a, b) or a window's blocks
    t: float | None = None  # blend weight (bridge, interpolate)
    heal: bool = False  # a deletion healed by a linear correction (docs/heal.md)
    count: int | None = None  # prune-experts: experts every MoE block keeps (blocks is then ())

    @property
    def label(self) -> str:
        """Stable text in base indices, e.g. 'swap 11 12', 'delete-window 12-14 heal', 'bridge 11 t=0.5',
        'prune-experts 6'."""
        if self.op == "prune-experts":
            return f"prune-experts {self.count}"
        if self.op in ("delete-window", "repeat-window"):
            body = f"{self.blocks[0]}-{self.blocks[-1]}"
        else:
            body = " ".join(map(str, self.blocks))
        return f"{self.op} {body}" + (f" t={self.t:g}" if self.t is not None else "") + (" heal" if self.heal else "")

    @staticmethod
    def from_label(label: str) -> Move:
        parts = label.split()
        op, t, heal = parts[0], None, False
        if op == "prune-experts":
            return Move(op, (), count=int(parts[1]))
        rest = []
        for p in parts[1:]:
            if p.startswith("t="):
                t = float(p[2:])
            elif p == "heal":
                heal = True
            else:
                rest.append(p)
        blocks = tuple(i for p in rest for i in parse_layer_spec(p))
        return Move(op, blocks, t, heal)

    def step(self, layers: Sequence[LayerSource]) -> Step | None:
        """The recipe step (through the operation registry) doing this move on the current
        `layers`, or None when it cannot (a block it names is gone, or blocks that must be
        adjacent no longer are). A prune-experts step lists no experts yet (see `compose`)."""
        if self.op == "prune-experts":
            assert self.count is not None
            return step_of("prune-experts", PruneExperts(self.count, None))
        where = {}
        for pos, l in enumerate(layers):
            if l.is_copy and l.parts[0][0] not in where:
                where[l.parts[0][0]] = pos
        if not all(b in where for b in self.blocks):
            return None
        pos = [where[b] for b in self.blocks]
        contiguous = pos == list(range(pos[0], pos[0] + len(pos)))
        if self.op in ("delete", "delete-window"):
            return step_of("delete", Delete(tuple(sorted(pos)), self.heal))
        if self.op == "swap":
            return step_of("swap", Swap(pos[0], pos[1]))
        if self.op == "duplicate":
            return step_of("duplicate", Duplicate(pos[0], pos[0] + 1))
        if self.op == "bridge" and pos[1] == pos[0] + 1:
            return step_of("bridge", Bridge(pos[0], self.t))
        if self.op == "interpolate":
            return step_of("interpolate", Interpolate(pos[0], pos[1], self.t, "replace", pos[0]))
        if self.op == "repeat-window" and contiguous:
            end = pos[-1]
            return step_of("keep", Keep(tuple(range(0, end + 1)) + tuple(pos) + tuple(range(end + 1, len(layers)))))
        return None


@dataclass(frozen=True)
class Candidate:
    """A composition of moves and the recipe and layer plan it gives on the base."""

    moves: tuple[Move, ...]
    recipe: str
    key: str  # the layer plan as text: candidates with equal keys are the same model
    blocks: int  # output block count


def compose(moves: Sequence[Move], block_count: int, experts: Any | None = None) -> Candidate | None:
    """Apply moves in order (each placed where its base blocks are now); None when one cannot
    be placed or the plan leaves the base unchanged. A prune-experts move keeps, in every MoE
    block as the earlier moves left it, the top N experts of `experts` (analysis.expert_rank's
    ExpertOrder or ExpertRanking of the base), so its recipe lists them and replays exactly."""
    layers = tuple(LayerSource.copy(i) for i in range(block_count))
    steps: list[Step] = []
    for m in moves:
        step = m.step(layers)
        if step is None:
            return None
        try:
            if step.op == "prune-experts" and step.args.keep is None:
                if experts is None:
                    raise SearchError(f"{m.label}: the search has no expert ranking of the base")
                from ..analysis.expert_rank import resolve_prune_steps

                step = resolve_prune_steps([*steps, step], experts, block_count)[-1]
            layers = REGISTRY[step.op].apply(step.args, layers)
        except SearchError:
            raise
        except SurgeonError:
            return None  # e.g. more experts asked than an earlier pruning left, a blend of pruned blocks
        steps.append(step)
        if not layers:
            return None
    plan = LayerPlan(tuple(steps), block_count, layers)
    if plan.is_identity:
        return None
    key = plan_key(plan)
    healed = sorted(b for m in moves if m.heal for b in m.blocks)
    if healed:  # the same layers, other bytes: a healed deletion is not the plain one's candidate
        key += "|heal=" + format_layer_spec(healed).replace(",", ".")
    return Candidate(tuple(moves), "; ".join(s.text for s in steps), key, len(layers))


def plan_key(plan: LayerPlan) -> str:
    """The layer plan as text: each output block's source (or blend), and after '@' the source
    experts it keeps when pruned ('3@0.2-5.7'), so distinct prunings are distinct candidates."""
    return ",".join(
        l.describe().replace(" ", "")
        + ("" if l.experts is None else "@" + format_layer_spec(l.experts).replace(",", "."))
        for l in plan.layers
    )


@dataclass(frozen=True)
class Family:
    """One kind of move and where it may act."""

    op: str  # one of FAMILIES
    blocks: tuple[int, ...] | None = None  # first blocks it may start at (None: all)
    t: tuple[float, ...] = (0.5,)  # blend weights (bridge, interpolate)
    sizes: tuple[int, ...] = (2, 3)  # window sizes (delete-window, repeat-window)
    heal: tuple[bool, ...] = (False,)  # deletions plain and/or healed (delete, delete-window)
    # prune-experts: experts every MoE block keeps, each a count (>= 1) or a share of the model's (< 1)
    experts: tuple[float, ...] = ()


def expert_counts(family: Family, n_expert: int) -> list[int]:
    """A prune-experts family's counts on a model of `n_expert` experts, largest first: a share
    is rounded to a whole count, and to a multiple of 32 (at least 32) when the model has 32 or
    more experts (GPU MoE kernels' edge cases, docs/experts.md)."""
    out: set[int] = set()
    for x in family.experts:
        if x >= 1:
            out.add(int(x))
            continue
        n = max(1, round(x * n_expert))
        if n_expert >= KERNEL_MULTIPLE:
            n = max(KERNEL_MULTIPLE, round(n / KERNEL_MULTIPLE) * KERNEL_MULTIPLE)
        out.add(n)
    return sorted(out, reverse=True)


def family_moves(family: Family, block_count: int, n_expert: int = 0) -> list[Move]:
    """Every move of a family on a model of `block_count` blocks (and `n_expert` experts per
    MoE block: a prune-experts family has none on a dense model, nor a count that keeps all)."""
    if family.op == "prune-experts":
        return [Move("prune-experts", (), count=n) for n in expert_counts(family, n_expert) if n < n_expert]
    starts = range(block_count) if family.blocks is None else [b for b in family.blocks if 0 <= b < block_count]
    out: list[Move] = []
    for s in starts:
        if family.op == "delete" and block_count > 1:
            # a healed deletion folds its correction into the block before: none before block 0
            out += [Move("delete", (s,), heal=h) for h in family.heal if s > 0 or not h]
        elif family.op == "duplicate":
            out.append(Move("duplicate", (s,)))
        elif family.op == "swap" and s + 1 < block_count:
            out.append(Move("swap", (s, s + 1)))
        elif family.op in ("bridge", "interpolate") and s + 1 < block_count:
            out += [Move(family.op, (s, s + 1), t) for t in family.t]
        elif family.op in ("delete-window", "repeat-window"):
            for n in family.sizes:
                if s + n <= block_count and family.op == "repeat-window":
                    out.append(Move(family.op, tuple(range(s, s + n))))
                elif s + n <= block_count and n < block_count:
                    out += [Move(family.op, tuple(range(s, s + n)), heal=h) for h in family.heal if s > 0 or not h]
    return out
