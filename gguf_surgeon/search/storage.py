"""The Optuna study in its storage: search options, the storage URL, opening or creating the study
with its ordered move list, and counting its trials.

A server database (PostgreSQL, MySQL) is shared by workers on several machines, so this module
also makes the storage survive what happens between machines:

- **one schema, one study**: Optuna's tables and the study (with its move list) are created
  under a PostgreSQL advisory lock, so workers started at the same moment on an empty database
  do not race on ``CREATE TABLE`` / ``alembic_version`` and the study is created once;
- **outages**: every storage call that fails because the server cannot be reached (stopped,
  restarted, network down) is retried with backoff; the process prints one line when it starts
  waiting and one when the database is back, and gives up after ``db_wait_s``;
- **dead workers**: a RUNNING trial whose heartbeat is older than the grace period is failed
  (and retried by the workers); so is a RUNNING trial that never got a heartbeat;
- **errors**: a bad URL, a missing driver or a refused login is one SearchError naming it; a
  URL is only ever shown with its password replaced by ``***``.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PlanError, SearchError
from ..experts import check_expert_plan, expert_blocks, expert_shape
from ..plan import LayerPlan, LayerSource
from ..reader import Model
from ..vocab import Keys
from .moves import Move, expert_counts
from .order import ordered_moves
from .scorer import SHORT_CHARS, SHORT_CTX
from .space import SearchSpace

DEFAULT_WORK_DIR = Path("gguf-surgeon-search")
DB_FILE = "search.db"
HEARTBEAT_S = 20  # a RUNNING trial silent for GRACE_S is failed (its worker died) and retried
GRACE_S = 90  # also the longest outage (database or network) a running candidate survives
DB_WAIT_S = 600  # how long a worker waits for an unreachable database before it gives up
BACKOFF_MAX_S = 5.0
# tuning for every worker of a machine (the tests shorten them); SearchOptions fields win
ENV_HEARTBEAT = "GGUF_SURGEON_SEARCH_HEARTBEAT"
ENV_GRACE = "GGUF_SURGEON_SEARCH_GRACE"
ENV_DB_WAIT = "GGUF_SURGEON_SEARCH_DB_WAIT"
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
    leaders: int | None = None  # the most leaders that get the full eval (default: the space's)
    full_questions: int | None = None  # full eval: ask only the first N questions
    yardstick: bool = False  # place KLDs on the base's own quantization ladder (made once per base, cached)
    leader_benches: tuple = ()  # evaluation.benchmarks.BenchSpec each: added to the leaders' full eval
    rank_file: Path | None = None  # a `rank --save` JSON for the guidance (default: computed, BI only)
    use_rank: bool = True  # False: natural order, no pruning
    seed: int = 0
    threads: int | None = None  # llama.cpp threads per worker (default: cores / jobs)
    cache_dir: Path | None = None  # eval cache (default: evaluate's)
    heartbeat_s: int | None = None  # default: $GGUF_SURGEON_SEARCH_HEARTBEAT, else HEARTBEAT_S
    grace_s: int | None = None  # default: $GGUF_SURGEON_SEARCH_GRACE, else GRACE_S
    db_wait_s: float | None = None  # default: $GGUF_SURGEON_SEARCH_DB_WAIT, else DB_WAIT_S


@dataclass(frozen=True)
class SearchEvent:
    """What a progress callback hears: a phase starting, a candidate scored, the leaders' eval."""

    kind: str  # "phase" | "scored" | "reused" | "full" | "waiting"
    phase: str
    recipe: str | None
    evaluated: int  # stage-1 results in the study so far
    budget: int | None
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Timing:
    """Heartbeat interval and grace period of running trials, and the wait for a lost database."""

    heartbeat_s: int = HEARTBEAT_S
    grace_s: int = GRACE_S
    db_wait_s: float = DB_WAIT_S


def _env_number(name: str, default: float, kind: type = int) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SearchError(f"${name}={raw!r}: not a number of seconds") from None
    if value <= 0:
        raise SearchError(f"${name}={raw!r}: must be positive")
    return value


