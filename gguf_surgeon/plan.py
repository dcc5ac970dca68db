"""The layer plan: which source block (or blend of blocks) each output block comes from.

A recipe is parsed into steps; each step (operations.build_plan) transforms the current layer list, so indices in a
step refer to the model as the previous step left it. The plan is pure data: nothing here
reads tensors or writes bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlanError


@dataclass(frozen=True)
class LayerSource:
    """Where one output block comes from: a weighted sum of source blocks (weights sum to 1)."""

    parts: tuple[tuple[int, float], ...]  # (source block index, weight), sorted by index
    experts: tuple[int, ...] | None = None  # source experts kept, ascending (prune-experts); None: all

    @staticmethod
    def copy(index: int) -> LayerSource:
        return LayerSource(((index, 1.0),))

    @property
    def is_copy(self) -> bool:
        return len(self.parts) == 1

    @property
    def primary(self) -> int:
        """The source block with the largest weight (the first on ties)."""
        return max(self.parts, key=lambda p: (p[1], -p[0]))[0]

    def describe(self) -> str:
        if self.is_copy:
            return str(self.parts[0][0])
        return " + ".join(f"{w:g}*{i}" for i, w in self.parts)

    @staticmethod
    def blend(a: LayerSource, b: LayerSource, t: float) -> LayerSource:
        """(1-t)*a + t*b, merged by source index; zero weights dropped."""
        if a.experts is not None or b.experts is not None:
            raise PlanError("cannot blend a block whose experts were pruned (blend first, then prune-experts)")
        weights: dict[int, float] = {}
        for src, scale in ((a, 1.0 - t), (b, t)):
            for i, w in src.parts:
                weights[i] = weights.get(i, 0.0) + w * scale
        parts = tuple((i, round(w, 12)) for i, w in sorted(weights.items()) if abs(w) > 1e-12)
        if len(parts) == 1:
            return LayerSource.copy(parts[0][0])
        return LayerSource(parts)


@dataclass(frozen=True)
class Step:
    """One parsed recipe step."""

    op: str  # operation name in the registry
    args: tuple  # operation-specific parsed arguments
    text: str  # canonical text, e.g. "swap 11 12"


@dataclass(frozen=True)
class LayerPlan:
    """The new layer order of a surgery, before any byte is read or written."""

    steps: tuple[Step, ...]
    source_block_count: int
    layers: tuple[LayerSource, ...]  # output block i comes from layers[i]

    @property
    def recipe(self) -> str:
        return "; ".join(s.text for s in self.steps)

    @property
    def is_identity(self) -> bool:
        return self.layers == tuple(LayerSource.copy(i) for i in range(self.source_block_count))
