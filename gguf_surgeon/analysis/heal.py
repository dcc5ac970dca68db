"""Deletion that heals: a training-free linear correction folded into the kept block's ffn_down.

For a deleted window W that follows a kept block K, the base model turns K's output y into the
window's output t. After a plain deletion the stream goes on from y. A heal rewrites K's
``ffn_down`` (D, shape n_embd x n_ff) so that K itself produces (approximately) t:

    y = r + f @ D.T          r: K's residual after attention (+ ffn_down's bias), f: K's SwiGLU
    t ~ r + f @ D'.T         activations; D' fitted on calibration tokens so f @ D'.T ~ d := t - r

Estimators, all computed from the same running sums of the n_ff-dimensional activations
(A = F'F, B = F'd, ||d||^2), each shrunk toward the plain deletion (D' = D) by a ridge term:

- ``ridge``: ``D'.T = (A + lam I)^-1 (B + lam D.T)``: least squares over all n_ff x n_embd
  weights of ffn_down, shrunk toward D.
- ``lstsq``: the same with a vanishing lam (alpha 1e-6): plain least squares (it overfits a
  few thousand tokens: n_ff unknowns per output channel).
- ``transform`` (ReplaceMe-style): an n_embd x n_embd map T of K's feed-forward output
  m = f @ D.T, ``T = (M'M + lam I)^-1 (M'd + lam I)``, folded as ``D' = T.T @ D``. M'M = D A D.T
  and M'd = D B, so it needs no sums of its own.
- ``diagonal``: one scale per residual channel of m, ``s_j = (M'd_jj + lam) / (M'M_jj + lam)``.

lam = alpha * trace(A_x) / dim(x) for the estimator's input x. Except for ``lstsq``, alpha is
chosen per window by two-fold cross-validation over ALPHAS on the calibration tokens alone
(the chunks alternate between two folds; each fold's fit is scored on the other fold's
error, from the sums, without another pass); ``auto`` (the default) picks, per window, the
estimator and alpha with the lowest cross-validated error. docs/heal.md has the measurements.

Memory is bounded by the calibration tokens, not the model: the reference pass advances all
calibration chunks block by block (each block dequantized once), keeping the streams
(tokens x n_embd) and, while a window is crossed, K's activations (tokens x n_ff); every
chunk's contribution goes into the running sums (2 folds x n_ff^2 float64 per window) as soon
as the window's output is reached, and the activations are dropped. Nothing here imports
click or rich.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys
from gguf.quants import dequantize

from ..edit import HealData
from ..errors import ForwardError, RankError, ToolError
from ..llama.tools import find_tool
from ..reader import Model
from ..surgery import HEAL_TENSOR, HealWindow, Surgery
from ..vocab import GGMLQuantizationType
from ..writer import encode_rows
from .rank import default_text, tokenize
from .reference import ReferenceModel, rms_norm, silu

HEAL_ARCHS = ("llama", "qwen3")  # dense architectures of the reference forward pass
ESTIMATORS = ("auto", "ridge", "lstsq", "transform", "diagonal")
DEFAULT_ESTIMATOR = "auto"
FITTED = ("ridge", "transform", "diagonal")  # the estimators `auto` chooses among
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # the grid cross-validation chooses alpha from
LSTSQ_ALPHA = 1e-6
DEFAULT_TOKENS = 2048  # calibration tokens
CHUNK_TOKENS = 256  # tokens per reference-pass chunk (the eval's llama-perplexity context)
FOLDS = 2

HealProgress = Callable[[str, int, int], None]  # (phase, done, total)


# the calibration text ---------------------------------------------------------------------


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
    """The default calibration text: the first half of the bundled eval text."""
    return split_text(default_text())[0]


def held_out_text() -> str:
    """The second half of the bundled eval text, never used for calibration."""
    return split_text(default_text())[1]


def chunks_of(tokens: Sequence[int], bos: int | None, size: int = CHUNK_TOKENS) -> list[list[int]]:
    """Token chunks of at most `size`; each starts with BOS when the text did."""
    tokens = list(tokens)
    lead = [bos] if bos is not None and tokens and tokens[0] == bos else []
    body = tokens[len(lead) :]
    step = size - len(lead)
    return [lead + body[i : i + step] for i in range(0, len(body), step) if body[i : i + step]]


# records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowFit:
    """One window's correction and how well it fits the calibration tokens. Errors are sums of
    squared residual-stream errors at the window's output, relative to the plain deletion's."""

    kept: int  # source block the correction is folded into
    deleted: tuple[int, ...]
    tensors: tuple[str, ...]  # output tensors that hold it
    ggml_type: str  # the type it is written in
    source_type: str  # the type of the tensor it replaces
    estimator: str  # the estimator used (auto's choice, for auto)
    alpha: float
    healed_error: float  # in-sample, with the float32 correction
    cv_error: float  # cross-validated (each fold's float fit on the other fold's tokens)
    requantized_error: float  # in-sample, with the correction as written (requantized)
    weight_error: float  # ||written - float32|| / ||float32|| of the corrected tensor
    cv_by_estimator: dict[str, float]  # each fitted estimator's cross-validated error (at its best alpha)

    @property
    def requantization_added(self) -> float:
        """The error the requantization added, as a fraction of the plain deletion's."""
        return self.requantized_error - self.healed_error

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "deleted": list(self.deleted), "tensors": list(self.tensors)} | {
            "requantization_added": self.requantization_added
        }


