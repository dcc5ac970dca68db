"""Run llama.cpp's `llama-perplexity`: the per-chunk perplexity of a text, the base logits for
KL divergence (--kl-divergence-base), a model's KL divergence to them (--kl-divergence), and
benchmark tasks (--hellaswag, --winogrande, --multiple-choice), right or wrong per task.

    tool = PerplexityTool(find_tool("llama-perplexity"), ctx=256, batch=512, threads=4, seed=42)
    base_nll = tool.chunk_nll(base, text, logits=Path("base.bin"))  # mean NLL per chunk, nats
    kld = tool.kld(edited, Path("base.bin"))  # per-chunk NLL, KLD, same-top rate; token statistics
    right = tool.task_results(model, "hellaswag", Path("tasks.txt"), 40)  # [True, False, ...]

Results depend on every setting (the batch split too), so all are fixed per tool. Each run is
killed on timeout or Ctrl-C (run_tool); `on_time(load, compute)` gets the seconds until the
model had loaded and the seconds after, also for a run that fails. Nothing here caches.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import EvalError, SurgeonError, ToolError
from .tools import ERROR_LINE, run_tool

Timing = Callable[[float, float], None]
"""on_time(load seconds, compute seconds): called once per llama-perplexity run."""
ChunkProgress = Callable[[int, "int | None"], None]
"""progress(chunks done, chunks announced): None until the tool has said how many."""

# llama.cpp's logger thread is not flushed at exit (llama.cpp issue 22142), so the last lines
# of a run are sometimes lost: often for millisecond runs on a loaded machine, rarely for
# real models (0 in 10 SmolLM2 runs at load 5). Such a run is repeated, after a short pause.
OUTPUT_ATTEMPTS = 6
KLD_STATS_MIN_TOKENS = 100  # llama-perplexity prints no token-level KLD statistics below this
_CHUNKS_LINE = re.compile(r"over (\d+) chunks")
_TASKS_READ = re.compile(r"loaded (\d+) tasks from prompt|there are (\d+) tasks in prompt")
_LOADED_LINE = re.compile(r"calculating perplexity over|computing over \d+ chunks")

# "       0  15.3000  2.727853  0.223038": --ppl-output-type 1, one line per chunk, cumulative
_PPL_LINE = re.compile(r"^\s*\d+\s+(\S+)\s+(\S+)\s+(\S+)\s*$")
# "   3    20.1405 ±    0.0123    0.00012 ±    0.00003    0.00045 ±  ...  %    99.123 ±  0.123 %"
_PM = r"\s*±\s*"
_KLD_LINE = re.compile(
    r"^\s*(\d+)\s+(\S+)"
    + _PM
    + r"(\S+)\s+(\S+)"
    + _PM
    + r"(\S+)\s+(\S+)"
    + _PM
    + r"(\S+)\s+(\S+)"
    + _PM
    + r"(\S+)\s*%\s+(\S+)"
    + _PM
    + r"(\S+)\s*%\s*$"
)
_KLD_STAT = {
    "mean": re.compile(r"^Mean\s+KLD:\s*(\S+)"),  # over all tokens, 6 decimals (chunk lines have fewer)
    "median": re.compile(r"^Median\s+KLD:\s*(\S+)"),
    "p99": re.compile(r"^99\.0%\s+KLD:\s*(\S+)"),
    "maximum": re.compile(r"^Maximum\s+KLD:\s*(\S+)"),
}


def scored_tokens_per_chunk(ctx: int) -> int:
    """Tokens of a `ctx`-token chunk that llama-perplexity scores: the second half, less the last."""
    return ctx - 1 - ctx // 2


def _no_time(load: float, compute: float) -> None:
    pass


def _run_perplexity_tool(
    binary: Path, args: Sequence[str], on_time: Timing, timeout: float, on_line: Callable[[str], None]
) -> tuple[int, list[str], list[str]]:
    """Run llama-perplexity through run_tool (killed on timeout or Ctrl-C), each line to
    `on_line`; `on_time` gets the time until the model has loaded and the rest. Returns
    (exit status, all lines, error lines without log prefixes)."""
    start = time.perf_counter()
    lines: list[str] = []
    errors: deque[str] = deque(maxlen=6)
    loaded_at: float | None = None

    def each(line: str) -> None:
        nonlocal loaded_at
        lines.append(line)
        if loaded_at is None and _LOADED_LINE.search(line):
            loaded_at = time.perf_counter()
        if ERROR_LINE.search(line):
            errors.append(re.sub(r"^[\d.]+ [EWI] ", "", line.strip()))
        on_line(line)

    try:
        run = run_tool(binary, args, each, timeout=timeout)
    finally:
        end = time.perf_counter()
        loaded = loaded_at if loaded_at is not None else end
        on_time(loaded - start, end - loaded)
    return run.returncode, lines, list(errors)


def _per_chunk(cumulative: Sequence[float]) -> list[float]:
    """Per-chunk means from running means over equal-sized chunks."""
    return [k * m - (k - 1) * prev for k, (m, prev) in enumerate(zip(cumulative, [0.0, *cumulative[:-1]]), start=1)]


def _finite(values: Sequence[float], what: str, model: Path) -> list[float]:
    bad = [i + 1 for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise EvalError(
            f"{model.name}: llama-perplexity gave a non-finite {what} for chunk {bad[0]}: "
            f"the model produces NaN or infinite logits"
        )
    return list(values)


def parse_perplexity_output(lines: Iterable[str]) -> list[float]:
    """Per-chunk mean NLL from llama-perplexity --ppl-output-type 1 lines."""
    cumulative = []
    for line in lines:
        m = _PPL_LINE.match(line)
        if m:
            try:
                cumulative.append(float(m.group(2)))
            except ValueError:
                continue
    return _per_chunk(cumulative)


def parse_kld_output(lines: Iterable[str]) -> dict[str, Any]:
    """Per-chunk NLL, KLD, same-top fraction and the token-level statistics of a
    llama-perplexity --kl-divergence run."""
    ppl, kld, top, stats = [], [], [], {}
    for line in lines:
        m = _KLD_LINE.match(line)
        if m:
            ppl.append(float(m.group(2)))
            kld.append(float(m.group(6)))
            top.append(float(m.group(10)) / 100)
            continue
        for name, rx in _KLD_STAT.items():
            s = rx.match(line.strip())
            if s:
                stats[name] = float(s.group(1)) + 0.0  # "-0.000000" -> 0.0
    nll = _per_chunk([math.log(p) if p > 0 else float("nan") for p in ppl])
    return {
        "chunk_nll": nll,
        "chunk_kld": [max(0.0, v) for v in _per_chunk(kld)],
        "chunk_same_top": [min(1.0, max(0.0, v)) for v in _per_chunk(top)],
        **stats,
    }


def _tool_failure(binary: Path, model: Path, rc: int, errors: list[str], lines: list[str]) -> SurgeonError:
    reason = "; ".join(errors) or "; ".join(l.strip() for l in lines[-4:] if l.strip()) or "no output"
    if any("tokens to evaluate perplexity" in e or "tokenizes to only" in e for e in errors):
        return EvalError(f"{model.name}: the evaluation text is too short for chunks of this length: {reason}")
    status = f"exited with status {rc}" if rc else "produced no results"
    return ToolError(f"{binary.name} {status} for {model.name}: {reason}")


class PerplexityTool:
    """llama-perplexity at fixed settings: -c `ctx` (the second half of each chunk is scored),
    -b `batch`, -t `threads`, --seed `seed`; `timeout` seconds per run."""

    def __init__(
        self,
        binary: Path,
        *,
        ctx: int,
        batch: int,
        threads: int,
        seed: int,
        timeout: float,
        on_time: Timing = _no_time,
    ):
        self.binary = binary
        self.ctx, self.batch, self.threads, self.seed = ctx, batch, threads, seed
        self.timeout = timeout
        self.on_time = on_time

    def args(self, *extra: str) -> list[str]:
        return ["-c", str(self.ctx), "-b", str(self.batch), "-t", str(self.threads), "--seed", str(self.seed), *extra]

    def run(
        self,
        model: Path,
        args: Sequence[str],
        count_lines: re.Pattern,
        progress: ChunkProgress,
        needs_stats: bool = False,
        expected: int | None = None,
    ) -> list[str]:
        """Run llama-perplexity on `model` until its output is complete: llama.cpp's logger may
        drop the last lines at exit (its queue is not flushed), so a run whose chunk lines (or,
        with `needs_stats`, KLD statistics) fall short of what it announced (or of `expected`
        lines) is repeated. Returns the output lines; ToolError (EvalError for a too short
        text) when it fails."""
        for attempt in range(1, OUTPUT_ATTEMPTS + 1):
            if attempt > 1:
                time.sleep(0.1 * attempt)
            done, total = 0, expected

            read: int | None = None  # tasks llama-perplexity says it read (benchmark modes)

            def on_line(line: str) -> None:
                nonlocal done, total, read
                if total is None and (m := _CHUNKS_LINE.search(line)):
                    total = int(m.group(1))
                if expected is not None and read is None and (m := _TASKS_READ.search(line)):
                    read = int(m.group(1) or m.group(2))
                if count_lines.match(line):
                    done += 1
                progress(done, total)

            progress(0, None)
            rc, lines, errors = _run_perplexity_tool(
                self.binary, ["-m", str(model), *args], self.on_time, self.timeout, on_line
            )
            if (rc != 0 and (errors or attempt == OUTPUT_ATTEMPTS)) or (done == 0 and errors):
                raise _tool_failure(self.binary, model, rc, errors, lines)
            if expected is not None and read is not None and read != expected:
                raise ToolError(f"{self.binary.name} read {read} of the {expected} tasks written for {model.name}")
            if expected is not None and errors and done < expected:
                raise _tool_failure(self.binary, model, rc, errors, lines)  # e.g. a task too long
            if rc != 0:
                continue  # failed, and the reason was among the lost lines: run again to get it
            if total is not None and done == total:
                scored = total * scored_tokens_per_chunk(self.ctx) if expected is None else 0
                if (
                    not needs_stats
                    or scored < KLD_STATS_MIN_TOKENS
                    or any(_KLD_STAT["median"].match(l.strip()) for l in lines)
                ):
                    return lines
        if done == 0:
            raise _tool_failure(self.binary, model, rc, errors, lines)
        raise ToolError(
            f"{self.binary.name} output for {model.name} was cut short "
            f"{OUTPUT_ATTEMPTS} times ({done} of {total} chunk lines)"
        )

    def chunk_nll(
        self, model: Path, text: str, progress: ChunkProgress = lambda done, total: None, logits: Path | None = None
    ) -> list[float]:
        """Mean negative log-likelihood (nats) of each chunk of `text`; with `logits`, also
        writes the --kl-divergence-base file there (complete, or not at all)."""
        with tempfile.TemporaryDirectory(prefix="gguf-surgeon-eval-") as tmp:
            text_file = Path(tmp) / "text.txt"
            text_file.write_text(text, encoding="utf-8")
            args = self.args("-f", str(text_file), "--ppl-output-type", "1")
            partial = None if logits is None else logits.with_name(f".{logits.name}.{os.getpid()}.tmp")
            if partial is not None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                args += ["--kl-divergence-base", str(partial)]
            try:
                lines = self.run(model, args, _PPL_LINE, progress)
                if partial is not None:
                    os.replace(partial, logits)
            finally:
                if partial is not None:
                    partial.unlink(missing_ok=True)
        return _finite(parse_perplexity_output(lines), "perplexity", model)

    def kld(self, model: Path, base_logits: Path, progress: ChunkProgress = lambda done, total: None) -> dict[str, Any]:
        """parse_kld_output of `model` against the base logits file (which must exist)."""
        args = self.args("--kl-divergence-base", str(base_logits), "--kl-divergence")
        out = parse_kld_output(self.run(model, args, _KLD_LINE, progress, needs_stats=True))
        _finite(out["chunk_nll"], "perplexity", model)
        _finite(out["chunk_kld"], "KL divergence", model)
        return out

    def task_results(
        self,
        model: Path,
        mode: str,
        data_file: Path,
        count: int,
        parallel: int = 4,
        progress: ChunkProgress = lambda done, total: None,
    ) -> list[bool]:
        """Right or wrong for every task of `data_file` (`count` of them), in the order
        llama-perplexity scores them: HellaSwag in its seeded shuffle (--hellaswag-tasks count),
        WinoGrande and multiple choice in file order (task count 0: all). `parallel` is -np: the
        answers of one task must fit (llama.cpp's minimum, 4, holds one HellaSwag task)."""
        flag, file_flag = _TASK_MODES[mode]
        extra = ["--hellaswag-tasks", str(count)] if mode == "hellaswag" else []
        args = self.args(flag, *extra, "-np", str(parallel), file_flag, str(data_file))
        lines = self.run(model, args, _TASK_LINES[mode], progress, expected=count)
        return parse_task_output(mode, lines, count)


# per-task lines of the benchmark modes (perplexity.cpp's LOG calls):
# hellaswag "12\t41.66666667%\t[18.9, 67.4]" and mc "12\t41.66666667": task number, running
# accuracy in percent; winogrande "12\t41.6667\t-1.2  -1.4  1  2": number, running accuracy,
# both choices' scores, the choice made and the right one
_TASK_LINES = {
    "hellaswag": re.compile(r"^(\d+)\t(\d+\.\d+)%\t\["),
    "winogrande": re.compile(r"^(\d+)\t(\d+\.\d+)\t\s*\S+\s+\S+\s+([12])\s+([12])\s*$"),
    "mc": re.compile(r"^(\d+)\t(\d+\.\d+)\s*$"),
}
_TASK_MODES = {
    "hellaswag": ("--hellaswag", "-f"),
    "winogrande": ("--winogrande", "-f"),
    "mc": ("--multiple-choice", "-bf"),
}


def parse_task_output(mode: str, lines: Iterable[str], count: int) -> list[bool]:
    """Right or wrong for each of `count` tasks, in the order llama-perplexity scored them:
    winogrande prints its choice and the right one; the others a running accuracy (percent,
    8 decimals), whose count of right answers after task k is round(k x accuracy / 100)."""
    rx = _TASK_LINES[mode]
    seen: dict[int, re.Match] = {}
    for line in lines:
        if m := rx.match(line):
            seen[int(m.group(1))] = m
    if sorted(seen) != list(range(1, count + 1)):
        raise ToolError(f"llama-perplexity printed results for {len(seen)} of {count} tasks")
    if mode == "winogrande":
        return [seen[k].group(3) == seen[k].group(4) for k in range(1, count + 1)]
    totals = [0] + [round(k * float(seen[k].group(2)) / 100) for k in range(1, count + 1)]
    steps = [b - a for a, b in zip(totals, totals[1:])]
    if any(s not in (0, 1) for s in steps):
        k = next(i for i, s in enumerate(steps, start=1) if s not in (0, 1))
        raise ToolError(f"llama-perplexity's running accuracy jumps at task {k}: {seen[k].group(0).strip()}")
    return [s == 1 for s in steps]
