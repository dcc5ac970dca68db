"""Layer importance from the numpy reference forward pass: which blocks a surgery can touch.

Three scores, all from one short text run through `reference.ReferenceModel`:

- **Block Influence** (ShortGPT, Men et al. 2024): ``BI_i = 1 - mean_t cos(x_i[t], x_{i+1}[t])``
  where x_i is the residual stream entering block i. A block that barely turns the stream
  (low BI) is a candidate for deletion.
- **Angular distance** (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers"): ``d(l, n) = mean_t arccos(cos(x_l[t], x_{l+n}[t])) / pi`` for every window of n
  blocks starting at l. The window with the smallest d for a given n is the one to prune.
  Averaged over all positions rather than the last token only: one short text is all there
  is, and the mean is steadier.
- **Ablation KL divergence** (optional): ``KL(P_base || P_without_i)`` per token, averaged,
  for the model with block i deleted. Computed without writing any file: the streams of all
  N ablations advance together through the blocks, so each block is dequantized once and
  the head once, slice by slice, whatever N is.

Memory is bounded by one block's float32 weights, the hidden states of the text
((N + 1) x tokens x n_embd) and one slice of the output head; it does not grow with the
model's file size. Nothing here imports click, rich or matplotlib at module level.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from gguf import Keys

from ..errors import RankError, ToolError
from ..llama.tools import find_tool
from ..reader import Model
from ..vocab import OUTPUT, OUTPUT_NORM, TOKEN_EMBD
from .reference import HEAD_ROWS_PER_SLICE, ReferenceModel, dequantize_rows, log_softmax, rms_norm

DEFAULT_TOKENS = 128  # tokens of the text the scores are computed on
EVAL_TEXT = "eval_text.txt"  # package data shared with the eval suite; its first tokens are the default text
FALLBACK_TEXT = (
    "Water on Earth is always on the move. Sunlight warms the surface of oceans, lakes and rivers, and some "
    "of that water turns into vapour and rises into the air. As warm, moist air climbs higher it cools, and "
    "the vapour condenses around tiny specks of dust to form the droplets that make up clouds. When the "
    "droplets grow heavy enough, they fall back to the ground as rain, snow, sleet or hail."
)

RankProgress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class BlockScore:
    """The importance of one block."""

    index: int
    block_influence: float  # 1 - mean cos(input, output); 0 = the block changes nothing
    ablation_kld: float | None  # mean KL(base || block deleted) per token, nats; None when not computed


@dataclass(frozen=True)
class WindowScore:
    """The angular distance across n consecutive blocks."""

    start: int  # first block of the window
    size: int  # n, blocks in the window
    angular_distance: float  # mean arccos(cos(x_start, x_start+n)) / pi, in [0, 1]


@dataclass(frozen=True)
class Ranking:
    """Everything `rank` measured on one model and one text."""

    model: str
    architecture: str
    n_tokens: int
    tokenizer: str  # "llama.cpp" or "approximate (greedy vocabulary match)"
    blocks: tuple[BlockScore, ...]  # in block order
    windows: tuple[WindowScore, ...]  # by size, then start
    seconds: float

    @property
    def block_count(self) -> int:
        return len(self.blocks)

    def window(self, start: int, size: int) -> WindowScore:
        for w in self.windows:
            if w.start == start and w.size == size:
                return w
        raise KeyError((start, size))

    def best_windows(self) -> tuple[WindowScore, ...]:
        """For each size n, the window with the smallest angular distance (Gromov's pick)."""
        best: dict[int, WindowScore] = {}
        for w in self.windows:
            if w.size not in best or w.angular_distance < best[w.size].angular_distance:
                best[w.size] = w
        return tuple(best[n] for n in sorted(best))

    def least_important(self) -> tuple[int, ...]:
        """Block indices, least important first: by ablation KLD when measured, else by BI."""
        return tuple(b.index for b in sorted(self.blocks, key=lambda b: (block_damage(b), b.index)))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "architecture": self.architecture,
            "n_tokens": self.n_tokens,
            "tokenizer": self.tokenizer,
            "seconds": round(self.seconds, 3),
            "blocks": [asdict(b) for b in self.blocks],
            "windows": [asdict(w) for w in self.windows],
            "best_windows": [asdict(w) for w in self.best_windows()],
            "least_important": list(self.least_important()),
        }

    @staticmethod
    def from_dict(data: dict) -> Ranking:
        return Ranking(
            data["model"],
            data["architecture"],
            data["n_tokens"],
            data["tokenizer"],
            tuple(BlockScore(**b) for b in data["blocks"]),
            tuple(WindowScore(**w) for w in data["windows"]),
            data.get("seconds", 0.0),
        )