@dataclass(frozen=True)
class HealResult:
    data: HealData  # the tensors and metadata for edit()
    fits: tuple[WindowFit, ...]
    estimator: str  # as asked ("auto" or one estimator)
    n_tokens: int
    text_sha256: str
    tokenizer: str
    seconds: dict[str, float]  # tokenize, calibration, solve, encode

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator,
            "calibration_tokens": self.n_tokens,
            "calibration_sha256": self.text_sha256,
            "tokenizer": self.tokenizer,
            "error_measure": "sum of squared residual-stream errors at each window's output on the calibration "
            "tokens, relative to the plain deletion's",
            "windows": [f.to_dict() for f in self.fits],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


# running sums and estimators ----------------------------------------------------------------


class _Sums:
    """Running normal-equation sums of one window in the n_ff space: A = F'F, B = F'd, ||d||^2."""

    def __init__(self, n_in: int, n_out: int):
        self.A = np.zeros((n_in, n_in))
        self.B = np.zeros((n_in, n_out))
        self.dd = 0.0
        self.n = 0

    def add(self, f: np.ndarray, d: np.ndarray) -> None:
        f64, d64 = f.astype(np.float64), d.astype(np.float64)
        self.A += f64.T @ f64
        self.B += f64.T @ d64
        self.dd += float((d64 * d64).sum())
        self.n += f.shape[0]

    def __add__(self, other: _Sums) -> _Sums:
        out = _Sums(0, 0)
        out.A, out.B, out.dd, out.n = self.A + other.A, self.B + other.B, self.dd + other.dd, self.n + other.n
        return out

    def sse(self, W_t: np.ndarray) -> float:
        """sum ||f @ W_t - d||^2 over everything added, from the sums alone."""
        W_t = W_t.astype(np.float64)
        return float(self.dd - 2.0 * np.sum(W_t * self.B) + np.sum(W_t * (self.A @ W_t)))