def timing(options: SearchOptions | None = None) -> Timing:
    o = options or SearchOptions()
    hb = o.heartbeat_s or int(_env_number(ENV_HEARTBEAT, HEARTBEAT_S))
    grace = o.grace_s or int(_env_number(ENV_GRACE, GRACE_S))
    wait = o.db_wait_s or float(_env_number(ENV_DB_WAIT, DB_WAIT_S, float))
    if grace <= hb:
        raise SearchError(f"grace period {grace} s: must be longer than the heartbeat interval {hb} s")
    return Timing(hb, grace, wait)


def storage_url(options: SearchOptions) -> str:
    if options.storage:
        return options.storage
    return f"sqlite:///{(Path(options.work_dir) / DB_FILE).resolve()}"


def redact_url(url: str) -> str:
    """The URL as it may be shown: the password (in the authority or a query parameter) as ***."""
    out = re.sub(r"(://[^/@:?#]*):[^/@?#]*@", r"\1:***@", url)
    return re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*", r"\1***", out)


def is_server_url(url: str) -> bool:
    return not url.startswith("sqlite:")


def is_postgres_url(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] == "postgresql"


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


# --- errors of a server database ---------------------------------------------------------------

_DRIVER_MODULES = ("psycopg", "psycopg2", "pymysql", "MySQLdb", "mysql", "pg8000", "asyncpg", "sqlite3", "sqlalchemy")
_CONNECTION_ERRORS = {"OperationalError", "InterfaceError", "DisconnectionError"}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_connection_error(e: BaseException) -> bool:
    """The server could not be reached or dropped the connection (stopped, restarting, network
    down, connection reset): worth waiting for. Optuna wraps such errors in StorageInternalError."""
    for x in _chain(e):
        if getattr(x, "connection_invalidated", False):
            return True
        mod = type(x).__module__.split(".", 1)[0]
        if mod in _DRIVER_MODULES and any(c.__name__ in _CONNECTION_ERRORS for c in type(x).__mro__):
            return True
    return False


def error_reason(e: BaseException) -> str:
    """One line saying what the database driver reported (the innermost driver error)."""
    driver = [x for x in _chain(e) if type(x).__module__.split(".", 1)[0] in _DRIVER_MODULES[:-1]]
    text = str(driver[-1] if driver else e)
    text = re.sub(r"\(Background on this error at:[^)]*\)", "", text)
    text = re.sub(r"^\([\w.]+\)\s*", "", text.strip())
    text = text.removeprefix("connection failed: ")
    lines = [re.sub(r"\s+", " ", l).strip() for l in text.splitlines()]
    return "; ".join(l for l in lines if l) or type(e).__name__


# --- one line when the database is lost, one when it is back ---------------------------------


