"""The writer commands (one per operation, plus apply and plan): parse, call the library, render."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import ForwardError
from ..files import format_size, read_text
from ..operations import REGISTRY
from ..reader import Model
from ..recipe import parse_step
from .common import (
    IN_ARG,
    OUT_ARG,
    emit_json,
    err_console,
    json_option,
    live_terminal,
    llama_bin_option,
    option_group,
    out_console,
    parse_size,
    step_progress,
)

# Options every writer shares.
writer_options = option_group(
    click.option(
        "--dry-run", is_flag=True, help="Print the layer map, metadata changes and output size; write nothing."
    ),
    click.option("--force", is_flag=True, help="Overwrite OUT; write blocks into positions whose tensor set differs."),
    click.option("--name", help="general.name of the output (default: the source's name and the recipe)."),
    click.option(
        "--split-max-size",
        help="Split the output llama-gguf-split style, at most this much tensor data per shard (e.g. 2G).",
    ),
    click.option(
        "--split-max-tensors",
        type=click.IntRange(min=1),
        help="Split the output, at most this many tensors per shard.",
    ),
    json_option(),
    click.option(
        "--align",
        "alignment",
        type=int,
        metavar="BYTES",
        help="Data alignment of the output (default: the source's). 4096 lets later surgeries on a "
        "reflink filesystem (XFS, btrfs) share extents instead of copying.",
    ),
    click.option(
        "--quantize",
        "quantize_types",
        metavar="TYPES",
        help="After writing OUT, quantize it with llama-quantize into OUT's folder, e.g. Q8_0,Q4_K_M.",
    ),
    click.option(
        "--allow-requantize",
        is_flag=True,
        help="With --quantize: allow a quantized source (quality compounds).",
    ),
    llama_bin_option("With --quantize: folder holding the llama.cpp tools."),
)


# Options of the writers whose recipe may heal a deletion (apply, delete).
heal_options = option_group(
    click.option(
        "--calibration",
        type=click.Path(path_type=Path, dir_okay=False),
        metavar="FILE",
        help="With a healed deletion: the calibration text (default: the first half of the bundled eval text).",
    ),
    click.option(
        "--calibration-tokens",
        type=click.IntRange(min=2),
        metavar="N",
        help="With a healed deletion: calibrate on the text's first N tokens (default 2048).",
    ),
    click.option(
        "--heal-estimator",
        metavar="NAME",
        help="With a healed deletion: auto (the default: ridge, transform or diagonal, whichever "
        "cross-validates best on the calibration tokens), ridge, lstsq, transform or diagonal (docs/heal.md).",
    ),
)


HEAL_OPTIONS = ("calibration", "calibration_tokens", "heal_estimator")

WRITER_OPTIONS = (
    "dry_run",
    "force",
    "name",
    "split_max_size",
    "split_max_tensors",
    "as_json",
    "alignment",
    "quantize_types",
    "allow_requantize",
    "llama_bin",
)


def run_edit(
    source: Path,
    out: Path | None,
    recipe: str,
    *,
    dry_run: bool,
    force: bool,
    name: str | None,
    split_max_size: str | None,
    split_max_tensors: int | None,
    as_json: bool,
    alignment: int | None = None,
    quantize_types: str | None = None,
    allow_requantize: bool = False,
    llama_bin: Path | None = None,
    calibration: Path | None = None,
    calibration_tokens: int | None = None,
    heal_estimator: str | None = None,
) -> None:
    from ..edit import EditOptions, HealData, check_outputs, edit, prepare, report

    recipe = choose_experts(source, recipe, llama_bin, quiet=as_json)
    options = EditOptions(name, force, parse_size(split_max_size), split_max_tensors, alignment)
    if quantize_types and (split_max_size or split_max_tensors):
        raise click.UsageError("--quantize needs a single-file output; drop --split-max-size/--split-max-tensors")
    if quantize_types and not dry_run:  # the tools and types before OUT is written, not after
        from ..llama.quantize import QUANTIZE_TOOL, quant_types, resolve_types
        from ..llama.tools import find_tool
        from .llama import split_types

        resolve_types(split_types((quantize_types,)), quant_types(find_tool(QUANTIZE_TOOL, llama_bin)))
    with Model(source) as model:
        surgery = prepare(model, recipe, options)
        if out is not None:
            check_outputs(model, surgery, out, options)  # before a heal's calibration pass, not after
    heal_given = [
        f"--{k.replace('_', '-')}"
        for k, v in zip(HEAL_OPTIONS, (calibration, calibration_tokens, heal_estimator))
        if v is not None
    ]
    if heal_given and not surgery.heal_windows:
        raise click.UsageError(f"{', '.join(heal_given)} needs a recipe that heals a deletion (delete ... heal)")
    healed = None
    if surgery.heal_windows:
        from ..analysis import heal as healing  # numpy's forward pass: only for a heal

        estimator = heal_estimator or healing.DEFAULT_ESTIMATOR
        if estimator not in healing.ESTIMATORS:
            raise click.BadParameter(
                f"{estimator!r} is not one of {', '.join(healing.ESTIMATORS)}", param_hint="--heal-estimator"
            )
        healing.check_supported(source, surgery.heal_windows)
        text = None if calibration is None else read_text(calibration, ForwardError, "text", "--calibration")
        if dry_run or out is None:  # what a heal records, with its sizes, without computing it
            planned = healing.heal_metadata(surgery, estimator, "0" * 64, 0, healing.tokenizer_name(llama_bin))
            with Model(source) as model:
                surgery = prepare(model, recipe, options, HealData({}, planned))
        else:
            with step_progress(enabled=not as_json, label=HEAL_STEPS.get) as progress:
                healed = healing.compute_heal(
                    source,
                    surgery,
                    text=text,
                    max_tokens=calibration_tokens or healing.DEFAULT_TOKENS,
                    estimator=estimator,
                    llama_bin=llama_bin,
                    progress=progress,
                )
    if dry_run or out is None:
        data = report(surgery, out, options)
        return emit_json(data) if as_json else render_plan(data, dry_run=True)
    with byte_progress(f"writing {out.name}", enabled=not as_json) as progress:
        surgery, result = edit(source, out, recipe, options, progress, healed.data if healed else None)
    data = report(surgery, out, options, result)
    if healed is not None:
        data["heal"] = healed.to_dict()
    quantized = None
    if quantize_types and not dry_run:
        from ..llama.quantize import quantize_ladder
        from .llama import render_quantize, split_types, type_progress  # rich tables: only when quantizing

        with type_progress(enabled=not as_json) as qprogress:
            quantized = quantize_ladder(
                out,
                split_types((quantize_types,)),
                out.parent,
                allow_requantize=allow_requantize,
                force=force,
                llama_bin=llama_bin,
                progress=qprogress,
            )
        data["quantized"] = quantized.to_dict()
    if as_json:
        return emit_json(data)
    for w in data["warnings"]:
        err_console.print(f"[yellow]warning:[/] {w}")
    for c in data["conversions"]:
        err_console.print(f"[yellow]converted:[/] {c}")
    if healed is not None:
        render_heal(data["heal"])
    files = ", ".join(data["files"])
    click.echo(
        f"Wrote {files}: {data['output_blocks']} blocks (from {data['source_blocks']}), "
        f"{format_size(data['output_size'])} in {data['seconds']:.2f} s via {data['copy_method']}"
    )
    if quantized is not None:
        render_quantize(quantized)


def choose_experts(source: Path, recipe: str, llama_bin: Path | None, quiet: bool) -> str:
    """The recipe with every `prune-experts N` that lists no experts given the top N of each
    block by REAP saliency, measured by the numpy reference on the bundled calibration text
    (the core never ranks: it gets explicit lists). Other recipes come back unchanged."""
    from ..recipe import load_recipe

    steps = load_recipe(recipe)
    if not any(s.op == "prune-experts" and s.args.keep is None for s in steps):
        return recipe
    from ..analysis.expert_rank import rank_experts, resolve_prune_steps
    from .common import step_progress

    with step_progress(enabled=not quiet) as progress:
        ranking = rank_experts(source, llama_bin=llama_bin, progress=progress)
    with Model(source) as model:
        block_count = len(model.blocks())
    return "; ".join(s.text for s in resolve_prune_steps(steps, ranking, block_count))


HEAL_STEPS = {"calibration": "heal: calibration pass (blocks)", "solve": "heal: solving (windows)"}


def render_heal(heal: dict) -> None:
    """One line per healed window: its tensors and what the correction leaves of the plain
    deletion's error on the calibration tokens (in-sample, cross-validated, after requantizing)."""
    for w in heal["windows"]:
        click.echo(
            f"Healed {', '.join(w['tensors'])} ({w['source_type']} -> {w['ggml_type']}) for blocks "
            f"{','.join(map(str, w['deleted']))}: {w['estimator']} (alpha {w['alpha']:g}); error vs plain deletion "
            f"{w['healed_error']:.3f} in-sample, {w['cv_error']:.3f} cross-validated, {w['requantized_error']:.3f} "
            f"after requantizing (weights {100 * w['weight_error']:.1f}% off); {heal['calibration_tokens']} "
            f"calibration tokens"
        )


