"""Expert importance in mixture-of-experts blocks from the numpy reference forward pass, and the
top-N lists `prune-experts N` keeps.

One text runs through the model block by block (`reference.ReferenceModel`, routing exactly as
llama.cpp's build_moe_ffn). For every MoE block and expert, over the tokens routed to it:

- **frequency**: the share of the text's tokens routed to the expert;
- **mean gate weight**: the weight the router gave it (after top-k renormalization: the weight
  llama.cpp multiplies its output by);
- **mean output norm**: ``||expert(x)||``;
- **REAP saliency** (Lasby et al. 2025, arXiv 2510.13999): the mean over routed tokens of
  gate weight x ``||expert(x)||``: what the expert adds to the block's output. An expert no
  token reaches scores 0. Ties (unrouted experts, on a short text) are broken by the router's
  mean softmax probability over all tokens, then by index.

Memory: one block's attention weights, the router, and one expert at a time (each expert some
token is routed to is dequantized once per block); the hidden state of the text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from gguf import Keys

from ..errors import PlanError, RankError
from ..experts import expert_shape
from ..operations import build_plan, step_of
from ..operations.prune_experts import PruneExperts
from ..plan import Step
from ..reader import Model
from .rank import FALLBACK_TEXT, RankProgress, text_ids
from .reference import ExpertStats, ReferenceModel

DEFAULT_TOKENS = 256  # calibration tokens: 128 experts x 8 routed get ~16 tokens each
CALIBRATION_TEXT = "calibration_text.txt"  # package data the eval suite never scores on (held out from eval's KLD)


def calibration_text() -> str:
    """The bundled calibration text (mixed prose, code, dialogue, numbers, three languages): not
    the eval text, so a pruning ranked on it is judged by eval on other text."""
    try:
        return resources.files("gguf_surgeon").joinpath("data", CALIBRATION_TEXT).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return FALLBACK_TEXT


@dataclass(frozen=True)
class ExpertScore:
    """What one expert of one block did on the text."""

    block: int  # source block index
    expert: int
    tokens: int  # tokens routed to it
    frequency: float  # tokens / tokens of the text
    mean_weight: float  # mean gate weight over its routed tokens (0 when none)
    mean_norm: float  # mean ||expert output|| over its routed tokens
    saliency: float  # REAP: mean gate weight x ||expert output|| over its routed tokens
    mean_prob: float  # the router's mean softmax probability over all tokens (tie-breaker)


# what `prune-experts N --by X` keeps the top N of
CRITERIA = {
    "saliency": lambda s: s.saliency,  # REAP: mean over routed tokens of gate weight x ||output||
    "frequency": lambda s: s.frequency,  # share of tokens routed to the expert
    "contribution": lambda s: s.frequency * s.saliency,  # REAP's sum over ALL tokens, per token
}


@dataclass(frozen=True)
class ExpertRanking:
    """Every MoE block's experts scored on one text."""

    model: str
    architecture: str
    n_tokens: int
    tokenizer: str
    n_expert: int
    n_used: int  # expert_used_count (the largest, for a per-block array)
    blocks: tuple[int, ...]  # the MoE blocks scored (leading dense blocks are not)
    scores: tuple[ExpertScore, ...]  # by block, then expert
    block_seconds: tuple[float, ...]  # time of each MoE block's pass (attention, router, experts)
    seconds: float

    def block_scores(self, block: int) -> tuple[ExpertScore, ...]:
        return tuple(s for s in self.scores if s.block == block)

    def matrix(self, field: str = "saliency") -> np.ndarray:
        """(MoE blocks, experts) array of one score."""
        out = np.zeros((len(self.blocks), self.n_expert))
        row = {b: i for i, b in enumerate(self.blocks)}
        for s in self.scores:
            out[row[s.block], s.expert] = getattr(s, field)
        return out

    def order(self, block: int, by: str = "saliency") -> tuple[int, ...]:
        """Block's experts, best first by `by` (see CRITERIA; ties: higher mean router
        probability, then lower index)."""
        key = CRITERIA[by]
        scores = self.block_scores(block)
        return tuple(s.expert for s in sorted(scores, key=lambda s: (-key(s), -s.mean_prob, s.expert)))

    def top(self, block: int, n: int, by: str = "saliency") -> tuple[int, ...]:
        """The n best experts of `block` by `by`, ascending."""
        return tuple(sorted(self.order(block, by)[:n]))

    def orders(self, criteria: Sequence[str] = ("saliency",)) -> ExpertOrder:
        """Every MoE block's experts, best first, by each of `criteria`: all `resolve_prune_steps`
        needs, small enough to store (search keeps it in its study)."""
        return ExpertOrder(
            self.n_expert, self.blocks, {by: tuple(self.order(b, by) for b in self.blocks) for by in criteria}
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "architecture": self.architecture,
            "n_tokens": self.n_tokens,
            "tokenizer": self.tokenizer,
            "n_expert": self.n_expert,
            "n_used": self.n_used,
            "seconds": round(self.seconds, 3),
            "blocks": [
                {
                    "block": b,
                    "seconds": round(sec, 4),
                    "order": list(self.order(b)),
                    "experts": [{k: v for k, v in asdict(s).items() if k != "block"} for s in self.block_scores(b)],
                }
                for b, sec in zip(self.blocks, self.block_seconds)
            ],
        }


