"""Find the best surgery automatically: spaces of candidate edits, an Optuna study, staged scoring.

    result = run_search("base.gguf", load_space("phase1"), SearchOptions(budget=60))
    result.champion.recipe      # "delete 10; swap 11 12"

How it works:
- A **space** (a preset or a TOML file) lists families of *moves*: single deletions, adjacent
  swaps, duplications, bridges, interpolations, windows of n blocks deleted or repeated. A
  move names blocks of the *base* model, so moves compose: ``delete 10`` then ``swap 12 13``
  (base indices) becomes the recipe ``delete 10; swap 11 12``. Candidates that give the same
  layer plan are one candidate.
- **Guided**: `rank` scores (Block Influence, angular distance, or ablation KLD when given)
  order every family, most promising first, and `prune` drops the least promising.
- **Engine**: one Optuna study holds everything, in SQLite by default (or any --storage URL:
  PostgreSQL/MySQL for many machines). Exhaustive spaces are brute force: every candidate is
  enqueued in rank order and workers take them one at a time; combination spaces too large
  for that are sampled with TPE over "step1..stepK" choices. The best candidates are then
  combined (beam search; width 1 is greedy), phase after phase.
- **Staged**: every candidate gets the KL divergence to the base on a short text
  (llama-perplexity through gguf_surgeon.evaluate, base logits cached by hash); only the
  leaders get the full eval suite, whose overall score picks the champion and gives the
  verdict against the base.
- **Resumable**: each result is stored when it finishes. A rerun re-enqueues what is missing
  or failed (Ctrl-C fails the running trial) and never re-evaluates a finished candidate.
  Candidate files live in the work folder only while they are scored, unless `keep`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputError, SearchError, SurgeonError, ToolError, ToolNotFoundError
from ..operations import format_fraction, format_layer_spec, parse_layer_spec
from ..plan import LayerPlan, LayerSource
from ..reader import Model
from ..recipe import parse_recipe
from ..files import read_toml
from ..files import write_text_atomic


DEFAULT_WORK_DIR = Path("gguf-surgeon-search")
DB_FILE = "search.db"
SHORT_CHARS = 2500  # of the eval text: about 4 chunks of 128 tokens for a 50k-token vocabulary
SHORT_CTX = 128  # llama-perplexity chunk length of the short KLD stage
EXHAUSTIVE_LIMIT = 512  # a combination space larger than this is sampled with TPE
MAX_REUSED_IN_A_ROW = 50  # TPE proposing only known candidates this often: the space is used up
HEARTBEAT_S = 20  # a RUNNING trial silent for GRACE_S is failed (its worker died) and retried
GRACE_S = 90
POLL_S = 0.5  # waiting for other workers to finish a phase

FAMILIES = ("delete", "swap", "duplicate", "bridge", "interpolate", "delete-window", "repeat-window")

SearchProgress = Callable[["SearchEvent"], None]



# --- moves and candidates -----------------------------------------------------------------

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
    def from_label(label: str) -> "Move":
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


# --- spaces -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """One kind of move and where it may act."""

    op: str  # one of FAMILIES
    blocks: tuple[int, ...] | None = None  # first blocks it may start at (None: all)
    t: tuple[float, ...] = (0.5,)  # blend weights (bridge, interpolate)
    sizes: tuple[int, ...] = (2, 3)  # window sizes (delete-window, repeat-window)


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
    leaders: int = 3  # candidates that get the full eval suite
    exhaustive_limit: int = EXHAUSTIVE_LIMIT

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, SearchSpace] = {
    "deletions": SearchSpace("deletions", (Family("delete"),)),
    "swaps": SearchSpace("swaps", (Family("swap"),)),
    "duplications": SearchSpace("duplications", (Family("duplicate"),)),
    "blends": SearchSpace("blends", (Family("bridge"), Family("interpolate"))),
    "windows": SearchSpace("windows", (Family("delete-window", sizes=(2, 3, 4)), Family("repeat-window", sizes=(2, 3)))),
    # the reference card's phase-1 sweep: every single deletion, adjacent swap, duplication,
    # bridge and interpolation, then the best combined (about 150 candidates on 28 blocks)
    "phase1": SearchSpace("phase1", (Family("delete"), Family("swap"), Family("duplicate"), Family("bridge"),
                                     Family("interpolate")), beam_width=3, beam_depth=2, beam_top=8),
    "combos": SearchSpace("combos", (Family("delete"), Family("swap")), max_steps=2),
}


def _spec(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        return tuple(parse_layer_spec(value))
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise SearchError(f"{where}: expected a layer spec like \"10-20\" or a list of integers, got {value!r}")


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
        extra = set(f) - {"op", "blocks", "t", "sizes"}
        if extra:
            raise SearchError(f"{at}: unknown key(s) {', '.join(sorted(extra))}")
        t = f.get("t", [0.5])
        t = t if isinstance(t, list) else [t]
        if not all(isinstance(x, (int, float)) and 0 < x < 1 for x in t):
            raise SearchError(f"{at}: t must be numbers strictly between 0 and 1")
        sizes = f.get("sizes", [2, 3])
        sizes = sizes if isinstance(sizes, list) else [sizes]
        if not all(isinstance(x, int) and x >= 1 for x in sizes):
            raise SearchError(f"{at}: sizes must be positive integers")
        families.append(Family(f["op"], _spec(f["blocks"], at) if "blocks" in f else None,
                               tuple(float(x) for x in t), tuple(sizes)))
    if not families:
        raise SearchError(f"{where}: a space needs at least one [[family]]")
    beam = data.get("beam", {})
    if not isinstance(beam, dict):
        raise SearchError(f"{where}: [beam] must be a table with width, depth, top")
    try:
        space = SearchSpace(str(data.get("name", name)), tuple(families), int(data.get("max_steps", 1)),
                            float(data["prune"]) if "prune" in data else None, int(beam.get("width", 0)),
                            int(beam.get("depth", 2)), int(beam.get("top", 6)), int(data.get("leaders", 3)),
                            int(data.get("exhaustive_limit", EXHAUSTIVE_LIMIT)))
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


# --- ordering moves by rank -------------------------------------------------------------------

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


def ordered_moves(space: SearchSpace, block_count: int, ranking: Any | None) -> list[Move]:
    """The space's moves, each family ordered by prior and pruned, then interleaved so that
    the most promising move of every family comes before the second of any."""
    per_family: list[list[Move]] = []
    for fam in space.families:
        moves = family_moves(fam, block_count)
        moves.sort(key=lambda m: (move_prior(m, ranking), m.blocks, m.t or 0.0))
        if space.prune is not None and ranking is not None:
            keep = math.ceil(len(moves) * space.prune) if space.prune <= 1 else int(space.prune)
            moves = moves[:max(1, keep)]
        per_family.append(moves)
    out, seen = [], set()
    for group in itertools.zip_longest(*per_family):
        for m in group:
            if m is not None and m.label not in seen:
                seen.add(m.label)
                out.append(m)
    return out


def singles(moves: Sequence[Move], block_count: int) -> list[Candidate]:
    """One candidate per move (deduplicated by layer plan), in the moves' order."""
    out, keys = [], set()
    for m in moves:
        c = compose((m,), block_count)
        if c is not None and c.key not in keys:
            keys.add(c.key)
            out.append(c)
    return out