def _stderr_notice(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_notice: Callable[[str], None] = _stderr_notice


def notice(line: str) -> None:
    _notice(line)


def set_notice(fn: Callable[[str], None] | None) -> None:
    """Where the outage lines go (default: stderr of this process)."""
    global _notice
    _notice = fn or _stderr_notice


class _Outage:
    """Shared by the threads of one process: an outage is announced once and ended once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None

    def begin(self, shown_url: str, reason: str, wait_s: float) -> float:
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
                _notice(
                    f"search ({worker_id()}): database {shown_url} unreachable ({reason}); "
                    f"waiting and retrying with backoff for up to {wait_s:.0f} s; finished results are kept"
                )
            return self.since

    def end(self) -> None:
        with self.lock:
            if self.since is not None:
                _notice(
                    f"search ({worker_id()}): database reachable again after "
                    f"{time.monotonic() - self.since:.0f} s; continuing"
                )
                self.since = None


_OUTAGE = _Outage()


def retrying(fn: Callable[[], Any], shown_url: str, wait_s: float, on_retry: Callable[[], None] | None = None) -> Any:
    """fn(), retried with exponential backoff while the database is unreachable, for at most
    wait_s seconds of one outage; then SearchError."""
    attempt = 0
    while True:
        try:
            result = fn()
        except Exception as e:
            if not is_connection_error(e):
                raise
            since = _OUTAGE.begin(shown_url, error_reason(e), wait_s)
            waited = time.monotonic() - since
            if waited > wait_s:
                raise SearchError(
                    f"database {shown_url} unreachable for {waited:.0f} s ({error_reason(e)}); this worker stops: "
                    "every finished result is kept, rerun the same command to continue"
                ) from None
            time.sleep(min(BACKOFF_MAX_S, 0.25 * 2**attempt) * random.uniform(0.8, 1.2))
            attempt += 1
            if on_retry is not None:
                on_retry()
            continue
        if attempt or _OUTAGE.since is not None:  # any call that gets through ends the outage: the thread
            _OUTAGE.end()  # that announced it may have finished (a heartbeat) before its own retry succeeded
        return result


# --- PostgreSQL locks -----------------------------------------------------------------------------


def lock_key(purpose: str) -> int:
    """A signed 64-bit advisory-lock key for a purpose such as "schema" or "claim:<study>"."""
    return int.from_bytes(hashlib.sha256(f"gguf-surgeon:{purpose}".encode()).digest()[:8], "big", signed=True)


class AdvisoryLock:
    """PostgreSQL's transaction-level advisory lock for `purpose`, on a connection of its own:
    every process and machine on the database waits for it while it is held. A lost connection
    releases it on the server; the work done under it retries on its own connections."""

    def __init__(self, engine: Any, purpose: str):
        self.engine, self.key = engine, lock_key(purpose)
        self.conn: Any = None

    def acquire(self) -> None:
        import sqlalchemy

        conn = self.engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": self.key})
        except BaseException:
            self._close(conn)
            raise
        self.conn = conn

    def release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self._close(conn)

    @staticmethod
    def _close(conn: Any) -> None:
        try:
            conn.rollback()  # ends the transaction: releases the lock
            conn.close()
        except Exception as e:
            if not is_connection_error(e):
                raise
            with contextlib.suppress(Exception):
                conn.invalidate()

    def __enter__(self) -> AdvisoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _file_lock(path: Path) -> Any:
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (Windows: one worker per SQLite study)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def locked() -> Iterator[None]:
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return locked()


def study_lock(url: str, storage: Any, purpose: str) -> Any:
    """Serialize a read-then-write on the study between all its workers: an advisory lock on
    PostgreSQL; on SQLite (one machine) a lock file next to the database, as SQLite ignores the
    row locks Optuna asks for; nothing elsewhere."""
    if url.startswith("sqlite:///"):
        return _file_lock(Path(url.removeprefix("sqlite:///") + ".lock"))
    backend = getattr(storage, "backend", None)
    if backend is None or not is_postgres_url(url):
        return contextlib.nullcontext()
    lock = AdvisoryLock(backend.engine, purpose)

    @contextlib.contextmanager
    def locked() -> Iterator[None]:
        retrying(lock.acquire, storage.shown_url, storage.timing.db_wait_s)
        try:
            yield
        finally:
            lock.release()

    return locked()


# --- opening a storage -------------------------------------------------------------------------------


def _connect_args(url: str) -> dict[str, Any]:
    """libpq settings that turn a dead network into an error in seconds (instead of a TCP
    timeout of minutes), unless the URL sets them: keepalives on both ends, a TCP user timeout,
    and a server-side limit on a transaction left idle by a vanished worker."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "postgresql" or u.get_driver_name() not in ("psycopg", "psycopg2"):
        return {}
    defaults: dict[str, Any] = {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 3,
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": 8000,  # ms of unacknowledged data: a network down for 8 s is an outage
        "application_name": "gguf-surgeon-search",
        "options": "-c idle_in_transaction_session_timeout=120000 -c tcp_keepalives_idle=10 "
        "-c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
    }
    return {k: v for k, v in defaults.items() if k not in u.query}


def _open_error(url: str, e: BaseException) -> SearchError:
    shown = redact_url(url)
    if isinstance(e, ImportError):
        mod = next((x.name for x in _chain(e) if isinstance(x, ImportError) and x.name), None) or "its driver"
        hint = (
            "pip install 'gguf-surgeon[postgres]'"
            if mod.split(".")[0] in ("psycopg", "psycopg_binary")
            else f"install the Python package that provides {mod!r}"
        )
        return SearchError(f"--storage {shown}: the database driver {mod!r} is not installed: {hint}")
    name = type(e).__name__
    if name == "ArgumentError" and "Could not parse" in str(e):
        return SearchError(
            f"--storage {shown}: not a database URL (e.g. postgresql://user:password@host:5432/db "
            "or sqlite:///path/search.db)"
        )
    if name == "NoSuchModuleError":
        kind = shown.split(":", 1)[0]
        return SearchError(
            f"--storage {shown}: unknown kind of database {kind!r} (postgresql://, mysql:// or sqlite:///)"
        )
    if is_connection_error(e):
        return SearchError(f"--storage {shown}: cannot connect: {error_reason(e)}")
    return SearchError(f"--storage {shown}: cannot open: {error_reason(e)}")


_OPEN: dict[tuple, Any] = {}
_OPEN_LOCK = threading.Lock()


def open_storage(url: str, options: SearchOptions | None = None, *, wait: bool = False) -> Any:
    """The Optuna storage for `url`, opened once per process and URL (the workers' heartbeat and
    grace period from `options`). A server database is opened under an advisory lock (workers
    started together on an empty database create Optuna's tables once) and wrapped so that its
    calls wait out outages. With `wait`, an unreachable server at opening is waited for too (a
    worker joining a running study); otherwise it is an error at once (a typo in the URL)."""
    t = timing(options)
    key = (url, t)
    with _OPEN_LOCK:
        if key in _OPEN:
            return _OPEN[key]
    optuna = load_optuna()
    hb = dict(heartbeat_interval=t.heartbeat_s, grace_period=t.grace_s)
    if not is_server_url(url):
        path = Path(url.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SearchError(f"--storage {redact_url(url)}: cannot create {path.parent}: {e.strerror or e}") from None
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 120}}, **hb
            )  # workers wait on each other's writes
        except Exception as e:  # noqa: BLE001  SQLAlchemy raises many types for a bad URL or file
            raise _open_error(url, e) from None
    else:
        storage = _open_server(optuna, url, t, hb, wait)
    with _OPEN_LOCK:
        return _OPEN.setdefault(key, storage)


