"""search on a real PostgreSQL 15 with workers on separate hosts, under faults.

The session fixture `pg` runs `initdb` into a temp folder and starts `postgres` as the
unprivileged `postgres` user (when the tests run as root, as CI does) on a free port, and stops
it at the end by its own pid. Where network namespaces can be made (root, iproute2), the
database lives in one namespace and every worker host in another, joined by veth pairs; each
host also gets its own host name (a UTS namespace), --work-dir, eval cache and copy of the base
file: nothing is shared but the database. Elsewhere the same tests run over loopback and say so.

Workers are real `gguf-surgeon search` processes scoring a tiny model with the real
llama-perplexity. Faults are real: SIGKILL, the server stopped and started, a veth taken down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

if os.environ.get("CI"):  # CI installs the test extra: a missing driver must fail there, not skip
    import psycopg
else:
    psycopg = pytest.importorskip("psycopg", reason="pip install 'gguf-surgeon[postgres]'")

from click.testing import CliRunner  # noqa: E402

from gguf_surgeon.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PG_BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"), Path("/usr/local/bin"))
ROLE, PASSWORD = "surgeon", "pw-Xq7-not-for-output"  # the tests check the password is never printed
SPACE = (
    'name = "faults"\nleaders = 0\n[[family]]\nop = "delete"\n[[family]]\nop = "swap"\n[[family]]\nop = "duplicate"\n'
)
N_CANDIDATES = 6 + 5 + 6  # on the 6-block tiny model
SEARCH_ARGS = ["--no-rank", "--ctx", "32", "--short-chars", "700", "--threads", "1", "--leaders", "0", "--json"]


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _pg_tool(name: str) -> Path:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return d / name
    pytest.fail(f"PostgreSQL 15's {name} is not installed (Debian: apt-get install postgresql-15)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Network:
    """Network namespaces: 'db' for the server, one per worker host, veth pairs to the db."""

    def __init__(self) -> None:
        self.tag = f"gs{os.getpid() % 100000}"
        self.namespaces: list[str] = []
        self.links: list[str] = []
        # 10.X.0.0/24 test process <-> database, 10.X.N.0/24 host N <-> database; X unused on this
        # machine (another test session may hold one)
        used = _run("ip", "-o", "addr", check=False).stdout
        self.subnet = next(f"10.{x}" for x in [100 + os.getpid() % 100, *range(100, 250)] if f" 10.{x}." not in used)

    def ns(self, name: str) -> str:
        return f"{self.tag}{name}"

    def make(self, hosts: int) -> None:
        db = self.ns("db")
        _run("ip", "netns", "add", db)
        self.namespaces.append(db)
        _run("ip", "-n", db, "link", "set", "lo", "up")
        # the test process (root namespace) <-> db, then each host <-> db
        net = self.subnet
        self._pair(f"{self.tag}t", None, f"{net}.0.1", f"{self.tag}td", db, f"{net}.0.2")
        for i in range(1, hosts + 1):
            ns = self.ns(f"h{i}")
            _run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            self._pair(f"{self.tag}h{i}", ns, f"{net}.{i}.2", f"{self.tag}h{i}d", db, f"{net}.{i}.1")

    def _pair(self, a: str, ns_a: str | None, ip_a: str, b: str, ns_b: str, ip_b: str) -> None:
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        self.links.append(a)
        for dev, ns, ip in ((a, ns_a, ip_a), (b, ns_b, ip_b)):
            if ns is not None:
                _run("ip", "link", "set", dev, "netns", ns)
            pre = ["ip"] + (["-n", ns] if ns else [])
            _run(*pre, "addr", "add", f"{ip}/24", "dev", dev)
            _run(*pre, "link", "set", dev, "up")

    def host_link(self, i: int, up: bool) -> None:
        _run("ip", "-n", self.ns(f"h{i}"), "link", "set", f"{self.tag}h{i}", "up" if up else "down")

    def remove(self) -> None:
        for link in self.links:
            _run("ip", "link", "del", link, check=False)
        for ns in self.namespaces:
            _run("ip", "netns", "del", ns, check=False)


@dataclass
class Cluster:
    """One PostgreSQL server for the session, and how workers reach it."""

    root: Path
    port: int
    namespaces: bool
    network: Network | None
    as_user: list[str]  # prefix running a command as the server's user
    log: Path
    proc: subprocess.Popen | None = None
    databases: list[str] = field(default_factory=list)

    @property
    def sockets(self) -> Path:
        return self.root / "sockets"

    def postgres_cmd(self) -> list[str]:
        net = self.network.subnet if self.namespaces else None
        listen = f"{net}.0.2,{net}.1.1,{net}.2.1" if net else "127.0.0.1"
        cmd = [
            *self.as_user,
            str(_pg_tool("postgres")),
            "-D",
            str(self.root / "data"),
            "-p",
            str(self.port),
            "-k",
            str(self.sockets),
            "-c",
            f"listen_addresses={listen}",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]
        if self.namespaces:
            cmd = ["ip", "netns", "exec", self.network.ns("db"), *cmd]
        return cmd

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.postgres_cmd(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.admin():
                    return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown of our own server process (by its pid), as `pg_ctl stop -m fast` does."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        """A superuser connection over the Unix socket (works whatever the network does)."""
        return psycopg.connect(host=str(self.sockets), port=self.port, user="postgres", dbname=dbname, autocommit=True)

    def new_database(self, name: str) -> str:
        with self.admin() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # left by a failed try
            c.execute(f'CREATE DATABASE "{name}" OWNER {ROLE}')
        self.databases.append(name)
        return name

    def url(self, db: str, host: int = 0, password: str = PASSWORD) -> str:
        """The URL for worker host `host` (0: the test process)."""
        net = self.network.subnet if self.namespaces else None
        addr = (f"{net}.0.2" if host == 0 else f"{net}.{host}.1") if net else "127.0.0.1"
        return f"postgresql://{ROLE}:{password}@{addr}:{self.port}/{db}"


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    """A real PostgreSQL 15 for the session: network namespaces when they can be made, else loopback."""
    initdb = _pg_tool("initdb")
    root = Path(tempfile.mkdtemp(prefix="gguf-surgeon-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: the unprivileged postgres user
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root and there is no 'postgres' user to run PostgreSQL as")
        as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
        os.chown(root, user.pw_uid, user.pw_gid)
    os.chmod(root, 0o755)
    (root / "sockets").mkdir()
    pwfile = root / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        os.chown(root / "sockets", user.pw_uid, user.pw_gid)
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    out = subprocess.run(
        [*as_user, str(initdb), "-D", str(root / "data"), "-U", "postgres", "--auth-local=trust"]
        + ["--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    with open(root / "data" / "pg_hba.conf", "a") as f:
        f.write("host all all 0.0.0.0/0 scram-sha-256\n")
    network = None
    namespaces = False
    if os.geteuid() == 0 and shutil.which("ip"):
        network = Network()
        try:
            network.make(hosts=2)
            namespaces = True
        except subprocess.CalledProcessError as e:
            network.remove()
            network = None
            reason = e.stderr.strip()
    else:
        reason = "not root or no iproute2"
    if not namespaces:
        warnings.warn(f"network namespaces cannot be made ({reason}): workers run over loopback", stacklevel=1)
        print(f"\ntest_postgres: LOOPBACK mode, network namespaces cannot be made ({reason})", file=sys.stderr)
    cluster = Cluster(root, _free_port(), namespaces, network, as_user, root / "postgres.log")
    try:
        cluster.start()
        with cluster.admin() as c:
            c.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        yield cluster
    finally:
        cluster.stop()
        if network is not None:
            network.remove()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def perplexity_bin(request) -> Path:
    """The llama.cpp tools folder; search needs only llama-perplexity."""
    env = os.environ.get("GGUF_SURGEON_LLAMA_BIN")
    if env and (Path(env) / "llama-perplexity").exists():
        return Path(env)
    return request.getfixturevalue("llama_bin")


# --- worker hosts ---------------------------------------------------------------------------------


@dataclass
class Host:
    """A worker machine: its namespace and host name, its own folder, cache and base file."""

    index: int
    name: str
    dir: Path
    cluster: Cluster
    env: dict
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def base(self) -> Path:
        return self.dir / "tiny.gguf"

    def command(self, argv: list[str], gate: Path | None = None) -> list[str]:
        py = [sys.executable]
        if gate is None:
            py += ["-m", "gguf_surgeon", *argv]
        else:  # everything imported, say so, then start when the gate opens: hosts open the database together
            py += [
                "-c",
                "import sys, time, pathlib, psycopg, sqlalchemy, optuna, gguf_surgeon.cli as c, gguf_surgeon.cli.search, "
                "gguf_surgeon.search.study; gate = pathlib.Path(sys.argv[1]); "
                "pathlib.Path(sys.argv[2]).touch(); "
                "exec('while not gate.exists(): time.sleep(0.002)'); "
                "sys.argv = ['gguf-surgeon'] + sys.argv[3:]; c.main()",
                str(gate),
                str(self.dir / "ready"),
                *argv,
            ]
        if not self.cluster.namespaces:
            return py
        uts = ["unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh"]
        return ["ip", "netns", "exec", self.cluster.network.ns(f"h{self.index}"), *uts, *py]

    def search(self, db: str, *extra: str, gate: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        argv = ["search", str(self.base), "--space", str(self.dir / "faults.toml"), "--storage", self.url(db)]
        argv += ["--study-name", "s", "--work-dir", str(self.dir / "work"), *SEARCH_ARGS, *extra]
        n = len(self.procs)
        p = subprocess.Popen(
            self.command(argv, gate),
            stdout=open(self.dir / f"out-{n}.txt", "w"),
            stderr=open(self.dir / f"err-{n}.txt", "w"),
            stdin=subprocess.DEVNULL,
            env={**self.env, **(env or {})},
            cwd=self.dir,
            start_new_session=True,  # its own process group: a SIGKILL takes its llama.cpp child too
        )
        p.n = n
        self.procs.append(p)
        return p

    def url(self, db: str) -> str:
        return self.cluster.url(db, self.index)

    def wait(self, p: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
        rc = p.wait(timeout=timeout)
        return rc, (self.dir / f"out-{p.n}.txt").read_text(), (self.dir / f"err-{p.n}.txt").read_text()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def hosts(pg, tiny, tmp_path, perplexity_bin, request):
    """Two worker hosts (more with hosts.extend); every process they started is ended at teardown."""
    made: list[Host] = []

    def make(i: int, name: str | None = None, **env: str) -> Host:
        name = name or f"host-{chr(96 + i)}"
        d = tmp_path / name
        d.mkdir()
        shutil.copy(tiny, d / "tiny.gguf")  # no shared filesystem: each host has its own copy
        (d / "faults.toml").write_text(SPACE)
        e = {
            **os.environ,
            "GGUF_SURGEON_LLAMA_BIN": str(perplexity_bin),
            "GGUF_SURGEON_CACHE": str(d / "cache"),
            **env,
        }
        h = Host(i, name, d, pg, e)
        made.append(h)
        return h

    yield make
    for h in made:
        h.kill()


def trials(pg: Cluster, db: str) -> list[dict]:
    """Every trial of study 's': number, state, value, user attributes (read with SQL)."""
    with pg.admin(db) as c:
        if c.execute("SELECT to_regclass('trial_user_attributes')").fetchone()[0] is None:
            return []  # no worker has created Optuna's tables yet
        rows = c.execute(
            "SELECT t.trial_id, t.number, t.state, v.value FROM trials t "
            "LEFT JOIN trial_values v ON v.trial_id = t.trial_id ORDER BY t.number"
        ).fetchall()
        attrs: dict[int, dict] = {}
        for tid, key, value in c.execute("SELECT trial_id, key, value_json FROM trial_user_attributes"):
            attrs.setdefault(tid, {})[key] = json.loads(value)
    return [{"number": n, "state": s, "value": v, **attrs.get(tid, {})} for tid, n, s, v in rows]


def scored(ts: list[dict]) -> list[dict]:
    return [t for t in ts if t["state"] == "COMPLETE" and t.get("evaluated")]


def wait_until(cond, timeout: float, what: str, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_each_scored_once(ts: list[dict]) -> dict[str, float]:
    done = scored(ts)
    recipes = [t["recipe"] for t in done]
    assert len(recipes) == len(set(recipes)) == N_CANDIDATES, sorted(recipes)
    return {t["recipe"]: t["value"] for t in done}


def host_of(t: dict) -> str:
    return t["worker"].rsplit(":", 1)[0]


_REFERENCE: dict[str, float] = {}


def one_worker_reference(pg: Cluster, hosts) -> dict[str, float]:
    """KLD per recipe of a one-worker run of the whole space (computed once per session)."""
    if not _REFERENCE:
        h = hosts(1, name="reference")
        db = pg.new_database("reference")
        rc, out, err = h.wait(h.search(db))
        assert rc == 0, err
        _REFERENCE.update(assert_each_scored_once(trials(pg, db)))
    return dict(_REFERENCE)


def assert_clean(rc: int, out: str, err: str) -> dict:
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err and PASSWORD not in out + err
    return json.loads(out)


FAST = {"GGUF_SURGEON_SEARCH_HEARTBEAT": "1", "GGUF_SURGEON_SEARCH_GRACE": "4"}  # a dead worker is noticed in 4 s
# outages of ~10 s must not make a running candidate stale: a grace period well past them
PATIENT = {
    "GGUF_SURGEON_SEARCH_HEARTBEAT": "2",
    "GGUF_SURGEON_SEARCH_GRACE": "90",
    "GGUF_SURGEON_SEARCH_DB_WAIT": "120",
}


# --- the tests ---------------------------------------------------------------------------------------


@pytest.mark.slow  # real llama-perplexity in every worker
def test_two_hosts_started_together_on_an_empty_database_make_one_study(pg, hosts):
    """Both open an empty database at the same instant: Optuna's schema and the study are
    created once (without the lock, one of them dies on a duplicate key of Optuna's CREATE TABLE or
    alembic_version)."""
    db = pg.new_database("together")
    a, b = hosts(1), hosts(2)
    gate = a.dir.parent / "gate"
    pa, pb = a.search(db, gate=gate), b.search(db, gate=gate)
    wait_until(lambda: (a.dir / "ready").exists() and (b.dir / "ready").exists(), 60, "both hosts ready")
    gate.touch()
    ra, rb = assert_clean(*a.wait(pa)), assert_clean(*b.wait(pb))
    with pg.admin(db) as c:
        assert c.execute("SELECT count(*) FROM studies").fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM version_info").fetchone()[0] == 1
        (created_by,) = c.execute("SELECT value_json FROM study_user_attributes WHERE key = 'created_by'").fetchone()
    ts = trials(pg, db)
    assert_each_scored_once(ts)
    workers = {t["worker"] for t in scored(ts)}
    assert len(workers) == 2  # both hosts scored candidates
    assert json.loads(created_by) in workers  # made by one of them, once
    assert ra["evaluated"] == rb["evaluated"] == N_CANDIDATES  # each ends when the whole space is done
    if pg.namespaces:
        assert {host_of(t) for t in scored(ts)} == {"host-a", "host-b"}
    # nothing enqueued twice: one trial per candidate
    assert len(ts) == N_CANDIDATES, [(t["number"], t["state"], t.get("recipe")) for t in ts]


@pytest.mark.slow  # real llama-perplexity in every worker
def test_three_workers_on_two_hosts_match_a_one_worker_run_and_status_shows_them(pg, hosts):
    """An exhaustive space over 3 workers (host a: --jobs 2, host b: 1) gives the leaderboard
    of one worker; `search status` reports each host's share."""
    ref = one_worker_reference(pg, hosts)
    db = pg.new_database("three")
    a, b = hosts(1), hosts(2)
    pa, pb = a.search(db, "--jobs", "2"), b.search(db)
    ra, rb = assert_clean(*a.wait(pa)), assert_clean(*b.wait(pb))
    ts = trials(pg, db)
    assert assert_each_scored_once(ts) == ref  # same recipes, same KLDs
    assert ra["evaluated"] == rb["evaluated"] == N_CANDIDATES
    board = [e["recipe"] for e in ra["leaderboard"]]
    assert sorted(board) == sorted(ref) and [ref[r] for r in board] == sorted(ref.values())  # best first
    assert ra["storage"].startswith(f"postgresql://{ROLE}:***@")

    r = CliRunner().invoke(main, ["search", "status", "--storage", pg.url(db), "--json"])
    assert r.exit_code == 0, r.output
    status = json.loads(r.output)
    assert PASSWORD not in r.output
    assert (status["study_name"], status["evaluated"], status["candidates"]) == ("s", N_CANDIDATES, N_CANDIDATES)
    assert (status["remaining"], status["running"], status["failed"], status["eta_s"]) == (0, 0, 0, 0.0)
    per_host = {h["host"]: h for h in status["hosts"]}
    assert sum(h["done"] for h in per_host.values()) == N_CANDIDATES
    if pg.namespaces:
        assert set(per_host) == {"host-a", "host-b"}
        assert per_host["host-a"]["workers"] == 2 and per_host["host-b"]["workers"] == 1
        assert all(h["done"] > 0 and h["rate"] > 0 for h in per_host.values())
    text = CliRunner().invoke(main, ["search", "status", "--storage", pg.url(db)])
    assert text.exit_code == 0 and "candidates scored" in text.output and PASSWORD not in text.output
    for h in per_host:
        assert h in text.output
    missing = CliRunner().invoke(main, ["search", "status", "--storage", pg.url(db), "--study-name", "nope"])
    assert missing.exit_code == 1 and missing.output.startswith("Error: no study 'nope' in postgresql://")


