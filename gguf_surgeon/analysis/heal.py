"""Deletion that heals: a training-free linear correction folded into the kept block's ffn_down.

For a deleted window W that follows a kept block K, the base model maps K's output y to the
window's output t. After the deletion the stream goes on from y. A heal rewrites K's
``ffn_down`` so that K itself produces (approximately) t:

    y = r + f @ D.T          r: K's residual after attention, f: K's SwiGLU activations
    t ~ r + f @ D'.T         D' fitted on calibration tokens, so f @ D'.T ~ d := t - r

Estimators (docs/heal.md measures them):

- ``ridge`` (the default): ``D'.T = (F'F + lam I)^-1 (F'd + lam D.T)``, least squares on the
  n_ff activations shrunk toward the original weights, lam = alpha * trace(F'F) / n_ff.
- ``lstsq``: the same with a vanishing alpha (1e-6): plain least squares.
- ``transform``: ReplaceMe-style, an n_embd x n_embd map T of K's FFN output m = f @ D.T,
  ``T = (M'M + lam I)^-1 (M'd + lam I)``, folded as ``D' = T.T @ D``.
- ``diagonal``: one scale per residual channel, ``s_j = (m_j'd_j + lam) / (m_j'm_j + lam)``.

Memory is bounded: the calibration text runs through the numpy reference pass in chunks of
CHUNK_TOKENS; each chunk adds to running normal-equation sums (n_ff^2 or n_embd^2 float64
values per window) and is dropped. Nothing here imports click or rich.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import Keys

from ..edit import HealData
from ..errors import ForwardError, RankError
from ..reader import Model
from ..surgery import HEAL_TENSOR, HealWindow, Surgery
from ..writer import encode_rows
from .rank import default_text, tokenize
from .reference import ReferenceModel, dequantize_rows, rms_norm, silu

ESTIMATORS = ("ridge", "lstsq", "transform", "diagonal")
DEFAULT_ESTIMATOR = "ridge"
DEFAULT_ALPHA = {"ridge": 1e-2, "lstsq": 1e-6, "transform": 1e-2, "diagonal": 1e-2}
DEFAULT_TOKENS = 2048  # calibration tokens
CHUNK_TOKENS = 256  # tokens per reference-pass chunk (the eval's llama-perplexity context)

HealProgress = Callable[[str, int, int], None]  # (phase, done, total)


def split_text(text: str) -> tuple[str, str]:
    """(calibration, held out): the text's paragraphs split in half. The default calibration
    text is the first half of the bundled eval text; benchmarks score KLD on the second."""
    paras = [p for p in text.split("\n\n") if p.strip()]
    if len(paras) < 2:
        half = len(text) // 2
        return text[:half], text[half:]
    mid = len(paras) // 2
    return "\n\n".join(paras[:mid]) + "\n", "\n\n".join(paras[mid:]) + "\n"


def calibration_text() -> str:
    return split_text(default_text())[0]


def held_out_text() -> str:
    return split_text(default_text())[1]


@dataclass(frozen=True)
class WindowFit:
    """How well one window's correction fits the calibration data (residual-stream squared error)."""

    kept: int
    deleted: tuple[int, ...]
    tensor: str  # the kept block's source tensor that was corrected
    plain_error: float  # sum ||y - t||^2: the plain deletion's error on the calibration tokens
    healed_error: float  # sum ||r + f @ D'.T - t||^2 with the float32 correction, before quantizing
    quantized_error: float  # the same with the correction as written (requantized)

    @property
    def ratio(self) -> float:
        return self.healed_error / self.plain_error if self.plain_error > 0 else 1.0


@dataclass(frozen=True)
class HealResult:
    data: HealData  # the tensors and metadata for edit()
    fits: tuple[WindowFit, ...]
    estimator: str
    alpha: float
    n_tokens: int
    text_sha256: str
    seconds: dict[str, float]  # calibration, solve, encode


class _Sums:
    """Running normal-equation sums of one window: A = X'X, B = X'd, and ||d||^2."""

    def __init__(self, n_in: int, n_out: int):
        self.A = np.zeros((n_in, n_in))
        self.B = np.zeros((n_in, n_out))
        self.dd = 0.0
        self.n = 0

    def add(self, x: np.ndarray, d: np.ndarray) -> None:
        x64, d64 = x.astype(np.float64), d.astype(np.float64)
        self.A += x64.T @ x64
        self.B += x64.T @ d64
        self.dd += float((d64 * d64).sum())
        self.n += x.shape[0]

    def sse(self, W_t: np.ndarray) -> float:
        """sum ||x @ W_t - d||^2 over everything added, from the sums alone."""
        W_t = W_t.astype(np.float64)
        return float(self.dd - 2.0 * np.sum(W_t * self.B) + np.sum(W_t * (self.A @ W_t)))