def block_damage(b: BlockScore) -> float:
    """The score that orders blocks: ablation KLD when measured, else Block Influence."""
    return b.ablation_kld if b.ablation_kld is not None else b.block_influence


# text and tokens -------------------------------------------------------------------------


def default_text() -> str:
    """The eval suite's text when the package ships it, else a short built-in paragraph."""
    try:
        return resources.files("gguf_surgeon").joinpath("data", EVAL_TEXT).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return FALLBACK_TEXT


def tokenize(model_path: Path, text: str, llama_bin: str | Path | None = None) -> tuple[list[int], str]:
    """(token ids, tokenizer used): llama.cpp's tokenizer through llama-server when it is found,
    else a greedy longest-match over the GGUF vocabulary (close enough to rank blocks)."""
    try:
        find_tool("llama-server", llama_bin)
    except ToolError:
        with Model(model_path) as model:
            return greedy_tokenize(model, text), "approximate (greedy vocabulary match; llama-server not found)"
    from ..llama.server import LlamaServer  # starts a process: only when the tool exists

    bin_dir = find_tool("llama-server", llama_bin).parent
    # one thread: tokenizing needs none, and spinning ggml threads slow a busy machine down
    with LlamaServer(bin_dir, model_path, ctx_size=256, threads=1, extra_args=("--no-warmup",)) as server:
        return server.tokenize(text, add_special=True), "llama.cpp"


def text_ids(
    path: Path, text: str, tokens: Sequence[int] | None, max_tokens: int, llama_bin: str | Path | None
) -> tuple[list[int], str]:
    """(token ids, tokenizer name) of `text`, or the given `tokens`, cut to `max_tokens`;
    RankError when fewer than 2 remain (no next token to predict)."""
    if tokens is None:
        ids, tokenizer = tokenize(path, text, llama_bin)
    else:
        ids, tokenizer = [int(t) for t in tokens], "given"
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise RankError(f"{path}: the text gives {len(ids)} token(s); rank needs at least 2")
    return ids, tokenizer


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table (tokenizer.ggml.model == "gpt2")
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def greedy_tokenize(model: Model, text: str) -> list[int]:
    """Longest vocabulary match, left to right, in the vocabulary's own spelling of bytes
    (GPT-2 byte characters for "gpt2" tokenizers, "▁" for spaces in "llama" ones). Not the
    model's real tokenization, only a plausible one; adds BOS when the model asks for it."""
    tokens = model.value(Keys.Tokenizer.LIST)
    if not tokens:
        raise RankError(f"{model.path}: no tokenizer.ggml.tokens to tokenize the text with")
    kind = model.value(Keys.Tokenizer.MODEL)
    if kind == "llama":
        spelled = "▁" + text.replace(" ", "▁")
    else:
        table = _byte_to_unicode()
        spelled = "".join(table[b] for b in text.encode("utf-8"))
    index = {t: i for i, t in enumerate(tokens) if t}
    longest = max(len(t) for t in index)
    ids: list[int] = []
    bos = model.value(Keys.Tokenizer.BOS_ID)
    if bos is not None and model.value(Keys.Tokenizer.ADD_BOS, False):
        ids.append(int(bos))
    pos = 0
    while pos < len(spelled):
        for size in range(min(longest, len(spelled) - pos), 0, -1):
            hit = index.get(spelled[pos : pos + size])
            if hit is not None:
                ids.append(hit)
                pos += size
                break
        else:
            pos += 1  # a character the vocabulary cannot spell: skipped
    return ids


# the scores --------------------------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (tokens, n_embd) arrays, in float64."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide((a * b).sum(-1), denom, out=np.ones_like(denom), where=denom > 0)


def block_influence(hidden: Sequence[np.ndarray]) -> list[float]:
    """ShortGPT's BI for each block run: 1 - mean cos(hidden[k], hidden[k + 1])."""
    return [float(1.0 - _cosine(hidden[k], hidden[k + 1]).mean()) for k in range(len(hidden) - 1)]


def angular_distances(hidden: Sequence[np.ndarray], max_size: int | None = None) -> list[WindowScore]:
    """Gromov's d(l, n) for every window of n = 1..max_size blocks (default: all)."""
    n_blocks = len(hidden) - 1
    max_size = n_blocks if max_size is None else min(max_size, n_blocks)
    out = []
    for size in range(1, max_size + 1):
        for start in range(0, n_blocks - size + 1):
            cos = np.clip(_cosine(hidden[start], hidden[start + size]), -1.0, 1.0)
            out.append(WindowScore(start, size, float((np.arccos(cos) / math.pi).mean())))
    return out


