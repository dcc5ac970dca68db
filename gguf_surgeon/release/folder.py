"""Ship an edited model: the release folder (edited GGUF, quant ladder, Modelfile, README.md).

    release("base.gguf", "delete 10; swap 11 12", "out/")   # edited GGUF + ladder + Modelfile + README.md

The Modelfile is built by release.ollama, the card by release.card.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import OutputError, ReleaseError
from ..files import signals_deferred, write_text_atomic
from ..llama.quantize import DEFAULT_LADDER, QuantizeReport, QuantProgress, default_name, quantize_ladder
from ..reader import Model
from .card import CardOptions, QuantFile, _md, model_card
from .ollama import MODELFILE, build_modelfile

README = "README.md"


@dataclass(frozen=True)
class ReleaseOptions:
    name: str | None = None  # file and model name (default: the base's file name + "-edited")
    types: tuple[str, ...] = DEFAULT_LADDER  # the quant ladder; () for none
    allow_requantize: bool = False  # the base is quantized (quality loss compounds)
    llama_bin: Path | None = None
    force: bool = False  # write into a non-empty folder, overwrite files
    base_model: str | None = None  # Hugging Face id for the card
    author: str | None = None
    benchmarks: str | None = None  # Markdown table for the card
    evaluate: bool = False  # run the eval suite (base vs edited) for the benchmark table
    eval_questions: int | None = None  # with evaluate: ask only the first N questions
    yardstick: bool = False  # with evaluate: place the edit's KLD on the base's quantization ladder
    eval_benches: tuple = ()  # with evaluate: evaluation.benchmarks.BenchSpec each, added to the eval
    eval_threads: int | None = None  # with evaluate: llama.cpp threads (default: the suite's; part of cache keys)
    parameters: Mapping[str, str] = field(default_factory=dict)  # Modelfile PARAMETER overrides
    system: str | None = None  # Modelfile SYSTEM
    methodology: str | None = None
    target_size: int | None = None  # ship a per-tensor mix allocated under this many file bytes (budget.allocate)
    target_label: str | None = None  # its file-name part, NAME-LABEL.gguf (default: the bytes + "B")
    budget_options: Any = None  # with target_size: EvalOptions of the sensitivity and KLD runs (default: the suite's)
    budget_texts: tuple[str, str] | None = None  # with target_size: (calibration, held-out) texts (default: bundled)
    inherit_costs: bool = False  # with target_size: the edit's tensor costs from the base's sensitivity (not measured)


@dataclass(frozen=True)
class ReleaseReport:
    out_dir: Path
    edited: Path
    quants: QuantizeReport | None
    modelfile: Path
    readme: Path
    benchmarks: bool  # the card has a benchmark table
    files: tuple[tuple[str, int], ...]  # (file name, size) of everything written
    budget: Any = None  # with target_size: budget.allocate.BudgetResult of the shipped mix
    rows: tuple[QuantFile, ...] = ()  # the card's quantization rows (the mix first, with KLDs under a budget)

    def to_dict(self) -> dict:
        return {
            "budget": self.budget.to_dict() if self.budget else None,
            "rows": [r.to_dict() for r in self.rows],
            "out_dir": str(self.out_dir),
            "edited": str(self.edited),
            "modelfile": str(self.modelfile),
            "readme": str(self.readme),
            "benchmarks": self.benchmarks,
            "quantized": self.quants.to_dict() if self.quants else None,
            "files": [{"file": n, "size": s} for n, s in self.files],
        }


ReleaseProgress = Callable[[str], None]  # a step starting: "editing", "quantizing", ...


def default_release_name(base: Path) -> str:
    """The base's file name without .gguf and a trailing quant type, plus '-edited'."""
    stem = default_name(base)
    stem = re.sub(r"[.-](F32|F16|BF16|Q\d(_[A-Z0-9]+)*|IQ\d\w*)$", "", stem, flags=re.IGNORECASE)
    return f"{stem}-edited"


