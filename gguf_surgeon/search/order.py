"""Candidate ordering: every move of a space ordered by rank's predicted damage and pruned, and
the candidates (single moves, or every composition up to a size) in that order."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from .moves import Candidate, Move, compose, family_moves
from .space import SearchSpace


def move_prior(move: Move, ranking: Any | None) -> float:
    """Predicted damage of a move from rank's scores (lower: try first); 0 without a ranking.

    Deleting or duplicating a block that barely turns the residual stream (low Block
    Influence, or low ablation KLD when measured) should hurt least; a swap or blend of two
    such blocks likewise; a window by its angular distance (Gromov et al.).
    """
    if ranking is None:
        return 0.0
    from ..analysis.rank import block_damage

    blocks = {b.index: b for b in ranking.blocks}
    if move.op in ("delete-window", "repeat-window"):
        try:
            return ranking.window(move.blocks[0], len(move.blocks)).angular_distance
        except KeyError:
            return sum(block_damage(blocks[b]) for b in move.blocks if b in blocks)
    return sum(block_damage(blocks[b]) for b in move.blocks if b in blocks)


def ordered_moves(space: SearchSpace, block_count: int, ranking: Any | None, n_expert: int = 0) -> list[Move]:
    """The space's moves, each family ordered by prior and pruned, then interleaved so that
    the most promising move of every family comes before the second of any (prune-experts:
    the most experts kept first)."""
    per_family: list[list[Move]] = []
    for fam in space.families:
        moves = family_moves(fam, block_count, n_expert)
        moves.sort(key=lambda m: (move_prior(m, ranking), m.blocks, m.t or 0.0, -(m.count or 0)))
        if space.prune is not None and ranking is not None:
            keep = math.ceil(len(moves) * space.prune) if space.prune <= 1 else int(space.prune)
            moves = moves[: max(1, keep)]
        per_family.append(moves)
    out, seen = [], set()
    for group in itertools.zip_longest(*per_family):
        for m in group:
            if m is not None and m.label not in seen:
                seen.add(m.label)
                out.append(m)
    return out


def singles(moves: Sequence[Move], block_count: int, experts: Any | None = None) -> list[Candidate]:
    """One candidate per move (deduplicated by layer plan), in the moves' order (`experts`: the
    base's expert order, for prune-experts moves)."""
    out, keys = [], set()
    for m in moves:
        c = compose((m,), block_count, experts)
        if c is not None and c.key not in keys:
            keys.add(c.key)
            out.append(c)
    return out


def combinations(
    moves: Sequence[Move], block_count: int, max_steps: int, limit: int, experts: Any | None = None
) -> list[Candidate] | None:
    """Every composition of up to `max_steps` distinct moves (in the moves' order), or None
    when there are more than `limit`: then the space is sampled instead."""
    total = sum(math.comb(len(moves), k) for k in range(1, max_steps + 1))
    if total > limit:
        return None
    out, keys = [], set()
    for k in range(1, max_steps + 1):
        for combo in itertools.combinations(moves, k):
            c = compose(combo, block_count, experts)
            if c is not None and c.key not in keys:
                keys.add(c.key)
                out.append(c)
    return out
