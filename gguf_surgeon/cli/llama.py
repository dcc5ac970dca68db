"""Commands that drive llama.cpp tools: doctor, quantize, imatrix-remap (in COMMANDS, loaded lazily by
`cli.SurgeonGroup`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ..files import format_size
from ..llama.tools import DEFAULT_LADDER, HOW_TO_GET, doctor
from ..reader import Model
from .budget import budget_options, candidates_of, eval_options_of, read_calibration
from .common import (
    IN_ARG,
    emit_json,
    err_console,
    json_option,
    llama_bin_option,
    out_console,
    parse_size,
    step_progress,
)


@click.command("doctor")
@llama_bin_option()
@json_option()
def doctor_cmd(llama_bin: Path | None, as_json: bool) -> None:
    """Find the llama.cpp tools gguf-surgeon drives: path, version, or how to get each.

    Looks in --llama-bin, then the folder in $GGUF_SURGEON_LLAMA_BIN, then PATH. Exits 1 when
    a tool is missing.

    \b
    Example:
      gguf-surgeon doctor --llama-bin ~/llama.cpp/build/bin
    """
    records = doctor(llama_bin)
    missing = [r for r in records if not r.found]
    if as_json:
        emit_json({"tools": [r.to_dict() for r in records], "ok": not missing})
    else:
        # plain aligned lines, not a table: paths and versions must not be wrapped or cropped
        width = max(len(r.name) for r in records)
        for r in records:
            if r.found:
                version = str(r.version) if r.version else "version unknown"
                out_console.print(f"{r.name.ljust(width)}  [green]found[/]    {version}  {r.path} (via {r.found_via})")
            else:
                out_console.print(f"{r.name.ljust(width)}  [red]missing[/]  needed to {r.purpose}")
        if missing:
            out_console.print(f"Missing: {', '.join(r.name for r in missing)}. To get them, {HOW_TO_GET}.")
        else:
            out_console.print("All llama.cpp tools found.")
    if missing:
        raise SystemExit(1)


def split_types(values: tuple[str, ...]) -> tuple[str, ...]:
    """('Q8_0,Q6_K', 'Q4_K_M') -> ('Q8_0', 'Q6_K', 'Q4_K_M')."""
    return tuple(t for v in values for t in re.split(r"[,\s]+", v) if t)


def type_progress(enabled: bool = True) -> step_progress:
    """One bar per quantization type, counting tensors."""
    return step_progress(enabled, label=lambda qtype: f"quantizing {qtype} (tensors)")


@click.command("quantize")
@IN_ARG
@click.argument("extra", nargs=-1, metavar="[-- LLAMA_QUANTIZE_ARGS...]")
@click.option(
    "--types",
    "types",
    multiple=True,
    metavar="TYPES",
    help=f"Types to write, comma-separated or repeated (default: {','.join(DEFAULT_LADDER)}).",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for the outputs (default: IN's folder; created when missing).",
)
@click.option("--name", help="Output files are NAME-TYPE.gguf (default: IN's file name without .gguf).")
@click.option(
    "--imatrix",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Importance matrix (llama-imatrix GGUF or legacy .dat) passed to llama-quantize.",
)
@click.option("--recipe", help="The recipe that made IN from the imatrix's model: the imatrix is remapped through it.")
@click.option(
    "--allow-requantize",
    is_flag=True,
    help="Allow a quantized IN (quality loss compounds: quantize from F16/BF16 when you can).",
)
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Threads for llama-quantize (default: its own); with a target also for llama-perplexity (default: min(4, CPUs)).",
)
@click.option(
    "--tensor-type-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Per-tensor types (PATTERN=TYPE words, as llama-quantize reads them; e.g. a mix saved by --target-size).",
)
@click.option(
    "--target-size",
    metavar="SIZE",
    help="Instead of --types: the least-KLD type per tensor whose file fits SIZE (e.g. 90M); see docs/budget.md.",
)
@click.option(
    "--target-bpw",
    type=float,
    metavar="BITS",
    help="Instead of --types: the least-KLD type per tensor at most BITS bits per weight (e.g. 5.5).",
)
@budget_options
@click.option(
    "--held-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With a target: the text the result's KLD is measured on (default: the bundled text's last 70%).",
)
@llama_bin_option()
@json_option()
def quantize_cmd(
    source: Path,
    extra: tuple[str, ...],
    types: tuple[str, ...],
    out_dir: Path | None,
    name: str | None,
    imatrix: Path | None,
    recipe: str | None,
    allow_requantize: bool,
    force: bool,
    threads: int | None,
    tensor_type_file: Path | None,
    target_size: str | None,
    target_bpw: float | None,
    design: str,
    probe: str,
    candidates: str,
    calibration: Path | None,
    no_cache: bool,
    held_out: Path | None,
    llama_bin: Path | None,
    as_json: bool,
) -> None:
    """Quantize IN with llama-quantize, one NAME-TYPE.gguf per type, and report bits per weight,
    size and time of each. Arguments after -- go to llama-quantize unchanged. With --target-size
    or --target-bpw: measure IN's per-tensor sensitivity (cached), choose a type per tensor under
    the budget, write NAME-SIZE.gguf and its NAME-SIZE.tensor-types.txt, and report predicted and
    measured size and KL divergence (on text held out from the calibration text).

    \b
    Example:
      gguf-surgeon quantize out.gguf --types Q8_0,Q4_K_M --out-dir quants -- --leave-output-tensor
      gguf-surgeon quantize model-F16.gguf --target-size 90M --out-dir quants
    """
    from ..llama.quantize import quantize_ladder

    if target_size is not None or target_bpw is not None:
        from ..errors import OptionError

        clash = [
            opt
            for opt, given in (
                ("--types", types),
                ("--recipe", recipe),
                ("--tensor-type-file", tensor_type_file),
                ("llama-quantize arguments after --", extra),
                ("--target-size and --target-bpw together", target_size is not None and target_bpw is not None),
            )
            if given
        ]
        if clash:
            raise OptionError(f"--target-size/--target-bpw choose the types themselves; drop {clash[0]}")
        return quantize_budget_cmd(
            source,
            out_dir,
            name,
            allow_requantize=allow_requantize,
            imatrix=imatrix,
            force=force,
            target_size=target_size,
            target_bpw=target_bpw,
            design=design,
            probe=probe,
            candidates=candidates,
            calibration=calibration,
            held_out=held_out,
            eval_threads=threads,
            no_cache=no_cache,
            llama_bin=llama_bin,
            as_json=as_json,
        )

    with type_progress(enabled=not as_json) as progress:
        report = quantize_ladder(
            source,
            split_types(types) or DEFAULT_LADDER,
            out_dir,
            name=name,
            imatrix=imatrix,
            recipe=recipe,
            allow_requantize=allow_requantize,
            force=force,
            llama_bin=llama_bin,
            extra_args=extra,
            threads=threads,
            progress=progress,
            tensor_type_file=tensor_type_file,
        )
    if as_json:
        return emit_json(report.to_dict())
    render_quantize(report)


def quantize_budget_cmd(
    source: Path,
    out_dir: Path | None,
    name: str | None,
    *,
    allow_requantize: bool,
    imatrix: Path | None,
    force: bool,
    target_size: str | None,
    target_bpw: float | None,
    design: str,
    probe: str,
    candidates: str,
    calibration: Path | None,
    held_out: Path | None,
    eval_threads: int | None,
    no_cache: bool,
    llama_bin: Path | None,
    as_json: bool,
) -> None:
    """quantize --target-size / --target-bpw (options that choose types refused by the caller):
    allocate, write, measure, report."""
    from ..budget.allocate import quantize_to_budget
    from ..llama.quantize import default_name

    size = parse_size(target_size, "--target-size") if target_size is not None else None
    label = target_size.strip().replace(" ", "") if target_size is not None else f"{target_bpw:g}bpw"
    out = (out_dir or source.parent) / f"{name or default_name(source)}-{label}.gguf"
    with step_progress(enabled=not as_json) as progress:
        result = quantize_to_budget(
            source,
            out,
            target_size=size,
            target_bpw=target_bpw,
            design=design,
            probe=probe,
            candidates=candidates_of(candidates),
            options=eval_options_of(llama_bin, eval_threads, no_cache),
            calibration=read_calibration(calibration),
            held_out=read_calibration(held_out, "--held-out"),
            allow_requantize=allow_requantize,
            imatrix=imatrix,
            force=force,
            progress=progress,
        )
    if as_json:
        return emit_json(result.to_dict())
    a = result.allocation
    limit = f" ({format_size(a.limit)} of tensors)" if a.unit == "tensor bytes" else ""
    out_console.print(f"Wrote {result.out} for a budget of {result.target}{limit}, and its mix {result.types_file}:")
    table = Table("", "predicted", "measured", box=None, pad_edge=False)
    table.add_row("file size", f"{a.predicted_size:,} B", f"{result.size:,} B")
    table.add_row("bits/weight", "", f"{result.bits_per_weight:.3f}")
    kld = result.kld
    measured = "not measured" if kld is None else f"{kld.value:.4g} [{kld.low:.4g}, {kld.high:.4g}]"
    table.add_row("KL divergence", f"{a.predicted_kld:.4g} (calibration text)", f"{measured} (held-out text)")
    out_console.print(table)
    counts = ", ".join(f"{t} x{n}" for t, n in sorted(result.types.items(), key=lambda kv: -kv[1]))
    out_console.print(f"written types: {counts}")
    for m in result.mismatches:
        err_console.print(f"[yellow]warning:[/] written type differs from the prediction: {m}")


def render_quantize(report: Any) -> None:
    """Warnings, then one row per written type."""
    for w in report.warnings:
        err_console.print(f"[yellow]warning:[/] {w}")
    folders = {str(r.path.parent) for r in report.results}
    out_console.print(f"Quantized {report.source} into {', '.join(sorted(folders))}:")
    # file names only: full paths would be cropped in a narrow terminal
    table = Table("type", "bits/weight", "size", "time", "file", box=None, pad_edge=False)
    for r in report.results:
        table.add_row(r.type, f"{r.bits_per_weight:.2f}", format_size(r.size), f"{r.seconds:.1f} s", r.path.name)
    out_console.print(table)


@click.command("imatrix-remap")
@click.argument("recipe")
@click.argument("source", metavar="IN.imatrix", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("out", metavar="OUT.imatrix", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--model",
    "model",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The model the imatrix was computed on (gives the block count).",
)
@click.option("--force", is_flag=True, help="Overwrite OUT.imatrix.")
@json_option()
def imatrix_remap_cmd(recipe: str, source: Path, out: Path, model: Path, force: bool, as_json: bool) -> None:
    """Renumber an importance matrix's blk.N entries through a recipe, for quantizing the edited
    model; a blended block gets the weighted mean of its sources. Reads the GGUF and legacy
    .dat formats, writes GGUF.

    \b
    Example:
      gguf-surgeon imatrix-remap "delete 10; swap 11 12" base.imatrix out.imatrix --model base.gguf
    """
    from ..edit import plan_for
    from ..llama.imatrix import remap_file

    with Model(model) as m:
        plan = plan_for(m, recipe)
    report = remap_file(source, out, plan, force=force)
    if as_json:
        return emit_json(report.to_dict())
    blended = f"; blended blocks: {', '.join(map(str, report.blended))}" if report.blended else ""
    out_console.print(
        f"Wrote {report.out}: {report.entries_out} entries for {report.output_blocks} blocks "
        f"(from {report.entries_in} for {report.source_blocks}; {report.source_format} format in){blended}"
    )


COMMANDS: dict[str, click.Command] = {
    "doctor": doctor_cmd,
    "quantize": quantize_cmd,
    "imatrix-remap": imatrix_remap_cmd,
}
