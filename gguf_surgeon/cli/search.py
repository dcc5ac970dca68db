"""Commands that rank, search and release: rank, search, release, card, modelfile ."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ..errors import SurgeonError
from .common import (
    emit_json,
    err_console,
    human_size,
    json_option,
    live_terminal,
    llama_bin_option,
    out_console,
    step_progress,
)

BAR_WIDTH = 36
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
    help="Text to score the blocks on (default: the start of the bundled evaluation text).",
)
@click.option(
    "--tokens",
    "max_tokens",
    type=click.IntRange(min=2),
    default=128,
    show_default=True,
    help="Use at most this many tokens of the text.",
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
@llama_bin_option()
@json_option()
def rank_cmd(
    model: Path,
    text_file: Path | None,
    max_tokens: int,
    ablation: bool,
    max_window: int | None,
    plot: Path | None,
    save: Path | None,
    llama_bin: Path | None,
    as_json: bool,
) -> None:
    """Score every block's importance with the numpy reference forward pass (no torch): Block
    Influence 1 - cos(block input, block output), the angular distance across every window
    of n blocks, and with --ablation the KL divergence when the block is deleted. Low scores
    mark blocks a surgery can touch. Weights are dequantized one block at a time.

    \b
    Example:
      gguf-surgeon rank model.gguf --ablation --plot ranks.png
    """
    import json

    from ..analysis.plot import plot_ranking
    from ..analysis.rank import RankError, rank_model

    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise RankError(f"--plot {plot}: write a .png, .svg or .pdf file")  # before the forward pass, not after
    text = None
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RankError(f"--text {text_file}: cannot read: {getattr(e, 'strerror', None) or e}") from None
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

VERDICT_MARK = {"better": "[green]better[/]", "worse": "[red]worse[/]", "not distinguishable": "≈ base"}


def leaderboard_table(entries: Sequence[Any], top: int = 10) -> Table:
    """Best candidates first: KL divergence to the base with its 95% interval, the share of
    tokens whose top prediction is the base's, and the full eval's score for leaders."""
    has_full = any(e.full for e in entries[:top])
    columns = ["#", "recipe", "blocks", "KLD", "95% interval", "top %"] + (["score (base)"] if has_full else [])
    table = Table(*columns, box=None, pad_edge=False)
    for i, e in enumerate(entries[:top], 1):
        interval = f"{e.kld_low:.3f}–{e.kld_high:.3f}" if math.isfinite(e.kld_low) and math.isfinite(e.kld_high) else ""
        full = ""
        if e.full:
            f = e.full
            full = f"{f['score'][0]:.1f} ({f['base_score'][0]:.1f}) {VERDICT_MARK.get(f['verdict'], f['verdict'])}"
        table.add_row(
            str(i),
            e.recipe,
            str(e.blocks),
            f"{e.kld:.4f}",
            interval,
            f"{e.same_top:.1f}" if math.isfinite(e.same_top) else "",
            *([full] if has_full else []),
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


@click.command("search")
@click.argument("base", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--space",
    "space_spec",
    default="deletions",
    show_default=True,
    metavar="PRESET|FILE",
    help="A preset (deletions, swaps, duplications, blends, windows, phase1, combos) or a TOML space file.",
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
    "--leaders", type=click.IntRange(min=0), help="Candidates that get the full eval suite (default: the space's, 3)."
)
@click.option("--questions", type=click.IntRange(min=1), help="Full eval: ask only the first N factual questions.")
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
    "--export",
    "export_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Release the champion into this folder (edited GGUF, ladder, Modelfile, README.md).",
)
@click.option("--allow-requantize", is_flag=True, help="With --export: quantize a quantized BASE's edit.")
@click.option("--force", is_flag=True, help="With --export: write into a non-empty folder.")
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
    ctx: int,
    short_chars: int,
    rank_file: Path | None,
    no_rank: bool,
    threads: int | None,
    export_dir: Path | None,
    allow_requantize: bool,
    force: bool,
    llama_bin: Path | None,
    as_json: bool,
) -> None:
    """Search a space of surgeries for the one closest to (or better than) BASE: every candidate
    gets the KL divergence to BASE on a short text, the leaders the full eval suite. Rank's
    scores order and prune the candidates; an Optuna study (SQLite by default) keeps every
    result, so a rerun continues where the last one stopped and --jobs/--storage share it.

    \b
    Example:
      gguf-surgeon search base.gguf --space phase1 --budget 80 --jobs 2 --export release/
    """
    from ..search.space import load_space
    from ..search.storage import SearchOptions, default_study_name, storage_url
    from ..search.study import run_search

    space = load_space(space_spec)
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
    )
    url = storage_url(options)
    name = study_name or default_study_name(base, space)
    try:
        with live_leaderboard(url, name, enabled=not as_json) as progress:
            result = run_search(base, space, options, progress)
    except KeyboardInterrupt:
        click.echo(
            f"Error: interrupted; every finished result is kept in {url} (study {name!r}): "
            "rerun the same command to continue",
            err=True,
        )
        raise SystemExit(130)
    data = result.to_dict()
    if export_dir is not None and result.champion is not None:
        from ..release.folder import ReleaseOptions, export_champion

        with step_progress(enabled=not as_json) as qprogress:
            report = export_champion(
                base,
                result,
                space.name,
                leaders if leaders is not None else space.leaders,
                export_dir,
                ReleaseOptions(
                    allow_requantize=allow_requantize, llama_bin=llama_bin, force=force, eval_questions=questions
                ),
                quant_progress=lambda t, d, n: qprogress(f"quantizing {t}", d, n),
            )
        data["export"] = report.to_dict()
    if as_json:
        return emit_json(data)
    out_console.print(
        f"Study {result.study_name!r} in {result.storage}: {result.evaluated} candidates scored "
        f"({result.evaluated_now} now) of "
        + (f"{result.candidates} in space {result.space!r}" if result.candidates else f"sampled space {result.space!r}")
        + (f", budget {result.budget}" if result.budget else "")
        + f", {result.seconds:.1f} s"
    )
    out_console.print(leaderboard_table(result.leaderboard))
    if result.champion is not None:
        out_console.print(f"Champion: [bold]{result.champion.recipe}[/] — {result.verdict}")
    if "export" in data:
        out_console.print(f"Released into {data['export']['out_dir']}")


# --- release, card, modelfile -------------------------------------------------------------

PARAM_OPTION = click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Modelfile PARAMETER, overriding the default set (repeatable), e.g. temperature=0.7.",
)
SYSTEM_OPTION = click.option(
    "--system", help="Modelfile SYSTEM prompt (default: the chat template's own, else a generic one)."
)


def _read_markdown(path: Path | None) -> str | None:
    from ..errors import ReleaseError

    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReleaseError(f"--benchmarks {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


@click.command("release")
@click.argument("base", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--recipe", required=True, help="The surgery (text or a .toml file).")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Release folder (created; must be empty unless --force).",
)
@click.option("--name", help="Model and file name (default: BASE's name + '-edited').")
@click.option(
    "--types",
    "types",
    multiple=True,
    metavar="TYPES",
    help="Quant ladder, comma-separated or repeated (default: Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K).",
)
@click.option("--no-quantize", is_flag=True, help="No ladder: the edited GGUF only.")
@click.option("--allow-requantize", is_flag=True, help="Quantize although BASE is quantized (quality loss compounds).")
@click.option(
    "--benchmarks",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A Markdown benchmark table for the card (e.g. from `compare --markdown`).",
)
@click.option(
    "--eval", "run_eval", is_flag=True, help="Run the eval suite on BASE and the edit for the benchmark table."
)
@click.option("--questions", type=click.IntRange(min=1), help="With --eval: ask only the first N factual questions.")
@click.option("--base-model", help="Hugging Face id of the base for the card (default: from metadata).")
@click.option("--author", help="quantized_by and credits in the card.")
@PARAM_OPTION
@SYSTEM_OPTION
@click.option("--force", is_flag=True, help="Write into a non-empty folder, overwriting files.")
@llama_bin_option()
@json_option()
def release_cmd(
    base: Path,
    recipe: str,
    out_dir: Path,
    name: str | None,
    types: tuple[str, ...],
    no_quantize: bool,
    allow_requantize: bool,
    benchmarks: Path | None,
    run_eval: bool,
    questions: int | None,
    base_model: str | None,
    author: str | None,
    params: tuple[str, ...],
    system: str | None,
    force: bool,
    llama_bin: Path | None,
    as_json: bool,
) -> None:
    """Write a release folder: the edited GGUF, its quant ladder, an Ollama Modelfile (TEMPLATE
    derived from the embedded chat template, which is never executed) and a README.md model
    card with measured bits/weight and sizes, model details, the surgery and benchmarks.

    \b
    Example:
      gguf-surgeon release base.gguf --recipe "delete 10; swap 11 12" --out release/ --eval
    """
    from ..llama.quantize import DEFAULT_LADDER
    from ..release.folder import ReleaseOptions, release
    from ..release.ollama import parse_parameters
    from .llama import split_types

    options = ReleaseOptions(
        name=name,
        types=() if no_quantize else (split_types(types) or DEFAULT_LADDER),
        allow_requantize=allow_requantize,
        llama_bin=llama_bin,
        force=force,
        base_model=base_model,
        author=author,
        benchmarks=_read_markdown(benchmarks),
        evaluate=run_eval,
        eval_questions=questions,
        parameters=parse_parameters(params),
        system=system,
    )
    with step_progress(enabled=not as_json) as progress:
        report = release(
            base,
            recipe,
            out_dir,
            options,
            progress=lambda s: progress(s, 0, None),
            quant_progress=lambda t, d, n: progress(f"quantizing {t}", d, n),
        )
    if as_json:
        return emit_json(report.to_dict())
    if report.quants:
        for w in report.quants.warnings:
            err_console.print(f"[yellow]warning:[/] {w}")
    out_console.print(f"Released into {report.out_dir}:")
    table = Table("file", "size", "bits/weight", box=None, pad_edge=False)
    bpw = {r.path.name: r.bits_per_weight for r in report.quants.results} if report.quants else {}
    for fname, size in report.files:
        table.add_row(fname, human_size(size), f"{bpw[fname]:.2f}" if fname in bpw else "")
    out_console.print(table)


@click.command("card")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--quants",
    "quants_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder holding NAME-TYPE.gguf files to list (measured), NAME being --name or MODEL's stem.",
)
@click.option("--name", help="Model name in the title and of the ladder files (default: MODEL's file name).")
@click.option(
    "--benchmarks",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A Markdown benchmark table (e.g. from `compare --markdown`).",
)
@click.option("--base-model", help="Hugging Face id of the base (default: from metadata).")
@click.option("--author", help="quantized_by and credits.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Write the card here (default: print it).")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@json_option()
def card_cmd(
    model: Path,
    quants_dir: Path | None,
    name: str | None,
    benchmarks: Path | None,
    base_model: str | None,
    author: str | None,
    out: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write the README.md model card of an edited GGUF: YAML front matter from its metadata,
    the quant table (measured), model details, the surgery from surgery.recipe, benchmarks,
    and usage for Ollama, llama.cpp and llama-cpp-python.

    \b
    Example:
      gguf-surgeon card release/model.gguf --quants release/ --out release/README.md
    """
    from ..files import write_text_atomic
    from ..llama.quantize import default_name
    from ..release.card import CardOptions, model_card, scan_quants

    files = scan_quants(quants_dir, name or default_name(model)) if quants_dir else ()
    text = model_card(
        model,
        CardOptions(
            name=name, quants=files, benchmarks=_read_markdown(benchmarks), base_model=base_model, author=author
        ),
    )
    if out is not None:
        write_text_atomic(out, text, force)
    if as_json:
        return emit_json(
            {"model": str(model), "out": str(out) if out else None, "quants": [q.__dict__ for q in files], "card": text}
        )
    if out is None:
        click.echo(text, nl=False)
    else:
        out_console.print(f"Wrote {out} ({len(files)} quantizations listed)")