def combinations(moves: Sequence[Move], block_count: int, max_steps: int, limit: int) -> list[Candidate] | None:
    """Every composition of up to `max_steps` distinct moves (in the moves' order), or None
    when there are more than `limit`: then the space is sampled instead."""
    total = sum(math.comb(len(moves), k) for k in range(1, max_steps + 1))
    if total > limit:
        return None
    out, keys = [], set()
    for k in range(1, max_steps + 1):
        for combo in itertools.combinations(moves, k):
            c = compose(combo, block_count)
            if c is not None and c.key not in keys:
                keys.add(c.key)
                out.append(c)
    return out


# --- scoring candidates (the integration with gguf_surgeon.evaluate) ------------------------

@dataclass(frozen=True)
class ShortScore:
    """Stage 1: KL divergence to the base on the short text."""

    kld: float  # mean KL(base || candidate) per token, nats
    low: float  # 95% bootstrap interval over text chunks
    high: float
    same_top: float  # % of tokens whose most likely next token is the base's
    seconds: float


def short_text(chars: int = SHORT_CHARS) -> str:
    """The first `chars` characters of the eval suite's text, cut at a sentence end."""
    from ..evaluation.runner import EVAL_TEXT_FILE

    text = EVAL_TEXT_FILE.read_text(encoding="utf-8")
    if len(text) <= chars:
        return text
    cut = text[:chars]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[:end + 1] if end > chars // 2 else cut


