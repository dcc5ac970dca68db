"""The release commands: release (edited GGUF, quant ladder, Modelfile, card), card, modelfile."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..files import format_size
from .common import (
    emit_json,
    err_console,
    json_option,
    llama_bin_option,
    out_console,
    parse_size,
    step_progress,
)

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
@click.option(
    "--target-size",
    metavar="SIZE",
    help="Also ship NAME-SIZE.gguf, the least-KLD type per tensor whose file fits SIZE (e.g. 90M; "
    "docs/budget.md), with each file's KLD on held-out text in the card (with --no-quantize: instead of the ladder).",
)
@click.option(
    "--inherit-costs",
    is_flag=True,
    help="With --target-size: each tensor's KLD cost from BASE's sensitivity (measured once per base, cached) "
    "instead of a sensitivity pass on the edit (docs/budget.md).",
)
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
@click.option(
    "--yardstick",
    is_flag=True,
    help="With --eval: place the edit's KLD on BASE's own quantization ladder (made and measured once per base).",
)
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
    target_size: str | None,
    inherit_costs: bool,
    allow_requantize: bool,
    benchmarks: Path | None,
    run_eval: bool,
    questions: int | None,
    yardstick: bool,
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
      gguf-surgeon release base-F16.gguf --recipe "delete 10" --out release/ --target-size 90M
    """
    from ..errors import ReleaseError
    from ..llama.quantize import DEFAULT_LADDER
    from ..release.folder import ReleaseOptions, release
    from ..release.ollama import parse_parameters
    from .llama import split_types

    if yardstick and not run_eval:
        raise ReleaseError("--yardstick: needs --eval (it places the eval's KL divergence on the base's ladder)")
    if inherit_costs and target_size is None:
        raise ReleaseError("--inherit-costs: needs --target-size (it chooses where the costs come from)")

    size = parse_size(target_size, "--target-size")
    options = ReleaseOptions(
        target_size=size,
        target_label=target_size.strip().replace(" ", "") if target_size is not None else None,
        inherit_costs=inherit_costs,
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
        yardstick=yardstick,
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
    bpw.update({r.file: r.bits_per_weight for r in report.rows})
    rows = {r.file: r for r in report.rows if r.kld is not None}
    if rows:
        table.add_column("KLD [95% CI]")
        table.add_column("beats")
    for fname, size in report.files:
        cells = [fname, format_size(size), f"{bpw[fname]:.2f}" if fname in bpw else ""]
        if rows:
            r = rows.get(fname)
            k = r.kld if r else None
            cells += [f"{k.value:.4f} [{k.low:.4f}, {k.high:.4f}]" if k else "", ", ".join(r.beats) if r else ""]
        table.add_row(*cells)
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


COMMANDS: dict[str, click.Command] = {c.name: c for c in (release_cmd, card_cmd, modelfile_cmd)}  # type: ignore[misc]