class _Problem:
    """One estimator's regularized least squares from a window's sums: solutions for any lam
    from one eigendecomposition. Solutions come back as D'.T (n_ff, n_embd) float64."""

    def __init__(self, estimator: str, sums: _Sums, down: np.ndarray, decompose: bool = True):
        self.estimator = estimator
        D = down.astype(np.float64)  # (n_embd, n_ff)
        self.D = D
        if estimator in ("ridge", "lstsq"):
            A, B, W0 = sums.A, sums.B, D.T
        else:  # in the space of m = f @ D.T
            A, B, W0 = D @ sums.A @ D.T, D @ sums.B, np.eye(D.shape[0])
        self.A, self.B, self.W0 = A, B, W0
        self.scale = float(np.trace(A)) / A.shape[0]
        self.eig = None
        if decompose and estimator != "diagonal":  # many alphas: rotate once, then each is elementwise
            evals, evecs = np.linalg.eigh(A)
            self.eig = (evals, evecs, evecs.T @ B, evecs.T @ W0)

    def solve(self, alpha: float) -> np.ndarray:
        """The solution for lam = alpha * scale: through the eigendecomposition when there is
        one (many alphas), else one linear solve (the final fit)."""
        lam = alpha * self.scale
        if not np.isfinite(self.scale) or self.scale <= 0:  # no activations to fit (all zero): keep D
            return self.D.T.copy()
        if self.estimator == "diagonal":
            s = (np.diag(self.B) + lam) / (np.diag(self.A) + lam)
            return self.D.T * s[None, :]
        if self.eig is None:
            M, rhs = self.A + lam * np.eye(self.A.shape[0]), self.B + lam * self.W0
            try:
                W = np.linalg.solve(M, rhs)
            except np.linalg.LinAlgError:  # singular in float64 (degenerate activations): least norm
                W = np.linalg.lstsq(M, rhs, rcond=None)[0]
        else:
            evals, evecs, QtB, QtW0 = self.eig
            W = evecs @ ((QtB + lam * QtW0) / np.maximum(evals + lam, 1e-300)[:, None])
        return W if self.estimator in ("ridge", "lstsq") else self.D.T @ W


def requantized(down_new: np.ndarray, ggml_type: GGMLQuantizationType) -> tuple[bytes, np.ndarray]:
    """(bytes in `ggml_type`, the float32 matrix they hold) of a corrected ffn_down (n_embd, n_ff)."""
    data = encode_rows(np.ascontiguousarray(down_new, dtype=np.float32), ggml_type)
    back = dequantize(np.frombuffer(data, np.uint8).reshape(down_new.shape[0], -1), ggml_type)
    return data, back.reshape(down_new.shape).astype(np.float32)


def _choose_alpha(estimator: str, folds: Sequence[_Sums], down: np.ndarray) -> tuple[float, float]:
    """(alpha, cross-validated SSE): each fold's float fit scored on the other folds' sums.
    Not requantized: on SmolLM2 the residual-stream error overstates what Q4_1 rounding costs
    in KLD, and scoring requantized fits chose no correction where the float choice halved
    a third of the loss (docs/heal.md)."""
    alphas: Sequence[float] = (LSTSQ_ALPHA,) if estimator == "lstsq" else ALPHAS
    problems = []
    for k in range(len(folds)):
        rest = [f for j, f in enumerate(folds) if j != k]
        fit = rest[0]
        for f in rest[1:]:
            fit = fit + f
        problems.append((_Problem(estimator, fit, down), folds[k]))
    best = (alphas[0], np.inf)
    for alpha in alphas:
        err = sum(test.sse(p.solve(alpha)) for p, test in problems)
        if err < best[1]:
            best = (alpha, err)
    return best


def solve_window(
    estimator: str, folds: Sequence[_Sums], down: np.ndarray
) -> tuple[str, float, np.ndarray, float, dict[str, float]]:
    """(estimator used, alpha, corrected ffn_down (n_embd, n_ff) float32, cross-validated SSE,
    cross-validated SSE of every estimator tried)."""
    tried = FITTED if estimator == "auto" else (estimator,)
    scores = {name: _choose_alpha(name, folds, down) for name in tried}
    name = min(scores, key=lambda k: scores[k][1])
    alpha, cv = scores[name]
    total = folds[0]
    for f in folds[1:]:
        total = total + f
    new_t = _Problem(name, total, down, decompose=False).solve(alpha)
    return name, alpha, new_t.T.astype(np.float32), cv, {k: v[1] for k, v in scores.items()}


# the calibration pass ---------------------------------------------------------------------