class CandidateScorer:
    """Writes a candidate's GGUF, scores it, deletes it (unless keep).

    The integration point with gguf_surgeon.evaluate: stage 1 runs llama-perplexity
    --kl-divergence-base/--kl-divergence through evaluate's evaluator and cache (base logits
    are computed once per text and cached by the base's hash; a candidate's result is cached
    by its own hash, so a rebuilt identical candidate costs nothing); stage 2 is
    evaluate.evaluate(candidate, base).
    """

    def __init__(self, base: Path, work_dir: Path, *, llama_bin: Path | None = None, ctx: int = SHORT_CTX,
                 short_chars: int = SHORT_CHARS, threads: int | None = None, full_questions: int | None = None,
                 keep: bool = False, cache_dir: Path | None = None):
        self.base = Path(base)
        self.work_dir = Path(work_dir)
        self.candidates_dir = self.work_dir / "candidates"
        self.llama_bin = llama_bin
        self.ctx = ctx
        self.short_chars = short_chars
        self.threads = threads
        self.full_questions = full_questions
        self.keep = keep
        self.cache_dir = cache_dir

    def _options(self, text: Path | None) -> Any:
        from ..evaluation.runner import EvalOptions

        kw: dict[str, Any] = {"llama_bin": self.llama_bin, "cache_dir": self.cache_dir}
        if self.threads:
            kw["threads"] = self.threads
        if text is not None:
            kw.update(text=text, ctx=self.ctx)
        else:
            kw["questions"] = self.full_questions
        return EvalOptions(**kw)

    def text_file(self) -> Path:
        """The short text, written once into the work folder (same bytes: same cache keys)."""
        path = self.work_dir / f"short-text-{self.short_chars}.txt"
        text = short_text(self.short_chars)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            try:
                self.work_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{self.work_dir}: cannot create the work folder: {e.strerror}") from None
            write_text_atomic(path, text, force=True)
        return path

    def prepare(self) -> None:
        """Compute (or find cached) the base logits of the short text before workers start."""
        self._kld(self.base)

    def _kld(self, candidate: Path) -> ShortScore:
        from ..evaluation.runner import kl_divergence

        start = time.monotonic()
        result = kl_divergence(candidate, self.base, self._options(self.text_file()))
        return ShortScore(result.mean.value, result.mean.low, result.mean.high, result.same_top.value,
                          time.monotonic() - start)

    def build(self, recipe: str, tag: str) -> Path:
        from ..edit import EditOptions, edit

        self.candidates_dir.mkdir(parents=True, exist_ok=True)
        path = self.candidates_dir / f"candidate-{tag}.gguf"
        edit(self.base, path, recipe, EditOptions(overwrite=True))
        return path

    def short(self, recipe: str, tag: str) -> ShortScore:
        """Stage 1 for one recipe; the candidate file exists only while it is scored."""
        path = self.build(recipe, tag)
        try:
            return self._kld(path)
        finally:
            if not self.keep:
                path.unlink(missing_ok=True)

    def full(self, recipe: str, tag: str) -> dict:
        """Stage 2: the full eval suite against the base, summarized for the study."""
        from ..evaluation.runner import evaluate

        path = self.build(recipe, tag)
        try:
            report = evaluate(path, self.base, self._options(None))
        finally:
            if not self.keep:
                path.unlink(missing_ok=True)
        vs = report.versus_base
        assert vs is not None
        overall = vs.differences[0].delta
        return {"score": _est(report.score), "base_score": _est(vs.base.score), "delta": _est(overall),
                "verdict": vs.verdict, "factual": [report.factual.correct, report.factual.total],
                "base_factual": [vs.base.factual.correct, vs.base.factual.total],
                "perplexity": _est(report.perplexity.ppl), "base_perplexity": _est(vs.base.perplexity.ppl),
                "kld": _est(vs.kld.mean)}


def _est(e: Any) -> list[float]:
    return [e.value, e.low, e.high]


# --- the study ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchOptions:
    budget: int | None = None  # candidates scored, over all workers and runs (None: the whole exhaustive space)
    jobs: int = 1  # worker processes on this machine
    storage: str | None = None  # Optuna storage URL (default: sqlite:///<work_dir>/search.db)
    study_name: str | None = None  # default: "<base file stem>:<space name>"
    work_dir: Path = DEFAULT_WORK_DIR  # candidate files, the short text, the default database
    keep: bool = False  # keep candidate files after scoring
    llama_bin: Path | None = None
    ctx: int = SHORT_CTX
    short_chars: int = SHORT_CHARS
    leaders: int | None = None  # override the space's leaders
    full_questions: int | None = None  # full eval: ask only the first N questions
    rank_file: Path | None = None  # a `rank --save` JSON for the guidance (default: computed, BI only)
    use_rank: bool = True  # False: natural order, no pruning
    seed: int = 0
    threads: int | None = None  # llama.cpp threads per worker (default: cores / jobs)
    cache_dir: Path | None = None  # eval cache (default: evaluate's)


@dataclass(frozen=True)
class Entry:
    """One scored candidate of the leaderboard."""

    number: int  # Optuna trial number
    recipe: str
    key: str
    phase: str
    blocks: int
    kld: float
    kld_low: float
    kld_high: float
    same_top: float
    worker: str
    full: dict | None  # stage-2 summary (score, delta, verdict, factual, ...) for leaders

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchResult:
    study_name: str
    storage: str
    base: str
    space: str
    budget: int | None
    evaluated: int  # candidates scored (stage 1) in the whole study
    evaluated_now: int  # of those, by this run
    candidates: int | None  # size of the exhaustive space (None: sampled with TPE)
    leaderboard: tuple[Entry, ...]  # best first
    champion: Entry | None
    verdict: str  # the champion against the base, in words
    seconds: float
    interrupted: bool = False

    def to_dict(self) -> dict:
        return {"study_name": self.study_name, "storage": self.storage, "base": self.base, "space": self.space,
                "budget": self.budget, "evaluated": self.evaluated, "evaluated_now": self.evaluated_now,
                "candidates": self.candidates, "seconds": round(self.seconds, 2), "interrupted": self.interrupted,
                "champion": self.champion.to_dict() if self.champion else None, "verdict": self.verdict,
                "leaderboard": [e.to_dict() for e in self.leaderboard]}