def _ffn_parts(ref: ReferenceModel, w, x: np.ndarray, positions: np.ndarray, factors) -> tuple[np.ndarray, np.ndarray]:
    """(r, f) of block w on x: the residual after attention (with ffn_down's bias, if any) and
    the SwiGLU activations that ffn_down reads, so that the block's output is r + f @ down.T."""
    zero = replace(w, down=np.zeros_like(w.down))
    r = ref.run_block(zero, x, positions, factors)  # x + attention (+ down bias): the block without ffn_down
    x_attn = r - w.biases["ffn_down"] if "ffn_down" in w.biases else r
    h = rms_norm(x_attn, w.ffn_norm, ref.hparams.rms_eps)
    gate = h @ w.gate.T
    up = h @ w.up.T
    if "ffn_gate" in w.biases:
        gate = gate + w.biases["ffn_gate"]
    if "ffn_up" in w.biases:
        up = up + w.biases["ffn_up"]
    return r, (silu(gate) * up).astype(np.float32)


def chunks_of(tokens: Sequence[int], bos: int | None, size: int = CHUNK_TOKENS) -> list[list[int]]:
    """Token chunks of at most `size`; each starts with BOS when the text did."""
    tokens = list(tokens)
    lead = [bos] if bos is not None and tokens and tokens[0] == bos else []
    body = tokens[len(lead) :]
    step = size - len(lead)
    return [lead + body[i : i + step] for i in range(0, len(body), step) if body[i : i + step]]


def solve(estimator: str, sums: _Sums, down: np.ndarray, alpha: float) -> np.ndarray:
    """The corrected ffn_down (n_embd, n_ff) float32 from the window's sums."""
    W_t = down.T.astype(np.float64)  # (n_ff, n_embd)
    A = sums.A
    lam = alpha * float(np.trace(A)) / A.shape[0]
    if estimator in ("ridge", "lstsq"):
        new_t = np.linalg.solve(A + lam * np.eye(A.shape[0]), sums.B + lam * W_t)
        return new_t.T.astype(np.float32)
    if estimator == "transform":
        eye = np.eye(A.shape[0])
        T = np.linalg.solve(A + lam * eye, sums.B + lam * eye)  # (n_embd, n_embd): m @ T ~ d
        return (W_t @ T).T.astype(np.float32)
    if estimator == "diagonal":
        diag = np.diag(A)
        lam = alpha * float(diag.mean())
        s = (np.diag(sums.B) + lam) / (diag + lam)
        return (W_t * s[None, :]).T.astype(np.float32)
    raise ForwardError(f"unknown heal estimator {estimator!r} (known: {', '.join(ESTIMATORS)})")


def _check_model(ref: ReferenceModel, windows: Sequence[HealWindow]) -> None:
    for w in windows:
        name = f"blk.{w.kept}.{HEAL_TENSOR}"
        if ref.tensor(name, required=False) is None:
            raise ForwardError(f"{ref.model.path}: heal needs {name!r}, which is missing")