class byte_progress:
    """A rich progress bar on stderr for a (done, total) byte callback; silent off a terminal."""

    def __init__(self, label: str, enabled: bool = True):
        self.label = label
        self.enabled = enabled and live_terminal()
        self.bar: Any = None
        self.task = None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        self.bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console.get(),
            transient=True,
        )
        self.bar.__enter__()
        self.task = self.bar.add_task(self.label, total=None)

        def update(done: int, total: int) -> None:
            self.bar.update(self.task, completed=done, total=total)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def render_plan(data: dict, dry_run: bool) -> None:
    out_console.print(f"Plan: {data['recipe']}  ({data['source_blocks']} -> {data['output_blocks']} blocks)")
    from rich.table import Table

    pruned = any("experts" in row for row in data["layers"])
    table = Table("output block", "source", *(["experts kept"] if pruned else []), box=None, pad_edge=False)
    for row in data["layers"]:
        moved = row["source"] != str(row["output"])
        experts = [",".join(map(str, row["experts"])) if "experts" in row else "all"] if pruned else []
        table.add_row(str(row["output"]), f"[bold]{row['source']}[/]" if moved else row["source"], *experts)
    out_console.print(table)
    out_console.print("Metadata changes:")
    for c in data["metadata_changes"]:
        old, new = c["old"], c["new"]
        if old is None:
            out_console.print(f"  + {c['key']} = {new!r}")
        elif new is None:
            out_console.print(f"  - {c['key']} (was {old!r})")
        else:
            out_console.print(f"  ~ {c['key']}: {old!r} -> {new!r}")
    for c in data["conversions"]:
        out_console.print(f"Converted: {c}")
    for t in data["healed_tensors"]:
        out_console.print(
            f"Heal rewrites: {t['name']} ({t['type']}; computed when written, from calibration activations)"
        )
    for w in data["warnings"]:
        out_console.print(f"Warning: {w}")
    out_console.print(
        f"Output size: {data['output_size']} bytes ({format_size(data['output_size'])})"
        + ("; nothing written (dry run)" if dry_run else "")
    )


