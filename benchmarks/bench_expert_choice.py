"""Which experts to keep: REAP saliency against routed-token frequency, the least salient
experts and random choices, judged by llama.cpp's KL divergence to the unpruned model.

The experts are ranked on the bundled calibration text (what `prune-experts N` uses); the KLD
is measured by llama-perplexity on the bundled EVAL text, which the ranking never saw. Models:
the bundled fixture (6 blocks x 8 experts, 2 routed) and a synthetic 32-expert one (4 routed);
both have random weights, so this checks the mechanics (a ranking that keeps what the router
weights most should hurt least), not a quality claim about real models.

    python benchmarks/bench_expert_choice.py --llama-bin ~/.cache/gguf-surgeon/llama.cpp-0.3.36-avx2/build/bin
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))

import gguf  # noqa: E402
from make_fixtures import build_model  # noqa: E402

from gguf_surgeon.analysis.expert_rank import rank_experts  # noqa: E402
from gguf_surgeon.edit import edit  # noqa: E402
from gguf_surgeon.evaluation.suite import EVAL_TEXT_FILE  # noqa: E402
from gguf_surgeon.llama.perplexity import PerplexityTool  # noqa: E402
from gguf_surgeon.llama.tools import find_tool  # noqa: E402


def strategies(ranking, n: int, seeds: int) -> dict[str, list[tuple[int, ...]]]:
    out: dict[str, list[tuple[int, ...]]] = {
        "REAP saliency": [],
        "frequency": [],
        "summed contribution (frequency x saliency)": [],
        "least salient": [],
    }
    for b in ranking.blocks:
        scores = ranking.block_scores(b)
        out["REAP saliency"].append(ranking.top(b, n))
        by_freq = sorted(scores, key=lambda s: (-s.frequency, -s.mean_prob, s.expert))
        out["frequency"].append(tuple(sorted(s.expert for s in by_freq[:n])))
        by_sum = sorted(scores, key=lambda s: (-s.frequency * s.saliency, -s.mean_prob, s.expert))
        out["summed contribution (frequency x saliency)"].append(tuple(sorted(s.expert for s in by_sum[:n])))
        out["least salient"].append(tuple(sorted(ranking.order(b)[-n:])))
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        out[f"random (seed {seed})"] = [
            tuple(sorted(rng.choice(ranking.n_expert, n, replace=False).tolist())) for _ in ranking.blocks
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--chars", type=int, default=6000, help="characters of the eval text the KLD is measured on")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tool = PerplexityTool(
        find_tool("llama-perplexity", args.llama_bin), ctx=128, batch=128, threads=2, seed=42, timeout=600
    )
    text = EVAL_TEXT_FILE.read_text(encoding="utf-8")[: args.chars]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-choice-") as tmp:
        work = Path(tmp)
        models = {
            "fixture 8 experts -> 6": (ROOT / "fixtures" / "tiny-qwen3moe-q8_0.gguf", 6),
            "synthetic 32 experts -> 16": (
                build_model(
                    work / "moe32.gguf",
                    arch="qwen3moe",
                    n_expert=32,
                    n_expert_used=4,
                    qtype=gguf.GGMLQuantizationType.Q8_0,
                    seed=7,
                ),
                16,
            ),
        }
        for label, (path, n) in models.items():
            base_logits = work / f"{path.stem}.kld"
            tool.chunk_nll(path, text, logits=base_logits)
            ranking = rank_experts(path, llama_bin=args.llama_bin)
            for name, lists in strategies(ranking, n, args.seeds).items():
                out = work / "pruned.gguf"
                out.unlink(missing_ok=True)
                keep = "/".join(",".join(map(str, k)) for k in lists)
                edit(path, out, f"prune-experts {n} --keep {keep}")
                kld = tool.kld(out, base_logits)
                row = {
                    "model": label,
                    "keep": name,
                    "mean_kld": round(float(np.mean(kld["chunk_kld"])), 4),
                    "same_top": round(float(np.mean(kld["chunk_same_top"])), 3),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    print("| model | experts kept by | mean KLD to the base (nats/token) | same top token |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['keep']} | {r['mean_kld']} | {r['same_top']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