def _ffn_parts(ref: ReferenceModel, w, x: np.ndarray, positions: np.ndarray, factors) -> tuple[np.ndarray, np.ndarray]:
    """(r, f) of block w on x: the residual after attention (with ffn_down's bias, if any) and
    the SwiGLU activations that ffn_down reads, so that the block's output is r + f @ down.T."""
    r = ref.run_block(replace(w, down=np.zeros_like(w.down)), x, positions, factors)
    x_attn = r - w.biases["ffn_down"] if "ffn_down" in w.biases else r
    h = rms_norm(x_attn, w.ffn_norm, ref.hparams.rms_eps)
    gate = h @ w.gate.T
    up = h @ w.up.T
    if "ffn_gate" in w.biases:
        gate = gate + w.biases["ffn_gate"]
    if "ffn_up" in w.biases:
        up = up + w.biases["ffn_up"]
    return r, (silu(gate) * up).astype(np.float32)


def check_supported(path: str | Path, windows: Sequence[HealWindow]) -> None:
    """ForwardError naming what is missing when the reference pass cannot calibrate `windows`
    on the model at `path`: its architecture (llama and qwen3 are supported), a block's kind
    (mixture-of-experts, fused attn_qkv) or the tensor a heal rewrites. Reads metadata only."""
    with Model(path) as model:
        if model.architecture not in HEAL_ARCHS:  # the reference also runs qwen3moe, but heal is dense only
            raise ForwardError(
                f"{model.path}: heal: architecture {model.architecture!r} is not supported "
                f"(supported: {', '.join(HEAL_ARCHS)})"
            )
        ref = ReferenceModel(model)
        for w in windows:
            for i in range(max(w.deleted) + 1):  # every block the calibration pass runs
                p = f"blk.{i}."
                if ref.tensor(p + "ffn_gate_inp.weight", required=False) is not None:
                    raise ForwardError(
                        f"{model.path}: heal: block {i} is mixture-of-experts; heal folds into a dense ffn_down only"
                    )
                if ref.tensor(p + "attn_qkv.weight", required=False) is not None:
                    raise ForwardError(
                        f"{model.path}: heal: block {i} has a fused attn_qkv tensor, which the reference forward pass does not split"
                    )
            name = f"blk.{w.kept}.{HEAL_TENSOR}"
            if ref.tensor(name, required=False) is None:
                raise ForwardError(f"{model.path}: heal needs tensor {name!r}, which is missing")


def tokenizer_name(llama_bin: str | Path | None) -> str:
    """What calibration text is tokenized with: llama.cpp's tokenizer when llama-server is found."""
    try:
        find_tool("llama-server", llama_bin)
    except ToolError:
        return "greedy"
    return "llama.cpp"


def heal_metadata(
    surgery: Surgery, estimator: str, sha256: str, n_tokens: int, tokenizer: str, fits: Sequence[WindowFit] = ()
) -> dict[str, str | int]:
    """The `surgery.heal.*` values of a heal (the same keys and sizes before it is computed,
    so a dry run's output size is exact when `fits` is empty and the 64-digit hash a placeholder)."""
    chosen = {f.kept: f for f in fits}
    width = max(len(e) for e in ESTIMATORS)  # fixed widths: the dry run's placeholder has the same size
    windows = []
    for w in surgery.heal_windows:
        f = chosen.get(w.kept)
        how = f"{f.estimator:<{width}} alpha={f.alpha:.0e}" if f else f"{'?':<{width}} alpha={'?':<5}"
        windows.append(f"{w.kept} <- {','.join(map(str, w.deleted))}: {how}")
    return {
        "estimator": estimator,
        "calibration_sha256": sha256,
        "calibration_tokens": n_tokens,
        "chunk_tokens": CHUNK_TOKENS,
        "tokenizer": tokenizer,
        "tensors": ",".join(surgery.healed),
        "windows": "; ".join(windows),
    }