def benchmark_markdown(base: Path, edited: Path, options: Any = None, yardstick: bool = False) -> str:
    """The base-vs-edited table of the eval suite (evaluation.runner.compare with `options`, an
    EvalOptions; default: the suite's) as Markdown, then the verdict: each measure's difference
    with its interval, test, smallest detectable difference and verdict; with `yardstick`, the
    KLD's place on the base's quantization ladder (measured on the same text)."""
    from ..evaluation.report import comparison_table, markdown_table, measure_lines, verdict_lines
    from ..evaluation.runner import compare
    from ..evaluation.suite import DEFAULT_OPTIONS

    options = options or DEFAULT_OPTIONS
    reports = compare([base, edited], options)
    versus = reports[1].versus_base
    assert versus is not None
    header, rows = comparison_table(reports)
    place = None
    if yardstick:
        from ..evaluation.yardstick import yardstick as base_ladder

        place = base_ladder(base, options).place(versus.kld.mean.value)
        rows.append(["KLD on the base's ladder", "—", place])
    header = [header[0]] + [f"{_md(h)} (base)" if i == 0 else f"**{_md(h)}**" for i, h in enumerate(header[1:])]
    head, *rest = verdict_lines(versus)
    lines = [markdown_table(header, rows), "", f"**{head}**", ""]
    lines += [f"- {_md(line)}" for line in measure_lines(versus.differences)]
    if place is not None:
        k = versus.kld.mean
        lines.append(f"- {_md(f'KL divergence {k.value:.4f} [{k.low:.4f}, {k.high:.4f}] nats/token costs {place}')}")
    lines += [f"- {_md(line)}" for line in rest if line.startswith("This suite")]
    return "\n".join(lines)


def release(
    base: str | Path,
    recipe: str,
    out_dir: str | Path,
    options: ReleaseOptions = ReleaseOptions(),
    progress: ReleaseProgress | None = None,
    quant_progress: QuantProgress | None = None,
) -> ReleaseReport:
    """Write a release folder: NAME.gguf (the edit of `base` by `recipe`), NAME-TYPE.gguf for
    each ladder type, Modelfile (FROM the first ladder file) and README.md (the card).

    `out_dir` is created; an existing non-empty folder needs `force`. Raises the editor's,
    quantizer's and evaluator's errors, and ReleaseError/OutputError.
    """

    base, out_dir = Path(base), Path(out_dir)
    name = options.name or default_release_name(base)
    if not re.fullmatch(r"[\w.+-]+", name):
        raise ReleaseError(f"--name {name!r}: use letters, digits, '.', '_', '+' and '-' only (it names files)")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not options.force:
        raise OutputError(f"{out_dir}: folder is not empty; pass --force to write into it")
    label = options.target_label or (f"{options.target_size}B" if options.target_size is not None else None)
    if label is not None and not re.fullmatch(r"[\w.+-]+", label):
        raise ReleaseError(f"--target-size label {label!r}: use letters, digits, '.', '_', '+' and '-' only")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the folder: {e.strerror or e}") from None
    before = set(out_dir.iterdir())
    try:  # an error or a signal leaves the folder as it was: what this release wrote is removed
        return _write_release(base, recipe, out_dir, name, label, options, progress, quant_progress)
    except BaseException:
        with signals_deferred():
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                for path in set(out_dir.iterdir()) - before:
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        raise


