"""Commands that rank, search and release: rank, search, release, card, modelfile ."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ..errors import SurgeonError
from ..files import format_size, signals_deferred
from .common import (
    emit_json,
    err_console,
    json_option,
    live_terminal,
    llama_bin_option,
    out_console,
    parse_size,
    step_progress,
)

BAR_WIDTH = 36
DEFAULT_BUDGET_TRIALS = 20  # search --target-size without --budget
LOW_SHARE_TEXT = "80%"  # search.budget.LOW_SHARE, for the help text (the core is imported lazily)
PARTIAL_BLOCKS = " ▏▎▍▌▋▊▉"


def bar(value: float, scale: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `width` cells for value/scale, with eighth-cell precision; a value
    past the scale gets a full bar ending in '▶'."""
    if scale <= 0 or not math.isfinite(value) or value <= 0:
        return ""
    if value > scale:
        return "█" * (width - 1) + "▶"
    eighths = round(value / scale * width * 8)
    return "█" * (eighths // 8) + (PARTIAL_BLOCKS[eighths % 8] if eighths % 8 else "")


def bar_scale(values: Sequence[float]) -> float:
    """The value a full bar stands for: the largest value, unless a few outliers (block 0 and
    the last block often dwarf the rest) would flatten every other bar; then 4x the median."""
    vals = sorted(v for v in values if math.isfinite(v) and v > 0)
    if not vals:
        return 0.0
    median = vals[len(vals) // 2]
    return min(vals[-1], 4 * median) if median > 0 else vals[-1]


# --- rank ---------------------------------------------------------------------------------


@click.command("rank")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--text",
    "text_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Text to score the blocks on (default: the start of the bundled evaluation text; with --experts, "
    "the bundled calibration text, which eval never scores on).",
)
@click.option(
    "--tokens",
    "max_tokens",
    type=click.IntRange(min=2),
    help="Use at most this many tokens of the text (default: 128 for blocks, 256 with --experts).",
)
@click.option(
    "--ablation",
    is_flag=True,
    help="Also the KL divergence to the base when each block alone is deleted (about N/2 times slower).",
)
@click.option(
    "--windows",
    "max_window",
    type=click.IntRange(min=1),
    help="Angular distances for windows of at most this many blocks (default: all sizes).",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a PNG of the scores (needs matplotlib: pip install 'gguf-surgeon[plot]').",
)
@click.option(
    "--save",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the JSON report to this file (search --rank reads it).",
)
@click.option(
    "--experts",
    is_flag=True,
    help="Score the experts of every mixture-of-experts block instead: routed-token frequency, mean gate "
    "weight, mean output norm and REAP saliency (what prune-experts N keeps the top N of).",
)
@click.option(
    "--keep",
    "keep_count",
    type=click.IntRange(min=1),
    help="With --experts and --keep-file: how many experts per block the keep file lists.",
)
@click.option(
    "--keep-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --experts: write the --keep most salient experts of each block to this JSON file "
    "(for prune-experts N --keep-file FILE; blocks are the source's).",
)
@llama_bin_option()
@json_option()
def rank_cmd(
    model: Path,
    text_file: Path | None,
    max_tokens: int | None,
    ablation: bool,
    max_window: int | None,
    plot: Path | None,
    save: Path | None,
    experts: bool,
    keep_count: int | None,
    keep_file: Path | None,
    llama_bin: Path | None,
    as_json: bool,
) -> None:
    """Score every block's importance with the numpy reference forward pass (no torch): Block
    Influence 1 - cos(block input, block output), the angular distance across every window
    of n blocks, and with --ablation the KL divergence when the block is deleted. Low scores
    mark blocks a surgery can touch. Weights are dequantized one block at a time. With
    --experts: every expert of every MoE block, a heat map with --plot.

    \b
    Example:
      gguf-surgeon rank model.gguf --ablation --plot ranks.png
      gguf-surgeon rank moe.gguf --experts --plot experts.png
    """
    import json

    from ..analysis.plot import plot_ranking
    from ..analysis.rank import RankError, rank_model

    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise RankError(f"--plot {plot}: write a .png, .svg or .pdf file")  # before the forward pass, not after
    if experts and (ablation or max_window is not None):
        raise click.UsageError("--experts scores experts; --ablation and --windows score blocks")
    if (keep_count is None) != (keep_file is None) or (keep_file is not None and not experts):
        raise click.UsageError("--keep N and --keep-file FILE go together, with --experts")
    text = None
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RankError(f"--text {text_file}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if experts:
        from ..analysis.expert_rank import DEFAULT_TOKENS as EXPERT_TOKENS

        n_tokens = max_tokens or EXPERT_TOKENS
        return rank_experts_cmd(model, text, n_tokens, plot, save, llama_bin, as_json, keep_count, keep_file)
    from ..analysis.rank import DEFAULT_TOKENS

    max_tokens = max_tokens or DEFAULT_TOKENS
    with step_progress(enabled=not as_json) as progress:
        ranking = rank_model(
            model,
            text,
            max_tokens=max_tokens,
            ablation=ablation,
            max_window=max_window,
            llama_bin=llama_bin,
            progress=progress,
        )
    data = ranking.to_dict()
    if plot is not None:
        data["plot"] = str(plot_ranking(ranking, plot))
    if save is not None:
        from ..files import write_text_atomic

        write_text_atomic(save, json.dumps(data, indent=2), force=True)
    if as_json:
        return emit_json(data)
    render_ranking(ranking, plot)


def rank_experts_cmd(
    model: Path,
    text: str | None,
    max_tokens: int,
    plot: Path | None,
    save: Path | None,
    llama_bin: Path | None,
    as_json: bool,
    keep_count: int | None = None,
    keep_file: Path | None = None,
) -> None:
    import json

    from ..analysis.expert_rank import rank_experts
    from ..analysis.plot import plot_experts

    with step_progress(enabled=not as_json) as progress:
        ranking = rank_experts(model, text, max_tokens=max_tokens, llama_bin=llama_bin, progress=progress)
    data = ranking.to_dict()
    if keep_file is not None and keep_count is not None:
        from ..errors import RankError
        from ..files import write_text_atomic

        if keep_count > ranking.n_expert:
            raise RankError(f"--keep {keep_count}: the model has {ranking.n_expert} experts per block")
        lists = {str(b): list(ranking.top(b, keep_count)) for b in ranking.blocks}
        write_text_atomic(keep_file, json.dumps({"experts": lists}, indent=1), force=True)
        data["keep_file"] = str(keep_file)
    if plot is not None:
        data["plot"] = str(plot_experts(ranking, plot))
    if save is not None:
        from ..files import write_text_atomic

        write_text_atomic(save, json.dumps(data, indent=2), force=True)
    if as_json:
        return emit_json(data)
    out_console.print(
        f"{Path(ranking.model).name}: {len(ranking.blocks)} MoE blocks of {ranking.n_expert} experts, "
        f"{ranking.n_used} routed per token ({ranking.architecture}); {ranking.n_tokens} tokens, "
        f"tokenizer: {ranking.tokenizer}"
    )
    shown = 4
    table = Table(
        "block", "unrouted", f"most salient ({shown})", f"least salient ({shown})", "saliency max / median", box=None
    )

    def cell(scores: dict, experts: Sequence[int]) -> str:
        return ", ".join(f"{e} ({scores[e].saliency:.3g}, {scores[e].frequency:.0%})" for e in experts)

    for b in ranking.blocks:
        scores = {s.expert: s for s in ranking.block_scores(b)}
        order = ranking.order(b)
        values = sorted(s.saliency for s in scores.values())
        table.add_row(
            str(b),
            str(sum(1 for s in scores.values() if s.tokens == 0)),
            cell(scores, order[:shown]),
            cell(scores, order[-shown:]),
            f"{values[-1]:.3g} / {values[len(values) // 2]:.3g}",
        )
    out_console.print(table)
    out_console.print(
        "Cells: expert (REAP saliency, routed share of tokens). "
        "--json has every expert's frequency, mean gate weight and mean output norm."
    )
    if plot is not None:
        out_console.print(f"Wrote {plot}")
    if keep_file is not None:
        out_console.print(f"Wrote {keep_file}: the {keep_count} most salient experts of each block")


def render_ranking(ranking: Any, plot: Path | None) -> None:
    blocks = ranking.blocks
    has_kld = any(b.ablation_kld is not None for b in blocks)
    out_console.print(
        f"{Path(ranking.model).name}: {ranking.block_count} blocks ({ranking.architecture}), "
        f"{ranking.n_tokens} tokens, tokenizer: {ranking.tokenizer}"
    )
    bi_scale = bar_scale([b.block_influence for b in blocks])
    kld_scale = bar_scale([b.ablation_kld or 0.0 for b in blocks])
    columns = ["block", "block influence", ""]
    if has_kld:
        columns += ["KLD if deleted", ""]
    table = Table(*columns, box=None, pad_edge=False)
    for b in blocks:
        row = [str(b.index), f"{b.block_influence:.4f}", f"[blue]{bar(b.block_influence, bi_scale)}[/]"]
        if has_kld:
            row += [f"{b.ablation_kld:.4f}", f"[red]{bar(b.ablation_kld, kld_scale)}[/]"]
        table.add_row(*row)
    out_console.print(table)
    best = ranking.best_windows()
    if best:
        wt = Table("window size", "blocks", "angular distance", box=None, pad_edge=False)
        for w in best[:8]:
            wt.add_row(
                str(w.size),
                f"{w.start}-{w.start + w.size - 1}" if w.size > 1 else str(w.start),
                f"{w.angular_distance:.4f}",
            )
        out_console.print("Most prunable window of each size (smallest angular distance):")
        out_console.print(wt)
    order = ", ".join(map(str, ranking.least_important()[:10]))
    by = "KLD if deleted" if has_kld else "block influence"
    out_console.print(f"Least important first (by {by}): {order}")
    if plot is not None:
        out_console.print(f"Wrote {plot}")


# --- search -------------------------------------------------------------------------------

VERDICT_MARK = {
    "better": "[green]better[/]",
    "worse": "[red]worse[/]",
    "equivalent": "≈ base",
    "inconclusive": "inconclusive",
}


def full_cell(f: dict) -> str:
    """A leader's full eval in the leaderboard: its score and the difference to the base, each
    with its 95% interval, and the verdict (never a bare point score)."""
    s, b = f["score"], f["base_score"]
    d = f["delta"]
    return (
        f"{s[0]:.1f} [{s[1]:.1f}, {s[2]:.1f}] vs {b[0]:.1f}: Δ {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}] "
        + VERDICT_MARK.get(f["verdict"], f["verdict"])
    )


def leaderboard_table(entries: Sequence[Any], top: int = 10) -> Table:
    """Best candidates first: KL divergence to the base with its 95% interval, the share of
    tokens whose top prediction is the base's, the KLD's place on the base's quantization
    ladder (with a yardstick), and the full eval's score against the base for leaders."""
    has_full = any(e.full for e in entries[:top])
    has_ladder = any(e.ladder for e in entries[:top])
    columns = ["#", "recipe", "blocks", "KLD", "95% interval", "top %"]
    columns += (["on the base's ladder"] if has_ladder else []) + (["full eval vs base"] if has_full else [])
    table = Table(*columns, box=None, pad_edge=False)
    for i, e in enumerate(entries[:top], 1):
        interval = f"{e.kld_low:.3f}–{e.kld_high:.3f}" if math.isfinite(e.kld_low) and math.isfinite(e.kld_high) else ""
        table.add_row(
            str(i),
            e.recipe,
            str(e.blocks),
            f"{e.kld:.4f}",
            interval,
            f"{e.same_top:.1f}" if math.isfinite(e.same_top) else "",
            *([e.ladder or ""] if has_ladder else []),
            *([full_cell(e.full) if e.full else ""] if has_full else []),
        )
    return table


class live_leaderboard:
    """A rich Live view on stderr: scored/budget and the best candidates, refreshed from the
    study at most once a second; silent off a terminal."""

    def __init__(self, storage: str, study_name: str, enabled: bool = True):
        self.storage, self.study_name = storage, study_name
        self.enabled = enabled and live_terminal()
        self.live = None
        self.last = 0.0

    def __enter__(self):
        import time

        from rich.live import Live

        if self.enabled:
            self.live = Live(console=err_console.get(), transient=True, refresh_per_second=4)
            self.live.__enter__()
        else:
            return None  # off a terminal: nothing to show, and the search need not count for it

        def update(event: Any) -> None:
            if self.live is None or (event.kind == "waiting" and time.monotonic() - self.last < 1):
                return
            if time.monotonic() - self.last < 1 and event.kind not in ("phase", "full"):
                return
            self.last = time.monotonic()
            from rich.console import Group
            from rich.text import Text

            from ..search.study import search_status

            try:
                entries = search_status(self.storage, self.study_name)
            except SurgeonError:
                entries = []
            budget = f"/{event.budget}" if event.budget else ""
            what = {
                "full": f"full eval of {event.recipe}",
                "waiting": "waiting for other workers",
                "phase": f"phase {event.phase}",
            }.get(event.kind, f"scored {event.recipe or ''}")
            head = Text(f"search: {event.evaluated}{budget} candidates scored — {what}")
            self.live.update(Group(head, leaderboard_table(entries)))

        return update

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)


class SearchCommand(click.Command):
    """`search BASE ...` runs a search; `search status ...` reports on one (a subcommand name
    in BASE's place, so that `search` keeps its arguments)."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any):
        if args and args[0] == "status":
            return status_cmd.make_context(f"{info_name} status", args[1:], parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command("search", cls=SearchCommand)
@click.argument("base", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--space",
    "space_spec",
    default="deletions",
    show_default=True,
    metavar="PRESET|FILE",
    help="A preset (deletions, swaps, duplications, blends, windows, phase1, combos, healed-deletions, experts, "
    "experts-deletions) or a TOML space file.",
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    help="Candidates to score, over all workers and reruns (default: the whole space; required for sampled spaces).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this machine, sharing one study.",
)
@click.option(
    "--storage",
    metavar="URL",
    help="Optuna storage URL shared by all workers, e.g. postgresql://host/db (default: sqlite in --work-dir).",
)
@click.option("--study-name", help="Study to create or continue (default: BASE's file name and the space's name).")
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("gguf-surgeon-search"),
    show_default=True,
    help="Candidate files, the short text and the default database.",
)
@click.option("--keep", is_flag=True, help="Keep every candidate file after scoring (default: deleted at once).")
@click.option(
    "--leaders",
    type=click.IntRange(min=0),
    help="At most this many candidates get the full eval suite: every one whose short-KLD interval "
    "overlaps the best one's, best first (default: the space's, 6; 0: none).",
)
@click.option("--questions", type=click.IntRange(min=1), help="Full eval: ask only the first N factual questions.")
@click.option(
    "--leader-bench",
    "leader_benches",
    multiple=True,
    metavar="SPEC",
    help="Add a benchmark to the leaders' full eval (repeatable), as eval --bench takes it: hellaswag[:N], "
    "winogrande[:N], arc-easy, ..., or hellaswag|winogrande|mc:FILE[:N].",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder of fetched benchmark data for --leader-bench (default: $GGUF_SURGEON_DATA or the cache).",
)
@click.option(
    "--ctx",
    type=click.IntRange(min=16),
    default=128,
    show_default=True,
    help="Chunk length of the short KL-divergence stage.",
)
@click.option(
    "--short-chars",
    type=click.IntRange(min=200),
    default=2500,
    show_default=True,
    help="Characters of the bundled evaluation text used by the short stage.",
)
@click.option(
    "--rank",
    "rank_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A `rank --save` file to guide the order (default: Block Influence computed now).",
)
@click.option("--no-rank", is_flag=True, help="No guidance: natural order, no pruning.")
@click.option("--threads", type=click.IntRange(min=1), help="llama.cpp threads per worker (default: cores / jobs).")
@click.option(
    "--yardstick",
    is_flag=True,
    help="Place every KLD on the base's own quantization ladder (Q8_0 ... Q2_K, made and measured once per "
    "base, then cached); with --export also on the card.",
)
@click.option(
    "--export",
    "export_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Release the champion into this folder (edited GGUF, ladder, Modelfile, README.md).",
)
@click.option("--allow-requantize", is_flag=True, help="With --export: quantize a quantized BASE's edit.")
@click.option("--force", is_flag=True, help="With --export: write into a non-empty folder.")
@click.option(
    "--target-size",
    metavar="SIZE",
    help="Instead of the KLD study: a multi-objective study (file size, KLD to BASE) over the space's single "
    "moves and no surgery, each with the least-KLD type per tensor under a budget between --min-size and SIZE; "
    "--budget trials (default 20); prints the Pareto front measured on held-out text against BASE's uniform "
    "Q3_K_M/Q4_K_M/Q5_K_M (docs/budget.md).",
)
@click.option(
    "--min-size",
    metavar="SIZE",
    help=f"With --target-size: the smallest budget drawn (default: {LOW_SHARE_TEXT} of --target-size).",
)
@click.option(
    "--plot",
    "plot_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --target-size: a PNG of the front, KLD against file size, the uniform types as reference points.",
)
@click.option(
    "--point",
    type=click.IntRange(min=1),
    help="With --target-size --export: the front point to release, numbered as the table shows them "
    "(default: the one with the least KLD).",
)
@llama_bin_option()
@json_option()
def search_cmd(
    base: Path,
    space_spec: str,
    budget: int | None,
    jobs: int,
    storage: str | None,
    study_name: str | None,
    work_dir: Path,
    keep: bool,
    leaders: int | None,
    questions: int | None,
    leader_benches: tuple[str, ...],
    data_dir: Path | None,
    ctx: int,
    short_chars: int,
    rank_file: Path | None,
    no_rank: bool,
    threads: int | None,
    yardstick: bool,
    export_dir: Path | None,
    allow_requantize: bool,
    force: bool,
    target_size: str | None,
    min_size: str | None,
    plot_file: Path | None,
    point: int | None,
    llama_bin: Path | None,
    as_json: bool,
) -> None:
    """Search a space of surgeries for the one closest to (or better than) BASE: every candidate
    gets the KL divergence to BASE on a short text, the leaders the full eval suite. Rank's
    scores order and prune the candidates; an Optuna study (SQLite by default) keeps every
    result, so a rerun continues where the last one stopped and --jobs/--storage share it.

    \b
    Example:
      gguf-surgeon search base.gguf --space phase1 --budget 80 --jobs 2 --leader-bench hellaswag:400 --export release/
      gguf-surgeon search base-F16.gguf --target-size 112M --min-size 90M --budget 40 --plot front.png
    """
    from ..errors import OptionError
    from ..search.space import load_space

    if target_size is not None:
        given = {
            "--jobs": jobs != 1, "--keep": keep, "--leaders": leaders is not None, "--questions": questions,
            "--leader-bench": leader_benches, "--rank": rank_file, "--no-rank": no_rank, "--yardstick": yardstick,
        }  # fmt: skip
        clash = [k for k, v in given.items() if v]
        if clash:
            raise OptionError(f"--target-size: a size-and-KLD study has no full-eval stage; drop {clash[0]}")
        if point is not None and export_dir is None:
            raise OptionError("--point: needs --export (it names the front point to release)")
        return _budget_search(
            base,
            load_space(space_spec),
            target_size,
            BudgetSearch(
                min_size, budget, work_dir, storage, study_name, threads, plot_file, export_dir, point, force,
                allow_requantize, llama_bin,
            ),
            as_json,
        )  # fmt: skip
    for option, value in (("--min-size", min_size), ("--plot", plot_file), ("--point", point)):
        if value is not None:
            raise OptionError(f"{option}: needs --target-size")
    from ..search.storage import SearchOptions, default_study_name, redact_url, set_notice, storage_url
    from ..search.study import run_search

    # the database-outage lines, through rich: above the live leaderboard, not through it
    set_notice(lambda line: err_console.get().print(line, markup=False, highlight=False))

    space = load_space(space_spec)
    benches = ()
    if leader_benches:
        from ..errors import EvalError
        from ..evaluation.benchmarks import parse_bench

        try:  # refused before any work
            benches = tuple(parse_bench(b, data_dir) for b in leader_benches)
        except EvalError as e:
            raise EvalError(str(e).replace("--bench ", "--leader-bench ", 1)) from None
    options = SearchOptions(
        budget=budget,
        jobs=jobs,
        storage=storage,
        study_name=study_name,
        work_dir=work_dir,
        keep=keep,
        llama_bin=llama_bin,
        ctx=ctx,
        short_chars=short_chars,
        leaders=leaders,
        full_questions=questions,
        rank_file=rank_file,
        use_rank=not no_rank,
        threads=threads,
        yardstick=yardstick,
        leader_benches=benches,
    )
    url = storage_url(options)
    name = study_name or default_study_name(base, space)
    try:
        with live_leaderboard(url, name, enabled=not as_json) as progress:
            result = run_search(base, space, options, progress)
    except KeyboardInterrupt:
        click.echo(
            f"Error: interrupted; every finished result is kept in {redact_url(url)} (study {name!r}): "
            "rerun the same command to continue",
            err=True,
        )
        raise SystemExit(130)
    data = result.to_dict()
    if export_dir is not None and result.champion is not None:
        from ..release.folder import ReleaseOptions, export_champion
        from ..search.worker import worker_threads

        with step_progress(enabled=not as_json) as qprogress:
            report = export_champion(
                base,
                result,
                space.name,
                sum(1 for e in result.leaderboard if e.full),  # the candidates with a full eval
                export_dir,
                ReleaseOptions(
                    allow_requantize=allow_requantize,
                    llama_bin=llama_bin,
                    force=force,
                    eval_questions=questions,
                    eval_benches=benches,
                    eval_threads=worker_threads(options),  # the leaders' settings: their eval comes from the cache
                    yardstick=yardstick,
                ),
                quant_progress=lambda t, d, n: qprogress(f"quantizing {t}", d, n),
            )
        data["export"] = report.to_dict()
    if as_json:
        return emit_json(data)
    render_search(result, data)


@dataclass(frozen=True)
class BudgetSearch:
    """search --target-size's settings besides the base, the space and the target."""

    min_size: str | None
    trials: int | None
    work_dir: Path
    storage: str | None
    study_name: str | None
    threads: int | None
    plot: Path | None
    export: Path | None
    point: int | None
    force: bool
    allow_requantize: bool
    llama_bin: Path | None


def _budget_search(base: Path, space: Any, target_size: str, o: BudgetSearch, as_json: bool) -> None:
    """search --target-size: the study of search/budget.py, its front as a table (and PNG), and
    with --export one point released."""
    from dataclasses import replace

    from ..errors import OptionError
    from ..evaluation.suite import DEFAULT_OPTIONS
    from ..reader import Model
    from ..release.folder import default_release_name
    from ..search.budget import budget_study, plot_front
    from ..search.order import ordered_moves, singles

    limit = parse_size(target_size, "--target-size")
    low = parse_size(o.min_size, "--min-size")
    assert limit is not None
    if low is not None and low > limit:
        raise OptionError(f"--min-size {o.min_size.strip()}: larger than --target-size {target_size.strip()}")
    if o.plot is not None and o.plot.suffix.lower() != ".png":
        raise OptionError(f"--plot {o.plot}: give a .png file name")
    if o.export is not None and o.export.exists() and any(o.export.iterdir()) and not o.force:
        raise OptionError(f"--export {o.export}: folder is not empty; pass --force to write into it")
    # written after the study: where they go is checked before it
    if o.plot is not None and not o.plot.parent.is_dir():
        what = "is not a folder" if o.plot.parent.exists() else "no such folder"
        raise OptionError(f"--plot {o.plot}: {o.plot.parent}: {what}")
    folder = o.export.parent if o.export is not None else None
    while folder is not None and not folder.exists() and folder != folder.parent:
        folder = folder.parent  # --export makes the missing folders: the first existing one must be a folder
    if folder is not None and not folder.is_dir():
        raise OptionError(f"--export {o.export}: {folder}: is not a folder")
    with Model(base) as m:
        blocks = len(m.blocks())
    moves = singles(ordered_moves(space, blocks, None), blocks)
    healed = next((c.recipe for c in moves if any(m.heal for m in c.moves)), None)
    if healed is not None:  # a heal needs its calibration pass, which the study's candidates do not run
        raise OptionError(f"--space {space.name}: {healed!r} heals a deletion; the size study takes no healed moves")
    if not moves:
        raise OptionError(
            f"--space {space.name}: no move of it applies to {base.name} ({blocks} blocks); for the base's mix alone, "
            "use quantize --target-size"
        )
    recipes = [c.recipe for c in moves]
    options = replace(DEFAULT_OPTIONS, llama_bin=o.llama_bin)
    if o.threads:
        options = replace(options, threads=o.threads)
    name = default_release_name(base)
    with step_progress(enabled=not as_json) as progress:
        front = budget_study(
            base, recipes, limit=limit, low=low, trials=o.trials or DEFAULT_BUDGET_TRIALS, work_dir=o.work_dir,
            storage=o.storage, study_name=o.study_name, name=name, target_label=target_size.strip(),
            options=options, allow_requantize=o.allow_requantize, progress=progress,
        )  # fmt: skip
    data = front.to_dict()
    if o.plot is not None:
        data["plot"] = str(plot_front(front, o.plot))
    if o.export is not None:
        if not any(p.recipe is not None for p in front.points):
            raise OptionError(
                f"--export {o.export}: the study's front has no point: every trial ({front.refused}) was over "
                "its budget; pass a larger --budget"
            )
        chosen = front.point(o.point) if o.point else min(
            (p for p in front.points if p.recipe is not None), key=lambda p: p.kld.value
        )  # fmt: skip
        created = not o.export.exists()
        try:
            with step_progress(enabled=not as_json) as progress:
                data["export"] = _export_point(base, chosen, name, o, options, progress)
        except BaseException:
            if created:  # a folder this run made is not left behind empty
                with signals_deferred(), contextlib.suppress(OSError):
                    o.export.rmdir()
            raise
    if as_json:
        return emit_json(data)
    out_console.print(
        f"{base.name}: study {front.study_name!r} in {front.storage}, {front.trials} trials ({front.trials_now} now"
        + (f", {front.refused} over budget" if front.refused else "")
        + f") over {front.candidates} surgeries, budgets {format_size(front.low)} – {format_size(front.limit)}, "
        f"{front.seconds:.0f} s"
    )
    out_console.print(f"KL divergence to the base on {front.kld_text}; the study ranked on the calibration text")
    table = Table("#", "file", "budget", "size", "bits/weight", box=None, pad_edge=False)
    table.add_column("KLD [95% CI]", no_wrap=True)
    table.add_column("front")
    n = 0
    for p in front.points:
        n += p.recipe is not None
        k = p.kld
        table.add_row(
            str(n) if p.recipe is not None else "", p.recipe or ("no surgery" if p.recipe == "" else p.label),
            format_size(p.budget) if p.budget else "", format_size(p.size), f"{p.bits_per_weight:.2f}",
            f"{k.value:.4f} [{k.low:.4f}, {k.high:.4f}]", "yes" if p.on_front else "",
        )  # fmt: skip
    out_console.print(table)
    for c in front.comparisons:
        if c.point is None:
            out_console.print(f"{c.uniform}: no front point is that small ({format_size(c.size)})")
        else:
            out_console.print(
                f"{c.uniform} ({format_size(c.size)}, KLD {c.kld.value:.4f}): best front point no larger is "
                f"{c.point} at {c.ratio:.2f}x its KLD — " + ("beats it (intervals apart)" if c.beats else "not apart"),
                highlight=False,
            )
    if "plot" in data:
        out_console.print(f"Plot: {data['plot']}")
    if "export" in data:
        out_console.print(f"Exported: {data['export']['file']}")


def _export_point(base: Path, p: Any, name: str, o: BudgetSearch, options: Any, progress: Any) -> dict:
    """Write front point `p`: a surgery as a release folder (edit, the point's mix with costs
    inherited from the base, card, Modelfile); no surgery as the base's mix and its tensor-type file."""
    from ..budget.allocate import quantize_to_budget
    from ..budget.sensitivity import measure_sensitivity
    from ..llama.quantize import default_name
    from ..release.folder import ReleaseOptions, release

    label = next(f"{p.budget / f:.1f}{u}" for f, u in ((1e9, "G"), (1e6, "M"), (1e3, "K"), (1, "B")) if p.budget >= f)
    if not p.recipe:
        out = o.export / f"{default_name(base)}-{label}.gguf"  # as quantize --target-size names it
        result = quantize_to_budget(
            base, out, target_size=p.budget, options=options, allow_requantize=o.allow_requantize, force=o.force,
            sensitivity=measure_sensitivity(base, options=options, allow_requantize=o.allow_requantize),
            progress=progress,
        )  # fmt: skip
        return {"file": str(result.out), "types_file": str(result.types_file), "recipe": "", "budget": result.to_dict()}
    report = release(
        base,
        p.recipe,
        o.export,
        ReleaseOptions(
            name=name,
            target_size=p.budget,
            target_label=label,
            inherit_costs=True,
            budget_options=options,
            allow_requantize=o.allow_requantize,
            llama_bin=o.llama_bin,
            force=o.force,
        ),  # fmt: skip
        progress=lambda s: progress(s, 0, 1),
    )
    return {"file": str(report.budget.out), "types_file": str(report.budget.types_file), "recipe": p.recipe,
            "release": report.to_dict()}  # fmt: skip


def render_search(result: Any, data: dict) -> None:
    out_console.print(
        f"Study {result.study_name!r} in {result.storage}: {result.evaluated} candidates scored "
        f"({result.evaluated_now} now) of "
        + (f"{result.candidates} in space {result.space!r}" if result.candidates else f"sampled space {result.space!r}")
        + (f", budget {result.budget}" if result.budget else "")
        + f", {result.seconds:.1f} s"
    )
    out_console.print(leaderboard_table(result.leaderboard))
    lead = result.leaders
    if lead is not None and lead.cap:
        out_console.print(
            f"Full eval: {len(lead.chosen)} leader(s), every candidate whose KLD interval overlaps the best one's"
            + (f"; the cap --leaders {lead.cap} left out {lead.left_out} more that overlap" if lead.left_out else "")
        )
    if result.champion is not None:
        out_console.print(f"Champion: [bold]{result.champion.recipe}[/] — {result.verdict}", highlight=False)
        for line in data.get("measures", []):
            out_console.print(f"  {line}", highlight=False, markup=False)
    if "export" in data:
        out_console.print(f"Released into {data['export']['out_dir']}")


@click.command("status")
@click.option(
    "--storage",
    metavar="URL",
    help="The study's storage URL, as given to search (default: sqlite in --work-dir).",
)
@click.option("--study-name", help="The study (default: the only one in the storage).")
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("gguf-surgeon-search"),
    show_default=True,
    help="Where the default SQLite database is.",
)
@click.option("--top", type=click.IntRange(min=0), default=5, show_default=True, help="Leaderboard rows to show.")
@json_option()
def status_cmd(storage: str | None, study_name: str | None, work_dir: Path, top: int, as_json: bool) -> None:
    """Progress of a search over all its worker hosts, read from the study: per host the
    candidates done, running, failed and retried, its rate; the study's rate and ETA; the best
    candidates so far. Runs no candidate and changes no study.

    \b
    Example:
      gguf-surgeon search status --storage postgresql://search:PASSWORD@db:5432/search
    """
    from ..search.storage import SearchOptions, storage_url
    from ..search.study import study_progress

    url = storage_url(SearchOptions(storage=storage, work_dir=work_dir))
    progress = study_progress(url, study_name)
    if as_json:
        data = progress.to_dict()
        data["leaderboard"] = data["leaderboard"][:top] if top else data["leaderboard"]
        return emit_json(data)
    render_status(progress, top)


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_status(p: Any, top: int) -> None:
    of = f" of {p.candidates}" if p.candidates is not None else ""
    budget = f", budget {p.budget}" if p.budget is not None else ""
    rate = f"{p.rate:.1f} candidates/min" if p.rate else "no worker running"
    left = f", {p.remaining} to go" if p.remaining is not None else ""
    out_console.print(
        f"Study {p.study_name!r} in {p.storage}: {p.evaluated}{of} candidates scored{budget}, "
        f"{p.running} running, {p.waiting} queued, {p.failed} failed{left}; {rate}; ETA {_minutes(p.eta_s)}",
        highlight=False,
    )
    table = Table(
        "host", "workers", "done", "running", "failed", "retried", "reused", "rate/min", "last done", box=None
    )
    for h in p.hosts:
        table.add_row(
            h.host,
            str(h.workers),
            str(h.done),
            str(h.running),
            str(h.failed),
            str(h.retried),
            str(h.reused),
            f"{h.rate:.1f}" if h.rate else "",
            (h.last or "").split("T")[-1],
        )
    table.add_row(
        "all",
        str(sum(h.workers for h in p.hosts)),
        str(p.evaluated),
        str(p.running),
        str(p.failed),
        str(sum(h.retried for h in p.hosts)),
        str(sum(h.reused for h in p.hosts)),
        f"{p.rate:.1f}" if p.rate else "",
        f"ETA {_minutes(p.eta_s)}",
    )
    out_console.print(table)
    if top and p.leaderboard:
        out_console.print(leaderboard_table(p.leaderboard, top))


COMMANDS: dict[str, click.Command] = {c.name: c for c in (rank_cmd, search_cmd)}  # type: ignore[misc]