@dataclass(frozen=True)
class Calibration:
    """The running sums of every healed window of a surgery, and how they were made: what a fit
    needs, so several estimators can be fitted from one calibration pass."""

    path: Path
    surgery: Surgery
    folds: dict[int, list[_Sums]]  # kept block -> the sums of each fold
    downs: dict[int, np.ndarray]  # kept block -> its ffn_down (n_embd, n_ff) float32
    n_tokens: int
    sha256: str  # of the calibration text (or of the given token ids)
    tokenizer: str  # "llama.cpp", "greedy" (llama-server not found) or "given"
    seconds: dict[str, float]  # tokenize, calibration


def calibrate(
    path: str | Path,
    surgery: Surgery,
    *,
    text: str | None = None,
    tokens: Sequence[int] | None = None,
    max_tokens: int = DEFAULT_TOKENS,
    llama_bin: str | Path | None = None,
    progress: HealProgress | None = None,
) -> Calibration:
    """The calibration pass of `surgery`'s healed deletions over `text` (default:
    calibration_text()) or given `tokens`, cut to `max_tokens`. Raises ForwardError for a
    model the reference pass cannot run (naming what is missing), RankError for a text under
    2 tokens, ToolError when llama-server fails."""
    path = Path(path)
    windows = surgery.heal_windows
    if not windows:
        raise ForwardError(f"{path}: the recipe {surgery.plan.recipe!r} heals no deletion")
    check_supported(path, windows)
    started = time.monotonic()
    if tokens is None:
        body = calibration_text() if text is None else text
        ids, how = tokenize(path, body, llama_bin)
        tokenizer = "llama.cpp" if how == "llama.cpp" else "greedy"
        digest_src = body.encode("utf-8")
    else:
        ids, tokenizer = [int(t) for t in tokens], "given"
        digest_src = np.asarray(ids, np.int64).tobytes()
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise RankError(f"{path}: the calibration text gives {len(ids)} token(s); heal needs at least 2")
    sha = hashlib.sha256(digest_src).hexdigest()

    t0 = time.monotonic()
    with Model(path) as model:
        bos = model.value(Keys.Tokenizer.BOS_ID)
        chunks = chunks_of(ids, None if bos is None else int(bos))
        if len(chunks) < FOLDS:  # cross-validation needs two folds: split the one chunk in two
            chunks = [chunks[0][: len(chunks[0]) // 2], chunks[0][len(chunks[0]) // 2 :]]
        ref = ReferenceModel(model)
        factors = ref.rope_factors()
        positions = [np.arange(len(c)) for c in chunks]
        streams = [ref.embed(c) for c in chunks]
        by_kept = {w.kept: w for w in windows}
        folds: dict[int, list[_Sums]] = {}
        downs: dict[int, np.ndarray] = {}
        open_: dict[int, tuple[list, list]] = {}  # kept -> (r, f) per chunk, until the window's end
        last = max(max(w.deleted) for w in windows)  # windows are kept + 1 ... kept + n (surgery.heal_windows)
        for i in range(last + 1):
            w = ref.load_block(i)
            if i in by_kept:
                parts = [_ffn_parts(ref, w, x, p, factors) for x, p in zip(streams, positions)]
                open_[i] = ([r for r, _ in parts], [f for _, f in parts])
                downs[i] = w.down
            streams = [ref.run_block(w, x, p, factors) for x, p in zip(streams, positions)]
            del w
            for kept in [k for k in open_ if max(by_kept[k].deleted) == i]:  # the window's output
                rs, fs = open_.pop(kept)
                targets = streams
                sums = [_Sums(fs[0].shape[1], rs[0].shape[1]) for _ in range(FOLDS)]
                for c in range(len(chunks)):
                    sums[c % FOLDS].add(fs[c], targets[c] - rs[c])
                folds[kept] = sums
            if progress:
                progress("calibration", i + 1, last + 1)
    t1 = time.monotonic()
    return Calibration(
        path, surgery, folds, downs, len(ids), sha, tokenizer, {"tokenize": t0 - started, "calibration": t1 - t0}
    )


def fit(
    cal: Calibration,
    estimator: str = DEFAULT_ESTIMATOR,
    ggml_type: GGMLQuantizationType | None = None,
    progress: HealProgress | None = None,
) -> HealResult:
    """The corrected tensors of a calibration's windows by `estimator`, written in the
    surgery's planned type (the source's where gguf.quants can write it, else F16) unless
    `ggml_type` says otherwise. Deterministic: the same calibration gives the same bytes."""
    if estimator not in ESTIMATORS:
        raise ForwardError(f"unknown heal estimator {estimator!r} (known: {', '.join(ESTIMATORS)})")
    surgery, folds, downs, windows = cal.surgery, cal.folds, cal.downs, cal.surgery.heal_windows
    computed: dict[str, tuple[GGMLQuantizationType, bytes]] = {}
    fits: list[WindowFit] = []
    solve_s = encode_s = 0.0
    by_name = {t.name: t for t in surgery.tensors}
    for n, hw in enumerate(windows):
        s0 = time.monotonic()
        down = downs[hw.kept]
        planned = by_name[hw.tensor_names()[0]]
        out_type = planned.ggml_type if ggml_type is None else ggml_type
        used, alpha, new, cv, cv_all = solve_window(estimator, folds[hw.kept], down)
        if not np.isfinite(new).all():
            raise ForwardError(f"{cal.path}: the heal of block {hw.kept} is not finite")
        s1 = time.monotonic()
        data, written = requantized(new, out_type)
        s2 = time.monotonic()
        solve_s += s1 - s0
        encode_s += s2 - s1
        for name in hw.tensor_names():
            computed[name] = (out_type, data)
        total = folds[hw.kept][0]
        for f in folds[hw.kept][1:]:
            total = total + f
        plain = total.sse(down.T)
        scale = 1.0 / plain if plain > 0 else 0.0  # errors relative to the plain deletion's
        fits.append(
            WindowFit(
                hw.kept,
                hw.deleted,
                hw.tensor_names(),
                out_type.name,
                planned.sources[0][0].ggml_type.name,
                used,
                alpha,
                scale * total.sse(new.T),
                scale * cv,
                scale * total.sse(written.T),
                float(np.linalg.norm(written - new) / max(np.linalg.norm(new), 1e-30)),
                {k: scale * v for k, v in cv_all.items()},
            )
        )
        if progress:
            progress("solve", n + 1, len(windows))
    metadata = heal_metadata(surgery, estimator, cal.sha256, cal.n_tokens, cal.tokenizer, fits)
    seconds = {**cal.seconds, "solve": solve_s, "encode": encode_s}
    return HealResult(
        HealData(computed, metadata), tuple(fits), estimator, cal.n_tokens, cal.sha256, cal.tokenizer, seconds
    )


def compute_heal(
    path: str | Path,
    surgery: Surgery,
    *,
    text: str | None = None,
    tokens: Sequence[int] | None = None,
    max_tokens: int = DEFAULT_TOKENS,
    estimator: str = DEFAULT_ESTIMATOR,
    ggml_type: GGMLQuantizationType | None = None,
    llama_bin: str | Path | None = None,
    progress: HealProgress | None = None,
) -> HealResult:
    """calibrate() then fit(): the corrected tensors of `surgery`'s healed deletions.
    Deterministic: the same model, text, token count and estimator give the same bytes."""
    if estimator not in ESTIMATORS:
        raise ForwardError(f"unknown heal estimator {estimator!r} (known: {', '.join(ESTIMATORS)})")
    cal = calibrate(
        path, surgery, text=text, tokens=tokens, max_tokens=max_tokens, llama_bin=llama_bin, progress=progress
    )
    return fit(cal, estimator, ggml_type, progress)


__all__ = [
    "ALPHAS",
    "DEFAULT_ESTIMATOR",
    "DEFAULT_TOKENS",
    "ESTIMATORS",
    "HealResult",
    "WindowFit",
    "calibration_text",
    "check_supported",
    "compute_heal",
    "heal_metadata",
    "held_out_text",
    "split_text",
    "tokenizer_name",
]