def ablation_klds(
    ref: ReferenceModel, tokens: Sequence[int], base_hidden: Sequence[np.ndarray], progress: RankProgress | None = None
) -> list[float]:
    """Mean per-token KL(base || block i deleted) for every block i, from one joint pass.

    Stream i skips block i: it starts as base_hidden[i] and then runs blocks i+1..N-1. Block
    j is dequantized once and applied to every stream i < j; the output head is read once,
    slice by slice, with running log-sum-exps, so memory is N streams plus one head slice.
    """
    n = ref.block_count
    positions = np.arange(len(tokens))
    factors = ref.rope_factors()
    streams: list[np.ndarray | None] = [None] * n
    for j in range(n):
        streams[j] = base_hidden[j]  # stream j skips block j: block j+1 gets block j's input
        if j > 0:
            w = ref.load_block(j)
            for i in range(j):
                streams[i] = ref.run_block(w, streams[i], positions, factors)
            del w
        if progress:
            progress("ablation", j + 1, n)
    return _kl_to_base(ref, base_hidden[-1], [s for s in streams if s is not None])


def _kl_to_base(ref: ReferenceModel, base_final: np.ndarray, finals: list[np.ndarray]) -> list[float]:
    """Mean over tokens of KL(base || each final hidden state), reading the head once in slices.

    With p the base distribution and z the other model's logits:
    KL = sum p log p - sum p z + logsumexp(z). The last two are accumulated per slice.
    """
    hp = ref.hparams
    norm_w = ref.vector(OUTPUT_NORM)
    base_logp = log_softmax(ref.head(base_final))  # (T, V) float64
    p = np.exp(base_logp)
    neg_entropy = (p * base_logp).sum(-1)  # (T,)
    h = np.stack([rms_norm(f, norm_w, hp.rms_eps) for f in finals])  # (N, T, E)
    t = ref.tensor(TOKEN_EMBD if hp.tied_output else OUTPUT)
    assert t is not None
    n_vocab = t.shape[1]
    cross = np.zeros(h.shape[:2])  # sum p z
    running_max = np.full(h.shape[:2], -np.inf)
    running_sum = np.zeros(h.shape[:2])
    for start in range(0, n_vocab, HEAD_ROWS_PER_SLICE):
        stop = min(start + HEAD_ROWS_PER_SLICE, n_vocab)
        z = (h @ dequantize_rows(ref.model, t, start, stop).T).astype(np.float64)  # (N, T, S)
        cross += (z * p[None, :, start:stop]).sum(-1)
        new_max = np.maximum(running_max, z.max(-1))
        running_sum = running_sum * np.exp(running_max - new_max) + np.exp(z - new_max[..., None]).sum(-1)
        running_max = new_max
    lse = running_max + np.log(running_sum)
    kl = neg_entropy[None, :] - cross + lse  # (N, T)
    return [float(max(v, 0.0)) for v in kl.mean(-1)]


def rank_model(
    path: str | Path,
    text: str | None = None,
    *,
    tokens: Sequence[int] | None = None,
    max_tokens: int = DEFAULT_TOKENS,
    ablation: bool = False,
    max_window: int | None = None,
    llama_bin: str | Path | None = None,
    progress: RankProgress | None = None,
) -> Ranking:
    """Score every block of the model at `path` on `text` (default: the eval text's start).

    `tokens` skips tokenization. The text is cut to `max_tokens` tokens. `ablation` adds the
    per-block deletion KLD (about N/2 times the cost of the plain pass). Raises RankError for
    a text of fewer than 2 tokens, ForwardError for an architecture the reference pass does
    not run, ToolError when llama-server fails.
    """
    path = Path(path)
    start_time = time.monotonic()
    ids, tokenizer = text_ids(path, default_text() if text is None else text, tokens, max_tokens, llama_bin)
    with Model(path) as model:
        ref = ReferenceModel(model)
        n = ref.block_count
        positions = np.arange(len(ids))
        factors = ref.rope_factors()
        x = ref.embed(ids)
        hidden = [x]
        for i in range(n):
            x = ref.run_block(ref.load_block(i), x, positions, factors)
            hidden.append(x)
            if progress:
                progress("forward", i + 1, n)
        bi = block_influence(hidden)
        windows = angular_distances(hidden, max_window)
        klds: list[float | None] = list(ablation_klds(ref, ids, hidden, progress)) if ablation else [None] * n
        arch = model.architecture
    blocks = tuple(BlockScore(i, bi[i], klds[i]) for i in range(n))
    return Ranking(str(path), arch, len(ids), tokenizer, blocks, tuple(windows), time.monotonic() - start_time)
