"""Search spaces: families of moves and how to combine them, from a preset or a TOML file
(see docs/search.md for the format)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import SearchError
from ..files import read_toml
from ..operations import parse_layer_spec
from .moves import FAMILIES, HEALABLE, Family

EXHAUSTIVE_LIMIT = 512  # a combination space larger than this is sampled with TPE
# the most leaders (candidates whose short-KLD interval overlaps the best one's) that get the full
# eval: 1.5x the 4 of 30 measured on SmolLM2's deletions (docs/search.md), so the cap binds only
# when the short stage separates candidates much less well, and bounds the minutes it can cost
LEADER_CAP = 6


@dataclass(frozen=True)
class SearchSpace:
    """Families of moves, how to combine them, and how many leaders get the full eval."""

    name: str
    families: tuple[Family, ...]
    max_steps: int = 1  # candidates combine up to this many moves (TPE when that is too many)
    prune: float | None = None  # keep this share (<= 1) or number (> 1) of each family, best ranked first
    beam_width: int = 0  # > 0: combine the best candidates phase after phase (1: greedy)
    beam_depth: int = 2  # moves in the deepest combination
    beam_top: int = 6  # moves (best single results) that combinations draw from
    leaders: int = LEADER_CAP  # at most this many candidates get the full eval suite
    exhaustive_limit: int = EXHAUSTIVE_LIMIT

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in d["families"]:  # a study stored before prune-experts families keeps its identity
            if not f["experts"]:
                del f["experts"]
        return d


PRESETS: dict[str, SearchSpace] = {
    "deletions": SearchSpace("deletions", (Family("delete"),)),
    "swaps": SearchSpace("swaps", (Family("swap"),)),
    "duplications": SearchSpace("duplications", (Family("duplicate"),)),
    "blends": SearchSpace("blends", (Family("bridge"), Family("interpolate"))),
    "windows": SearchSpace(
        "windows", (Family("delete-window", sizes=(2, 3, 4)), Family("repeat-window", sizes=(2, 3)))
    ),
    # the reference card's phase-1 sweep: every single deletion, adjacent swap, duplication,
    # bridge and interpolation, then the best combined (about 150 candidates on 28 blocks)
    "phase1": SearchSpace(
        "phase1",
        (Family("delete"), Family("swap"), Family("duplicate"), Family("bridge"), Family("interpolate")),
        beam_width=3,
        beam_depth=2,
        beam_top=8,
    ),
    "combos": SearchSpace("combos", (Family("delete"), Family("swap")), max_steps=2),
    # every single deletion and window of 2-4 blocks, plain and healed, competing on one scale
    "healed-deletions": SearchSpace(
        "healed-deletions",
        (Family("delete", heal=(False, True)), Family("delete-window", sizes=(2, 3, 4), heal=(False, True))),
    ),
    # mixture-of-experts models: keep three quarters, then half of every block's experts (REAP saliency)
    "experts": SearchSpace("experts", (Family("prune-experts", experts=(0.75, 0.5)),)),
    # the same prunings and every single deletion, then the best 2 extended by one of the best 6 moves
    "experts-deletions": SearchSpace(
        "experts-deletions",
        (Family("prune-experts", experts=(0.75, 0.5)), Family("delete")),
        beam_width=2,
        beam_depth=2,
        beam_top=6,
    ),
}


def _spec(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        return tuple(parse_layer_spec(value))
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise SearchError(f'{where}: expected a layer spec like "10-20" or a list of integers, got {value!r}')


def _experts(f: dict, at: str) -> tuple[float, ...]:
    """A family's `experts`: counts (integers >= 1) or shares of the model's (0 < x < 1); only,
    and always, for prune-experts, which acts on every MoE block (no `blocks`)."""
    if f["op"] != "prune-experts":
        if "experts" in f:
            raise SearchError(f'{at}: experts applies to op = "prune-experts" only, not {f["op"]!r}')
        return ()
    if "blocks" in f:
        raise SearchError(f"{at}: prune-experts keeps the same count in every MoE block: no blocks")
    value = f.get("experts")
    value = value if isinstance(value, list) else [value]
    ok = [
        x
        for x in value
        if not isinstance(x, bool) and ((isinstance(x, int) and x >= 1) or (isinstance(x, float) and 0 < x < 1))
    ]
    if not value or len(ok) != len(value):
        raise SearchError(
            f"{at}: experts must be expert counts (integers >= 1) or shares between 0 and 1, e.g. [96, 64] or "
            "[0.75, 0.5]"
        )
    return tuple(value)


def parse_space(data: dict, name: str, where: str) -> SearchSpace:
    """A space from parsed TOML (see docs/search.md for the format)."""
    known = {"name", "family", "max_steps", "prune", "beam", "leaders", "exhaustive_limit"}
    unknown = set(data) - known
    if unknown:
        raise SearchError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    families = []
    for i, f in enumerate(data.get("family", [])):
        at = f"{where}: family[{i}]"
        if not isinstance(f, dict) or f.get("op") not in FAMILIES:
            raise SearchError(f"{at}: 'op' must be one of {', '.join(FAMILIES)}")
        extra = set(f) - {"op", "blocks", "t", "sizes", "heal", "experts"}
        if extra:
            raise SearchError(f"{at}: unknown key(s) {', '.join(sorted(extra))}")
        experts = _experts(f, at)
        t = f.get("t", [0.5])
        t = t if isinstance(t, list) else [t]
        if not all(isinstance(x, (int, float)) and 0 < x < 1 for x in t):
            raise SearchError(f"{at}: t must be numbers strictly between 0 and 1")
        sizes = f.get("sizes", [2, 3])
        sizes = sizes if isinstance(sizes, list) else [sizes]
        if not all(isinstance(x, int) and x >= 1 for x in sizes):
            raise SearchError(f"{at}: sizes must be positive integers")
        heal = f.get("heal", False)
        heal = sorted(set(heal)) if isinstance(heal, list) else [heal]
        if not heal or not all(isinstance(x, bool) for x in heal):
            raise SearchError(f"{at}: heal must be true, false or [false, true]")
        if True in heal and f["op"] not in HEALABLE:
            raise SearchError(f"{at}: heal applies to deletions only ({', '.join(HEALABLE)}), not {f['op']!r}")
        families.append(
            Family(
                f["op"],
                _spec(f["blocks"], at) if "blocks" in f else None,
                tuple(float(x) for x in t),
                tuple(sizes),
                tuple(heal),
                experts,
            )
        )
    if not families:
        raise SearchError(f"{where}: a space needs at least one [[family]]")
    beam = data.get("beam", {})
    if not isinstance(beam, dict):
        raise SearchError(f"{where}: [beam] must be a table with width, depth, top")
    try:
        space = SearchSpace(
            str(data.get("name", name)),
            tuple(families),
            int(data.get("max_steps", 1)),
            float(data["prune"]) if "prune" in data else None,
            int(beam.get("width", 0)),
            int(beam.get("depth", 2)),
            int(beam.get("top", 6)),
            int(data.get("leaders", LEADER_CAP)),
            int(data.get("exhaustive_limit", EXHAUSTIVE_LIMIT)),
        )
    except (TypeError, ValueError) as e:
        raise SearchError(f"{where}: {e}") from None
    if space.max_steps < 1 or space.leaders < 0 or space.beam_depth < 2 or space.beam_top < 1:
        raise SearchError(f"{where}: max_steps >= 1, leaders >= 0, beam depth >= 2 and beam top >= 1 are required")
    return space


def load_space(spec: str) -> SearchSpace:
    """A preset name (see PRESETS) or the path of a TOML space file."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.suffix == ".toml" and not path.exists():
        raise SearchError(f"--space {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a .toml file")
    data = read_toml(path, SearchError, label=f"--space {path}")
    return parse_space(data, path.stem, str(path))
