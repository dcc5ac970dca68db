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
from ..vocab import GGML_QUANT_SIZES
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


# llama-quantize's tensor_type_fallback (src/llama-quant.cpp): the type written instead of a
# requested one whose block does not divide a tensor's rows (SmolLM2's 576-wide rows and 256-blocks)
FALLBACK = {
    GGMLQuantizationType.Q2_K: GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q3_K: GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.TQ1_0: GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.TQ2_0: GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_K: GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_K: GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q6_K: GGMLQuantizationType.Q8_0,
    **{
        GGMLQuantizationType[n]: GGMLQuantizationType.IQ4_NL
        for n in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")
    },
}
_REGEX_SPECIAL = frozenset("^$\\.*+?()[]{}|/")  # ECMAScript's metacharacters (llama-quantize uses std::regex)


def written_type(requested: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """The type llama-quantize writes for a tensor of `row_length`-element rows when asked for
    `requested`: its fallback when the type's block does not divide the rows, F16 when the
    fallback does not either (tensor_type_fallback in the pinned llama.cpp)."""
    block = GGML_QUANT_SIZES[requested][0]
    if row_length % block == 0:
        return requested
    if requested in FALLBACK:
        out = FALLBACK[requested]
    elif block <= 32:
        out = requested
    else:
        raise OptionError(f"{QUANTIZE_TOOL} has no fallback for {requested.name} on {row_length}-element rows")
    return out if row_length % GGML_QUANT_SIZES[out][0] == 0 else GGMLQuantizationType.F16


def tensor_bytes(qtype: GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes of a tensor of `shape` (ggml order: row length first) stored as `qtype`."""
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= int(d)
    return n // block * size


def quantizable(name: str, n_dims: int) -> bool:
    """Whether llama-quantize gives this tensor a new type (tensor_allows_quantization, for the
    dense decoder tensors this project edits): weights of 2 or more dimensions, not norms."""
    return n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp" not in name


def tensor_pattern(name: str) -> str:
    """The regex that matches exactly one tensor name (llama-quantize uses regex_search, so anchored)."""
    return "^" + "".join("\\" + c if c in _REGEX_SPECIAL else c for c in name) + "$"


def write_tensor_type_file(mix: Mapping[str, GGMLQuantizationType | str], path: str | Path) -> Path:
    """Write `mix` (tensor name -> ggml type, e.g. Q4_K or "q4_K") as a --tensor-type-file.

    llama-quantize reads the file as whitespace-separated PATTERN=TYPE words, lowercases each
    pattern, and gives a tensor the type of the first pattern whose regex_search matches its
    name; each word here is one anchored, escaped tensor name, so the order does not matter.
    """
    path = Path(path)
    words = []
    for name, qtype in mix.items():
        if not name or any(c.isspace() for c in name) or "=" in name or name != name.lower():
            raise OptionError(
                f"tensor name {name!r} cannot be given to {QUANTIZE_TOOL} (empty, whitespace, = or upper case)"
            )
        words.append(f"{tensor_pattern(name)}={ggml_type(qtype, name).name}")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(words) + "\n", encoding="utf-8")
    return path


def ggml_type(qtype: GGMLQuantizationType | str, where: str) -> GGMLQuantizationType:
    """`qtype` as gguf's enum (names case-insensitive, as llama-quantize parses them)."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    try:
        return GGMLQuantizationType[qtype.strip().upper()]
    except KeyError:
        raise OptionError(f"{where}: unknown ggml type {qtype!r}") from None


def read_tensor_type_file(path: str | Path) -> dict[str, GGMLQuantizationType]:
    """PATTERN -> type of a --tensor-type-file in file order (the first match wins in
    llama-quantize, so a repeated pattern keeps its first type), refusing what llama-quantize refuses."""
    try:
        words = Path(path).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise OptionError(f"{path}: cannot read the tensor-type file: {reason}") from None
    out: dict[str, GGMLQuantizationType] = {}
    for w in words:
        pattern, sep, qtype = w.partition("=")
        if not sep or not pattern or not qtype:
            raise OptionError(f"{path}: malformed tensor type {w!r} (expected PATTERN=TYPE)")
        try:
            re.compile(pattern)
        except re.error as e:
            raise OptionError(f"{path}: bad pattern {pattern!r}: {e}") from None
        out.setdefault(pattern.lower(), ggml_type(qtype, f"{path}: {w!r}"))
    return out


def mix_of_file(path: str | Path, names: Sequence[str]) -> dict[str, GGMLQuantizationType]:
    """The requested type of each of `names` under a tensor-type file (first matching pattern),
    for the names some pattern matches."""
    patterns = [(re.compile(p), t) for p, t in read_tensor_type_file(path).items()]
    out = {}
    for name in names:
        for rx, t in patterns:
            if rx.search(name):
                out[name] = t
                break
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


def quantize_mix(
    source: str | Path,
    out: str | Path,
    mix: Mapping[str, GGMLQuantizationType | str],
    *,
    base_type: str = "Q8_0",
    allow_requantize: bool = False,
    force: bool = False,
    llama_bin: str | Path | None = None,
    threads: int | None = None,
    progress: QuantProgress | None = None,
    imatrix: str | Path | None = None,
) -> QuantizeReport:
    """Quantize `source` into `out`, each tensor of `mix` (name -> requested type) through a
    --tensor-type-file, every other quantizable tensor as `base_type` (which must be a quantized
    type: llama-quantize ignores overrides otherwise), with `imatrix` (of `source`) when given. A requested type whose block does not
    divide a tensor's rows is written as its fallback (written_type). Raises OptionError for a
    name the source lacks, OutputError for an existing `out` without `force`, ToolError as
    quantize_ladder does; the report's one result is the written file."""
    source, out = Path(source), Path(out)
    if base_type.upper() in UNQUANTIZED_FTYPES:
        raise OptionError(f"{QUANTIZE_TOOL} ignores per-tensor types with {base_type}; use a quantized base type")
    warnings, _ = _check_source(source, allow_requantize, imatrix, None)
    with Model(source) as m:
        names = {t.name for t in m.tensors}
    missing = sorted(set(mix) - names)
    if missing:
        raise OptionError(f"{source}: has no tensor {missing[0]!r} (named by the type mix)")
    if out.exists() and out.resolve() == source.resolve():
        raise OutputError(f"{out}: is the input")
    if out.exists() and not force:
        raise OutputError(f"{out}: exists; pass --force to overwrite")
    tool = find_tool(QUANTIZE_TOOL, llama_bin)
    (qtype,) = resolve_types([base_type], quant_types(tool))
    with tempfile.TemporaryDirectory(prefix="gguf-surgeon-") as work:
        types_file = write_tensor_type_file(mix, Path(work) / "tensor-types.txt")
        extra = ("--tensor-type-file", str(types_file))
        im = str(Path(imatrix).resolve()) if imatrix is not None else None
        result = _quantize_one(tool, source, out, qtype, allow_requantize, im, extra, threads, progress, None)
    return QuantizeReport(
        source, tool, (result,), tuple(warnings), extra_args=extra[:1], imatrix=Path(imatrix) if imatrix else None
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


def requantize_warning(source: Path, model: Model, allow_requantize: bool) -> str | None:
    """None for an unquantized `model` (opened from `source`); for a quantized one, ModelError
    without `allow_requantize`, else the warning to show."""
    q = quantized_tensor(model)
    if q is None:
        return None
    if not allow_requantize:
        raise ModelError(
            f"{source}: is already quantized ({q[0]} is {q[1]}); requantizing compounds the "
            "quantization error: quantize from the F16/BF16/F32 source, or pass --allow-requantize"
        )
    return (
        f"{source} is already quantized ({q[1]}); requantizing compounds the quantization error, "
        "so outputs are worse than the same types made from an F16/BF16 source"
    )


def _check_source(
    source: Path, allow_requantize: bool, imatrix: str | Path | None, recipe: str | None
) -> tuple[list[str], Imatrix | None]:
    """The warnings for a quantized source, and the imatrix remapped through `recipe` (None without
    one), after checking the imatrix fits the model."""
    warnings: list[str] = []
    remapped: Imatrix | None = None
    with Model(source) as model:
        warning = requantize_warning(source, model, allow_requantize)
        if warning is not None:
            warnings.append(warning)
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
