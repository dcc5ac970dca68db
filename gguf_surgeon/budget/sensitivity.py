"""How much KL divergence to the base each tensor costs when it is quantized lower.

A group is one quantizable tensor (block x kind: attn_q/k/v/output, ffn_gate/up/down; plus
token_embd and output). The measurement puts a batch of groups at the probe type (default Q3_K,
written as Q4_0 on rows that are not a multiple of 256) and every other tensor at F16, writes
that through llama-quantize with a --tensor-type-file, and measures KL(base || it) with
llama-perplexity on a short calibration text (evaluation.kl_divergence: base logits once, each
result cached by file hash).

Designs:
- "batched" (default): one measurement per block (its 7 tensors together) and one per kind
  (that tensor across all blocks), each non-block tensor alone: blocks + kinds + 1-2 runs
  instead of 7 x blocks. Each group's cost is then the table c[block, kind] = a_block *
  b_kind * e[block, kind] (e: the group's weight error at the probe type) whose row sums are
  the block measurements and whose column sums are the kind measurements, rescaled to the
  same total (iterative proportional fitting). Assumes KLD adds up over groups and that a
  group's cost is its weight error times a block factor times a kind factor.
- "halves": the same with two row probes per block, its attention tensors and its feed-forward
  tensors (2 x blocks + kinds + 1-2 runs): a block whose cost sits in one half is split right.
- "each": every group measured alone (exact, 7 x blocks + 1-2 runs).

Both also measure every group at the probe type at once, and report how the sum of the parts
compares to it (the additivity the allocator relies on).

An edit of a measured base need not be measured again (`inherited_sensitivity`): each tensor of
the edit takes the KLD per unit of weight error of the base tensor(s) it is made from, and its own
weight errors from a menu of the edited file. That costs the menu (one llama-quantize --pure per
type) instead of a sensitivity pass; search --target-size relies on it (docs/budget.md).

A group's cost at another type is its measured cost scaled by the ratio of weight errors
(menu.py): KLD is close to a quadratic form in the weight perturbation, so for a fixed tensor it
grows with the squared error (docs/budget.md shows how well this holds).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import OptionError
from ..evaluation.cache import EvalCache, cache_key
from ..evaluation.runner import kl_divergence
from ..evaluation.suite import DEFAULT_OPTIONS, EVAL_TEXT_FILE, EvalOptions
from ..llama.perplexity import scored_tokens_per_chunk
from ..llama.quantize import quantize_mix, written_type
from ..reader import Model
from ..records import Record
from .menu import CANDIDATES, Menu, Slot, build_menu

SENSITIVITY_VERSION = 1  # bump when a change alters any measured cost
DESIGNS = ("batched", "halves", "each")
PROBE = "Q3_K"
CALIBRATION_SHARE = 0.3  # the bundled text's first sections, by characters, are the calibration text
BASE_TYPE = "Q8_0"  # the quantized default llama-quantize needs to honour per-tensor types

Progress = Callable[[str, int, "int | None"], None]


# --- the texts ------------------------------------------------------------------------------


def split_text(text: str, share: float = CALIBRATION_SHARE) -> tuple[str, str]:
    """(calibration, held out): `text` cut at the paragraph break nearest `share` of its length,
    so the two never share a sentence."""
    paragraphs = text.split("\n\n")
    target, total = share * len(text), 0
    for i, p in enumerate(paragraphs[:-1]):  # the last paragraph always stays held out
        total += len(p) + 2
        if total >= target:
            return "\n\n".join(paragraphs[: i + 1]).strip() + "\n", "\n\n".join(paragraphs[i + 1 :]).strip() + "\n"
    raise OptionError("the text has no paragraph break to split it at")


def bundled_texts() -> tuple[str, str]:
    """(calibration, held out) of the bundled evaluation text (data/eval_text.txt)."""
    text = resources.files("gguf_surgeon").joinpath("data", EVAL_TEXT_FILE.name).read_text(encoding="utf-8")
    return split_text(text)


def text_options(options: EvalOptions, text: str, folder: Path) -> EvalOptions:
    """`options` reading `text` (written into `folder`, which must outlive the options' use)."""
    path = folder / f"text-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    path.write_text(text, encoding="utf-8")
    return replace(options, text=path)


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement(Record):
    """One probe file and its KL divergence to the base on the calibration text."""

    label: str  # "block 3", "kind attn_v", "token_embd.weight", "all"
    tensors: tuple[str, ...]  # the tensors at the probe type
    kld: float  # mean KL(base || probe) per token, nats
    seconds: float  # quantizing and measuring it


@dataclass(frozen=True)
class GroupCost(Record):
    """The cost of one tensor at the probe type, and the slope that scales it to other types."""

    name: str
    block: int | None
    kind: str
    probe_written: str  # the type the probe wrote for this tensor
    kld: float  # estimated KLD when this tensor alone is at the probe type
    per_error: float  # kld / its weight error at the probe type: KLD per unit of squared error


@dataclass(frozen=True)
class Sensitivity(Record):
    """Everything `sensitivity` measured on one base."""

    model: str
    sha256: str
    design: str
    probe: str  # the requested probe type
    calibration_tokens: int  # scored tokens of the calibration text
    menu: Menu
    groups: tuple[GroupCost, ...]  # in the menu's slot order
    measurements: tuple[Measurement, ...]
    joint_kld: float | None  # every group at the probe type at once (None: not measured, inherited)
    seconds: float  # the whole pass (menu and measurements), 0 parts when cached
    cached: bool = False

    @property
    def parts_sum(self) -> float:
        return sum(g.kld for g in self.groups)

    @property
    def additivity(self) -> float | None:
        """Measured joint KLD / sum of the parts (1: exactly additive); None when not measured."""
        if self.joint_kld is None:
            return None
        return self.joint_kld / self.parts_sum if self.parts_sum > 0 else float("nan")

    def cost(self, name: str, written: str) -> float:
        """Predicted KLD of tensor `name` written as `written`, the rest at F16."""
        g = self._group[name]
        return g.per_error * self._slot[name].option(written).error

    def predict(self, written: Mapping[str, str]) -> float:
        """Predicted KLD of a mix (name -> written type), by additivity over groups."""
        return sum(self.cost(n, t) for n, t in written.items())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_group", {g.name: g for g in self.groups})
        object.__setattr__(self, "_slot", {s.name: s for s in self.menu.slots})

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["additivity"] = self.additivity
        d["parts_sum"] = self.parts_sum
        return d

    @staticmethod
    def from_dict(d: dict) -> Sensitivity:
        return Sensitivity(
            d["model"],
            d["sha256"],
            d["design"],
            d["probe"],
            d["calibration_tokens"],
            Menu.from_dict(d["menu"]),
            tuple(GroupCost(**g) for g in d["groups"]),
            tuple(Measurement(m["label"], tuple(m["tensors"]), m["kld"], m["seconds"]) for m in d["measurements"]),
            d["joint_kld"],
            d["seconds"],
        )


# --- the measurement ------------------------------------------------------------------------


def row_label(slot: Slot, design: str) -> str:
    """The row probe a block tensor belongs to: its block, or with "halves" its block's attention
    or feed-forward half."""
    if design == "halves":
        return f"block {slot.block} {'attention' if slot.kind.startswith('attn') else 'feed-forward'}"
    return f"block {slot.block}"


def design_batches(slots: Sequence[Slot], design: str) -> list[tuple[str, tuple[str, ...]]]:
    """(label, tensor names) of each probe the design measures, the joint one ("all") last."""
    if design not in DESIGNS:
        raise OptionError(f"unknown design {design!r}; choose one of {', '.join(DESIGNS)}")
    out: list[tuple[str, tuple[str, ...]]] = []
    if design == "each":
        out += [(s.name, (s.name,)) for s in slots]
    else:
        in_blocks = [s for s in slots if s.block is not None]
        rows = list(dict.fromkeys(row_label(s, design) for s in sorted(in_blocks, key=lambda s: s.block)))
        kinds = list(dict.fromkeys(s.kind for s in in_blocks))
        out += [(r, tuple(s.name for s in in_blocks if row_label(s, design) == r)) for r in rows]
        out += [(f"kind {k}", tuple(s.name for s in in_blocks if s.kind == k)) for k in kinds]
        out += [(s.name, (s.name,)) for s in slots if s.block is None]
    out.append(("all", tuple(s.name for s in slots)))
    return out


def fit_table(seed: np.ndarray, rows: np.ndarray, cols: np.ndarray, iterations: int = 200) -> np.ndarray:
    """c = a_i * b_j * seed with row sums `rows` and column sums `cols` (cols rescaled to the
    rows' total), by iterative proportional fitting. Cells where seed is 0 stay 0."""
    c = np.where(seed > 0, seed, 0.0).astype(np.float64)
    rows = np.maximum(rows, 0.0)
    cols = np.maximum(cols, 0.0)
    if cols.sum() > 0:
        cols = cols * rows.sum() / cols.sum()
    for _ in range(iterations):
        s = c.sum(1)
        c *= np.divide(rows, s, out=np.zeros_like(s), where=s > 0)[:, None]
        s = c.sum(0)
        c *= np.divide(cols, s, out=np.zeros_like(s), where=s > 0)[None, :]
    return c


def split_costs(
    slots: Sequence[Slot], measured: Mapping[str, float], design: str, probe_error: Mapping[str, float]
) -> dict[str, float]:
    """Each group's KLD at the probe type from the design's measurements."""
    if design == "each":
        return {s.name: max(0.0, measured[s.name]) for s in slots}
    out = {s.name: max(0.0, measured[s.name]) for s in slots if s.block is None}
    in_blocks = [s for s in slots if s.block is not None]
    rows = list(dict.fromkeys(row_label(s, design) for s in in_blocks))
    kinds = list(dict.fromkeys(s.kind for s in in_blocks))
    seed = np.zeros((len(rows), len(kinds)))  # zero where a row probe holds no tensor of that kind
    for s in in_blocks:
        seed[rows.index(row_label(s, design)), kinds.index(s.kind)] = probe_error[s.name]
    table = fit_table(seed, np.array([measured[r] for r in rows]), np.array([measured[f"kind {k}"] for k in kinds]))
    for s in in_blocks:
        out[s.name] = float(table[rows.index(row_label(s, design)), kinds.index(s.kind)])
    return out


def sensitivity_key(
    sha: str,
    design: str,
    probe: str,
    candidates: Sequence[str],
    calibration: str,
    o: EvalOptions,
    imatrix_sha: str | None = None,
) -> str:
    parts = [SENSITIVITY_VERSION, sha, design, probe.upper(), list(candidates), calibration, o.ctx, o.batch, o.threads]
    return cache_key(*parts, *([imatrix_sha] if imatrix_sha else []))  # keys without an imatrix stay as they were


def measure_sensitivity(
    base: str | Path,
    *,
    design: str = "batched",
    probe: str = PROBE,
    candidates: Sequence[str] = CANDIDATES,
    calibration: str | None = None,
    options: EvalOptions = DEFAULT_OPTIONS,
    allow_requantize: bool = False,
    progress: Progress | None = None,
    imatrix: str | Path | None = None,
) -> Sensitivity:
    """Measure every group's KLD cost on `base` (docstring of this module), or return the cached
    result for the same base file, design, probe, candidates, calibration text, imatrix and settings.

    With `imatrix` (of `base`), the menu and every probe are quantized with it, as the mix will be.
    `calibration` defaults to the bundled text's calibration part (bundled_texts). Raises
    OptionError for an unknown design or type, ToolError/EvalError as llama.cpp runs do.
    """
    base = Path(base)
    start = time.monotonic()
    if design not in DESIGNS:
        raise OptionError(f"unknown design {design!r}; choose one of {', '.join(DESIGNS)}")
    if probe.upper() not in [c.upper() for c in candidates] or probe.upper() == "F16":
        raise OptionError(f"the probe type {probe!r} must be one of the quantized candidates ({', '.join(candidates)})")
    calibration = bundled_texts()[0] if calibration is None else calibration
    if imatrix is not None:
        from ..llama.imatrix import read_imatrix

        read_imatrix(imatrix)  # an unreadable or malformed file: one error, before any hashing or run
    cache = EvalCache(options.cache_dir, options.use_cache)
    try:
        sha = cache.file_sha256([base])
        imatrix_sha = cache.file_sha256([Path(imatrix)]) if imatrix is not None else None
        key = sensitivity_key(sha, design, probe, candidates, calibration, options, imatrix_sha)
        hit = cache.load(sha, "sensitivity", key)
        if hit is not None:
            return replace(Sensitivity.from_dict(hit), model=str(base), cached=True)
    finally:
        cache.close()
    _, menu = cached_menu(base, candidates, options, allow_requantize, progress, imatrix)
    probe_type = probe.upper()
    probe_written = {}
    probe_error = {}
    for s in menu.slots:
        o = s.option(written_type(GGMLQuantizationType[probe_type], s.shape[0]).name)
        probe_written[s.name], probe_error[s.name] = o.written, o.error
    batches = design_batches(menu.slots, design)
    measurements: list[Measurement] = []
    tokens = 0
    with tempfile.TemporaryDirectory(prefix="gguf-surgeon-sens-") as work:
        opts = text_options(options, calibration, Path(work))
        for i, (label, names) in enumerate(batches):
            if progress:
                progress("probes (llama-quantize + KL divergence)", i, len(batches))
            t0 = time.monotonic()
            mix = {s.name: "F16" for s in menu.slots}
            mix.update({n: probe_type for n in names})
            probe_file = Path(work) / "probe.gguf"
            quantize_mix(
                base,
                probe_file,
                mix,
                base_type=BASE_TYPE,
                allow_requantize=allow_requantize,
                force=True,
                llama_bin=options.llama_bin,
                threads=options.threads,
                imatrix=imatrix,
            )
            result = kl_divergence(probe_file, base, opts)
            probe_file.unlink()
            tokens = len(result.chunk_kld)
            kld = result.token_mean if result.token_mean is not None else result.mean.value
            measurements.append(Measurement(label, names, kld, time.monotonic() - t0))
        if progress:
            progress("probes (llama-quantize + KL divergence)", len(batches), len(batches))
    measured = {m.label: m.kld for m in measurements}
    costs = split_costs(menu.slots, measured, design, probe_error)
    groups = tuple(
        GroupCost(
            s.name,
            s.block,
            s.kind,
            probe_written[s.name],
            costs[s.name],
            costs[s.name] / probe_error[s.name] if probe_error[s.name] > 0 else 0.0,
        )
        for s in menu.slots
    )
    result = Sensitivity(
        str(base),
        sha,
        design,
        probe_type,
        tokens * scored_tokens_per_chunk(options.ctx),
        menu,
        groups,
        tuple(measurements),
        measured["all"],
        time.monotonic() - start,
    )
    cache = EvalCache(options.cache_dir, options.use_cache)
    try:
        cache.save(sha, "sensitivity", key, result.to_dict())
    finally:
        cache.close()
    return result


def edit_sources(base: str | Path, recipe: str) -> dict[str, tuple[str, ...]]:
    """Output tensor name -> the base tensors it is made from (one for a copy, more for a blend;
    a healed tensor: the one it replaces), for the edit of `base` by `recipe` (planned, not written)."""
    from ..edit import plan_for
    from ..surgery import plan_surgery

    with Model(base) as m:
        surgery = plan_surgery(m, plan_for(m, recipe), force=True)
    return {t.name: tuple(dict.fromkeys(src.name for src, _ in t.sources)) for t in surgery.tensors}


def cached_menu(
    path: Path,
    candidates: Sequence[str],
    options: EvalOptions,
    allow_requantize: bool = False,
    progress: Progress | None = None,
    imatrix: str | Path | None = None,
) -> tuple[str, Menu]:
    """(SHA-256 of `path`, its menu), the menu built once per file, candidate types and imatrix."""
    cache = EvalCache(options.cache_dir, options.use_cache)
    try:
        sha = cache.file_sha256([path])
        imatrix_part = [cache.file_sha256([Path(imatrix)])] if imatrix is not None else []
        key = cache_key(SENSITIVITY_VERSION, [c.upper() for c in candidates], *imatrix_part)
        hit = cache.load(sha, "menu", key)
        if hit is not None:
            return sha, Menu.from_dict(hit)
        menu = build_menu(
            path,
            candidates,
            allow_requantize=allow_requantize,
            llama_bin=options.llama_bin,
            threads=options.threads,
            progress=lambda step, done, total: progress(step, done, total) if progress else None,
            imatrix=imatrix,
        )
        cache.save(sha, "menu", key, menu.to_dict())
        return sha, menu
    finally:
        cache.close()


def inherited_sensitivity(
    base: Sensitivity,
    edited: str | Path,
    sources: Mapping[str, Sequence[str]],
    *,
    candidates: Sequence[str] = CANDIDATES,
    options: EvalOptions = DEFAULT_OPTIONS,
    allow_requantize: bool = False,
    progress: Progress | None = None,
) -> Sensitivity:
    """The sensitivity of `edited`, an edit of the model `base` was measured on, without measuring:
    each tensor's KLD per unit of weight error is the mean of its `sources`' (edit_sources) in
    `base`, or of the base tensors of its kind when none of them was measured; its weight errors
    and sizes are those of `edited`'s own menu (cached per file). Assumes a copied tensor costs
    what it cost in the base, whatever the blocks around it became."""
    start = time.monotonic()
    edited = Path(edited)
    sha, menu = cached_menu(edited, candidates, options, allow_requantize, progress)
    per = {g.name: g.per_error for g in base.groups}
    by_kind: dict[str, list[float]] = {}
    for g in base.groups:
        by_kind.setdefault(g.kind, []).append(g.per_error)
    groups = []
    for s in menu.slots:
        known = [per[n] for n in sources.get(s.name, ()) if n in per] or by_kind.get(s.kind, [])
        if not known:
            raise OptionError(f"{edited}: {s.name} has no tensor of its kind in the measured base {base.model}")
        per_error = float(np.mean(known))
        o = s.option(written_type(GGMLQuantizationType[base.probe], s.shape[0]).name)
        groups.append(GroupCost(s.name, s.block, s.kind, o.written, per_error * o.error, per_error))
    return Sensitivity(
        str(edited),
        sha,
        f"{base.design}, inherited from the base",
        base.probe,
        base.calibration_tokens,
        menu,
        tuple(groups),
        (),
        None,
        time.monotonic() - start,
    )


# --- the picture ----------------------------------------------------------------------------


def cost_grid(sens: Sensitivity) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, kinds, KLD at the probe type): one row per block, then one per non-block
    tensor (its value in the first column)."""
    kinds = list(dict.fromkeys(g.kind for g in sens.groups if g.block is not None))
    blocks = sorted({g.block for g in sens.groups if g.block is not None})
    others = [g for g in sens.groups if g.block is None]
    rows = [f"blk {b}" for b in blocks] + [g.kind for g in others]
    grid = np.full((len(rows), max(1, len(kinds))), np.nan)
    for g in sens.groups:
        if g.block is not None:
            grid[blocks.index(g.block), kinds.index(g.kind)] = g.kld
    for i, g in enumerate(others):
        grid[len(blocks) + i, 0] = g.kld
    return rows, kinds, grid


def plot_sensitivity(sens: Sensitivity, out: str | Path) -> Path:
    """A PNG heat map, blocks x tensor kinds, of each group's KLD at the probe type."""
    from ..analysis.plot import plot_heat_map

    rows, kinds, grid = cost_grid(sens)
    return plot_heat_map(
        grid,
        rows,
        kinds,
        out,
        title=f"KLD to the base, one tensor at {sens.probe} (rest F16) — {Path(sens.model).name}",
        row_label="block (non-block tensors last, first column)",
        col_label="tensor kind",
        value_label="KL divergence (nats/token)",
        error=OptionError,
    )
