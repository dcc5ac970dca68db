"""Phases of a search: the grid of candidates scored together (singles, combinations, beam steps),
stored in the study so that every worker scores the same list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import SearchError
from .moves import Candidate, Move, compose
from .order import combinations, singles
from .storage import StudyContext, study_trials


@dataclass(frozen=True)
class Phase:
    name: str  # "singles", "combos", "beam2", ... or "tpe"
    param: str  # the Optuna parameter holding the recipe (grid phases)
    candidates: tuple[Candidate, ...]  # grid phases: in the order to score them; () for tpe

    def candidate(self, recipe: str) -> Candidate:
        for c in self.candidates:
            if c.recipe == recipe:
                return c
        raise SearchError(f"phase {self.name}: no candidate {recipe!r}")


PHASE_ATTR = "phase:"  # study attribute holding a grid phase's candidate list


def publish_phase(study: Any, phase: Phase) -> Phase:
    """Store a grid phase's candidates in the study unless a worker already did, and return the
    stored version: every worker then scores the same list under the same Optuna choices."""
    key = PHASE_ATTR + phase.name
    if key not in study.user_attrs:
        study.set_user_attr(
            key,
            {
                "param": phase.param,
                "candidates": [[c.recipe, [m.label for m in c.moves], c.key, c.blocks] for c in phase.candidates],
            },
        )
    stored = stored_phase(study, phase.name)
    assert stored is not None
    return stored


def stored_phase(study: Any, name: str) -> Phase | None:
    data = study.user_attrs.get(PHASE_ATTR + name)
    if data is None:
        return None
    return Phase(
        name,
        data["param"],
        tuple(
            Candidate(tuple(Move.from_label(l) for l in moves), recipe, key, blocks)
            for recipe, moves, key, blocks in data["candidates"]
        ),
    )


def first_phase(ctx: StudyContext) -> Phase:
    sp = ctx.space
    if sp.max_steps == 1:
        return Phase("singles", "candidate", tuple(singles(ctx.moves, ctx.block_count, ctx.experts)))
    combos = combinations(ctx.moves, ctx.block_count, sp.max_steps, sp.exhaustive_limit, ctx.experts)
    if combos is None:
        return Phase("tpe", "", ())
    combos.sort(key=lambda c: (len(c.moves),))  # singles first, then pairs, each in rank order
    return Phase("combos", "candidate", tuple(combos))


def scored_trials(study: Any, phase: str | None = None) -> list[Any]:
    """COMPLETE trials with a value, best first (reused duplicates left out)."""
    out = [
        t
        for t in study_trials(study)
        if t.state.name == "COMPLETE"
        and t.value is not None
        and t.user_attrs.get("evaluated")
        and (phase is None or t.user_attrs.get("phase") == phase)
    ]
    return sorted(out, key=lambda t: (t.value, t.number))


def beam_phase(ctx: StudyContext, study: Any, depth: int, parent_phase: str) -> Phase | None:
    """Depth-`depth` combinations: each of the best `beam_width` candidates of the parent
    phase, extended by each of the best `beam_top` single moves it does not hold yet."""
    sp = ctx.space
    singles_ = scored_trials(study, "singles")
    top_moves: list[Move] = []
    for t in singles_:
        (label,) = t.user_attrs["moves"]
        top_moves.append(Move.from_label(label))
        if len(top_moves) == sp.beam_top:
            break
    parents = scored_trials(study, parent_phase)[: sp.beam_width]
    known = {t.user_attrs.get("key") for t in scored_trials(study)}
    out: list[tuple[float, Candidate]] = []
    keys = set()
    value = {m.label: t.value for t, m in zip(singles_, top_moves)}
    for p in parents:
        pm = [Move.from_label(l) for l in p.user_attrs["moves"]]
        for m in top_moves:
            if m in pm:
                continue
            c = compose(pm + [m], ctx.block_count, ctx.experts)
            if c is None or c.key in keys or c.key in known:
                continue
            keys.add(c.key)
            out.append((p.value + value.get(m.label, 0.0), c))
    if not out:
        return None
    out.sort(key=lambda vc: vc[0])
    return Phase(f"beam{depth}", f"beam{depth}", tuple(c for _, c in out))