def _open_server(optuna: Any, url: str, t: Timing, hb: dict, wait: bool) -> Any:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    try:
        connect_args = _connect_args(url)
        # no pool_pre_ping: a connection the server dropped fails once and the call is retried
        engine_kwargs = {"connect_args": connect_args}

        def create() -> Any:
            if not is_postgres_url(url):
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **hb)
            lock_engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
            try:
                with AdvisoryLock(lock_engine, "schema"):  # create_all and alembic's stamp, once
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **hb)
            finally:
                lock_engine.dispose()

        backend = retrying(create, redact_url(url), t.db_wait_s) if wait else create()
    except SearchError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _open_error(url, e) from None
    return resilient_storage(optuna, backend, url, t)


# Every BaseStorage method _CachedStorage implements, and the heartbeat's; each is retried while
# the database is unreachable.
_DELEGATED = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_id_from_study_id_trial_number",
    "get_best_trial",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial",
    "get_all_trials",
    "record_heartbeat",
)
_RESILIENT: list[type] = []


def resilient_storage(optuna: Any, backend: Any, url: str, t: Timing) -> Any:
    """Optuna's cached RDB storage whose every call waits out an unreachable database."""
    if not _RESILIENT:
        _RESILIENT.append(_make_resilient_class(optuna))
    return _RESILIENT[0](optuna.storages._CachedStorage(backend), backend, url, t)