# --- writers ---------------------------------------------------------------------------


def operation_command(name: str) -> click.Command:
    """The writer command of a registered operation, built from its parameters in the registry:
    its arguments, IN, OUT, its options, then the writer options."""
    op = REGISTRY[name]

    heals = any(p.kind == "flag" and p.name == "heal" for p in op.params)

    def command(source: Path, out: Path, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in WRITER_OPTIONS + (HEAL_OPTIONS if heals else ())}
        tokens: list[str] = []
        for p in op.params:
            value = kwargs[p.name.replace("-", "_")]
            if p.kind == "arguments":
                tokens += value
            elif p.kind == "argument":
                tokens.append(value)
            elif p.kind == "flag":
                tokens += [p.name] if value else []
            elif value is not None:
                tokens += [f"--{p.name}", value]
        # the values reach the operation's parser as tokens, never pasted into recipe text
        run_edit(source, out, parse_step([name, *tokens]).text, **options)

    f = writer_options(command)
    if heals:
        f = heal_options(f)
    for p in reversed(op.params):
        if p.kind == "flag":
            f = click.option(f"--{p.name}", p.name, is_flag=True, help=p.help)(f)
        elif p.kind == "option":
            f = click.option(
                f"--{p.name}",
                p.name.replace("-", "_"),  # --keep-file -> keep_file
                help=p.help,
                default=p.default,
                show_default=p.default is not None,
                required=p.required,
            )(f)
    f = IN_ARG(OUT_ARG(f))
    for p in reversed(op.params):
        if p.kind in ("argument", "arguments"):
            f = click.argument(p.name.replace("-", "_"), nargs=-1 if p.kind == "arguments" else 1, required=True)(f)
    example = f"\n\n\b\nExample:\n  {op.example}" if op.example else ""
    return click.command(name, help=f"{op.help or op.summary}{example}")(f)


@click.command()
@click.argument("recipe")
@IN_ARG
@OUT_ARG
@writer_options
@heal_options
def apply(recipe: str, source: Path, out: Path, **options: Any) -> None:
    """Apply a recipe (text or a .toml file) in one pass; each step's indices refer to the model
    as the previous step left it.

    \b
    Example:
      gguf-surgeon apply "delete 10; swap 11 12" in.gguf out.gguf
      gguf-surgeon apply "delete 12-15 heal" in.gguf out.gguf
    """
    run_edit(source, out, recipe, **options)


@click.command("plan")
@click.argument("recipe")
@IN_ARG
@json_option("Print the plan as JSON.")
def plan_cmd(recipe: str, source: Path, as_json: bool) -> None:
    """Print the layer map, metadata changes and output size of a recipe; write nothing.

    \b
    Example:
      gguf-surgeon plan "delete 10; swap 11 12" in.gguf
    """
    run_edit(
        source,
        None,
        recipe,
        dry_run=True,
        force=False,
        name=None,
        split_max_size=None,
        split_max_tensors=None,
        as_json=as_json,
    )


COMMANDS: dict[str, click.Command] = {c.name: c for c in (apply, plan_cmd)}  # type: ignore[misc]
