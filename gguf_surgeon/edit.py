"""The library entry point for surgeries: recipe + input -> plan -> (dry-run report | output file)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PlanError
from .operations import build_plan
from .plan import LayerPlan, Step
from .reader import Model
from .recipe import load_recipe
from .surgery import Surgery, plan_surgery
from .vocab import GGMLQuantizationType
from .writer import Progress, WriteResult, check_output, layout, write_surgery


@dataclass(frozen=True)
class EditOptions:
    name: str | None = None  # general.name of the output; default: source name + recipe
    force: bool = False  # both of the next two (the CLI's --force)
    split_max_size: int | None = None  # bytes of tensor data per shard
    split_max_tensors: int | None = None
    alignment: int | None = None  # general.alignment of the output; default: the source's
    overwrite: bool = False  # replace an existing OUT
    allow_mismatch: bool = False  # write blocks into positions whose tensor set differs (dense <-> MoE)

    @property
    def may_overwrite(self) -> bool:
        return self.force or self.overwrite

    @property
    def may_mismatch(self) -> bool:
        return self.force or self.allow_mismatch


def plan_for(model: Model, recipe: str | tuple[Step, ...]) -> LayerPlan:
    steps = load_recipe(recipe) if isinstance(recipe, str) else recipe
    try:
        return build_plan(steps, len(model.blocks()))
    except PlanError as e:
        raise PlanError(f"{model.path}: {e}") from None


Computed = Mapping[str, tuple[GGMLQuantizationType, bytes]]  # output tensor name -> (type, bytes)


@dataclass(frozen=True)
class HealData:
    """A heal's corrected tensors and the `surgery.heal.*` values recording how they were made
    (computed in the periphery, by analysis.heal.compute_heal)."""

    tensors: Computed
    metadata: Mapping[str, str | int]


def prepare(
    model: Model, recipe: str | tuple[Step, ...], options: EditOptions = EditOptions(), heal: HealData | None = None
) -> Surgery:
    """Parse and check the recipe against the model; nothing is written."""
    return plan_surgery(
        model,
        plan_for(model, recipe),
        options.name,
        options.may_mismatch,
        options.alignment,
        heal.tensors if heal else None,
        heal.metadata if heal else None,
    )


def check_outputs(model: Model, surgery: Surgery, out: Path, options: EditOptions = EditOptions()) -> None:
    """What the writer would refuse (folder missing, OUT is IN, OUT exists), checked without writing."""
    for shard in layout(surgery, out, options.split_max_size, options.split_max_tensors):
        check_output(shard.path, [s.path for s in model.shards], options.may_overwrite)


def report(
    surgery: Surgery, out: Path | None = None, options: EditOptions = EditOptions(), result: WriteResult | None = None
) -> dict[str, Any]:
    """The JSON-able description of a surgery (the --dry-run and --json output)."""
    if result is not None:  # written: the writer already laid the output out
        size, files = result.size, [str(p) for p in result.paths]
    else:
        shards = layout(surgery, out or Path("out.gguf"), options.split_max_size, options.split_max_tensors)
        size, files = sum(s.size for s in shards), [str(s.path) for s in shards] if out else []
    data: dict[str, Any] = {
        "source": str(surgery.source),
        "recipe": surgery.plan.recipe,
        "source_blocks": surgery.plan.source_block_count,
        "output_blocks": len(surgery.plan.layers),
        "layers": [
            {"output": i, "source": src.describe(), "parts": [[b, w] for b, w in src.parts]}
            | ({"experts": list(src.experts)} if src.experts is not None else {})  # prune-experts: source experts kept
            for i, src in enumerate(surgery.plan.layers)
        ],
        "metadata_changes": [{"key": c.key, "old": c.old, "new": c.new} for c in surgery.changes],
        "warnings": list(surgery.warnings),
        "conversions": list(surgery.conversions),
        "heal_windows": [
            {"kept": w.kept, "deleted": list(w.deleted), "outputs": list(w.outputs)} for w in surgery.heal_windows
        ],
        "healed_tensors": [
            {
                "name": t.name,
                "type": t.ggml_type.name,
                "source": t.sources[0][0].name,
                "source_type": t.sources[0][0].ggml_type.name,
                "computed": t.is_computed,
            }
            for t in surgery.tensors
            if t.healed
        ],
        "output_size": size,
        "files": files,
    }
    if result is not None:
        data.update(written=True, copy_method=result.copy_method, seconds=round(result.seconds, 3))
    return data


def edit(
    source: str | Path,
    out: str | Path,
    recipe: str | tuple[Step, ...],
    options: EditOptions = EditOptions(),
    progress: Progress | None = None,
    heal: HealData | None = None,
) -> tuple[Surgery, WriteResult]:
    """Apply `recipe` to `source` and write `out` in one streaming pass; a recipe that heals a
    deletion needs `heal` (the corrected tensors, from analysis.heal.compute_heal)."""
    with Model(source) as model:
        surgery = prepare(model, recipe, options, heal)
        result = write_surgery(
            model,
            surgery,
            Path(out),
            force=options.may_overwrite,
            split_max_size=options.split_max_size,
            split_max_tensors=options.split_max_tensors,
            progress=progress,
        )
    return surgery, result
