"""The picture of a ranking: a PNG of Block Influence (and ablation KLD) per block and the
angular-distance map of every window; and a generic heat map (rows x columns, e.g. blocks x
tensor kinds). Needs matplotlib (the `plot` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RankError, SurgeonError
from .expert_rank import ExpertRanking
from .rank import Ranking


def pyplot(error: type[SurgeonError] = RankError) -> Any:
    """matplotlib.pyplot on the Agg backend; `error` (naming the plot extra) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        raise error("--plot needs matplotlib: pip install 'gguf-surgeon[plot]'") from None
    return plt


def save_figure(fig: Any, out: Path, error: type[SurgeonError] = RankError) -> Path:
    """Write `fig` to `out` (format from the suffix) and close it; `error` naming `out` on failure."""
    plt = pyplot(error)
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise error(f"{out}: cannot write the plot: {e.strerror or e}") from None
    except ValueError as e:  # matplotlib's answer to an unknown file suffix
        raise error(f"{out}: cannot write the plot: {e}") from None
    finally:
        plt.close(fig)
    return out


def plot_heat_map(
    grid: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    out: str | Path,
    *,
    title: str,
    row_label: str,
    col_label: str,
    value_label: str,
    log: bool = True,
    error: type[SurgeonError] = RankError,
) -> Path:
    """A PNG of `grid` (len(rows) x len(cols); NaN cells blank), log-coloured by default."""
    plt = pyplot(error)
    from matplotlib.colors import LogNorm

    out = Path(out)
    values = np.asarray(grid, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if log and positive.size else None
    shown = np.where(values > 0, values, np.nan) if norm is not None else values
    fig, ax = plt.subplots(
        figsize=(max(5.0, 0.9 * len(cols) + 2.5), max(4.0, 0.22 * len(rows) + 1.5)), constrained_layout=True
    )
    im = ax.imshow(shown, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=value_label)
    return save_figure(fig, out, error)


def plot_ranking(ranking: Ranking, out: str | Path) -> Path:
    """Write a PNG: Block Influence (and ablation KLD) per block, and the angular-distance map
    of every window. Needs matplotlib (the `plot` extra); raises RankError without it."""
    plt = pyplot()
    out = Path(out)
    n = ranking.block_count
    has_kld = any(b.ablation_kld is not None for b in ranking.blocks)
    rows = 3 if has_kld else 2
    fig, axes = plt.subplots(rows, 1, figsize=(max(8.0, n * 0.3), 3.2 * rows), constrained_layout=True)
    idx = np.arange(n)
    ax = axes[0]
    ax.bar(idx, [b.block_influence for b in ranking.blocks], color="tab:blue")
    ax.set_title(f"Block Influence (1 - cos(input, output)) — {Path(ranking.model).name}, {ranking.n_tokens} tokens")
    ax.set_xlabel("block")
    ax.set_xticks(idx)
    ax.tick_params(axis="x", labelsize=7)
    if has_kld:
        ax = axes[1]
        ax.bar(idx, [b.ablation_kld or 0.0 for b in ranking.blocks], color="tab:red")
        ax.set_yscale("log")
        ax.set_title("KL divergence to the base when the block is deleted (nats/token)")
        ax.set_xlabel("block")
        ax.set_xticks(idx)
        ax.tick_params(axis="x", labelsize=7)
    sizes = max((w.size for w in ranking.windows), default=1)
    grid = np.full((sizes, n), np.nan)
    for w in ranking.windows:
        grid[w.size - 1, w.start] = w.angular_distance
    ax = axes[-1]
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", extent=(-0.5, n - 0.5, 0.5, sizes + 0.5))
    for w in ranking.best_windows():
        ax.plot(w.start, w.size, "w.", markersize=4)
    ax.set_title("Angular distance d(l, l+n) / π (dots: best window per n)")
    ax.set_xlabel("first block l")
    ax.set_ylabel("window size n")
    fig.colorbar(im, ax=ax)
    return save_figure(fig, out)


def plot_experts(ranking: ExpertRanking, out: str | Path) -> Path:
    """Write heat maps (MoE blocks x experts) of REAP saliency and routed-token frequency.
    Needs matplotlib (the `plot` extra); raises RankError without it."""
    plt = pyplot()
    n_blocks, n_expert = len(ranking.blocks), ranking.n_expert
    fig, axes = plt.subplots(
        2, 1, figsize=(max(8.0, n_expert * 0.12 + 2), max(2.5, n_blocks * 0.18 + 1.2) * 2), constrained_layout=True
    )
    for ax, field, title in (
        (axes[0], "saliency", "REAP saliency (mean gate weight x ||expert output|| over routed tokens)"),
        (axes[1], "frequency", "share of tokens routed to the expert"),
    ):
        im = ax.imshow(ranking.matrix(field), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"{title} — {Path(ranking.model).name}, {ranking.n_tokens} tokens", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("block")
        ax.set_yticks(range(n_blocks), [str(b) for b in ranking.blocks], fontsize=6)
        fig.colorbar(im, ax=ax)
    return save_figure(fig, Path(out))