@click.command("modelfile")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--from", "source", help="The FROM line's target (default: ./MODEL's file name).")
@PARAM_OPTION
@SYSTEM_OPTION
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), help="Write the Modelfile here (default: print it)."
)
@click.option("--force", is_flag=True, help="Overwrite --out.")
@json_option()
def modelfile_cmd(
    model: Path,
    source: str | None,
    params: tuple[str, ...],
    system: str | None,
    out: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write an Ollama Modelfile for a GGUF: a TEMPLATE in Ollama's Go syntax recognized from the
    embedded chat template (ChatML; the template is read as text, never executed), the
    reference card's PARAMETER set as defaults, and a SYSTEM line.

    \b
    Example:
      gguf-surgeon modelfile model-Q8_0.gguf --param temperature=0.7 --out Modelfile
    """
    from ..files import write_text_atomic
    from ..release.ollama import build_modelfile, parse_parameters

    mf = build_modelfile(model, source, parameters=parse_parameters(params), system=system)
    if out is not None:
        write_text_atomic(out, mf.text, force)
    if as_json:
        return emit_json({**mf.to_dict(), "out": str(out) if out else None, "modelfile": mf.text})
    if out is None:
        click.echo(mf.text, nl=False)
    else:
        fmt = mf.template.format if mf.template else "none (chat template not recognized)"
        out_console.print(f"Wrote {out}: TEMPLATE {fmt}, {len(mf.parameters)} parameters")
        if mf.template:
            for n in mf.template.notes:
                err_console.print(f"[yellow]not carried:[/] {n}")


COMMANDS: dict[str, click.Command] = {c.name: c for c in (rank_cmd, search_cmd, release_cmd, card_cmd, modelfile_cmd)}  # type: ignore[misc]
