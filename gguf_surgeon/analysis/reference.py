"""A small numpy forward pass computed straight from a GGUF's tensors, for checking edits.

It follows llama.cpp's graphs for the dense `llama` and `qwen3` architectures (token
embedding, RMSNorm, RoPE, grouped-query causal attention, Qwen3's per-head q/k RMSNorm,
SwiGLU feed-forward, output norm and head) and the mixture-of-experts `qwen3moe` and
Mixtral-style `llama` blocks (the router as
llama-graph.cpp's build_moe_ffn computes it: softmax over the router logits, top-k, the k
weights renormalized to sum 1, SwiGLU experts summed by weight) closely enough that an F32 model's next-token
log-probabilities agree with llama.cpp's to ~1e-6 when llama.cpp also stays in float32 (an
F32 KV cache, flash attention off; see llama_server.FLOAT32_ARGS). It is a reference, not an
inference engine: one sequence, no KV cache, float32 numpy on the CPU.

Blocks can be run in any order (`layer_order`), so the effect of a recipe can be computed
from the *original* file's weights and compared with what llama.cpp computes on the edited
file. Memory stays bounded by one block: each block's tensors are dequantized when it runs
and dropped after (an MoE block's experts one at a time, each once per block and only when
some token is routed to it); the token embedding is read row by row and the output head in slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import Keys
from gguf.quants import dequantize

from ..errors import ForwardError
from ..reader import Model, TensorInfo
from ..vocab import OUTPUT, OUTPUT_NORM, TOKEN_EMBD

HEAD_ROWS_PER_SLICE = 8192  # output-head rows dequantized at a time


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported architectures' block graphs."""

    rope_neox: bool  # rotate (x[i], x[i + n_rot/2]) pairs; else adjacent (x[2i], x[2i+1]) pairs
    qk_norm: bool  # RMSNorm each q and k head (attn_q_norm / attn_k_norm) before RoPE
    honours_attention_scale: bool  # `<arch>.attention.scale` replaces 1/sqrt(head_dim)
    moe_renorm: bool | None = (
        None  # MoE blocks: renormalize the top-k weights (build_moe_ffn's norm_w); None: dense only
    )


# llama.cpp's llama_model_rope_type: LLAMA -> NORM (convert_hf_to_gguf permutes q/k for it), QWEN3 -> NEOX
ARCHS: dict[str, ArchSpec] = {
    # MoE blocks of llama (Mixtral): src/models/llama.cpp, build_moe_ffn(..., norm_w = true, SOFTMAX)
    "llama": ArchSpec(rope_neox=False, qk_norm=False, honours_attention_scale=True, moe_renorm=True),
    "qwen3": ArchSpec(rope_neox=True, qk_norm=True, honours_attention_scale=False),
    # src/models/qwen3moe.cpp: build_moe_ffn(..., LLM_FFN_SILU, norm_w = true, expert_weights_scale (unread: 0), SOFTMAX)
    "qwen3moe": ArchSpec(rope_neox=True, qk_norm=True, honours_attention_scale=False, moe_renorm=True),
}
SOFTMAX_WEIGHT_FLOOR = 6.103515625e-5  # build_moe_ffn clamps the top-k weight sum to the smallest normal F16


@dataclass(frozen=True)
class Hyperparams:
    """The model-wide numbers the forward pass needs, read from metadata and tensor shapes."""

    arch: str
    n_embd: int
    n_vocab: int  # rows of the output head
    rms_eps: float
    rope_base: float  # <arch>.rope.freq_base
    rope_freq_scale: float  # 1 / rope.scaling.factor for linear scaling, else 1
    attention_scale: float | None  # None: 1/sqrt(head_dim)
    tied_output: bool  # no output.weight: the head is token_embd


