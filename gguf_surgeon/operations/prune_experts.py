"""prune-experts N [--keep LISTS | --keep-file PATH | --by CRITERION]: keep N experts in every MoE block.

The experts to keep are explicit: `--keep` holds one comma list per block at this step, the
blocks separated by '/' ("0-3,6/1,2,4,7"; '-' leaves a block as it is, e.g. a dense one), or
`--keep-file` names a JSON or TOML file mapping block -> list. Indices count the block's
experts as the previous steps left them. Without either, the command line ranks the experts
(`--by`: REAP saliency by default) and fills the lists in (the core never ranks); the text
recorded in surgery.recipe holds the lists, so it replays exactly.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import PlanError, RecipeError
from ..files import read_text, read_toml
from .base import Layers, Operation, Param, expect_count, format_layer_spec, parse_layer_spec, split_options

USAGE = "prune-experts N [--keep E,E,../E,E,../.. | --keep-file PATH | --by saliency|frequency|contribution]"
CRITERIA = ("saliency", "frequency", "contribution")  # how the command line ranks experts when no lists are given

KeepLists = tuple[tuple[int, ...] | None, ...]


class PruneExperts(NamedTuple):
    count: int  # experts every MoE block keeps
    # per block at this step: experts kept (ascending; None: block untouched); None: not chosen yet
    keep: KeepLists | None
    by: str = "saliency"  # the ranking the command line keeps the top N of, when keep is None (one of CRITERIA)


def _count(tok: str) -> int:
    try:
        n = int(tok)
    except ValueError:
        raise RecipeError(f"{tok!r} is not an expert count") from None
    if n < 1:
        raise RecipeError(f"prune-experts {n}: keep at least one expert")
    return n


def _one_block(value: Any, where: str) -> tuple[int, ...] | None:
    """One block's list: a layer spec ("0-3,6"), a list of ints, or '-'/None (untouched)."""
    if value is None or value == "-":
        return None
    if isinstance(value, str):
        return tuple(sorted(set(parse_layer_spec(value))))
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        if len(set(value)) != len(value):
            raise RecipeError(f"{where}: an expert is listed twice")
        return tuple(sorted(value))
    raise RecipeError(f"{where}: expected a list of expert indices, got {value!r}")


def parse_keep(text: str) -> KeepLists:
    """'0-3/1,2,4,5/-' -> ((0, 1, 2, 3), (1, 2, 4, 5), None)."""
    lists = []
    for n, part in enumerate(text.split("/")):
        try:
            lists.append(_one_block(part.strip(), f"--keep block {n}"))
        except RecipeError as e:
            raise RecipeError(f"--keep block {n}: {e}") from None
    return _trimmed(lists)


def _trimmed(lists: list[tuple[int, ...] | None]) -> KeepLists:
    while lists and lists[-1] is None:
        lists.pop()
    return tuple(lists)


def read_keep_file(path: Path) -> KeepLists:
    """A keep file: JSON or TOML; a table block -> list (optionally under "experts"), or (JSON) a
    list with one entry per block (null: untouched)."""
    if path.suffix.lower() == ".json":
        text = read_text(path, RecipeError, "keep file")
        try:
            data: Any = json.loads(text)
        except ValueError as e:
            raise RecipeError(f"{path}: not valid JSON: {e}") from None
    else:
        data = read_toml(path, RecipeError, noun="keep file")
    if isinstance(data, dict) and "experts" in data:
        data = data["experts"]
    if isinstance(data, list):
        return _trimmed([_one_block(v, f"{path}: block {i}") for i, v in enumerate(data)])
    if not isinstance(data, dict) or not data:
        raise RecipeError(f"{path}: expected a table of block -> expert list (e.g. 0 = [0, 2, 5, 7])")
    by_block: dict[int, tuple[int, ...] | None] = {}
    for key, value in data.items():
        if not str(key).isdigit():
            raise RecipeError(f"{path}: {key!r} is not a block index")
        by_block[int(key)] = _one_block(value, f"{path}: block {key}")
    return _trimmed([by_block.get(i) for i in range(max(by_block) + 1)])


def parse(tokens: list[str]) -> PruneExperts:
    pos, opts = split_options(tokens, {"keep", "keep-file", "by"})
    expect_count(pos, 1, USAGE)
    count = _count(pos[0])
    if "keep" in opts and "keep-file" in opts:
        raise RecipeError("--keep and --keep-file exclude each other")
    by = opts.get("by", "saliency")
    if by not in CRITERIA:
        raise RecipeError(f"--by {by!r}: rank experts by one of {', '.join(CRITERIA)}")
    if "by" in opts and ("keep" in opts or "keep-file" in opts):
        raise RecipeError("--by ranks the experts; --keep/--keep-file name them: give one")
    keep = None
    if "keep" in opts:
        keep = parse_keep(opts["keep"])
    elif "keep-file" in opts:
        keep = read_keep_file(Path(opts["keep-file"]))
    if keep is not None:
        for i, kept in enumerate(keep):
            if kept is not None and len(kept) != count:
                raise RecipeError(f"block {i} keeps {len(kept)} experts, not {count}")
        if all(k is None for k in keep):
            raise RecipeError("the keep lists name no block")
    return PruneExperts(count, keep, by)


def apply(args: PruneExperts, layers: Layers) -> Layers:
    if args.keep is None:
        raise PlanError(
            f"prune-experts {args.count}: which experts to keep is not given (--keep or --keep-file); "
            "the writer commands (prune-experts, apply, plan) rank them themselves; elsewhere give the lists"
        )
    if len(args.keep) > len(layers):
        raise PlanError(f"the keep lists name block {len(args.keep) - 1}; the model has {len(layers)} at this step")
    out = list(layers)
    for i, kept in enumerate(args.keep):
        if kept is None:
            continue
        layer = layers[i]
        if not layer.is_copy:
            raise PlanError(f"block {i} is a blend; prune-experts keeps experts of copied blocks only")
        if layer.experts is not None:  # pruned before: indices count the experts left
            if kept[-1] >= len(layer.experts):
                raise PlanError(f"block {i} has {len(layer.experts)} experts at this step; no expert {kept[-1]}")
            kept = tuple(sorted(layer.experts[k] for k in kept))
        out[i] = replace(layer, experts=kept)
    return tuple(out)


def canonical(args: PruneExperts) -> str:
    if args.keep is None:
        return str(args.count) + ("" if args.by == "saliency" else f" --by {args.by}")
    lists = "/".join("-" if k is None else format_layer_spec(k) for k in args.keep)
    return f"{args.count} --keep {lists}"


OPERATION = Operation(
    name="prune-experts",
    usage=USAGE,
    summary="keep N experts in every mixture-of-experts block (byte slices, no requantization)",
    parse=parse,
    apply=apply,
    canonical=canonical,
    describe=lambda a: f"**Prune experts** to {a.count} per mixture-of-experts layer",
    params=(
        Param("count"),
        Param("keep", "option", "Experts to keep: one list per block, blocks separated by '/' ('-': untouched)."),
        Param("keep-file", "option", "JSON or TOML file: block -> list of experts to keep."),
        Param(
            "by",
            "option",
            "Without lists, keep the top COUNT by: saliency (REAP: mean gate weight x output norm over "
            "routed tokens; the default), frequency (routed tokens) or contribution (frequency x saliency).",
        ),
    ),
    help="Keep COUNT experts in every mixture-of-experts block: the top COUNT by REAP saliency "
    "(router weight x expert output norm, measured with the numpy reference on a calibration text), "
    "or the lists of --keep/--keep-file.",
    example="gguf-surgeon prune-experts 96 in.gguf out.gguf",
)