@dataclass(frozen=True)
class SearchEvent:
    """What a progress callback hears: a phase starting, a candidate scored, the leaders' eval."""

    kind: str  # "phase" | "scored" | "reused" | "full" | "waiting"
    phase: str
    recipe: str | None
    evaluated: int  # stage-1 results in the study so far
    budget: int | None
    detail: dict = field(default_factory=dict)


def storage_url(options: SearchOptions) -> str:
    if options.storage:
        return options.storage
    return f"sqlite:///{(Path(options.work_dir) / DB_FILE).resolve()}"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SearchError("search needs optuna: pip install 'gguf-surgeon[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are ours to report
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # run_one does what optimize does around each trial, heartbeat included
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


def open_storage(url: str) -> Any:
    optuna = _optuna()
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        path = Path(url.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SearchError(f"--storage {url}: cannot create {path.parent}: {e.strerror or e}") from None
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # workers wait on each other's writes
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **kwargs)
    except Exception as e:  # noqa: BLE001  SQLAlchemy raises many types for a bad URL or server
        raise SearchError(f"--storage {url}: cannot open: {e}") from None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _Context:
    """What every worker of one study needs (rebuilt in each worker process)."""

    base: Path
    space: SearchSpace
    options: SearchOptions
    url: str
    study_name: str
    block_count: int
    moves: list[Move]  # ordered and pruned, from the study (same list for every worker)


def _trials(study: Any, states: Sequence[Any] | None = None) -> list[Any]:
    return study.get_trials(deepcopy=False, states=states)


def count_evaluated(study: Any) -> int:
    return sum(1 for t in _trials(study) if t.user_attrs.get("evaluated") and t.state.name == "COMPLETE")


def _claimed(study: Any) -> int:
    """Scored or being scored: what the budget is charged with."""
    return sum(1 for t in _trials(study) if (t.user_attrs.get("evaluated") and t.state.name == "COMPLETE")
               or (t.state.name == "RUNNING" and t.user_attrs.get("scoring")))


def default_study_name(base: Path, space: SearchSpace) -> str:
    return f"{Path(base).name.removesuffix('.gguf')}:{space.name}"


def create_or_load(base: Path, space: SearchSpace, options: SearchOptions,
                   ranking: Any | None = None) -> _Context:
    """Open the study, creating it with the ordered move list on first use; checks that an
    existing study is about the same base and space."""
    optuna = _optuna()
    url = storage_url(options)
    storage = open_storage(url)
    with Model(base) as m:
        block_count = len(m.blocks())
        size = sum(s.size for s in m.shards)
    name = options.study_name or default_study_name(base, space)
    identity = {"base": base.name, "base_size": size, "block_count": block_count, "space": space.to_dict()}
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
    existing = study.user_attrs.get("identity")
    identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
    if existing is None:
        if options.use_rank and ranking is None:
            ranking = _ranking(base, options)
        moves = ordered_moves(space, block_count, ranking)
        study.set_user_attr("moves", [m.label for m in moves])
        study.set_user_attr("ranked_by", None if ranking is None else ranking.tokenizer)
        study.set_user_attr("identity", identity)  # last: a study with an identity is complete
    elif existing != identity:
        diff = [k for k in identity if existing.get(k) != identity[k]]
        raise SearchError(f"study {name!r} in {url} was made for another base or space (differs in: {', '.join(diff)}); "
                          "pass another --study-name or --storage")
    moves = [Move.from_label(l) for l in study.user_attrs["moves"]]
    return _Context(base, space, options, url, name, block_count, moves)


def _ranking(base: Path, options: SearchOptions) -> Any | None:
    from ..analysis.rank import Ranking, rank_model
    from ..analysis.reference import ForwardError

    if options.rank_file is not None:
        try:
            return Ranking.from_dict(json.loads(Path(options.rank_file).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SearchError(f"--rank {options.rank_file}: not a rank --save file: {e}") from None
    try:
        return rank_model(base, max_tokens=64, llama_bin=options.llama_bin)
    except ForwardError:
        return None  # an architecture the reference pass does not run: natural order


# --- phases ---------------------------------------------------------------------------------

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
        study.set_user_attr(key, {"param": phase.param, "candidates": [
            [c.recipe, [m.label for m in c.moves], c.key, c.blocks] for c in phase.candidates]})
    stored = stored_phase(study, phase.name)
    assert stored is not None
    return stored


def stored_phase(study: Any, name: str) -> Phase | None:
    data = study.user_attrs.get(PHASE_ATTR + name)
    if data is None:
        return None
    return Phase(name, data["param"], tuple(Candidate(tuple(Move.from_label(l) for l in moves), recipe, key, blocks)
                                            for recipe, moves, key, blocks in data["candidates"]))


def first_phase(ctx: _Context) -> Phase:
    sp = ctx.space
    if sp.max_steps == 1:
        return Phase("singles", "candidate", tuple(singles(ctx.moves, ctx.block_count)))
    combos = combinations(ctx.moves, ctx.block_count, sp.max_steps, sp.exhaustive_limit)
    if combos is None:
        return Phase("tpe", "", ())
    combos.sort(key=lambda c: (len(c.moves),))  # singles first, then pairs, each in rank order
    return Phase("combos", "candidate", tuple(combos))


def _results(study: Any, phase: str | None = None) -> list[Any]:
    """COMPLETE trials with a value, best first (reused duplicates left out)."""
    out = [t for t in _trials(study) if t.state.name == "COMPLETE" and t.value is not None
           and t.user_attrs.get("evaluated") and (phase is None or t.user_attrs.get("phase") == phase)]
    return sorted(out, key=lambda t: (t.value, t.number))


def beam_phase(ctx: _Context, study: Any, depth: int, parent_phase: str) -> Phase | None:
    """Depth-`depth` combinations: each of the best `beam_width` candidates of the parent
    phase, extended by each of the best `beam_top` single moves it does not hold yet."""
    sp = ctx.space
    singles_ = _results(study, "singles")
    top_moves: list[Move] = []
    for t in singles_:
        (label,) = t.user_attrs["moves"]
        top_moves.append(Move.from_label(label))
        if len(top_moves) == sp.beam_top:
            break
    parents = _results(study, parent_phase)[:sp.beam_width]
    known = {t.user_attrs.get("key") for t in _results(study)}
    out: list[tuple[float, Candidate]] = []
    keys = set()
    value = {m.label: t.value for t, m in zip(singles_, top_moves)}
    for p in parents:
        pm = [Move.from_label(l) for l in p.user_attrs["moves"]]
        for m in top_moves:
            if m in pm:
                continue
            c = compose(pm + [m], ctx.block_count)
            if c is None or c.key in keys or c.key in known:
                continue
            keys.add(c.key)
            out.append((p.value + value.get(m.label, 0.0), c))
    if not out:
        return None
    out.sort(key=lambda vc: vc[0])
    return Phase(f"beam{depth}", f"beam{depth}", tuple(c for _, c in out))


# --- one worker -----------------------------------------------------------------------------

class _Worker:
    def __init__(self, ctx: _Context, scorer: CandidateScorer, progress: SearchProgress | None):
        self.ctx = ctx
        self.scorer = scorer
        self.progress = progress or (lambda e: None)
        self.optuna = _optuna()
        self.storage = open_storage(ctx.url)
        self.evaluated_now = 0
        self.id = worker_id()

    def study(self, phase: Phase) -> Any:
        o = self.optuna
        if phase.name == "tpe":
            n_startup = max(4, min(10, (self.ctx.options.budget or 40) // 4))
            sampler = o.samplers.TPESampler(seed=self.ctx.options.seed, n_startup_trials=n_startup)
        else:
            grid = {phase.param: [c.recipe for c in phase.candidates]}
            sampler = o.samplers.GridSampler(grid, seed=self.ctx.options.seed)
        return o.load_study(study_name=self.ctx.study_name, storage=self.storage, sampler=sampler)

    def run_one(self, study: Any, objective: Callable[[Any], float]) -> None:
        """Take one trial (a queued one first) and run it, as Study.optimize would: a heartbeat
        while it runs, PRUNED/FAIL/COMPLETE at the end, and any other exception re-raised
        after the trial is failed (so Ctrl-C loses only the running candidate)."""
        with self.claim_lock():
            self.optuna.storages.fail_stale_trials(study)
            trial = study.ask()
        try:
            from optuna.storages._heartbeat import get_heartbeat_thread
        except ImportError:  # pragma: no cover  (older or newer optuna: no heartbeat, same results)
            import contextlib

            def get_heartbeat_thread(*_: Any) -> Any:
                return contextlib.nullcontext()

        with get_heartbeat_thread(trial._trial_id, self.storage):
            try:
                value = objective(trial)
            except self.optuna.TrialPruned:
                study.tell(trial, state=self.optuna.trial.TrialState.PRUNED)
                return
            except BaseException:
                study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                raise
        study.tell(trial, value)

    def claim_lock(self) -> Any:
        """Serialize taking a trial between the workers of a SQLite study. SQLite ignores the
        row lock Optuna asks for, so two processes could pop the same queued trial; a lock
        file next to the database (one machine) prevents it. Server databases lock rows."""
        import contextlib

        if not self.ctx.url.startswith("sqlite:///"):
            return contextlib.nullcontext()
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (Windows: one worker per SQLite study)
            return contextlib.nullcontext()
        lock_path = Path(self.ctx.url.removeprefix("sqlite:///") + ".lock")

        @contextlib.contextmanager
        def locked() -> Iterator[None]:
            with open(lock_path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

        return locked()

    def budget_left(self, study: Any) -> bool:
        b = self.ctx.options.budget
        return b is None or _claimed(study) < b

    def emit(self, kind: str, phase: str, recipe: str | None, study: Any, **detail: Any) -> None:
        done = count_evaluated(study) + (kind == "scored")  # the scored trial is told complete just after
        self.progress(SearchEvent(kind, phase, recipe, done, self.ctx.options.budget, detail))

    # grid phases: every candidate enqueued in order, workers pop them
    def enqueue_missing(self, study: Any, phase: Phase) -> None:
        taken = set()
        for t in _trials(study):
            # a PRUNED trial is settled only when its candidate is broken; one pruned as a
            # duplicate or at the budget's end may still need scoring
            if t.state.name in ("COMPLETE", "RUNNING", "WAITING") or (t.state.name == "PRUNED" and "error" in t.user_attrs):
                # a WAITING trial has its value only in fixed_params until a worker takes it
                taken.add(t.system_attrs.get("fixed_params", t.params).get(phase.param))
                taken.add(t.user_attrs.get("recipe"))
        for c in phase.candidates:
            if c.recipe not in taken:  # FAIL (Ctrl-C, dead worker) or never tried: (re)enqueue
                study.enqueue_trial({phase.param: c.recipe}, user_attrs={"phase": phase.name})

    def waiting(self, study: Any) -> int:
        return sum(1 for t in _trials(study, (self.optuna.trial.TrialState.WAITING,)))

    def run_grid(self, phase: Phase) -> None:
        study = self.study(phase)
        self.enqueue_missing(study, phase)
        self.emit("phase", phase.name, None, study, candidates=len(phase.candidates))

        def objective(trial: Any) -> float:
            # a queued trial names its phase: another worker may already have enqueued the next one
            name = trial.user_attrs.get("phase", phase.name)
            ph = phase if name == phase.name else stored_phase(study, name)
            if ph is None:
                raise SearchError(f"study {self.ctx.study_name!r}: trial {trial.number} of unknown phase {name!r}")
            recipe = trial.suggest_categorical(ph.param, [c.recipe for c in ph.candidates])
            return self.score(study, trial, ph.name, ph.candidate(recipe))

        while self.budget_left(study) and self.waiting(study):
            self.run_one(study, objective)

    # a sampled phase: TPE over step1..stepK, each a move or "none"
    def run_tpe(self, phase: Phase) -> None:
        study = self.study(phase)
        labels = [m.label for m in self.ctx.moves] + ["none"]
        by_label = {m.label: m for m in self.ctx.moves}
        self.emit("phase", phase.name, None, study, candidates=None)
        reused_in_a_row = 0
        if not any(t.user_attrs.get("phase") == "tpe" for t in _trials(study)):
            # warm start: the best-ranked single moves first
            for m in self.ctx.moves[:max(1, min(5, (self.ctx.options.budget or 20) // 4))]:
                params = {f"step{i + 1}": (m.label if i == 0 else "none") for i in range(self.ctx.space.max_steps)}
                study.enqueue_trial(params, user_attrs={"phase": "tpe"}, skip_if_exists=True)

        def objective(trial: Any) -> float:
            picked = [trial.suggest_categorical(f"step{i + 1}", labels) for i in range(self.ctx.space.max_steps)]
            moves = [by_label[p] for p in picked if p != "none"]
            cand = compose(moves, self.ctx.block_count) if moves else None
            if cand is None:
                trial.set_user_attr("phase", "tpe")
                raise self.optuna.TrialPruned("no applicable move")
            return self.score(study, trial, "tpe", cand)

        while self.budget_left(study) and reused_in_a_row < MAX_REUSED_IN_A_ROW:
            before = self.evaluated_now
            self.run_one(study, objective)
            reused_in_a_row = 0 if self.evaluated_now > before else reused_in_a_row + 1

    def score(self, study: Any, trial: Any, phase: str, cand: Candidate) -> float:
        trial.set_user_attr("phase", phase)
        trial.set_user_attr("recipe", cand.recipe)
        trial.set_user_attr("key", cand.key)
        trial.set_user_attr("moves", [m.label for m in cand.moves])
        trial.set_user_attr("blocks", cand.blocks)
        trial.set_user_attr("worker", self.id)
        for t in _trials(study):
            if t.number == trial.number or t.user_attrs.get("key") != cand.key:
                continue
            if t.state.name == "COMPLETE" and t.user_attrs.get("evaluated"):
                for k in ("kld_low", "kld_high", "same_top"):
                    trial.set_user_attr(k, t.user_attrs.get(k))
                trial.set_user_attr("reused_from", t.number)
                self.emit("reused", phase, cand.recipe, study)
                return float(t.value)
            if t.state.name == "RUNNING" and t.user_attrs.get("scoring") and t.number < trial.number:
                raise self.optuna.TrialPruned(f"being scored by trial {t.number}")
        if not self.budget_left(study):
            raise self.optuna.TrialPruned("budget reached")
        trial.set_user_attr("scoring", True)
        try:
            # the file name is unique per candidate: evaluate memoizes hashes by path, size and mtime
            s = self.scorer.short(cand.recipe, f"{trial.number}-{hashlib.sha256(cand.key.encode()).hexdigest()[:12]}")
        except SurgeonError as e:
            if isinstance(e, (OutputError, ToolNotFoundError)):
                raise  # the machine's fault (disk full, missing tool), not the candidate's: a rerun retries it
            trial.set_user_attr("error", str(e))  # this candidate is broken (NaN logits): never retried
            raise self.optuna.TrialPruned(str(e)) from None
        for k, v in (("kld_low", s.low), ("kld_high", s.high), ("same_top", s.same_top), ("seconds", s.seconds),
                     ("evaluated", True)):
            trial.set_user_attr(k, v)
        self.evaluated_now += 1
        self.emit("scored", phase, cand.recipe, study, kld=s.kld)
        return s.kld

    def wait_for_others(self, study: Any) -> None:
        """Block until no trial is RUNNING (other workers finishing the phase); stale ones are failed."""
        while True:
            self.optuna.storages.fail_stale_trials(study)
            if not any(t.state.name == "RUNNING" for t in _trials(study)):
                return
            if self.waiting(study) and self.budget_left(study):
                return  # re-enqueued work: the caller goes round again
            self.progress(SearchEvent("waiting", "", None, count_evaluated(study), self.ctx.options.budget))
            time.sleep(POLL_S)

    def run(self) -> None:
        phase = first_phase(self.ctx)
        study = self.study(phase)
        if phase.name == "tpe":
            self.run_tpe(phase)
            return
        phase = publish_phase(study, phase)
        while True:
            self.run_grid(phase)
            if not self.budget_left(study):
                return
            self.wait_for_others(study)
            if self.waiting(study):
                continue  # a stale trial was failed and re-enqueued
            failed = [t for t in _trials(study) if t.state.name == "FAIL" and t.user_attrs.get("phase") == phase.name]
            if failed and self.retry_failed(study, phase):
                continue
            depth = int(phase.name[4:]) + 1 if phase.name.startswith("beam") else 2
            if self.ctx.space.beam_width < 1 or depth > self.ctx.space.beam_depth or phase.name == "combos":
                return
            nxt = beam_phase(self.ctx, study, depth, phase.name if phase.name.startswith("beam") else "singles")
            if nxt is None:
                return
            phase = publish_phase(study, nxt)

    def retry_failed(self, study: Any, phase: Phase) -> bool:
        before = self.waiting(study)
        self.enqueue_missing(study, phase)
        return self.waiting(study) > before


def _worker_main(ctx: _Context, barrier: Any | None) -> None:
    """Entry point of a --jobs worker process."""
    if barrier is not None:
        barrier.wait(timeout=300)  # start together: each takes its share from the first candidate on
    scorer = _scorer(ctx)
    try:
        _Worker(ctx, scorer, None).run()
    except KeyboardInterrupt:
        pass  # the trial is already failed; the parent reports


def _scorer(ctx: _Context) -> CandidateScorer:
    o = ctx.options
    threads = o.threads or max(1, (os.cpu_count() or 1) // max(1, o.jobs))
    return CandidateScorer(ctx.base, Path(o.work_dir), llama_bin=o.llama_bin, ctx=o.ctx, short_chars=o.short_chars,
                           threads=threads, full_questions=o.full_questions, keep=o.keep, cache_dir=o.cache_dir)


# --- the whole search -----------------------------------------------------------------------

def full_attr(key: str) -> str:
    """The study attribute holding the full eval of the candidate with this plan key."""
    return "full:" + hashlib.sha256(key.encode()).hexdigest()[:20]


def leaderboard(study: Any) -> list[Entry]:
    """Every scored candidate, best (lowest KLD) first."""
    out = []
    fulls = study.user_attrs
    for t in _results(study):
        a = t.user_attrs
        out.append(Entry(t.number, a["recipe"], a["key"], a.get("phase", "?"), a.get("blocks", 0), float(t.value),
                         a.get("kld_low", math.nan), a.get("kld_high", math.nan), a.get("same_top", math.nan),
                         a.get("worker", "?"), fulls.get(full_attr(a["key"]))))
    return out


def pick_champion(entries: Sequence[Entry]) -> Entry | None:
    """The best overall score among leaders with a full eval (lower KLD breaks ties), else the
    lowest KLD."""
    full = [e for e in entries if e.full]
    if full:
        return max(full, key=lambda e: (e.full["score"][0], -e.kld))
    return entries[0] if entries else None


def verdict_text(champion: Entry | None) -> str:
    if champion is None:
        return "no candidate scored yet"
    if not champion.full:
        return (f"KL divergence {champion.kld:.4f} nats/token to the base on the short text; "
                "no full eval yet (leaders = 0 or budget spent): no verdict")
    f = champion.full
    d = f["delta"]
    return (f"{f['verdict']} than the base" if f["verdict"] in ("better", "worse") else "not distinguishable from the base") + (
        f": overall score {f['score'][0]:.1f} vs {f['base_score'][0]:.1f} (Δ {d[0]:+.1f}, 95% interval "
        f"[{d[1]:+.1f}, {d[2]:+.1f}]), factual {f['factual'][0]}/{f['factual'][1]} vs "
        f"{f['base_factual'][0]}/{f['base_factual'][1]}")


def run_leaders(ctx: _Context, scorer: CandidateScorer, study: Any, progress: SearchProgress | None) -> None:
    """Stage 2: the full eval suite for the best `leaders` candidates that lack it (stored on
    their trials, so a rerun does not repeat it)."""
    n = ctx.options.leaders if ctx.options.leaders is not None else ctx.space.leaders
    for e in leaderboard(study)[:n]:
        if e.full:
            continue
        if progress:
            progress(SearchEvent("full", e.phase, e.recipe, count_evaluated(study), ctx.options.budget))
        summary = scorer.full(e.recipe, f"full-{e.number}-{hashlib.sha256(e.key.encode()).hexdigest()[:12]}")
        study.set_user_attr(full_attr(e.key), summary)  # a finished trial cannot take new attributes


def run_search(base: str | Path, space: SearchSpace, options: SearchOptions = SearchOptions(),
               progress: SearchProgress | None = None, *, scorer: CandidateScorer | None = None,
               ranking: Any | None = None) -> SearchResult:
    """Search `space` on `base` until the budget is spent or the space is exhausted, then give
    the leaders the full eval and name a champion.

    With `options.jobs` > 1, that many worker processes share the study; with one, the search
    runs in this process (`scorer` may replace the default CandidateScorer there). A
    KeyboardInterrupt propagates after the running candidate is failed (a rerun retries it).
    Raises SearchError (space, storage, study of another base), and the evaluator's errors.
    """
    start = time.monotonic()
    base = Path(base)
    if options.jobs < 1:
        raise SearchError(f"--jobs {options.jobs}: must be at least 1")
    if options.budget is not None and options.budget < 1:
        raise SearchError(f"--budget {options.budget}: must be at least 1")
    ctx = create_or_load(base, space, options, ranking)
    first = first_phase(ctx)
    if first.name == "tpe" and options.budget is None:
        raise SearchError(f"space {space.name!r} has more than {space.exhaustive_limit} combinations and is sampled "
                          "with TPE: pass --budget")
    scorer = scorer or _scorer(ctx)
    scorer.prepare()
    optuna = _optuna()
    study = optuna.load_study(study_name=ctx.study_name, storage=open_storage(ctx.url))
    before = count_evaluated(study)
    interrupted = False
    try:
        if options.jobs == 1:
            _Worker(ctx, scorer, progress).run()
        else:
            _run_processes(ctx, study, progress)
        run_leaders(ctx, scorer, study, progress)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if interrupted:
            _cleanup(scorer)
    entries = leaderboard(study)
    champion = pick_champion(entries)
    total = count_evaluated(study)
    return SearchResult(ctx.study_name, ctx.url, str(base), space.name, options.budget, total, total - before,
                        len(first.candidates) if first.candidates else None, tuple(entries), champion,
                        verdict_text(champion), time.monotonic() - start)


def _cleanup(scorer: CandidateScorer) -> None:
    if not scorer.keep and scorer.candidates_dir.is_dir():
        for p in scorer.candidates_dir.glob("candidate-*.gguf"):
            p.unlink(missing_ok=True)


def _run_processes(ctx: _Context, study: Any, progress: SearchProgress | None) -> None:
    import multiprocessing

    mp = multiprocessing.get_context("spawn")  # no inherited database connections or threads
    # the first phase's queue is filled once, here, before the workers race for it
    w = _Worker(ctx, CandidateScorer(ctx.base, Path(ctx.options.work_dir)), None)
    phase = first_phase(ctx)
    if phase.name != "tpe":
        grid_study = w.study(phase)
        w.enqueue_missing(grid_study, publish_phase(grid_study, phase))
    barrier = mp.Barrier(ctx.options.jobs)
    procs = [mp.Process(target=_worker_main, args=(ctx, barrier), name=f"gguf-surgeon-search-{i}")
             for i in range(ctx.options.jobs)]
    for p in procs:
        p.start()
    seen = count_evaluated(study)
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(POLL_S)
            now = count_evaluated(study)
            if progress and now != seen:
                seen = now
                progress(SearchEvent("scored", "workers", None, now, ctx.options.budget))
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise SearchError(f"{len(bad)} of {len(procs)} search workers failed (exit status {bad[0]}); "
                          "rerun to continue: finished results are kept")


def search_status(storage: str, study_name: str) -> list[Entry]:
    """The leaderboard of an existing study, without running anything."""
    optuna = _optuna()
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise SearchError(f"no study {study_name!r} in {storage}") from None
    return leaderboard(study)
