"""Quantize a model to a ladder of types with llama-quantize, one output file per type.

Each type is one llama-quantize run writing a temp file in the output folder, renamed to
``NAME-TYPE.gguf`` when it succeeds, so a failure or Ctrl-C leaves no partial file. The
report measures bits per weight from the written file (tensor bytes * 8 / parameters).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType

from ..errors import ModelError, OptionError, OutputError, PlanError, ToolError
from ..files import atomic_output
from ..metadata import RECIPE_KEY
from ..operations import build_plan
from ..reader import Model
from ..recipe import load_recipe
from .imatrix import Imatrix, read_imatrix, remap_imatrix, write_imatrix
from .tools import DEFAULT_LADDER, find_tool, run_tool

QUANTIZE_TOOL = "llama-quantize"
UNQUANTIZED = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})

UNQUANTIZED_FTYPES = frozenset({"F32", "F16", "BF16", "COPY"})  # types whose runs skip --tensor-type overrides

QuantProgress = Callable[[str, int, int], None]  # (type, tensors done, tensors total)

_PROGRESS_LINE = re.compile(r"^\[\s*(\d+)\s*/\s*(\d+)\]\s+(\S+)")
# the "allowed quantization types" lines of llama-quantize's usage: "  15  or  Q4_K_M  : ..." / "  COPY : ..."
_TYPE_LINE = re.compile(r"^\s+(?:\d+\s+or\s+)?([A-Z][A-Z0-9_]*)\s*:")


@dataclass(frozen=True)
class QuantResult:
    """One written file of the ladder."""

    type: str  # llama-quantize's name for it, e.g. "Q4_K_M"
    path: Path
    size: int  # file size in bytes
    parameters: int  # elements over all tensors
    bits_per_weight: float  # tensor bytes * 8 / parameters, measured from the file
    seconds: float  # wall time of the llama-quantize run
    tensor_types: dict[str, int]  # ggml type name -> tensor count in the file

    def to_dict(self) -> dict:
        return {
            "type": self.type,
            "path": str(self.path),
            "size": self.size,
            "parameters": self.parameters,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "seconds": round(self.seconds, 3),
            "tensor_types": self.tensor_types,
        }


@dataclass(frozen=True)
class QuantizeReport:
    """The whole ladder."""

    source: Path
    tool: Path
    results: tuple[QuantResult, ...]
    warnings: tuple[str, ...] = ()
    imatrix: Path | None = None  # the imatrix given
    recipe: str | None = None  # the recipe the imatrix was remapped through
    extra_args: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "tool": str(self.tool),
            "imatrix": str(self.imatrix) if self.imatrix else None,
            "recipe": self.recipe,
            "extra_args": list(self.extra_args),
            "warnings": list(self.warnings),
            "results": [r.to_dict() for r in self.results],
        }


def tensor_pattern(name: str) -> str:
    """The regex llama-quantize matches against exactly one tensor name (regex_search, so anchored)."""
    return "^" + re.escape(name) + "$"


def write_tensor_type_file(mix: Mapping[str, str], path: str | Path) -> Path:
    """Write `mix` (tensor name -> ggml type name, e.g. "q4_K") as a --tensor-type-file.

    llama-quantize reads the file as whitespace-separated PATTERN=TYPE words, lowercases the
    pattern, and uses the first pattern whose regex_search matches a tensor name; each line here
    is one anchored, escaped tensor name, so the order does not matter.
    """
    path = Path(path)
    lines = []
    for name, qtype in mix.items():
        if any(c.isspace() for c in name) or name != name.lower():
            raise OptionError(f"tensor name {name!r} cannot be given to {QUANTIZE_TOOL} (whitespace or upper case)")
        if qtype.upper() not in GGMLQuantizationType.__members__:
            raise OptionError(f"{name}: unknown ggml type {qtype!r}")
        lines.append(f"{tensor_pattern(name)}={qtype}")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_tensor_type_file(path: str | Path) -> dict[str, str]:
    """PATTERN -> TYPE of a --tensor-type-file (upper-case type names), refusing what llama-quantize refuses."""
    try:
        words = Path(path).read_text(encoding="utf-8").split()
    except OSError as e:
        raise OptionError(f"{path}: cannot read the tensor-type file: {e.strerror or e}") from None
    out: dict[str, str] = {}
    for w in words:
        pattern, sep, qtype = w.partition("=")
        if not sep or not pattern or not qtype:
            raise OptionError(f"{path}: malformed tensor type {w!r} (expected PATTERN=TYPE)")
        if qtype.upper() not in GGMLQuantizationType.__members__:
            raise OptionError(f"{path}: unknown ggml type {qtype!r} in {w!r}")
        out.setdefault(pattern.lower(), qtype.upper())
    return out


def quant_types(tool: Path) -> tuple[str, ...]:
    """The type names this llama-quantize accepts, from its usage text (it is the authority:
    builds differ). Falls back to gguf's LlamaFileType names if the text cannot be parsed."""
    try:
        out = subprocess.run(
            [str(tool), "--help"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ToolError(f"{tool}: cannot run: {e}") from None
    text = out.stdout + out.stderr
    names: list[str] = []
    if "allowed quantization types" in text:
        for line in text.split("allowed quantization types", 1)[1].splitlines():
            m = _TYPE_LINE.match(line)
            if m and m.group(1) not in names:
                names.append(m.group(1))
    if not names:
        names = [
            n.removeprefix("MOSTLY_").removeprefix("ALL_") for n in gguf.LlamaFileType.__members__ if n != "GUESSED"
        ]
    return tuple(names)


def resolve_types(requested: Sequence[str], valid: Sequence[str]) -> tuple[str, ...]:
    """Canonical names for `requested` (case-insensitive, duplicates dropped), in order.

    Raises ToolError listing the valid names for an unknown one.
    """
    by_upper = {v.upper(): v for v in valid}
    out: list[str] = []
    for t in requested:
        name = by_upper.get(t.strip().upper())
        if name is None:
            raise ToolError(f"{QUANTIZE_TOOL} has no type {t!r}; valid types: {', '.join(valid)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ToolError(f"no quantization type given; valid types: {', '.join(valid)}")
    return tuple(out)


def quantized_tensor(model: Model) -> tuple[str, str] | None:
    """(name, type) of the first 2-D block weight that is not F32/F16/BF16, else None."""
    for t in model.tensors:
        if t.block_index is not None and len(t.shape) >= 2 and t.ggml_type not in UNQUANTIZED:
            return t.name, t.ggml_type.name
    return None


def default_name(source: Path) -> str:
    """The input's stem, without a split model's -00001-of-0000N suffix."""
    return re.sub(r"-\d{5}-of-\d{5}$", "", source.name.removesuffix(".gguf"))


def output_path(out_dir: Path, name: str, qtype: str) -> Path:
    return out_dir / f"{name}-{qtype}.gguf"


def measure(path: Path, qtype: str, seconds: float) -> QuantResult:
    """Read a written file back: size, parameters, bits per weight, tensor types."""
    with Model(path) as m:
        n_bytes = sum(t.n_bytes for t in m.tensors)
        params = sum(t.n_elements for t in m.tensors)
        types = Counter(t.ggml_type.name for t in m.tensors)
    size = path.stat().st_size
    return QuantResult(qtype, path, size, params, n_bytes * 8 / params if params else 0.0, seconds, dict(types))


def _check_imatrix(im: Imatrix, model: Model, remapped: bool, label: str) -> None:
    n_model = len(model.blocks())
    if im.block_count and im.block_count != n_model:
        hint = ""
        edited_with = model.value(RECIPE_KEY)
        if not remapped and edited_with:
            hint = f"; {model.path} was edited with {edited_with!r}: pass that as --recipe to remap the imatrix"
        elif not remapped:
            hint = "; if the imatrix is from the model this one was edited from, pass its recipe as --recipe"
        raise PlanError(f"{label}: imatrix covers {im.block_count} blocks, {model.path} has {n_model}{hint}")


def quantize_ladder(
    source: str | Path,
    types: Sequence[str] = DEFAULT_LADDER,
    out_dir: str | Path | None = None,
    *,
    name: str | None = None,
    imatrix: str | Path | None = None,
    recipe: str | None = None,
    allow_requantize: bool = False,
    force: bool = False,
    llama_bin: str | Path | None = None,
    extra_args: Sequence[str] = (),
    threads: int | None = None,
    progress: QuantProgress | None = None,
    tensor_type_file: str | Path | None = None,
) -> QuantizeReport:
    """Quantize `source` once per type into ``out_dir/NAME-TYPE.gguf`` (NAME: the input's stem).

    - A quantized input (a 2-D block weight not F32/F16/BF16) needs `allow_requantize`
      (passed on as --allow-requantize; the report warns that quality loss compounds).
    - `imatrix` (GGUF or legacy .dat) is passed on as --imatrix; with `recipe`, it is taken
      to belong to the model `source` was edited from, and is remapped through the recipe first.
    - `extra_args` go to llama-quantize before its positional arguments.
    - `tensor_type_file` (see write_tensor_type_file) is passed on as --tensor-type-file: its
      per-tensor types override the mix. llama-quantize applies overrides only when the
      requested type is a quantized one, so F16/BF16/F32/COPY with a file is refused.
    - Every output is checked before any run (exists -> OutputError unless `force`); each
      type writes a temp file renamed at the end, so a failure leaves only complete files.
    Raises ToolError (missing tool, unknown type, failed run with its last error lines),
    ModelError/FormatError (bad input), PlanError (imatrix does not fit), OutputError.
    """
    source = Path(source)
    out_dir = Path(out_dir) if out_dir is not None else source.parent
    name = name or default_name(source)
    extra_args = tuple(extra_args)
    _check_options(extra_args, threads, recipe, imatrix)
    warnings, remapped = _check_source(source, allow_requantize, imatrix, recipe)
    tool = find_tool(QUANTIZE_TOOL, llama_bin)
    qtypes = resolve_types(types, quant_types(tool))
    if tensor_type_file is not None:
        tensor_type_file = Path(tensor_type_file).resolve()
        read_tensor_type_file(tensor_type_file)  # a malformed file is refused before any run
        ignored = [t for t in qtypes if t in UNQUANTIZED_FTYPES]
        if ignored:
            raise OptionError(
                f"llama-quantize ignores --tensor-type overrides for {', '.join(ignored)}; "
                "quantize with a quantized type (e.g. Q8_0) as the default"
            )
        extra_args = ("--tensor-type-file", str(tensor_type_file), *extra_args)
    outputs = _claim_outputs(source, out_dir, name, qtypes, force)

    with tempfile.TemporaryDirectory(prefix="gguf-surgeon-") as work:
        cwd: Path | None = None
        imatrix_arg: str | None = str(imatrix) if imatrix is not None else None
        if remapped is not None:
            # run from the temp folder with a relative name: llama-quantize records the
            # imatrix's path in quantize.imatrix.file, and a temp path would mean nothing
            cwd = Path(work)
            imatrix_arg = re.sub(r"\.(gguf|dat)$", "", Path(str(imatrix)).name) + "-remapped.gguf"
            write_imatrix(remapped, cwd / imatrix_arg, recipe=recipe)
        results = [
            _quantize_one(
                tool, source, outputs[t], t, allow_requantize, imatrix_arg, extra_args, threads, progress, cwd
            )
            for t in qtypes
        ]
    return QuantizeReport(
        source,
        tool,
        tuple(results),
        tuple(warnings),
        Path(imatrix) if imatrix else None,
        recipe if remapped is not None else None,
        extra_args,
    )


def _check_options(
    extra_args: tuple[str, ...], threads: int | None, recipe: str | None, imatrix: str | Path | None
) -> None:
    if extra_args and not extra_args[0].startswith("-"):
        raise OptionError(
            f"extra {QUANTIZE_TOOL} arguments must start with an option (like --pure), got {extra_args[0]!r}"
        )
    if threads is not None and threads < 1:
        raise OptionError(f"threads must be at least 1, got {threads}")
    if recipe is not None and imatrix is None:
        raise PlanError("a recipe only applies to an imatrix: pass --imatrix with --recipe")


def _check_source(
    source: Path, allow_requantize: bool, imatrix: str | Path | None, recipe: str | None
) -> tuple[list[str], Imatrix | None]:
    """The warnings for a quantized source, and the imatrix remapped through `recipe` (None without
    one), after checking the imatrix fits the model."""
    warnings: list[str] = []
    remapped: Imatrix | None = None
    with Model(source) as model:
        q = quantized_tensor(model)
        if q is not None:
            if not allow_requantize:
                raise ModelError(
                    f"{source}: is already quantized ({q[0]} is {q[1]}); requantizing compounds the "
                    "quantization error: quantize from the F16/BF16/F32 source, or pass --allow-requantize"
                )
            warnings.append(
                f"{source} is already quantized ({q[1]}); requantizing compounds the quantization error, "
                "so outputs are worse than the same types made from an F16/BF16 source"
            )
        if imatrix is not None:
            im = read_imatrix(imatrix)
            if recipe is not None:
                plan = build_plan(load_recipe(recipe), im.block_count)
                remapped = remap_imatrix(im, plan)
                _check_imatrix(remapped, model, True, f"{imatrix} remapped through {plan.recipe!r}")
            else:
                _check_imatrix(im, model, False, str(imatrix))
    return warnings, remapped


def _claim_outputs(source: Path, out_dir: Path, name: str, qtypes: Sequence[str], force: bool) -> dict[str, Path]:
    """The output path of each type, after making `out_dir` and refusing the input or an existing file."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the output folder: {e.strerror or e}") from None
    outputs = {t: output_path(out_dir, name, t) for t in qtypes}
    for p in outputs.values():
        if p.exists() and p.resolve() == source.resolve():
            raise OutputError(f"{p}: is the input; pass another --name or --out-dir")
        if p.exists() and not force:
            raise OutputError(f"{p}: exists; pass --force to overwrite")
    return outputs


def _quantize_one(
    tool: Path,
    source: Path,
    out: Path,
    qtype: str,
    allow_requantize: bool,
    imatrix: str | None,
    extra_args: tuple[str, ...],
    threads: int | None,
    progress: QuantProgress | None,
    cwd: Path | None,
) -> QuantResult:
    with atomic_output(out) as tmp:
        args: list[str] = []
        if allow_requantize:
            args.append("--allow-requantize")
        if imatrix is not None:
            args += ["--imatrix", imatrix]
        args += [*extra_args, str(source.resolve()), str(tmp.resolve()), qtype]
        if threads is not None:
            args.append(str(threads))

        def on_line(line: str) -> None:
            m = _PROGRESS_LINE.match(line)
            if m and progress is not None:
                progress(qtype, int(m.group(1)), int(m.group(2)))

        start = time.monotonic()
        run = run_tool(tool, args, on_line, cwd=cwd)
        seconds = time.monotonic() - start
        if run.returncode != 0:
            what = (
                f"rejected its arguments (extra arguments: {' '.join(extra_args) or 'none'})"
                if run.printed_usage
                else f"failed (exit {run.returncode})"
            )
            raise ToolError(f"{QUANTIZE_TOOL} {what} for {qtype} of {source}: " + " | ".join(run.error_lines))
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise ToolError(f"{QUANTIZE_TOOL} wrote nothing for {qtype} of {source}: " + " | ".join(run.error_lines))
        result = measure(tmp, qtype, seconds)
    return QuantResult(
        result.type, out, result.size, result.parameters, result.bits_per_weight, result.seconds, result.tensor_types
    )
