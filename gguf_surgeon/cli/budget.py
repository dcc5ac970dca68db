"""The size-budget commands: sensitivity (in COMMANDS, loaded lazily by `cli.SurgeonGroup`);
`quantize --target-size` lives with quantize in cli/llama.py and calls budget.allocate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from .common import IN_ARG, emit_json, json_option, llama_bin_option, option_group, out_console, step_progress

DESIGN_HELP = (
    "batched: one probe per block and per tensor kind, split by fitting (default); each: one probe per tensor."
)


# Options of the sensitivity measurement, shared by sensitivity and quantize --target-size.
budget_options = option_group(
    click.option("--design", type=click.Choice(["batched", "halves", "each"]), default="batched", help=DESIGN_HELP),
    click.option("--probe", default="Q3_K", show_default=True, help="The low type each probe puts its tensors at."),
    click.option(
        "--candidates",
        default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,F16",
        show_default=True,
        help="Types a tensor may be given (llama-quantize's fallbacks apply where rows do not fit).",
    ),
    click.option(
        "--calibration",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Calibration text file for the sensitivity (default: the first 30% of the bundled text).",
    ),
    click.option("--no-cache", is_flag=True, help="Measure again and keep nothing."),
)


def eval_options_of(llama_bin: Path | None, threads: int | None, no_cache: bool) -> Any:
    from ..evaluation.suite import EvalOptions, default_threads

    return EvalOptions(llama_bin=llama_bin, threads=threads or default_threads(), use_cache=not no_cache)


def read_calibration(path: Path | None, option: str = "--calibration") -> str | None:
    """The text of a --calibration / --held-out file (None: the bundled text's part)."""
    if path is None:
        return None
    from ..errors import OptionError
    from ..files import read_text

    text = read_text(path, OptionError, "text file", label=f"{option} {path}")
    if not text.strip():
        raise OptionError(f"{option} {path}: empty")
    return text


def candidates_of(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.replace(" ", ",").split(",") if t)


@click.command("sensitivity")
@IN_ARG
@budget_options
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a PNG heat map, blocks x tensor kinds (needs matplotlib: pip install 'gguf-surgeon[plot]').",
)
@click.option(
    "--imatrix",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Importance matrix of IN (llama-imatrix GGUF or .dat): the probes are quantized with it, as "
    "quantize --target-size --imatrix writes the mix.",
)
@click.option("--allow-requantize", is_flag=True, help="Allow a quantized IN (measure from F16/BF16 when you can).")
@click.option(
    "--threads",
    "eval_threads",
    type=click.IntRange(min=1),
    help="llama.cpp threads (default: min(4, CPUs)); results are cached per thread count.",
)
@llama_bin_option()
@json_option()
def sensitivity_cmd(
    source: Path,
    design: str,
    probe: str,
    candidates: str,
    calibration: Path | None,
    no_cache: bool,
    plot: Path | None,
    imatrix: Path | None,
    allow_requantize: bool,
    eval_threads: int | None,
    llama_bin: Path | None,
    as_json: bool,
) -> None:
    """Measure how much KL divergence to IN each tensor costs when quantized to the probe type
    (the rest at F16), on the calibration part of the bundled text, through llama-quantize
    --tensor-type-file and llama-perplexity. Cached per IN's hash; quantize --target-size uses it.

    \b
    Example:
      gguf-surgeon sensitivity model-F16.gguf --plot sensitivity.png
    """
    from ..budget.sensitivity import measure_sensitivity, plot_sensitivity
    from ..errors import OptionError

    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise OptionError(f"--plot {plot}: write a .png, .svg or .pdf file")
    with step_progress(enabled=not as_json) as progress:
        sens = measure_sensitivity(
            source,
            design=design,
            probe=probe,
            candidates=candidates_of(candidates),
            calibration=read_calibration(calibration),
            options=eval_options_of(llama_bin, eval_threads, no_cache),
            allow_requantize=allow_requantize,
            progress=progress,
            imatrix=imatrix,
        )
    data = sens.to_dict()
    if plot is not None:
        data["plot"] = str(plot_sensitivity(sens, plot))
    if as_json:
        return emit_json(data)
    render_sensitivity(sens, plot)


def _sci(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.1e}"


def render_sensitivity(sens: Any, plot: Path | None) -> None:
    from ..budget.sensitivity import cost_grid

    rows, kinds, grid = cost_grid(sens)
    cached = " (cached)" if sens.cached else f" in {sens.seconds:.0f} s"
    out_console.print(
        f"{Path(sens.model).name}: KL divergence (nats/token) of each tensor alone at {sens.probe}, the rest "
        f"F16, on {sens.calibration_tokens} calibration tokens; {sens.design} design, "
        f"{len(sens.measurements)} probes{cached}"
    )
    table = Table("", *kinds, box=None, pad_edge=False)
    for label, row in zip(rows, grid):
        table.add_row(label, *(_sci(v) for v in row))
    out_console.print(table)
    out_console.print(
        f"all tensors at {sens.probe} at once: {sens.joint_kld:.4g}; sum of the parts: {sens.parts_sum:.4g} "
        f"(ratio {sens.additivity:.2f}: 1 means the costs add up exactly)"
    )
    if plot is not None:
        out_console.print(f"Heat map: {plot}")


COMMANDS: dict[str, click.Command] = {"sensitivity": sensitivity_cmd}