@dataclass(frozen=True)
class ExpertOrder:
    """The experts of every MoE block in ranking order, by criterion (an ExpertRanking's orders
    without its scores)."""

    n_expert: int
    blocks: tuple[int, ...]  # the MoE blocks (source indices)
    by: dict[str, tuple[tuple[int, ...], ...]]  # criterion -> per block of `blocks`: experts, best first

    def order(self, block: int, by: str = "saliency") -> tuple[int, ...]:
        return self.by[by][self.blocks.index(block)]

    def to_dict(self) -> dict:
        return {
            "n_expert": self.n_expert,
            "blocks": list(self.blocks),
            "by": {k: [list(o) for o in v] for k, v in self.by.items()},
        }

    @staticmethod
    def from_dict(d: dict) -> ExpertOrder:
        return ExpertOrder(
            int(d["n_expert"]),
            tuple(int(b) for b in d["blocks"]),
            {k: tuple(tuple(int(e) for e in o) for o in v) for k, v in d["by"].items()},
        )


def rank_experts(
    path: str | Path,
    text: str | None = None,
    *,
    tokens: Sequence[int] | None = None,
    max_tokens: int = DEFAULT_TOKENS,
    llama_bin: str | Path | None = None,
    progress: RankProgress | None = None,
) -> ExpertRanking:
    """Score every expert of every MoE block of the model at `path` on `text` (default: the
    bundled calibration text; `tokens` skips tokenization), cut to `max_tokens` tokens. Raises RankError for a dense model or a
    text under 2 tokens, ForwardError where the reference does not run the architecture."""
    path = Path(path)
    started = time.monotonic()
    with Model(path) as model:
        shape = expert_shape(model)
        if shape.count <= 0:
            key = model.arch_key(Keys.LLM.EXPERT_COUNT)
            raise RankError(
                f"{path}: a dense model ({key} is not set); ranking experts needs a mixture-of-experts model"
            )
    ids, tokenizer = text_ids(path, calibration_text() if text is None else text, tokens, max_tokens, llama_bin)
    scores: list[ExpertScore] = []
    blocks: list[int] = []
    seconds: list[float] = []
    with Model(path) as model:
        ref = ReferenceModel(model)
        positions = np.arange(len(ids))
        factors = ref.rope_factors()
        x = ref.embed(ids)
        n = ref.block_count
        for i in range(n):
            t0 = time.monotonic()
            w = ref.load_block(i)
            stats = ExpertStats.zeros(w.moe.n_expert) if w.moe is not None else None
            x = ref.run_block(w, x, positions, factors, stats)
            del w
            if stats is not None:
                blocks.append(i)
                seconds.append(time.monotonic() - t0)
                scores += _scores(i, stats)
            if progress:
                progress("experts", i + 1, n)
        arch = model.architecture
    return ExpertRanking(
        str(path),
        arch,
        len(ids),
        tokenizer,
        shape.count,
        max(shape.used),
        tuple(blocks),
        tuple(scores),
        tuple(seconds),
        time.monotonic() - started,
    )


def _scores(block: int, stats: ExpertStats) -> list[ExpertScore]:
    out = []
    routed = np.maximum(stats.tokens, 1)  # an unrouted expert's sums are 0: its means are 0
    for e in range(len(stats.tokens)):
        out.append(
            ExpertScore(
                block,
                e,
                int(stats.tokens[e]),
                float(stats.tokens[e] / stats.n_tokens),
                float(stats.weight[e] / routed[e]),
                float(stats.norm[e] / routed[e]),
                float(stats.saliency[e] / routed[e]),
                float(stats.prob[e] / stats.n_tokens),
            )
        )
    return out


def needs_ranking(steps: Sequence[Step]) -> bool:
    """Whether some prune-experts step leaves its experts to be chosen by saliency."""
    return any(s.op == "prune-experts" and s.args.keep is None for s in steps)


def resolve_prune_steps(
    steps: Sequence[Step], ranking: ExpertRanking | ExpertOrder, block_count: int
) -> tuple[Step, ...]:
    """`steps` with every `prune-experts N` that lists no experts given the top N by its `--by`
    criterion in each MoE block as that step finds it (after the earlier steps' moves and prunings)."""
    out: list[Step] = []
    moe = set(ranking.blocks)
    for step in steps:
        if step.op != "prune-experts" or step.args.keep is not None:
            out.append(step)
            continue
        n = step.args.count
        layers = build_plan(tuple(out), block_count).layers if out else None
        keep: list[tuple[int, ...] | None] = []
        for i in range(block_count if layers is None else len(layers)):
            layer = None if layers is None else layers[i]
            src = i if layer is None else layer.parts[0][0]
            if src not in moe or (layer is not None and not layer.is_copy):
                keep.append(None)  # dense (or a blend, which prune-experts refuses by name)
                continue
            current = tuple(range(ranking.n_expert)) if layer is None or layer.experts is None else layer.experts
            if n > len(current):
                raise PlanError(f"{step.text}: block {i} has {len(current)} experts at this step, fewer than {n}")
            rank = {e: r for r, e in enumerate(ranking.order(src, step.args.by))}
            best = sorted(sorted(range(len(current)), key=lambda k: rank[current[k]])[:n])
            keep.append(tuple(best))
        while keep and keep[-1] is None:
            keep.pop()
        out.append(step_of("prune-experts", PruneExperts(n, tuple(keep))))
    return tuple(out)