def compute_heal(
    path: str | Path,
    surgery: Surgery,
    *,
    text: str | None = None,
    tokens: Sequence[int] | None = None,
    max_tokens: int = DEFAULT_TOKENS,
    estimator: str = DEFAULT_ESTIMATOR,
    alpha: float | None = None,
    llama_bin: str | Path | None = None,
    progress: HealProgress | None = None,
) -> HealResult:
    """The corrected tensors of `surgery`'s healed deletions, calibrated on `text` (default:
    calibration_text()) or on given `tokens`, cut to `max_tokens`.

    Raises ForwardError for an architecture the reference pass does not run (naming it and
    what is supported), RankError for a text under 2 tokens, ToolError when llama-server fails."""
    if estimator not in ESTIMATORS:
        raise ForwardError(f"unknown heal estimator {estimator!r} (known: {', '.join(ESTIMATORS)})")
    alpha = DEFAULT_ALPHA[estimator] if alpha is None else float(alpha)
    path = Path(path)
    windows = surgery.heal_windows
    with Model(path) as model:
        ref = ReferenceModel(model)  # ForwardError: architecture not supported
        _check_model(ref, windows)
        bos = model.value(Keys.Tokenizer.BOS_ID)
    started = time.monotonic()
    if tokens is None:
        body = calibration_text() if text is None else text
        ids, _ = tokenize(path, body, llama_bin)
        digest_src = body.encode("utf-8")
    else:
        ids = [int(t) for t in tokens]
        digest_src = np.asarray(ids, np.int64).tobytes()
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise RankError(f"{path}: the calibration text gives {len(ids)} token(s); heal needs at least 2")
    sha = hashlib.sha256(digest_src).hexdigest()
    chunks = chunks_of(ids, None if bos is None else int(bos))

    t0 = time.monotonic()
    with Model(path) as model:
        ref = ReferenceModel(model)
        factors = ref.rope_factors()
        kept_of = {w.kept: w for w in windows}
        last = max(max(w.deleted) for w in windows)
        sums: dict[int, _Sums] = {}
        downs: dict[int, np.ndarray] = {}
        for c, chunk in enumerate(chunks):
            positions = np.arange(len(chunk))
            x = ref.embed(chunk)
            hidden = [x]
            parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            for i in range(last + 1):
                w = ref.load_block(i)
                if i in kept_of:
                    parts[i] = _ffn_parts(ref, w, x, positions, factors)
                    downs.setdefault(i, w.down)
                x = ref.run_block(w, x, positions, factors)
                hidden.append(x)
                del w
            for k, hw in kept_of.items():
                r, f = parts[k]
                if hw.deleted == tuple(range(k + 1, k + 1 + len(hw.deleted))):
                    target = hidden[k + 1 + len(hw.deleted)]
                else:  # a window of blocks out of source order: run them on K's output
                    target = hidden[k + 1]
                    for j in hw.deleted:
                        target = ref.run_block(ref.load_block(j), target, positions, factors)
                d = target - r
                if estimator in ("ridge", "lstsq"):
                    sums.setdefault(k, _Sums(f.shape[1], d.shape[1])).add(f, d)
                else:
                    sums.setdefault(k, _Sums(d.shape[1], d.shape[1])).add(f @ downs[k].T, d)
            if progress:
                progress("calibration", c + 1, len(chunks))
        t1 = time.monotonic()
        computed: dict[str, tuple] = {}
        fits: list[WindowFit] = []
        solve_s = encode_s = 0.0
        by_name = {t.name: t for t in surgery.tensors}
        for n, hw in enumerate(windows):
            s0 = time.monotonic()
            down = downs[hw.kept]
            new = solve(estimator, sums[hw.kept], down, alpha)
            if not np.isfinite(new).all():
                raise ForwardError(f"{path}: the heal of block {hw.kept} is not finite; try a larger alpha")
            s1 = time.monotonic()
            out_t = by_name[hw.tensor_names()[0]]
            data = encode_rows(np.ascontiguousarray(new), out_t.ggml_type)
            written = dequantize_rows_of(data, out_t.ggml_type, new.shape)
            s2 = time.monotonic()
            solve_s += s1 - s0
            encode_s += s2 - s1
            for name in hw.tensor_names():
                computed[name] = (by_name[name].ggml_type, data)
            sm = sums[hw.kept]
            if estimator in ("ridge", "lstsq"):
                errs = (sm.sse(down.T), sm.sse(new.T), sm.sse(written.T))
            else:  # the sums are over m = f @ D.T: D' = T.T @ D means m' = m @ T, T = pinv(D.T) D'.T
                errs = (
                    sm.sse(np.eye(down.shape[0])),
                    sm.sse(_transform_of(down, new)),
                    sm.sse(_transform_of(down, written)),
                )
            fits.append(WindowFit(hw.kept, hw.deleted, f"blk.{hw.kept}.{HEAL_TENSOR}", *errs))
            if progress:
                progress("solve", n + 1, len(windows))
    metadata = {
        "estimator": estimator,
        "alpha": repr(alpha),
        "calibration_sha256": sha,
        "calibration_tokens": len(ids),
        "chunk_tokens": CHUNK_TOKENS,
        "tensors": ",".join(surgery.healed),
        "windows": "; ".join(f"{w.kept} <- {','.join(map(str, w.deleted))}" for w in windows),
    }
    seconds = {
        "tokenize": t0 - started,
        "calibration": t1 - t0,
        "solve": solve_s,
        "encode": encode_s,
    }
    return HealResult(HealData(computed, metadata), tuple(fits), estimator, alpha, len(ids), sha, seconds)


def _transform_of(down: np.ndarray, new: np.ndarray) -> np.ndarray:
    """T with down.T @ T = new.T (least squares): the residual-space map a folded D' applies."""
    return np.linalg.lstsq(down.T.astype(np.float64), new.T.astype(np.float64), rcond=None)[0]


def dequantize_rows_of(data: bytes, ggml_type, shape: tuple[int, int]) -> np.ndarray:
    """The float32 matrix (rows, cols) that `data` in `ggml_type` holds."""
    from gguf.quants import dequantize

    raw = np.frombuffer(data, np.uint8).reshape(shape[0], -1)
    return dequantize(raw, ggml_type).reshape(shape).astype(np.float32)


__all__ = [
    "DEFAULT_ESTIMATOR",
    "DEFAULT_TOKENS",
    "ESTIMATORS",
    "HealResult",
    "WindowFit",
    "calibration_text",
    "compute_heal",
    "dequantize_rows",
    "held_out_text",
    "split_text",
]
