"""search --target-size: layer deletions and per-tensor types under one fixed file-size budget.

For each candidate surgery (the base itself first), the allocator of budget.allocate chooses a
type per tensor of the edited model under the same budget, so the bytes a deleted block frees go
to the other tensors; the written mix is measured by its KL divergence to the **base** on the
held-out text. The base's uniform llama-quantize types are measured on the same text as
reference rows, and the table is marked with its Pareto front over (file size, KLD).

Each candidate's sensitivity is measured on the candidate itself (cached per file hash), which is
honest but costs a full sensitivity pass per candidate (docs/budget.md gives the cost).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..budget.allocate import quantize_to_budget
from ..budget.sensitivity import bundled_texts, text_options
from ..edit import EditOptions, edit
from ..evaluation.records import Estimate
from ..evaluation.runner import kl_divergence
from ..evaluation.suite import DEFAULT_OPTIONS, EvalOptions
from ..files import format_size
from ..llama.quantize import quantize_ladder
from ..records import Record

UNIFORM = ("Q3_K_M", "Q4_K_M", "Q5_K_M")  # the base's uniform mixes drawn as reference rows
FrontProgress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass(frozen=True)
class FrontPoint(Record):
    """One measured file: an allocated mix of a candidate surgery, or a uniform type of the base."""

    label: str  # "uniform Q4_K_M", "no surgery", or the recipe
    recipe: str | None  # None for a uniform row; "" for the base allocated as it is
    size: int  # file bytes, read from the written file
    bits_per_weight: float
    kld: Estimate  # KL(base || file) on the held-out text, 95% interval over chunks
    on_front: bool  # no other row is at most as large and as far from the base, and better in one


@dataclass(frozen=True)
class BudgetFront(Record):
    base: Path
    target: str  # as given, e.g. "90M"
    limit: int  # file bytes
    points: tuple[FrontPoint, ...]  # the allocated candidates in order, then the uniform rows
    kld_text: str


def pareto(points: Sequence[tuple[int, float]]) -> list[bool]:
    """For each (size, kld): whether no other point is at most as large and as far, and better in one."""
    return [
        not any(s2 <= s and k2 <= k and (s2 < s or k2 < k) for j, (s2, k2) in enumerate(points) if j != i)
        for i, (s, k) in enumerate(points)
    ]


def budget_front(
    base: str | Path,
    target_size: int,
    recipes: Sequence[str],
    *,
    target_label: str | None = None,
    uniform: Sequence[str] = UNIFORM,
    options: EvalOptions = DEFAULT_OPTIONS,
    calibration: str | None = None,
    held_out: str | None = None,
    allow_requantize: bool = False,
    progress: FrontProgress | None = None,
) -> BudgetFront:
    """Allocate `base` and each `recipes` edit of it under `target_size` file bytes, measure every
    mix and each `uniform` type of `base` against `base` on the held-out text, mark the Pareto
    front. A budget the base cannot meet is refused before any measuring (budget.allocate)."""
    base = Path(base)
    step = progress or (lambda s, d, n: None)
    held_name = "the held-out text given" if held_out is not None else "the held-out part of the bundled eval text"
    text = bundled_texts()[1] if held_out is None else held_out
    rows: list[tuple[str, str | None, int, float, Estimate]] = []
    todo = ("", *recipes)
    with tempfile.TemporaryDirectory(prefix="gguf-surgeon-budget-search-") as work_dir:
        work = Path(work_dir)
        kld_options = text_options(options, text, work)
        for i, recipe in enumerate(todo):
            step(f"candidate {recipe or 'no surgery'}: sensitivity, allocation, KLD", i, len(todo))
            source = base
            if recipe:
                source = work / f"candidate-{i}.gguf"
                edit(base, source, recipe, EditOptions(name=f"candidate-{i}", overwrite=True))
            mix = quantize_to_budget(
                source,
                work / f"mix-{i}.gguf",
                target_size=target_size,
                options=options,
                calibration=calibration,
                measure_kld=False,
                allow_requantize=allow_requantize,
                force=True,
            )
            kld = kl_divergence(mix.out, base, kld_options).mean
            rows.append((recipe or "no surgery", recipe, mix.size, mix.bits_per_weight, kld))
            for p in (mix.out, mix.types_file) + ((source,) if recipe else ()):
                p.unlink(missing_ok=True)
        if uniform:
            step("the base's uniform types", len(todo), len(todo) + 1)
            ladder = quantize_ladder(
                base,
                tuple(uniform),
                work,
                name="uniform",
                allow_requantize=allow_requantize,
                llama_bin=options.llama_bin,
                threads=options.threads,
                force=True,
            )
            for r in ladder.results:
                rows.append(
                    (
                        f"uniform {r.type}",
                        None,
                        r.size,
                        r.bits_per_weight,
                        kl_divergence(r.path, base, kld_options).mean,
                    )
                )
    front = pareto([(size, kld.value) for _, _, size, _, kld in rows])
    points = tuple(FrontPoint(*row, on) for row, on in zip(rows, front))
    return BudgetFront(base, target_label or format_size(target_size), target_size, points, held_name)
