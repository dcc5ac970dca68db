"""The joint study of search --target-size on SmolLM2: is its Pareto front better than llama.cpp's
uniform K-quant mixes at their own sizes?

On the F16 base made from SmolLM2-135M-Instruct's Q4_1 release (`llama-quantize
--allow-requantize Q4_1 F16`), budget_study (search/budget.py) runs a multi-objective study over
no surgery and every single block deletion, each with a type per tensor allocated from the base's
sensitivity (inherited by the edits), budgets drawn between --low-share x the uniform Q3_K_M size
and the uniform Q5_K_M size. The study optimizes the KLD on the calibration text (first 30% of
the bundled text); this script reports the front re-measured on the held-out 70%, the uniform
types on the same text, and per uniform type the best front point no larger than it.

Caveat (docs/budget.md): a Q4_1 requantization recovers that base's grid almost exactly, so the
candidate types are the K-quants, Q8_0 and F16 and the reference points llama.cpp's K-quant mixes.

    python benchmarks/bench_front.py --base smollm2-f16.gguf --cache-dir /tmp/cache --trials 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from bench_budget import f16_base, log, table  # noqa: E402

from gguf_surgeon.budget.sensitivity import bundled_texts, text_options  # noqa: E402
from gguf_surgeon.edit import EditOptions, edit  # noqa: E402
from gguf_surgeon.evaluation.runner import kl_divergence  # noqa: E402
from gguf_surgeon.evaluation.suite import EvalOptions, default_threads  # noqa: E402
from gguf_surgeon.llama.quantize import quantize_ladder, quantize_mix  # noqa: E402
from gguf_surgeon.reader import Model  # noqa: E402
from gguf_surgeon.search.budget import budget_study, plot_front  # noqa: E402

NAME = "SmolLM2-135M-Instruct-edited"  # general.name of the study's candidates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="F16 base (default: made from SmolLM2's Q4_1 in the work folder)")
    ap.add_argument("--llama-bin", type=Path, default=os.environ.get("GGUF_SURGEON_LLAMA_BIN"))
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--cache-dir", type=Path, help="evaluation cache (default: in the work folder)")
    ap.add_argument("--work", type=Path, help="work folder: the study's database and files (default: temporary)")
    ap.add_argument("--trials", type=int, default=30, help="finished trials in the study")
    ap.add_argument("--low-share", type=float, default=0.95, help="smallest budget, as a share of uniform Q3_K_M")
    ap.add_argument("--check", type=int, default=4, help="best surgeries of the study whose estimate is checked")
    ap.add_argument("--plot", type=Path, help="write the front's PNG here")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.llama_bin is None:
        ap.error("give --llama-bin or set GGUF_SURGEON_LLAMA_BIN")

    with tempfile.TemporaryDirectory(prefix="bench-front-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = args.base or f16_base(work, args.llama_bin, ap)
        options = EvalOptions(
            llama_bin=args.llama_bin, threads=args.threads, cache_dir=args.cache_dir or work / "cache"
        )
        sizes = {
            r.type: r.size
            for r in quantize_ladder(
                base, ["Q3_K_M", "Q5_K_M"], work, name="size", llama_bin=args.llama_bin, force=True
            ).results
        }
        for t in sizes:
            (work / f"size-{t}.gguf").unlink(missing_ok=True)
        with Model(base) as m:
            recipes = [f"delete {b}" for b in range(len(m.blocks()))]
        low, limit = int(args.low_share * sizes["Q3_K_M"]), sizes["Q5_K_M"]
        log(f"study: no surgery + {len(recipes)} deletions, budgets {low:,} .. {limit:,} bytes, {args.trials} trials")
        t0 = time.perf_counter()
        last = [""]

        def progress(step: str, done: int, total: int) -> None:
            if step != last[0] or step.startswith("trials"):
                log(f"{step} {done}/{total}")
                last[0] = step

        front = budget_study(
            base, recipes, limit=limit, low=low, trials=args.trials, work_dir=work / "study", options=options,
            name=NAME, progress=progress,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        # the estimator behind the study, on the calibration text it was fitted to: for the front's
        # points and the best --check surgeries of the study, the mix against its own F16 source,
        # predicted by the allocation (a surgery's costs inherited from the base) and measured; and the
        # surgery alone (its F16 edit against the base), to see what the mix's KLD to the base is made of
        import optuna

        study = optuna.load_study(
            study_name=front.study_name, storage=f"sqlite:///{(work / 'study' / 'budget-study.db').resolve()}"
        )
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        surgeries = sorted((t for t in done if t.user_attrs["recipe"]), key=lambda t: t.values[1])
        seen: set[str] = set()
        best = [t for t in surgeries if not (t.user_attrs["recipe"] in seen or seen.add(t.user_attrs["recipe"]))]
        checks = [t for t in done if t.number in {p.trial for p in front.points}] + best[: args.check]
        calib = text_options(options, bundled_texts()[0], work)
        diag = []
        for t in checks:
            a = t.user_attrs
            source = base
            if a["recipe"]:
                source = work / "alone.gguf"
                edit(base, source, a["recipe"], EditOptions(name=NAME, overwrite=True))
            log(f"check: trial {t.number} ({a['recipe'] or 'no surgery'})")
            mix = work / "mix.gguf"
            quantize_mix(source, mix, a["types"], base_type="Q8_0", llama_bin=args.llama_bin, force=True)
            measured = kl_divergence(mix, source, calib).mean.value
            alone = kl_divergence(source, base, calib).mean.value if a["recipe"] else 0.0
            mix.unlink()
            diag.append((t, measured, alone))
        (work / "alone.gguf").unlink(missing_ok=True)

    print(
        f"base {base.name}; {front.trials} trials in the study ({front.trials_now} this run, {front.refused} refused), "
        f"{front.candidates} surgeries (no surgery + single deletions); budgets {front.low:,} .. {front.limit:,} bytes"
    )
    print(
        f"KLD to the base on {front.kld_text}; 'calib' = the study's objective on the calibration text; "
        "'predicted quant' = the allocation's prediction of the mix against its own F16 source\n"
    )
    rows = []
    number = 0
    for p in front.points:
        if p.recipe is not None:
            number += 1
        rows.append(
            {
                "n": str(number) if p.recipe is not None else "",
                "file": p.label,
                "size": f"{p.size:,}",
                "bpw": f"{p.bits_per_weight:.3f}",
                "kld": f"{p.kld.value:.4f} [{p.kld.low:.4f}, {p.kld.high:.4f}]",
                "calib": f"{p.search_kld:.4f}" if p.search_kld is not None else "",
                "pred": f"{p.predicted_kld:.4f}" if p.predicted_kld is not None else "",
                "front": "yes" if p.on_front else "",
            }
        )
    cols = [("#", "n"), ("file", "file"), ("size B", "size"), ("bpw", "bpw"), ("KLD held-out [95% CI]", "kld"),
            ("calib", "calib"), ("predicted quant", "pred"), ("front", "front")]  # fmt: skip
    print(table(cols, rows))
    print(
        f"\nthe estimator on the calibration text: the front's points and the {args.check} best surgeries "
        f"of the {len(surgeries)} surgery trials (KLD: mix vs its own F16 source, and vs the base)"
    )
    drows = [
        {
            "t": str(t.number),
            "r": t.user_attrs["recipe"] or "no surgery",
            "size": f"{t.user_attrs['size']:,}",
            "pred": f"{t.user_attrs['predicted_kld']:.4f}",
            "meas": f"{m:.4f}",
            "ratio": f"{m / t.user_attrs['predicted_kld']:.2f}",
            "alone": f"{al:.4f}" if t.user_attrs["recipe"] else "",
            "sum": f"{al + m:.4f}",
            "mix": f"{t.values[1]:.4f}",
        }
        for t, m, al in diag
    ]
    print(
        table(
            [("trial", "t"), ("surgery", "r"), ("size B", "size"), ("quant predicted", "pred"), ("measured", "meas"),
             ("measured/predicted", "ratio"), ("surgery alone", "alone"), ("alone + quant", "sum"),
             ("mix vs base", "mix")],
            drows,
        )
    )  # fmt: skip
    for what, keep in (("no surgery (own costs)", lambda r: not r), ("surgeries (inherited costs)", bool)):
        pairs = [(t.user_attrs["predicted_kld"], m) for t, m, _ in diag if keep(t.user_attrs["recipe"])]
        if len(pairs) >= 2:
            pr, me = np.array(pairs).T
            print(
                f"{what}: {len(pairs)} mixes, measured/predicted {np.min(me / pr):.2f}-{np.max(me / pr):.2f} "
                f"(median {np.median(me / pr):.2f}), Pearson r {np.corrcoef(pr, me)[0, 1]:.3f}"
            )
    print("\nper uniform type: the front point with the least held-out KLD no larger than it")
    crow = [
        {
            "u": c.uniform,
            "usize": f"{c.size:,}",
            "ukld": f"{c.kld.value:.4f} [{c.kld.low:.4f}, {c.kld.high:.4f}]",
            "p": c.point or "none that small",
            "psize": f"{c.point_size:,}" if c.point_size else "",
            "pkld": f"{c.point_kld.value:.4f} [{c.point_kld.low:.4f}, {c.point_kld.high:.4f}]" if c.point_kld else "",
            "ratio": f"{c.ratio:.2f}x" if c.ratio is not None else "",
            "beats": "yes" if c.beats else "no",
        }
        for c in front.comparisons
    ]
    print(
        table(
            [("uniform", "u"), ("size B", "usize"), ("KLD", "ukld"), ("front point", "p"), ("size B", "psize"),
             ("KLD", "pkld"), ("x uniform", "ratio"), ("beats (intervals apart)", "beats")],
            crow,
        )
    )  # fmt: skip
    print(
        f"\nwall time {wall:.0f} s on {os.cpu_count()} CPUs, {args.threads} threads (sensitivity from the cache if measured before)"
    )
    if args.plot:
        print(f"plot: {plot_front(front, args.plot)}")
    if args.json:
        args.json.write_text(json.dumps(front.to_dict(), indent=1, default=str))


if __name__ == "__main__":
    main()
