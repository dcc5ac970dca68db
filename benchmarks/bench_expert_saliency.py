"""What the REAP saliency pass (`rank --experts`, `prune-experts N`) costs per MoE block, and how
it scales with the number of experts and of tokens.

Synthetic qwen3moe models (random weights, built with the test fixtures' GGUFWriter recipe) run
through `analysis.expert_rank.rank_experts`; each row is the median over the model's blocks of
one block's time (attention, router, and every routed expert dequantized once and applied),
plus its CPU time per block (steadier than wall time on a shared machine) and the pass's peak
RSS, in a fresh process with one BLAS thread; each row keeps the least disturbed of --repeat runs. Two shapes:
  - "fixture": n_embd 64, n_ff_exp 32 (the test fixtures' width)
  - "wide": n_embd 512, n_ff_exp 256, F16 (a quarter of Qwen3-30B-A3B's n_embd 2048 x n_ff_exp 768)

    python benchmarks/bench_expert_saliency.py
    python benchmarks/bench_expert_saliency.py --shapes fixture --experts 8 32 --tokens 32 128 --json rows.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))

import gguf  # noqa: E402
from make_fixtures import build_model  # noqa: E402

from gguf_surgeon.analysis.expert_rank import rank_experts  # noqa: E402

SHAPES = {
    "fixture": dict(n_embd=64, ff_exp=32, n_head=4, n_head_kv=2, qtype=gguf.GGMLQuantizationType.F32),
    "wide": dict(n_embd=512, ff_exp=256, n_head=8, n_head_kv=4, qtype=gguf.GGMLQuantizationType.F16),
}


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM starts afresh at exec (ru_maxrss keeps the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(path: Path, n_tokens: int) -> dict:
    """One saliency pass over `path` (run in a fresh process, so peak RSS is this pass's own)."""
    vocab = 303  # the fixtures' vocabulary: byte tokens, merges, specials
    tokens = [(7 * i + 11) % (vocab - 10) for i in range(n_tokens)]
    wall, cpu = time.perf_counter(), time.process_time()
    r = rank_experts(path, tokens=tokens, max_tokens=n_tokens)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    routed = sum(1 for s in r.scores if s.tokens > 0) / len(r.blocks)
    return {
        "block_ms": round(statistics.median(r.block_seconds) * 1000, 1),
        "cpu_ms_per_block": round(cpu * 1000 / len(r.blocks), 1),
        "experts_routed_per_block": round(routed, 1),
        "cpu_ms_per_routed_expert": round(cpu * 1000 / len(r.blocks) / routed, 2),
        "wall_s": round(wall, 3),
        "peak_rss_mib": peak_rss_mib(),
    }


def measured(path: Path, n_tokens: int) -> dict:
    # one BLAS thread: on a shared machine, idle BLAS threads spin and bill CPU time for nothing
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(path), str(n_tokens)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--experts", nargs="+", type=int, default=[8, 32, 128])
    ap.add_argument("--tokens", nargs="+", type=int, default=[32, 128, 512])
    ap.add_argument("--used", type=int, default=8, help="experts routed per token (capped at the count)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the one with the least CPU time is kept")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--measure", nargs=2, metavar=("MODEL", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), int(args.measure[1]))))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-experts-") as tmp:
        for shape in args.shapes:
            for n_expert in args.experts:
                path = Path(tmp) / f"{shape}-{n_expert}.gguf"
                used = min(args.used, n_expert)
                build_model(
                    path, arch="qwen3moe", n_blocks=args.blocks, n_expert=n_expert, n_expert_used=used, **SHAPES[shape]
                )
                for n_tokens in args.tokens:
                    row = {"shape": shape, "experts": n_expert, "used": used, "tokens": n_tokens}
                    runs = [measured(path, n_tokens) for _ in range(args.repeat)]
                    row.update(min(runs, key=lambda r: r["cpu_ms_per_block"]))  # the least disturbed run
                    row["file_mib"] = round(path.stat().st_size / 2**20, 1)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