def _write_release(
    base: Path,
    recipe: str,
    out_dir: Path,
    name: str,
    label: str | None,
    options: ReleaseOptions,
    progress: ReleaseProgress | None,
    quant_progress: QuantProgress | None,
) -> ReleaseReport:
    """The body of `release`, into an existing `out_dir`."""
    from ..edit import EditOptions, edit, prepare

    step = progress or (lambda s: None)

    edited = out_dir / f"{name}.gguf"
    edit_options = EditOptions(name=name, overwrite=options.force)
    heal = None
    with Model(base) as model:
        surgery = prepare(model, recipe, edit_options)
    if surgery.heal_windows:  # a healed deletion: calibrated as search's candidates are (bundled text, auto)
        from ..analysis.heal import compute_heal

        step("calibrating the heal")
        heal = compute_heal(base, surgery, llama_bin=options.llama_bin).data
    step("editing")
    edit(base, edited, recipe, edit_options, heal=heal)
    budget = None
    if options.target_size is not None:
        step("allocating a mix under the budget")
        budget = _ship_budget(base, recipe, edited, out_dir / f"{name}-{label}.gguf", options)
    quants = None
    if options.types:
        step("quantizing")
        quants = quantize_ladder(
            edited,
            options.types,
            out_dir,
            name=name,
            allow_requantize=options.allow_requantize,
            force=options.force,
            llama_bin=options.llama_bin,
            progress=quant_progress,
        )
    benchmarks = options.benchmarks
    if options.evaluate and benchmarks is None:
        step("evaluating")
        from ..evaluation.suite import EvalOptions

        eval_options = EvalOptions(
            llama_bin=options.llama_bin, questions=options.eval_questions, benches=tuple(options.eval_benches)
        )
        if options.eval_threads:
            eval_options = replace(eval_options, threads=options.eval_threads)
        benchmarks = benchmark_markdown(base, edited, eval_options, options.yardstick)
    step("writing Modelfile and README.md")
    files = tuple(QuantFile.of(r) for r in quants.results) if quants else ()
    if budget is not None:
        step("KL divergence of the ladder on the held-out text")
        files = budget_rows(budget, files, _uniform_klds(edited, files, out_dir, options))
    main_file = files[0].file if files else edited.name
    modelfile = build_modelfile(edited, f"./{main_file}", parameters=options.parameters, system=options.system)
    mf_path = write_text_atomic(out_dir / MODELFILE, modelfile.text, options.force)
    with Model(base) as m:
        source_blocks = len(m.blocks())
    card = model_card(
        edited,
        CardOptions(
            name=name,
            quants=files,
            benchmarks=benchmarks,
            base_model=options.base_model,
            author=options.author,
            modelfile=modelfile,
            source_blocks=source_blocks,
            methodology=options.methodology,
        ),
    )
    readme = write_text_atomic(out_dir / README, card, options.force)
    written = [edited] + ([budget.out, budget.types_file] if budget else [])
    written += ([r.path for r in quants.results] if quants else []) + [mf_path, readme]
    return ReleaseReport(
        out_dir,
        edited,
        quants,
        mf_path,
        readme,
        benchmarks is not None,
        tuple((p.name, p.stat().st_size) for p in written),
        budget,
        files,
    )


def _budget_eval(options: ReleaseOptions) -> tuple[Any, str | None, str | None]:
    """(EvalOptions, calibration text, held-out text) of a release's budget runs."""
    from ..evaluation.suite import EvalOptions

    eval_options = options.budget_options or EvalOptions(llama_bin=options.llama_bin)
    if options.eval_threads and options.budget_options is None:
        eval_options = replace(eval_options, threads=options.eval_threads)
    calibration, held_out = options.budget_texts or (None, None)
    return eval_options, calibration, held_out


