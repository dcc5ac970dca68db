"""The Optuna study in its storage: search options, the storage URL, opening or creating the study
with its ordered move list, and counting its trials."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SearchError
from ..reader import Model
from .moves import Move
from .order import ordered_moves
from .scorer import SHORT_CHARS, SHORT_CTX
from .space import SearchSpace

DEFAULT_WORK_DIR = Path("gguf-surgeon-search")
DB_FILE = "search.db"
HEARTBEAT_S = 20  # a RUNNING trial silent for GRACE_S is failed (its worker died) and retried
GRACE_S = 90
SearchProgress = Callable[["SearchEvent"], None]


@dataclass(frozen=True)
class SearchOptions:
    """How one search runs: its budget, workers, storage and the scoring settings (all optional)."""

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


def load_optuna():
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
    optuna = load_optuna()
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
class StudyContext:
    """What every worker of one study needs (rebuilt in each worker process)."""

    base: Path
    space: SearchSpace
    options: SearchOptions
    url: str
    study_name: str
    block_count: int
    moves: list[Move]  # ordered and pruned, from the study (same list for every worker)


def study_trials(study: Any, states: Sequence[Any] | None = None) -> list[Any]:
    return study.get_trials(deepcopy=False, states=states)


def count_evaluated(study: Any) -> int:
    return sum(1 for t in study_trials(study) if t.user_attrs.get("evaluated") and t.state.name == "COMPLETE")


def count_claimed(study: Any) -> int:
    """Scored or being scored: what the budget is charged with."""
    return sum(
        1
        for t in study_trials(study)
        if (t.user_attrs.get("evaluated") and t.state.name == "COMPLETE")
        or (t.state.name == "RUNNING" and t.user_attrs.get("scoring"))
    )


def default_study_name(base: Path, space: SearchSpace) -> str:
    return f"{Path(base).name.removesuffix('.gguf')}:{space.name}"


def create_or_load(base: Path, space: SearchSpace, options: SearchOptions, ranking: Any | None = None) -> StudyContext:
    """Open the study, creating it with the ordered move list on first use; checks that an
    existing study is about the same base and space."""
    optuna = load_optuna()
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
        raise SearchError(
            f"study {name!r} in {url} was made for another base or space (differs in: {', '.join(diff)}); "
            "pass another --study-name or --storage"
        )
    moves = [Move.from_label(l) for l in study.user_attrs["moves"]]
    return StudyContext(base, space, options, url, name, block_count, moves)


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