@pytest.mark.slow  # real llama-perplexity in every worker
def test_budget_is_counted_over_all_hosts(pg, hosts):
    db = pg.new_database("budget")
    a, b = hosts(1), hosts(2)
    pa, pb = a.search(db, "--budget", "5"), b.search(db, "--budget", "5")
    assert_clean(*a.wait(pa)), assert_clean(*b.wait(pb))
    assert len(scored(trials(pg, db))) == 5
    # a larger budget on one host continues the same study: only the difference is scored
    out = assert_clean(*a.wait(a.search(db, "--budget", "7")))
    assert (out["evaluated"], out["evaluated_now"]) == (7, 2)
    assert len(scored(trials(pg, db))) == 7


@pytest.mark.slow  # real llama-perplexity in every worker
def test_a_worker_killed_mid_candidate_is_failed_by_heartbeat_and_retried_by_another_host(pg, hosts):
    ref = one_worker_reference(pg, hosts)
    db = pg.new_database("sigkill")
    a, b = hosts(1, **FAST), hosts(2, **FAST)
    pa = a.search(db)
    pb = b.search(db)
    killed = scoring_on(pg, db, a, pa)
    os.killpg(pa.pid, signal.SIGKILL)  # the host dies with its llama.cpp child, mid-candidate
    pa.wait()
    assert_clean(*b.wait(pb))
    ts = trials(pg, db)
    by_number = {t["number"]: t for t in ts}
    assert by_number[killed["number"]]["state"] == "FAIL"  # failed by heartbeat, not left RUNNING
    again = [t for t in scored(ts) if t["recipe"] == killed["recipe"]]
    assert len(again) == 1 and again[0]["number"] > killed["number"]
    assert again[0]["worker"].split(":")[-1] == str(pb.pid)  # retried by the other host
    assert assert_each_scored_once(ts) == ref
    status = json.loads(CliRunner().invoke(main, ["search", "status", "--storage", pg.url(db), "--json"]).output)
    if pg.namespaces:
        hs = {h["host"]: h for h in status["hosts"]}
        assert hs["host-a"]["failed"] == 1 and hs["host-b"]["retried"] == 1 and hs["host-a"]["running"] == 0


