"""`gguf-surgeon eval` and `gguf-surgeon compare`: parse options, call evaluation.runner, render."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .common import emit_json, json_option, llama_bin_option, option_group, out_console, step_progress

# evaluate (numpy) and rich.progress are imported inside the commands: registering these
# commands must not slow down every other gguf-surgeon command.
if TYPE_CHECKING:
    from ..evaluation.records import EvalReport
    from ..evaluation.suite import EvalOptions


# Options eval and compare share.
eval_options = option_group(
    click.option(
        "--text",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Perplexity/KLD text file (default: the bundled evaluation text).",
    ),
    click.option(
        "--questions",
        type=click.IntRange(min=1),
        help="Ask only the first N factual questions (quick runs; scores differ from full runs).",
    ),
    click.option(
        "--threads",
        type=click.IntRange(min=1),
        help="llama.cpp threads (default: min(4, CPUs)); results are cached per thread count.",
    ),
    click.option(
        "--bench",
        "benches",
        multiple=True,
        metavar="SPEC",
        help="Add a benchmark scored by llama-perplexity (repeatable): hellaswag[:N] (the N tasks "
        "llama-perplexity --hellaswag-tasks N picks), winogrande[:N], arc-easy, arc-challenge, mmlu, "
        "truthfulqa[:N] (fetched by `gguf-surgeon data fetch`), or hellaswag|winogrande|mc:FILE[:N] "
        "(mc: a multiple-choice .bin). Each task right or wrong, paired with the base per task.",
    ),
    click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Folder of fetched benchmark data (default: $GGUF_SURGEON_DATA or the cache).",
    ),
    click.option("--no-cache", is_flag=True, help="Recompute everything and keep nothing."),
    click.option(
        "--yardstick",
        is_flag=True,
        help="Place each KLD on the base's own quantization ladder (Q8_0 ... Q2_K, made and "
        "measured once per base, then cached).",
    ),
    llama_bin_option("Folder holding llama-perplexity and llama-server."),
)


def make_options(
    text: Path | None,
    questions: int | None,
    threads: int | None,
    no_cache: bool,
    llama_bin: Path | None,
    benches: Sequence[str] = (),
    data_dir: Path | None = None,
) -> EvalOptions:
    from ..evaluation.benchmarks import parse_bench
    from ..evaluation.suite import EvalOptions, default_threads

    return EvalOptions(
        llama_bin=llama_bin,
        text=text,
        questions=questions,
        threads=threads or default_threads(),
        use_cache=not no_cache,
        benches=tuple(parse_bench(b, data_dir) for b in benches),
    )


def place_on_yardstick(base: Path, reports: Sequence[EvalReport], options: EvalOptions, progress) -> dict:
    """The base's quantization ladder and each report's KLD placed on it (JSON-able)."""
    from ..evaluation.yardstick import yardstick

    stick = yardstick(base, options, progress=lambda step: progress(step, 0, None))
    placed = [
        {
            "model": str(r.model.path),
            "kld": r.versus_base.kld.mean.value,
            "place": stick.place(r.versus_base.kld.mean.value),
        }
        for r in reports
        if r.versus_base
    ]
    return {**stick.to_dict(), "placed": placed}


def useful_rows(rows: list[list[str]]) -> list[list[str]]:
    """Rows with something to show (a lone model has no KLD or verdict)."""
    return [r for r in rows if any(c != "—" for c in r[1:])]


def render_table(header: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    t = Table(*header, box=None, pad_edge=False)
    for r in useful_rows(rows):
        t.add_row(f"[bold]{r[0]}[/]", *r[1:])
    out_console.print(t)


def footer(reports: Sequence[EvalReport]) -> None:
    r = reports[-1]
    s = r.settings
    benches = "".join(f", {b.tasks} {b.label} tasks" for b in r.benchmarks)
    out_console.print(
        f"{s['questions']} questions, {r.perplexity.chunks} chunks of {s['ctx']} tokens of {s['text']}, "
        f"{len(r.generation.continuations)} open prompts{benches}; {s['threads']} threads, seed {s['seed']}; "
        f"intervals: {s['confidence']:.0%} bootstrap ({s['bootstrap_samples']} draws)"
    )
    t = r.timings
    out_console.print(
        f"Time: {t.total:.1f} s"
        + (
            " (all from cache)"
            if all(x.cached for x in reports)
            else f" (llama.cpp {t.llama:.1f} s, gguf-surgeon {t.overhead:.1f} s)"
        )
    )


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--base",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The model MODEL was made from: adds KL divergence and differences with intervals.",
)
@eval_options
@json_option()
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Also write the JSON report to this file.")
def eval_cmd(
    model: Path,
    base: Path | None,
    text: Path | None,
    questions: int | None,
    threads: int | None,
    benches: tuple[str, ...],
    data_dir: Path | None,
    no_cache: bool,
    yardstick: bool,
    llama_bin: Path | None,
    as_json: bool,
    out: Path | None,
) -> None:
    """Score MODEL 0-100 (factual questions, perplexity, coherence, repetition, thinking modes),
    each with a 95% bootstrap interval; with --base also KL divergence, same-top-token rate,
    differences to the base and a verdict: better, worse, equivalent or inconclusive.

    Runs llama-perplexity and llama-server (temperature 0, fixed seed and threads). Results
    are cached by file hash in ~/.cache/gguf-surgeon/eval, so a rerun is instant.

    --bench adds standard benchmarks through llama-perplexity (HellaSwag, WinoGrande, ARC,
    MMLU, TruthfulQA), cached per task.

    \b
    Example:
      gguf-surgeon eval edited.gguf --base original.gguf --bench hellaswag:400
    """
    from ..evaluation.report import comparison_table, verdict_lines
    from ..evaluation.runner import evaluate

    options = make_options(text, questions, threads, no_cache, llama_bin, benches, data_dir)
    with step_progress(enabled=not as_json) as progress:
        report = evaluate(model, base, options, progress)
        stick = place_on_yardstick(base, [report], options, progress) if yardstick and base else None
    data = report.to_dict()
    if stick is not None:
        data["yardstick"] = stick
    if out is not None:
        from ..files import write_text_atomic

        write_text_atomic(out, json.dumps(data, indent=2, default=str) + "\n", force=True)
    if as_json:
        return emit_json(data)
    reports = [report.versus_base.base, report] if report.versus_base else [report]
    render_table(*comparison_table(reports))
    if report.versus_base:
        d = report.versus_base.differences[0].delta
        first, *rest = verdict_lines(report.versus_base)
        out_console.print(f"[bold]{first}[/] (overall Δ {d.value:+.1f}, 95% interval [{d.low:+.1f}, {d.high:+.1f}])")
        for line in rest:
            out_console.print(line)
        if stick is not None:
            out_console.print(f"KL divergence {stick['placed'][0]['kld']:.4f} costs {stick['placed'][0]['place']}")
    footer(reports)


@click.command("compare")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@eval_options
@click.option("--markdown", is_flag=True, help="Print the table as Markdown, for a model card.")
@json_option("Print every report as JSON.")
def compare_cmd(
    models: tuple[Path, ...],
    text: Path | None,
    questions: int | None,
    threads: int | None,
    benches: tuple[str, ...],
    data_dir: Path | None,
    no_cache: bool,
    yardstick: bool,
    llama_bin: Path | None,
    markdown: bool,
    as_json: bool,
) -> None:
    """Evaluate models side by side, each against the first: overall score, factual accuracy,
    perplexity, KLD vs the first, thinking and non-thinking checks, deltas with 95% intervals.

    \b
    Example:
      gguf-surgeon compare original.gguf edited-a.gguf edited-b.gguf --markdown
    """
    if len(models) < 2:
        raise click.UsageError("compare needs at least two models")
    from ..evaluation.report import comparison_table, markdown_table
    from ..evaluation.runner import compare

    options = make_options(text, questions, threads, no_cache, llama_bin, benches, data_dir)
    with step_progress(enabled=not (as_json or markdown)) as progress:
        reports = compare(models, options, progress)
        stick = place_on_yardstick(models[0], reports, options, progress) if yardstick else None
    if as_json:
        data = [r.to_dict() for r in reports]
        return emit_json({"reports": data, "yardstick": stick} if stick is not None else data)
    header, rows = comparison_table(reports)
    if stick is not None:
        rows.append(["KLD on the base's ladder"] + ["—"] + [p["place"] for p in stick["placed"]])
    if markdown:
        return click.echo(markdown_table(header, rows))
    render_table(header, rows)
    footer(reports)


COMMANDS: dict[str, click.Command] = {"eval": eval_cmd, "compare": compare_cmd}
