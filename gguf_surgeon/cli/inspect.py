"""`gguf-surgeon inspect`, `diff` and `verify`: read GGUF files, report, write nothing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import RecipeError
from ..files import format_size
from ..metadata import RECIPE_KEY
from ..reader import Model
from .common import emit_json, json_option, out_console


@click.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--layers", is_flag=True, help="Add a per-block table.")
@click.option("--tensors", is_flag=True, help="Add every tensor with shape, type, size and offset.")
@click.option("--meta", is_flag=True, help="Add every metadata key (long arrays previewed).")
@json_option()
def inspect(model: Path, layers: bool, tensors: bool, meta: bool, as_json: bool) -> None:
    """Summarize a GGUF: architecture, sizes, tokenizer, chat template, types.

    \b
    Example:
      gguf-surgeon inspect model.gguf --layers
    """
    from ..inspection import layer_table, metadata_table, summarize, tensor_table

    with Model(model) as m:
        s = summarize(m)
        data: dict[str, Any] = s.to_dict()
        if layers:
            data["layers"] = [l.__dict__ for l in layer_table(m)]
        if tensors:
            data["tensors"] = tensor_table(m)
        if meta:
            data["metadata"] = metadata_table(m)
    if as_json:
        return emit_json(data)
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    tmpl = s.chat_template
    rows = [
        ("file", f"{s.path} (GGUF v{s.version}" + (f", {s.shards} shards)" if s.shards > 1 else ")")),
        ("name", s.name),
        ("architecture", s.architecture),
        (
            "blocks",
            f"{s.block_count}"
            + ("" if s.block_count_key == s.block_count else f" (block_count key says {s.block_count_key})"),
        ),
        ("embedding", s.embedding_length),
        ("feed-forward", s.feed_forward_length),
        ("heads / kv heads", f"{s.head_count} / {s.head_count_kv}"),
        ("context", s.context_length),
        ("rope base", s.rope_freq_base),
        ("vocab", s.vocab_size),
        ("tokenizer", f"{s.tokenizer_model} / {s.tokenizer_pre}"),
        (
            "chat template",
            "none"
            if tmpl is None
            else f"sha256 {tmpl.sha256}, {tmpl.length} chars, thinking switch: {'yes' if tmpl.thinking_switch else 'no'}",
        ),
        ("template starts", None if tmpl is None else tmpl.first_line),
        ("file type", s.file_type),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in s.tensor_types.items())),
        ("parameters", f"{s.parameters:,} ({s.parameters / 1e9:.3f} B)"),
        ("size", f"{format_size(s.file_bytes)} ({s.tensor_count} tensors, {s.metadata_keys} keys)"),
    ]
    for k, v in rows:
        if v is not None:
            t.add_row(f"[bold]{k}[/]", str(v))
    out_console.print(t)
    if layers:
        lt = Table("block", "tensors", "parameters", "size", "types", box=None)
        for l in data["layers"]:
            lt.add_row(
                str(l["index"]),
                str(l["tensors"]),
                f"{l['parameters']:,}",
                format_size(l["bytes"]),
                ", ".join(f"{k} x{v}" for k, v in l["types"].items()),
            )
        out_console.print(lt)
    if tensors:
        tt = Table("tensor", "shape", "type", "size", box=None)
        for r in data["tensors"]:
            tt.add_row(r["name"], "x".join(map(str, r["shape"])), r["type"], format_size(r["bytes"]))
        out_console.print(tt)
    if meta:
        mt = Table("key", "type", "value", box=None)
        for r in data["metadata"]:
            v = repr(r["value"])
            if r["count"] > 1 and isinstance(r["value"], list) and len(r["value"]) < r["count"]:
                v = v[:-1] + f", ... ({r['count']} items)]"
            mt.add_row(r["key"], r["type"], v if len(v) < 300 else v[:300] + "...")
        out_console.print(mt)


@click.command()
@click.argument("a", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("b", type=click.Path(path_type=Path, dir_okay=False))
@json_option()
def diff(a: Path, b: Path, as_json: bool) -> None:
    """Metadata differences, and B's blocks in terms of A's (by tensor hashes) as a recipe.

    \b
    Example:
      gguf-surgeon diff base.gguf edited.gguf
    """
    from ..diff import diff_models

    with Model(a) as ma, Model(b) as mb:
        d = diff_models(ma, mb)
    if as_json:
        return emit_json(d.to_dict())
    out_console.print("Metadata:" if d.metadata else "Metadata: identical")
    for k in d.metadata:
        if k.b is None:
            out_console.print(f"  - {k.key} = {k.a!r}")
        elif k.a is None:
            out_console.print(f"  + {k.key} = {k.b!r}")
        else:
            out_console.print(f"  ~ {k.key}: {k.a!r} -> {k.b!r}")
    out_console.print("Blocks of B from A: " + " ".join("?" if i is None else str(i) for i in d.block_map))
    if d.globals_changed:
        out_console.print("Non-block tensors that differ: " + ", ".join(d.globals_changed))
    unmatched = [i for i, s in enumerate(d.block_map) if s is None]
    if d.recipe:
        out_console.print(f"Recipe: {d.recipe}")
    else:
        out_console.print(f"Recipe: none (B's blocks {unmatched} match no block of A: blended or new weights)")


@click.command("verify")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--against", type=click.Path(path_type=Path, dir_okay=False), help="The source MODEL was made from.")
@click.option("--recipe", help="The recipe MODEL was made with (default: its surgery.recipe key).")
@json_option()
def verify_cmd(model: Path, against: Path | None, recipe: str | None, as_json: bool) -> None:
    """Check the rules llama.cpp's loader enforces; with --against, byte identity with the source.

    Exits 1 when a check fails.

    \b
    Example:
      gguf-surgeon verify out.gguf --against in.gguf --recipe "delete 10; swap 11 12"
    """
    from ..edit import plan_for
    from ..verify import verify

    if recipe is not None and against is None:
        raise click.UsageError("--recipe needs --against (the source the recipe was applied to)")
    with Model(model) as m:
        if against is not None:
            recipe = recipe or m.value(RECIPE_KEY)
            if not recipe:
                raise RecipeError(f"{model}: no {RECIPE_KEY} key; pass --recipe")
            with Model(against) as src:
                v = verify(m, src, plan_for(src, recipe))
        else:
            v = verify(m)
    if as_json:
        emit_json(v.to_dict())
    else:
        for f in v.findings:
            out_console.print(f"{'[green]ok[/]  ' if f.ok else '[red]FAIL[/]'} {f.rule}: {f.detail}")
        out_console.print("verified: all checks passed" if v.ok else "verification failed")
    if not v.ok:
        sys.exit(1)


COMMANDS: dict[str, click.Command] = {"inspect": inspect, "diff": diff, "verify": verify_cmd}
