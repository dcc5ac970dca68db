"""`gguf-surgeon data fetch` and `gguf-surgeon data list`: the benchmark data files that
`eval --bench` reads (evaluation.datasets)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json, json_option, out_console, step_progress

_NAMES = ("hellaswag", "winogrande", "arc-easy", "arc-challenge", "mmlu", "truthfulqa")

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Data folder (default: $GGUF_SURGEON_DATA, else $GGUF_SURGEON_CACHE/data, else ~/.cache/gguf-surgeon/data).",
)


@click.group("data")
def data_group() -> None:
    """Benchmark data for `eval --bench`: fetch the files llama.cpp's own scripts use and list
    what the data folder holds.

    \b
    Example:
      gguf-surgeon data fetch hellaswag
    """


@data_group.command("fetch")
@click.argument("names", nargs=-1, required=True, type=click.Choice(_NAMES))
@data_dir_option
@click.option("--url", help="Download from this address instead (a mirror; the same checks apply). One NAME only.")
@json_option("Print what was fetched as JSON.")
def fetch_cmd(names: tuple[str, ...], data_dir: Path | None, url: str | None, as_json: bool) -> None:
    """Download benchmark data into the data folder: HellaSwag (checked against its pinned
    SHA-256), WinoGrande, ARC-Easy, ARC-Challenge, MMLU, TruthfulQA (llama.cpp pins no
    checksum for these: every task is parsed as llama-perplexity reads it and the SHA-256 is
    recorded). A cut transfer is resumed; a file that fails its check is not kept.

    \b
    Example:
      gguf-surgeon data fetch hellaswag winogrande --data-dir ~/bench-data
    """
    from ..evaluation.datasets import fetch

    if url and len(names) > 1:
        raise click.UsageError("--url names one file: give one NAME")
    results = []
    with step_progress(enabled=not as_json) as progress:
        for name in names:
            results.append(
                fetch(name, data_dir, url, progress=lambda done, total, n=name: progress(f"{n}", done, total))
            )
    if as_json:
        return emit_json([r.to_dict() for r in results])
    for r in results:
        out_console.print(f"{r.name}: {r.path} ({r.size:,} bytes; {r.check}; SHA-256 {r.sha256})")


@data_group.command("list")
@data_dir_option
@json_option("Print the list as JSON.")
def list_cmd(data_dir: Path | None, as_json: bool) -> None:
    """List the benchmark data sets, where each is, and whether it passes its check.

    \b
    Example:
      gguf-surgeon data list
    """
    from ..evaluation.datasets import listing

    files = listing(data_dir)
    if as_json:
        return emit_json([f.to_dict() for f in files])
    for f in files:
        where = f"{f.path} ({f.size:,} bytes)" if f.present else f"absent: gguf-surgeon data fetch {f.name}"
        out_console.print(f"{f.name:<14} {where}; {f.check}" if f.present else f"{f.name:<14} {where}")


COMMANDS: dict[str, click.Command] = {"data": data_group}