@dataclass(frozen=True)
class ForwardResult:
    """The outcome of one reference forward pass over one token sequence.

    `hidden` has len(layer_order) + 1 entries, each (n_tokens, n_embd) float32:
    hidden[0] is the token embedding (the input to the first block run), and hidden[k + 1]
    is the residual stream after running block layer_order[k]. So block layer_order[k]
    maps hidden[k] to hidden[k + 1]; the final hidden state (before output_norm) is
    hidden[-1]. `logits` (n_tokens, n_vocab) float32 holds, for each position, the scores of
    the token that follows it.
    """

    tokens: tuple[int, ...]
    layer_order: tuple[int, ...]  # source block indices, in the order they were run
    hidden: tuple[np.ndarray, ...]
    logits: np.ndarray


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Log-probabilities along `axis`, computed stably in float64 (the returned dtype)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def dequantize_rows(model: Model, t: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of tensor `t` as float32, shape (rows, ne0).

    A GGUF shape (ne0, ne1) is the numpy matrix (ne1, ne0): a row is ne0 contiguous values.
    Higher dimensions are flattened into rows. F32 tensors come back as read-only views.
    """
    n_rows = t.n_elements // t.shape[0]
    stop = n_rows if stop is None else stop
    if not 0 <= start <= stop <= n_rows:
        raise ForwardError(f"{t.path}: rows [{start}, {stop}) out of range for tensor {t.name!r} with {n_rows} rows")
    raw = model.tensor_bytes(t, start * t.row_bytes, stop * t.row_bytes).reshape(stop - start, t.row_bytes)
    try:
        out = dequantize(raw, t.ggml_type)
    except NotImplementedError:
        raise ForwardError(
            f"{t.path}: tensor {t.name!r} has type {t.ggml_type.name}, which gguf-py cannot dequantize"
        ) from None
    return out.reshape(stop - start, t.shape[0])


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (llama.cpp's LLM_NORM_RMS)."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))) * weight


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    n_rot: int,
    base: float,
    neox: bool,
    freq_scale: float = 1.0,
    freq_factors: np.ndarray | None = None,
) -> np.ndarray:
    """Rotary position embedding as ggml_rope_ext applies it, without YaRN.

    x is (n_tokens, n_heads, head_dim); only the first `n_rot` values of each head rotate.
    Pair i (0 <= i < n_rot/2) turns by angle freq_scale * pos * base^(-2i/n_rot) / factor[i].
    NEOX pairs x[i] with x[i + n_rot/2]; NORM pairs x[2i] with x[2i+1].
    """
    half = n_rot // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    theta = freq_scale * positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (n_tokens, half)
    cos = np.cos(theta).astype(np.float32)[:, None, :]
    sin = np.sin(theta).astype(np.float32)[:, None, :]
    out = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half:n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    return out


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Grouped-query causal attention: q (n, n_head, d), k/v (n, n_head_kv, d) -> (n, n_head, d).

    Query head h reads kv head h // (n_head / n_head_kv), as ggml's broadcast does.
    """
    n, n_head, _ = q.shape
    group = n_head // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * np.float32(scale)
    scores = np.where(np.tril(np.ones((n, n), dtype=bool))[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", weights.astype(np.float32), v)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


@dataclass(frozen=True)
class MoeWeights:
    """One mixture-of-experts block's router (dequantized) and experts (read one expert at a time)."""

    router: np.ndarray  # (n_expert, n_embd) float32: ffn_gate_inp
    gate: TensorInfo  # ffn_gate_exps, ne {n_embd, n_ff_exp, n_expert}
    up: TensorInfo  # ffn_up_exps, ne {n_embd, n_ff_exp, n_expert}
    down: TensorInfo  # ffn_down_exps, ne {n_ff_exp, n_embd, n_expert}
    n_used: int  # experts routed per token (expert_used_count)
    renorm: bool  # the k weights are divided by their sum

    @property
    def n_expert(self) -> int:
        return self.router.shape[0]


@dataclass
class ExpertStats:
    """Per-expert sums over the routed tokens of one block (REAP's ingredients), accumulated by
    `run_block` when given one; divide by `tokens` for means."""

    tokens: np.ndarray  # (n_expert,) tokens routed to each expert
    weight: np.ndarray  # (n_expert,) sum of the gate weights it got (after top-k renormalization)
    norm: np.ndarray  # (n_expert,) sum of ||expert output||
    saliency: np.ndarray  # (n_expert,) sum of gate weight * ||expert output||  (REAP)
    prob: np.ndarray  # (n_expert,) sum over ALL tokens of the router's softmax probability
    n_tokens: int = 0  # tokens seen

    @staticmethod
    def zeros(n_expert: int) -> ExpertStats:
        return ExpertStats(*(np.zeros(n_expert, np.float64) for _ in range(5)))


@dataclass(frozen=True)
class BlockWeights:
    """One block's tensors dequantized to float32 numpy matrices (rows = output features)."""

    index: int  # source block index
    attn_norm: np.ndarray  # (n_embd,)
    wq: np.ndarray  # (n_head * head_dim, n_embd)
    wk: np.ndarray  # (n_head_kv * head_dim, n_embd)
    wv: np.ndarray  # (n_head_kv * head_dim, n_embd)
    wo: np.ndarray  # (n_embd, n_head * head_dim)
    q_norm: np.ndarray | None  # (head_dim,), qwen3
    k_norm: np.ndarray | None
    ffn_norm: np.ndarray
    gate: np.ndarray | None  # (n_ff, n_embd); None in an MoE block
    up: np.ndarray | None  # (n_ff, n_embd)
    down: np.ndarray | None  # (n_embd, n_ff)
    biases: dict[str, np.ndarray]  # optional biases by tensor stem ("attn_q", "ffn_down", ...)
    head_dim: int
    n_rot: int  # leading values of each head that RoPE rotates
    moe: MoeWeights | None = None  # the experts of an MoE block (then gate/up/down are None)

    @property
    def n_head(self) -> int:
        return self.wq.shape[0] // self.head_dim

    @property
    def n_head_kv(self) -> int:
        return self.wk.shape[0] // self.head_dim


def _per_layer(value: Any, index: int) -> Any:
    """A metadata value that may be one number for all blocks or a per-block list."""
    return value[index] if isinstance(value, list) else value


class ReferenceModel:
    """The reference forward pass over an open `Model` (which the caller keeps open and closes).

    Construction reads metadata only; `forward` reads tensors. Raises ForwardError for an
    architecture other than those in ARCHS, a missing tensor, or RoPE scaling it does not
    implement (YaRN, LongRoPE).
    """

    def __init__(self, model: Model):
        self.model = model
        arch = model.architecture
        if arch not in ARCHS:
            raise ForwardError(
                f"{model.path}: architecture {arch!r} is not supported by the reference forward pass (supported: {', '.join(ARCHS)})"
            )
        self.spec = ARCHS[arch]
        self.block_count = len(model.blocks())
        embd = self.tensor(TOKEN_EMBD)
        head = self.tensor(OUTPUT, required=False)
        scaling = model.value(model.arch_key(Keys.Rope.SCALING_TYPE), "none")
        factor = model.value(model.arch_key(Keys.Rope.SCALING_FACTOR))
        if scaling not in ("none", "linear") and factor not in (None, 0.0, 1.0):
            raise ForwardError(
                f"{model.path}: RoPE scaling {scaling!r} is not implemented by the reference forward pass"
            )
        freq_scale = 1.0 / factor if scaling == "linear" and factor else 1.0
        scale = model.value(model.arch_key(Keys.Attention.SCALE)) if self.spec.honours_attention_scale else None
        self.hparams = Hyperparams(
            arch=arch,
            n_embd=embd.shape[0],
            n_vocab=(embd if head is None else head).shape[1],
            rms_eps=float(self._require(Keys.Attention.LAYERNORM_RMS_EPS)),
            rope_base=float(model.value(model.arch_key(Keys.Rope.FREQ_BASE), 10000.0)),
            rope_freq_scale=freq_scale,
            attention_scale=float(scale) if scale else None,
            tied_output=head is None,
        )

    # reading
    def _require(self, template: str) -> Any:
        key = self.model.arch_key(template)
        v = self.model.value(key)
        if v is None:
            raise ForwardError(f"{self.model.path}: key {key!r} is missing")
        return v

    def tensor(self, name: str, required: bool = True) -> TensorInfo | None:
        """The named tensor; ForwardError when it is missing and required, else None."""
        try:
            return self.model.tensor(name)
        except KeyError:
            if required:
                raise ForwardError(f"{self.model.path}: tensor {name!r} is missing") from None
            return None

    def _matrix(self, name: str) -> np.ndarray:
        t = self.tensor(name)
        assert t is not None
        return dequantize_rows(self.model, t)

    def vector(self, name: str) -> np.ndarray:
        """A norm weight or bias as a float32 vector."""
        return self._matrix(name).reshape(-1)

    def head_dim(self, index: int) -> int:
        """Per-head width of block `index`: key_length, else n_embd / head_count (llama.cpp's rule)."""
        key_length = self.model.value(self.model.arch_key(Keys.Attention.KEY_LENGTH))
        if key_length:
            return int(key_length)
        n_head = _per_layer(self._require(Keys.Attention.HEAD_COUNT), index)
        return self.hparams.n_embd // int(n_head)

    def load_block(self, index: int) -> BlockWeights:
        """Dequantize source block `index`; the caller drops it when done."""
        if not 0 <= index < self.block_count:
            raise ForwardError(
                f"{self.model.path}: block {index} out of range (the model has blocks 0..{self.block_count - 1})"
            )
        p = f"blk.{index}."
        moe = None
        if self.tensor(p + "ffn_gate_inp.weight", required=False) is not None:
            moe = self.load_experts(index)
        if self.tensor(p + "attn_qkv.weight", required=False) is not None:
            raise ForwardError(
                f"{self.model.path}: block {index} has a fused attn_qkv tensor, which the reference forward pass does not split"
            )
        head_dim = self.head_dim(index)
        n_rot = self.model.value(self.model.arch_key(Keys.Rope.DIMENSION_COUNT)) or head_dim
        biases = {}
        for stem in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            if self.tensor(p + stem + ".bias", required=False) is not None:
                biases[stem] = self.vector(p + stem + ".bias")
        return BlockWeights(
            index=index,
            attn_norm=self.vector(p + "attn_norm.weight"),
            wq=self._matrix(p + "attn_q.weight"),
            wk=self._matrix(p + "attn_k.weight"),
            wv=self._matrix(p + "attn_v.weight"),
            wo=self._matrix(p + "attn_output.weight"),
            q_norm=self.vector(p + "attn_q_norm.weight") if self.spec.qk_norm else None,
            k_norm=self.vector(p + "attn_k_norm.weight") if self.spec.qk_norm else None,
            ffn_norm=self.vector(p + "ffn_norm.weight"),
            gate=None if moe else self._matrix(p + "ffn_gate.weight"),
            up=None if moe else self._matrix(p + "ffn_up.weight"),
            down=None if moe else self._matrix(p + "ffn_down.weight"),
            biases=biases,
            head_dim=head_dim,
            n_rot=int(n_rot),
            moe=moe,
        )

    def load_experts(self, index: int) -> MoeWeights:
        """Block `index`'s router and expert tensors; ForwardError where the routing is not implemented."""
        p = f"blk.{index}."
        if self.spec.moe_renorm is None:
            raise ForwardError(
                f"{self.model.path}: block {index} is mixture-of-experts; the reference runs the experts of "
                f"{', '.join(a for a, s in ARCHS.items() if s.moe_renorm is not None)} only"
            )
        for extra in ("exp_probs_b.bias", "ffn_gate_inp.bias", "ffn_gate_up_exps.weight", "ffn_gate_inp_shexp.weight"):
            if self.tensor(p + extra, required=False) is not None:
                raise ForwardError(f"{self.model.path}: block {index} has {extra}, which the reference does not run")
        used = _per_layer(self._require(Keys.LLM.EXPERT_USED_COUNT), index)
        gate, up, down = (self.tensor(p + f"ffn_{s}_exps.weight") for s in ("gate", "up", "down"))
        assert gate is not None and up is not None and down is not None
        return MoeWeights(self._matrix(p + "ffn_gate_inp.weight"), gate, up, down, int(used), self.spec.moe_renorm)

    def expert(self, moe: MoeWeights, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expert e's (gate (n_ff, n_embd), up (n_ff, n_embd), down (n_embd, n_ff)) as float32."""
        out = []
        for t in (moe.gate, moe.up, moe.down):
            rows = t.shape[1]  # rows per expert: the expert axis is the last, one contiguous range each
            out.append(dequantize_rows(self.model, t, e * rows, (e + 1) * rows))
        return out[0], out[1], out[2]

    def moe_ffn(self, moe: MoeWeights, h: np.ndarray, stats: ExpertStats | None = None) -> np.ndarray:
        """build_moe_ffn for softmax gating: probs = softmax(router logits), the n_used largest
        selected, their probs renormalized (norm_w), sum over them of weight * down(silu(gate h) * up h).
        Each expert some token is routed to is dequantized once."""
        logits = h @ moe.router.T  # (n, n_expert)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        selected = np.argsort(-probs, axis=-1, kind="stable")[:, : moe.n_used]  # (n, k)
        weights = np.take_along_axis(probs, selected, -1)
        if moe.renorm:
            weights = weights / np.maximum(weights.sum(-1, keepdims=True), np.float32(SOFTMAX_WEIGHT_FLOOR))
        if stats is not None:
            stats.prob += probs.sum(0, dtype=np.float64)
            stats.n_tokens += h.shape[0]
        out = np.zeros_like(h)
        for e in np.unique(selected):
            rows, slot = np.nonzero(selected == e)
            gate, up, down = self.expert(moe, int(e))
            y = (silu(h[rows] @ gate.T) * (h[rows] @ up.T)) @ down.T  # (r, n_embd)
            wt = weights[rows, slot].astype(np.float32)
            out[rows] += wt[:, None] * y
            if stats is not None:
                norms = np.linalg.norm(y.astype(np.float64), axis=-1)
                stats.tokens[e] += len(rows)
                stats.weight[e] += float(wt.sum())
                stats.norm[e] += float(norms.sum())
                stats.saliency[e] += float((wt * norms).sum())
        return out

    def rope_factors(self) -> np.ndarray | None:
        """llama 3's per-frequency RoPE divisors (one tensor shared by every block), if any."""
        t = self.tensor("rope_freqs.weight", required=False)
        return None if t is None else dequantize_rows(self.model, t).reshape(-1)

    # computing
    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """Token embedding rows (n_tokens, n_embd) float32, read only for the given tokens."""
        t = self.tensor(TOKEN_EMBD)
        assert t is not None
        n_vocab = t.shape[1]
        rows = []
        for tok in tokens:
            if not 0 <= tok < n_vocab:
                raise ForwardError(f"{self.model.path}: token id {tok} out of range (vocabulary of {n_vocab})")
            rows.append(dequantize_rows(self.model, t, tok, tok + 1))
        return np.concatenate(rows).astype(np.float32, copy=True)

    def run_block(
        self,
        w: BlockWeights,
        x: np.ndarray,
        positions: np.ndarray,
        rope_factors: np.ndarray | None = None,
        stats: ExpertStats | None = None,
    ) -> np.ndarray:
        """One transformer block on the residual stream x (n_tokens, n_embd); returns the new stream.
        `stats` (MoE blocks) accumulates what each expert did."""
        hp = self.hparams
        n = x.shape[0]

        def linear(stem: str, weight: np.ndarray, inp: np.ndarray) -> np.ndarray:
            out = inp @ weight.T
            bias = w.biases.get(stem)
            return out if bias is None else out + bias

        h = rms_norm(x, w.attn_norm, hp.rms_eps)
        q = linear("attn_q", w.wq, h).reshape(n, w.n_head, w.head_dim)
        k = linear("attn_k", w.wk, h).reshape(n, w.n_head_kv, w.head_dim)
        v = linear("attn_v", w.wv, h).reshape(n, w.n_head_kv, w.head_dim)
        if w.q_norm is not None and w.k_norm is not None:
            q = rms_norm(q, w.q_norm, hp.rms_eps)
            k = rms_norm(k, w.k_norm, hp.rms_eps)
        q = rope(q, positions, w.n_rot, hp.rope_base, self.spec.rope_neox, hp.rope_freq_scale, rope_factors)
        k = rope(k, positions, w.n_rot, hp.rope_base, self.spec.rope_neox, hp.rope_freq_scale, rope_factors)
        scale = hp.attention_scale if hp.attention_scale is not None else 1.0 / np.sqrt(w.head_dim)
        attn = causal_attention(q, k, v, scale).reshape(n, w.n_head * w.head_dim)
        x = x + linear("attn_output", w.wo, attn)

        h = rms_norm(x, w.ffn_norm, hp.rms_eps)
        if w.moe is not None:
            return (x + self.moe_ffn(w.moe, h, stats)).astype(np.float32, copy=False)
        assert w.gate is not None and w.up is not None and w.down is not None
        ff = silu(linear("ffn_gate", w.gate, h)) * linear("ffn_up", w.up, h)
        return (x + linear("ffn_down", w.down, ff)).astype(np.float32, copy=False)

    def head(self, hidden: np.ndarray) -> np.ndarray:
        """output_norm then the output head (token_embd when tied): (n_tokens, n_vocab) float32."""
        h = rms_norm(hidden, self.vector(OUTPUT_NORM), self.hparams.rms_eps)
        t = self.tensor(TOKEN_EMBD if self.hparams.tied_output else OUTPUT)
        assert t is not None
        n_vocab = t.shape[1]
        logits = np.empty((h.shape[0], n_vocab), dtype=np.float32)
        for start in range(0, n_vocab, HEAD_ROWS_PER_SLICE):
            stop = min(start + HEAD_ROWS_PER_SLICE, n_vocab)
            logits[:, start:stop] = h @ dequantize_rows(self.model, t, start, stop).T
        return logits

    def forward(self, tokens: Sequence[int], layer_order: Sequence[int] | None = None) -> ForwardResult:
        """Run `tokens` (positions 0..n-1, causal) through the blocks in `layer_order`.

        `layer_order` lists source block indices of this model, run in that order; repeats
        and omissions are allowed (a duplicated or deleted block). None runs 0..block_count-1.
        Only one block's weights are dequantized at a time. See ForwardResult for what
        `hidden` and `logits` hold.
        """
        tokens = tuple(int(t) for t in tokens)
        if not tokens:
            raise ForwardError(f"{self.model.path}: the reference forward pass needs at least one token")
        order = tuple(range(self.block_count)) if layer_order is None else tuple(int(i) for i in layer_order)
        for i in order:
            if not 0 <= i < self.block_count:
                raise ForwardError(
                    f"{self.model.path}: block {i} in layer_order out of range (the model has blocks 0..{self.block_count - 1})"
                )
        positions = np.arange(len(tokens))
        factors = self.rope_factors()
        x = self.embed(tokens)
        hidden = [x]
        for i in order:
            x = self.run_block(self.load_block(i), x, positions, factors)
            hidden.append(x)
        return ForwardResult(tokens, order, tuple(hidden), self.head(x))