def scoring_on(pg: Cluster, db: str, host: Host, p: subprocess.Popen) -> dict:
    """Wait until process p of `host` is scoring a candidate; its trial."""
    me = f"{host.name if pg.namespaces else ''}:{p.pid}"

    def running() -> dict | None:
        if p.poll() is not None:
            raise AssertionError(f"{host.name} ended before the fault: {host.wait(p)}")
        mine = [
            t
            for t in trials(pg, db)
            if t["state"] == "RUNNING" and t.get("scoring") and t.get("worker", "").endswith(me)
        ]
        return mine[0] if mine else None

    return wait_until(running, 120, f"{host.name} scoring a candidate")


@pytest.mark.slow  # real llama-perplexity in every worker
def test_ctrl_c_on_one_host_stops_only_that_host(pg, hosts):
    ref = one_worker_reference(pg, hosts)
    db = pg.new_database("ctrlc")
    a, b = hosts(1, **FAST), hosts(2, **FAST)
    pa, pb = a.search(db), b.search(db)
    interrupted = scoring_on(pg, db, a, pa)
    os.killpg(pa.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the foreground process group
    rc, out, err = a.wait(pa)
    assert rc == 130 and err.startswith("Error: interrupted; every finished result is kept in postgresql://"), err
    assert "Traceback" not in err and PASSWORD not in err
    assert_clean(*b.wait(pb))  # the other host went on and finished the study
    ts = trials(pg, db)
    assert {t["number"]: t for t in ts}[interrupted["number"]]["state"] == "FAIL"
    again = [t for t in scored(ts) if t["recipe"] == interrupted["recipe"]]
    assert len(again) == 1 and again[0]["worker"].endswith(f":{pb.pid}")
    assert assert_each_scored_once(ts) == ref  # the interrupted candidate was retried, not marked broken


@pytest.mark.slow  # real llama-perplexity in every worker
def test_a_worker_gives_up_on_a_database_gone_for_good_and_a_rerun_continues(pg, hosts):
    db = pg.new_database("giveup")
    a = hosts(1, **{**FAST, "GGUF_SURGEON_SEARCH_DB_WAIT": "3"})
    pa = a.search(db)
    wait_until(lambda: len(scored(trials(pg, db))) >= 2, 120, "2 candidates scored")
    pg.stop()
    try:
        rc, out, err = a.wait(pa, timeout=90)
    finally:
        pg.start()
    errors = [l for l in err.splitlines() if l.startswith("Error: ")]
    assert rc == 1 and len(errors) == 1, err
    assert "unreachable for" in errors[0] and "rerun the same command to continue" in errors[0]
    assert "Traceback" not in err and PASSWORD not in out + err
    kept = len(scored(trials(pg, db)))
    assert kept >= 2
    out = assert_clean(*a.wait(a.search(db)))  # the same command, once the database is back
    assert (out["evaluated"], out["evaluated_now"]) == (N_CANDIDATES, N_CANDIDATES - kept)
    assert_each_scored_once(trials(pg, db))


def _outage_lines(err: str) -> tuple[list[str], list[str]]:
    lines = err.splitlines()
    return [l for l in lines if "unreachable" in l], [l for l in lines if "reachable again" in l]


@pytest.mark.slow  # real llama-perplexity in every worker
def test_database_stopped_for_10_s_mid_study_and_started_again(pg, hosts):
    ref = one_worker_reference(pg, hosts)
    db = pg.new_database("restart")
    a, b = hosts(1, **PATIENT), hosts(2, **PATIENT)
    pa, pb = a.search(db), b.search(db)
    wait_until(lambda: len(scored(trials(pg, db))) >= 3, 120, "3 candidates scored")
    before = {t["number"]: (t["recipe"], t["value"]) for t in scored(trials(pg, db))}
    pg.stop()
    try:
        time.sleep(10)
        assert pa.poll() is None and pb.poll() is None  # waiting, not dead
    finally:
        pg.start()
    ra, rb = a.wait(pa), b.wait(pb)
    for rc, out, err in (ra, rb):
        assert_clean(rc, out, err)
        waiting, back = _outage_lines(err)
        assert len(waiting) == 1 and len(back) == 1, err  # one clear line while waiting, one when back
        assert "waiting and retrying" in waiting[0] and f"postgresql://{ROLE}:***@" in waiting[0]
    ts = trials(pg, db)
    after = {t["number"]: (t["recipe"], t["value"]) for t in scored(ts)}
    assert all(after[n] == v for n, v in before.items())  # no finished result lost
    assert assert_each_scored_once(ts) == ref
    assert not [t for t in ts if t["state"] == "RUNNING"]


@pytest.mark.slow  # real llama-perplexity in every worker
def test_a_host_cut_off_from_the_network_for_10_s_continues(pg, hosts):
    if not pg.namespaces:
        pytest.skip("loopback mode: no network to partition (network namespaces cannot be made here)")
    ref = one_worker_reference(pg, hosts)
    db = pg.new_database("partition")
    a, b = hosts(1, **PATIENT), hosts(2, **PATIENT)
    pa, pb = a.search(db), b.search(db)
    wait_until(lambda: len(scored(trials(pg, db))) >= 3, 120, "3 candidates scored")
    pg.network.host_link(1, up=False)
    try:
        time.sleep(10)
        assert pa.poll() is None
    finally:
        pg.network.host_link(1, up=True)
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = a.wait(pa), b.wait(pb)
    assert_clean(rc_a, out_a, err_a), assert_clean(rc_b, out_b, err_b)
    waiting, back = _outage_lines(err_a)
    assert len(waiting) == 1 and len(back) == 1, err_a
    assert _outage_lines(err_b) == ([], [])  # the other host never lost the database
    ts = trials(pg, db)
    assert assert_each_scored_once(ts) == ref
    assert not [t for t in ts if t["state"] in ("RUNNING", "FAIL")]  # nothing was given up for dead


def test_bad_url_wrong_password_and_missing_driver_are_one_error_line(pg, tiny):
    runner = CliRunner()
    db = pg.new_database("errors")
    cases = [
        (pg.url(db, password="wrong-" + PASSWORD), "password authentication failed"),
        (pg.url("no_such_db"), 'database "no_such_db" does not exist'),
        (f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{_free_port()}/{db}", "Connection refused"),
        (f"postgres://{ROLE}:{PASSWORD}@127.0.0.1/{db}", "unknown kind of database 'postgres'"),
        ("not a url", "not a database URL"),
    ]
    try:
        import psycopg2  # noqa: F401
    except ImportError:  # a driver that really is missing here
        cases.append((pg.url(db).replace("postgresql://", "postgresql+psycopg2://"), "'psycopg2' is not installed"))
    for url, says in cases:
        for argv in (["search", str(tiny), "--storage", url, "--no-rank"], ["search", "status", "--storage", url]):
            r = runner.invoke(main, argv)
            lines = r.output.strip().splitlines()
            assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (argv, r.output)
            assert says in lines[0], lines[0]
            assert PASSWORD not in r.output and "Traceback" not in r.output
            if "://" in url and "@" in url:
                assert f"{ROLE}:***@" in lines[0]