def _make_resilient_class(optuna: Any) -> type:
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages._heartbeat import BaseHeartbeat

    def delegate(name: str) -> Callable[..., Any]:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.call(name, *args, **kwargs)

        method.__name__ = name
        return method

    def __init__(self: Any, inner: Any, backend: Any, url: str, t: Timing) -> None:
        self.inner, self.backend, self.url, self.timing = inner, backend, url, t
        self.shown_url = redact_url(url)
        self.orphans: dict[int, float] = {}  # RUNNING trial without a heartbeat -> first seen (monotonic)

    def call(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        return retrying(lambda: getattr(self.inner, name)(*args, **kwargs), self.shown_url, self.timing.db_wait_s)

    def set_trial_state_values(self: Any, trial_id: int, state: Any, values: Sequence[float] | None = None) -> bool:
        tries = [0]

        def once() -> bool:
            tries[0] += 1
            try:
                return self.inner.set_trial_state_values(trial_id, state=state, values=values)
            except UpdateFinishedTrialError:
                # an earlier try may have been committed before its answer was lost
                if tries[0] > 1 and self.inner.get_trial(trial_id).state == state:
                    return True
                raise

        return retrying(once, self.shown_url, self.timing.db_wait_s)

    def _get_stale_trial_ids(self: Any, study_id: int) -> list[int]:
        """Trials whose heartbeat stopped, and RUNNING trials that never got one for the grace
        period (a worker that died, or an answer lost with the connection, between taking a
        trial and its first heartbeat)."""
        import sqlalchemy

        def stale() -> list[int]:
            ids = list(self.inner._get_stale_trial_ids(study_id))
            running = [
                t._trial_id
                for t in self.inner.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            ]
            if not running:
                self.orphans.clear()
                return ids
            q = sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
                sqlalchemy.bindparam("ids", expanding=True)
            )
            with self.backend.engine.connect() as conn:
                beating = {r[0] for r in conn.execute(q, {"ids": running})}
            now = time.monotonic()
            self.orphans = {i: self.orphans.get(i, now) for i in running if i not in beating}
            ids += [i for i, seen in self.orphans.items() if now - seen > self.timing.grace_s and i not in ids]
            return ids

        return retrying(stale, self.shown_url, self.timing.db_wait_s)

    def record_heartbeat_once(self: Any, trial_id: int) -> bool:
        """One heartbeat, not retried (a missed beat is no harm within the grace period)."""
        try:
            self.inner.record_heartbeat(trial_id)
            return True
        except Exception as e:
            if is_connection_error(e):
                return False
            raise

    def set_trial_user_attrs(self: Any, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attributes in one transaction (one round of queries instead of one per
        attribute); attribute by attribute where Optuna's internals differ."""
        try:
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session

            one = self.backend._set_trial_attr_without_commit
        except (ImportError, AttributeError):  # pragma: no cover  (another optuna)
            for k, v in attrs.items():
                self.set_trial_user_attr(trial_id, k, v)
            return

        def once() -> None:
            with _create_scoped_session(self.backend.scoped_session, True) as session:
                for k, v in attrs.items():
                    one(session, models.TrialUserAttributeModel, trial_id, k, v)

        retrying(once, self.shown_url, self.timing.db_wait_s)

    ns: dict[str, Any] = {name: delegate(name) for name in _DELEGATED}
    ns.update(
        __init__=__init__,
        call=call,
        set_trial_state_values=set_trial_state_values,
        _get_stale_trial_ids=_get_stale_trial_ids,
        record_heartbeat_once=record_heartbeat_once,
        set_trial_user_attrs=set_trial_user_attrs,
        get_heartbeat_interval=lambda self: self.inner.get_heartbeat_interval(),
        get_heartbeat_stale_trial_callback=lambda self: None,
        remove_session=lambda self: self.backend.remove_session(),
        __doc__="Optuna's cached RDB storage whose every call waits out an unreachable database.",
    )
    return abc.ABCMeta("ResilientStorage", (optuna.storages.BaseStorage, BaseHeartbeat), ns)


def set_user_attrs(trial: Any, attrs: dict[str, Any]) -> None:
    """trial.set_user_attr for each item, in one transaction on a server database."""
    many = getattr(trial.storage, "set_trial_user_attrs", None)
    if many is None:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        return
    many(trial._trial_id, attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # as Trial.set_user_attr keeps it


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_host(worker: str | None) -> str:
    """The host part of a worker id (host:pid)."""
    return (worker or "?").rsplit(":", 1)[0]


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
    experts: Any | None = None  # the base's expert order (analysis.expert_rank.ExpertOrder) for prune-experts moves


def study_trials(study: Any, states: Sequence[Any] | None = None) -> list[Any]:
    return study.get_trials(deepcopy=False, states=states)


def count_evaluated(study: Any) -> int:
    return sum(1 for t in study_trials(study) if t.user_attrs.get("evaluated") and t.state.name == "COMPLETE")


def count_claimed(study: Any, trials: Sequence[Any] | None = None) -> int:
    """Scored or being scored: what the budget is charged with (of `trials` when given)."""
    return sum(
        1
        for t in (study_trials(study) if trials is None else trials)
        if (t.user_attrs.get("evaluated") and t.state.name == "COMPLETE")
        or (t.state.name == "RUNNING" and t.user_attrs.get("scoring"))
    )


def default_study_name(base: Path, space: SearchSpace) -> str:
    return f"{Path(base).name.removesuffix('.gguf')}:{space.name}"


def create_or_load(base: Path, space: SearchSpace, options: SearchOptions, ranking: Any | None = None) -> StudyContext:
    """Open the study, creating it with the ordered move list on first use; checks that an
    existing study is about the same base and space. Creation is serialized between all
    workers of the storage (advisory lock, or the SQLite lock file): one study, made once."""
    optuna = load_optuna()
    with Model(base) as m:  # a space the base cannot take is refused before the storage is touched
        block_count = len(m.blocks())
        size = sum(s.size for s in m.shards)
        n_expert = _check_expert_families(m, space)
    url = storage_url(options)
    storage = open_storage(url, options)
    name = options.study_name or default_study_name(base, space)
    identity = {"base": base.name, "base_size": size, "block_count": block_count, "space": space.to_dict()}
    identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
    with study_lock(url, storage, "create:" + name):
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
        existing = study.user_attrs.get("identity")
        if existing is None:
            if options.use_rank and ranking is None:
                ranking = _ranking(base, options)
            moves = ordered_moves(space, block_count, ranking, n_expert)
            if any(m.op == "prune-experts" for m in moves):
                # ranked once per study: every worker and rerun prunes the same experts
                from ..analysis.expert_rank import rank_experts

                order = rank_experts(base, llama_bin=options.llama_bin).orders()
                study.set_user_attr(EXPERTS_ATTR, order.to_dict())
            study.set_user_attr("moves", [m.label for m in moves])
            study.set_user_attr("ranked_by", None if ranking is None else ranking.tokenizer)
            study.set_user_attr("created_by", worker_id())
            study.set_user_attr("identity", identity)  # last: a study with an identity is complete
        elif _scored_part(existing) != _scored_part(identity):
            diff = [k for k in identity if _scored_part(existing).get(k) != _scored_part(identity)[k]]
            raise SearchError(
                f"study {name!r} in {redact_url(url)} was made for another base or space (differs in: "
                f"{', '.join(diff)}); pass another --study-name or --storage"
            )
        if options.budget is not None:
            study.set_user_attr("budget", options.budget)  # for `search status`: the latest run's
    moves = [Move.from_label(l) for l in study.user_attrs["moves"]]
    experts = None
    if EXPERTS_ATTR in study.user_attrs:
        from ..analysis.expert_rank import ExpertOrder

        experts = ExpertOrder.from_dict(study.user_attrs[EXPERTS_ATTR])
    return StudyContext(base, space, options, url, name, block_count, moves, experts)


EXPERTS_ATTR = "expert_order"  # study attribute: the base's experts per MoE block, most salient first


def _check_expert_families(model: Model, space: SearchSpace) -> int:
    """The model's expert count; a space with a prune-experts family is refused (SearchError)
    on a dense model, or for a count the model cannot keep (all of its experts or more, fewer
    than it routes per token, not divisible by its groups: the core's own checks)."""
    shape = expert_shape(model)
    families = [f for f in space.families if f.op == "prune-experts"]
    if not families:
        return shape.count
    if shape.count <= 0:
        raise SearchError(
            f"space {space.name!r} prunes experts (a prune-experts family), but {model.path} is a dense model "
            f"({model.arch_key(Keys.LLM.EXPERT_COUNT)} is not set)"
        )
    blocks = model.blocks()
    moe = set(expert_blocks(blocks))
    for fam in families:
        for n in expert_counts(fam, shape.count):
            if n >= shape.count:
                raise SearchError(
                    f"space {space.name!r}: prune-experts {n}: {model.path} has {shape.count} experts per block; "
                    "keep fewer"
                )
            # the count alone decides these checks; which experts does not (balanced over groups)
            g = shape.groups if shape.groups > 1 and n % shape.groups == 0 else 1
            kept = tuple(sorted(k * (shape.count // g) + j for k in range(g) for j in range(n // g)))
            layers = tuple(LayerSource(((i, 1.0),), kept if i in moe else None) for i in range(len(blocks)))
            try:
                check_expert_plan(model, LayerPlan((), len(blocks), layers), blocks)
            except PlanError as e:
                raise SearchError(f"space {space.name!r}: {e}") from None
    return shape.count


def _scored_part(identity: dict) -> dict:
    """A study's identity without the leader cap: a rerun may give the full eval to more or
    fewer leaders, the candidates and their scores stay the same."""
    return {**identity, "space": {k: v for k, v in identity.get("space", {}).items() if k != "leaders"}}


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