def _ship_budget(base: Path, recipe: str, edited: Path, out: Path, options: ReleaseOptions) -> Any:
    """budget.allocate.quantize_to_budget of the edited file into `out`, with the edit's own
    sensitivity or, with `inherit_costs`, the base's (budget.sensitivity.inherited_sensitivity).
    A budget the edited model cannot meet is refused before any measuring (and `release` removes
    what it wrote)."""
    from ..budget.allocate import quantize_to_budget
    from ..budget.sensitivity import edit_sources, inherited_sensitivity, measure_sensitivity

    eval_options, calibration, held_out = _budget_eval(options)
    sens = None
    if options.inherit_costs:
        base_sens = measure_sensitivity(
            base, calibration=calibration, options=eval_options, allow_requantize=options.allow_requantize
        )
        sens = inherited_sensitivity(
            base_sens,
            edited,
            edit_sources(base, recipe),
            options=eval_options,
            allow_requantize=options.allow_requantize,
        )
    return quantize_to_budget(
        edited,
        out,
        sensitivity=sens,
        target_size=options.target_size,
        options=eval_options,
        calibration=calibration,
        held_out=held_out,
        allow_requantize=options.allow_requantize,
        force=options.force,
    )


def _uniform_klds(edited: Path, files: tuple[QuantFile, ...], out_dir: Path, options: ReleaseOptions) -> dict:
    """file name -> KL(edited || ladder file) on the budget's held-out text (the mix's own text)."""
    import tempfile

    from ..budget.sensitivity import bundled_texts, text_options
    from ..evaluation.runner import kl_divergence

    eval_options, _, held_out = _budget_eval(options)
    text = bundled_texts()[1] if held_out is None else held_out
    with tempfile.TemporaryDirectory(prefix="gguf-surgeon-release-") as work:
        opts = text_options(eval_options, text, Path(work))
        return {q.file: kl_divergence(out_dir / q.file, edited, opts).mean for q in files}


def beaten(mix: QuantFile, uniform: tuple[QuantFile, ...]) -> tuple[str, ...]:
    """The uniform types the mix beats: those of the same or larger size whose KLD interval lies
    wholly above the mix's (both measured on the same held-out text), largest file first."""
    if mix.kld is None:
        return ()
    won = [q for q in uniform if q.kld is not None and q.size >= mix.size and q.kld.low > mix.kld.high]
    return tuple(q.type for q in sorted(won, key=lambda q: -q.size))


def budget_rows(budget: Any, ladder: tuple[QuantFile, ...], klds: dict) -> tuple[QuantFile, ...]:
    """The card's rows under a budget: the allocated mix first (its size, bits per weight and
    KLD from the budget result, and the uniform types it beats), then the ladder with its KLDs."""
    uniform = tuple(replace(q, kld=klds.get(q.file)) for q in ladder)
    mix = QuantFile(f"mix {budget.target}", budget.out.name, budget.bits_per_weight, budget.size, budget.kld)
    return (replace(mix, beats=beaten(mix, uniform)),) + uniform


def champion_methodology(space_name: str, evaluated: int, leaders: int, recipe: str, verdict: str) -> str:
    """The card's Methodology paragraph for a recipe found by `search` over `space_name`
    (`leaders`: how many candidates had the full eval)."""
    full = (
        f", the {leaders} whose KL-divergence interval overlapped the best one's also by the full eval suite"
        if leaders
        else ""
    )
    return (
        f"Found by `gguf-surgeon search` over the `{space_name}` space: {evaluated} candidates "
        f"scored by KL divergence to the base on a short text{full}. "
        f"Champion `{recipe}`: {verdict}."
    )


def export_champion(
    base: str | Path,
    result: Any,
    space_name: str,
    leaders: int,
    out_dir: str | Path,
    options: ReleaseOptions = ReleaseOptions(),
    quant_progress: QuantProgress | None = None,
) -> ReleaseReport:
    """Release the champion of a finished search (`result`: search.study's result, with a
    champion) into `out_dir`: the champion's recipe, with the benchmark table when the champion
    was run through the full eval suite, and the Methodology paragraph. `options` gives the
    rest (its evaluate and methodology are set here)."""
    champion = result.champion
    methodology = champion_methodology(space_name, result.evaluated, leaders, champion.recipe, result.verdict)
    return release(
        base,
        champion.recipe,
        out_dir,
        replace(options, evaluate=bool(champion.full), methodology=methodology),
        quant_progress=quant_progress,
    )
