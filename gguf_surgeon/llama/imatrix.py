"""Importance matrices (llama-imatrix output): read both formats, remap through a layer plan, write GGUF.

An imatrix holds, per weight tensor, the sum of squared input activations per column
(``in_sum2``) and how many rows were summed (``counts``; one per expert for MoE tensors).
llama-quantize uses ``in_sum2 / counts``. Two file formats exist:

- GGUF (current llama-imatrix): ``general.type = imatrix``, keys ``imatrix.datasets``,
  ``imatrix.chunk_count``, ``imatrix.chunk_size``; per entry NAME two F32 tensors,
  ``NAME.in_sum2`` (ne0 = columns, ne1 = experts) and ``NAME.counts`` (ne0 = 1, ne1 = experts),
  raw sums and token counts.
- legacy ``.dat``: int32 entry count; per entry int32 name length, name, int32 ncall, int32
  nval, nval float32 values holding ``mean * ncall``; then optionally int32 chunk count, int32
  length and the dataset file name.

Both are held here as sums and counts whose ratio is the mean, so legacy entries keep
``counts = [ncall]``. Output is always GGUF, which llama-quantize and llama-imatrix read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, Keys
from gguf.constants import GGUF_MAGIC

from ..errors import FormatError, OutputError, PlanError
from ..files import atomic_output, open_regular, reading
from ..metadata import RECIPE_KEY
from ..plan import LayerPlan
from ..reader import BlockNamed, Model

SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
UNKNOWN_DATASET = "unknown"  # gguf's writer refuses empty arrays; llama-quantize only needs the key


@dataclass(frozen=True)
class ImatrixEntry(BlockNamed):
    """The statistics of one weight tensor."""

    name: str  # the weight's tensor name, e.g. "blk.3.ffn_down.weight"
    sums: np.ndarray  # float32, shape (experts, columns)
    counts: np.ndarray  # float32, shape (experts,); legacy files: the call count

    @property
    def mean(self) -> np.ndarray:
        """sums / counts per expert; 1 where an expert saw no data (as llama-quantize does)."""
        c = self.counts[:, None]
        return np.where(c > 0, self.sums / np.where(c > 0, c, 1), 1.0).astype(np.float32)


@dataclass(frozen=True)
class Imatrix:
    """A whole importance matrix file."""

    entries: dict[str, ImatrixEntry]  # by weight name, sorted
    datasets: tuple[str, ...]  # the text files it was computed on
    chunk_count: int
    chunk_size: int  # tokens per chunk; 0 when unknown (legacy files)
    legacy: bool  # read from the legacy .dat format
    path: Path | None = None  # the file it was read from

    @property
    def block_count(self) -> int:
        """1 + the largest blk.N index among the entries (0 when there is none)."""
        idx = [e.block_index for e in self.entries.values() if e.block_index is not None]
        return max(idx) + 1 if idx else 0

    def blocks(self) -> dict[int, dict[str, ImatrixEntry]]:
        """Block entries by block index, then by the name after ``blk.N.``."""
        out: dict[int, dict[str, ImatrixEntry]] = {}
        for e in self.entries.values():
            if e.block_index is not None:
                out.setdefault(e.block_index, {})[e.block_suffix or ""] = e
        return out


# reading -----------------------------------------------------------------------------


def read_imatrix(path: str | Path) -> Imatrix:
    """Read an imatrix in either format (told apart by the GGUF magic, as llama.cpp does)."""
    path = Path(path)
    with open_regular(path, FormatError, "imatrix file") as f, reading(path, FormatError, "imatrix file"):
        head = f.read(4)
    if len(head) == 4 and struct.unpack("<I", head)[0] == GGUF_MAGIC:
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    with Model(path) as m:
        kind = m.value(Keys.General.TYPE)
        if kind not in (None, gguf.GGUFType.IMATRIX):
            raise FormatError(f"{path}: {Keys.General.TYPE} is {kind!r}, not an imatrix (is this a model?)")
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        for t in m.tensors:
            if t.name.endswith(SUMS_SUFFIX):
                target, name = sums, t.name[: -len(SUMS_SUFFIX)]
            elif t.name.endswith(COUNTS_SUFFIX):
                target, name = counts, t.name[: -len(COUNTS_SUFFIX)]
            else:
                continue
            if t.ggml_type != GGMLQuantizationType.F32:
                raise FormatError(f"{path}: tensor {t.name!r} is {t.ggml_type.name}; imatrix tensors must be F32")
            arr = m.tensor_bytes(t).view(np.float32).copy()
            experts = t.shape[1] if len(t.shape) > 1 else 1
            target[name] = arr.reshape(experts, -1)
        datasets = m.value(Keys.IMatrix.DATASETS, [])
        chunk_count = int(m.value(Keys.IMatrix.CHUNK_COUNT, 0))
        chunk_size = int(m.value(Keys.IMatrix.CHUNK_SIZE, 0))
    if not sums and not counts:
        raise FormatError(f"{path}: no *{SUMS_SUFFIX} tensors; not an imatrix")
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            missing = SUMS_SUFFIX if name not in sums else COUNTS_SUFFIX
            raise FormatError(f"{path}: entry {name!r} has no {name}{missing} tensor")
        s, c = sums[name], counts[name].reshape(-1)
        if s.shape[0] != c.shape[0]:
            raise FormatError(
                f"{path}: entry {name!r} has {s.shape[0]} experts in {SUMS_SUFFIX} but {c.shape[0]} counts"
            )
        entries[name] = ImatrixEntry(name, s, c)
    return Imatrix(
        entries,
        tuple(datasets) if isinstance(datasets, list) else (str(datasets),),
        chunk_count,
        chunk_size,
        legacy=False,
        path=path,
    )


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise FormatError(
                f"{path}: not an imatrix (neither GGUF nor legacy .dat): truncated at offset {pos} while reading {what}"
            )
        v = struct.unpack_from(fmt, data, pos)
        pos += n
        return v

    (n_entries,) = take("<i", "the entry count")
    # each entry needs at least 12 bytes: refuse absurd counts (and most non-imatrix files) early
    if n_entries < 1 or n_entries * 12 > len(data):
        raise FormatError(f"{path}: not an imatrix (neither GGUF nor legacy .dat): entry count {n_entries} at offset 0")
    entries = {}
    for i in range(n_entries):
        (length,) = take("<i", f"the name length of entry #{i}")
        if not 0 < length <= len(data) - pos:
            raise FormatError(f"{path}: entry #{i} has a name length of {length} at offset {pos - 4}")
        try:
            name = data[pos : pos + length].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: the name of entry #{i} at offset {pos} is not valid UTF-8") from None
        pos += length
        ncall, nval = take("<ii", f"the sizes of entry {name!r}")
        if nval < 1 or nval * 4 > len(data) - pos:
            raise FormatError(
                f"{path}: entry {name!r} claims {nval} values at offset {pos - 4}, more than the file holds"
            )
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += nval * 4
        entries[name] = ImatrixEntry(name, values.reshape(1, -1), np.array([ncall], dtype=np.float32))
    chunk_count, datasets = 0, ()
    if pos + 4 <= len(data):  # optional trailer
        (chunk_count,) = take("<i", "the chunk count")
        if pos + 4 <= len(data):
            (length,) = take("<i", "the dataset name length")
            if 0 < length <= len(data) - pos:
                datasets = (data[pos : pos + length].decode("utf-8", errors="replace"),)
    return Imatrix(dict(sorted(entries.items())), datasets, chunk_count, 0, legacy=True, path=path)


# remapping ---------------------------------------------------------------------------


def remap_imatrix(imatrix: Imatrix, plan: LayerPlan) -> Imatrix:
    """The imatrix of the model `plan` produces, from the imatrix of its source.

    Output block i takes the entries of ``plan.layers[i]``'s source block; a blended block
    gets, per weight, the weighted mean of its sources' means (weights renormalized over
    the sources that have that entry; clipped at 0 for extrapolations), with counts blended
    the same way. A block whose experts were pruned keeps its per-expert entries' rows of the
    kept experts. Entries outside the blocks (output.weight) pass through.
    Raises PlanError when the imatrix covers another number of blocks than the plan's source.
    """
    where = f"{imatrix.path}: " if imatrix.path else ""
    if imatrix.block_count and imatrix.block_count != plan.source_block_count:
        raise PlanError(
            f"{where}imatrix covers {imatrix.block_count} blocks, but the source model has "
            f"{plan.source_block_count}; was it computed on another model?"
        )
    by_block = imatrix.blocks()
    out: dict[str, ImatrixEntry] = {n: e for n, e in imatrix.entries.items() if e.block_index is None}
    for i, layer in enumerate(plan.layers):
        suffixes = sorted({s for b, _ in layer.parts for s in by_block.get(b, {})})
        for suffix in suffixes:
            name = f"blk.{i}.{suffix}"
            present = [(by_block[b][suffix], w) for b, w in layer.parts if suffix in by_block.get(b, {})]
            if layer.is_copy:
                src = present[0][0]
                sums, counts = src.sums, src.counts
                if layer.experts is not None and sums.shape[0] > 1:  # a per-expert entry: the kept experts' rows
                    if layer.experts[-1] >= sums.shape[0]:
                        raise PlanError(
                            f"{where}{src.name} holds {sums.shape[0]} experts; the plan keeps expert {layer.experts[-1]}"
                        )
                    sums, counts = sums[list(layer.experts)], counts[list(layer.experts)]
                out[name] = ImatrixEntry(name, sums, counts)
            else:
                out[name] = _blend(name, present, where)
    return replace(imatrix, entries=dict(sorted(out.items())), path=None)


def _blend(name: str, parts: list[tuple[ImatrixEntry, float]], where: str) -> ImatrixEntry:
    shapes = {e.sums.shape for e, _ in parts}
    if len(shapes) > 1:
        raise PlanError(
            f"{where}cannot blend imatrix entries for {name!r}: sources have shapes "
            + ", ".join(f"{e.name} {e.sums.shape}" for e, _ in parts)
        )
    mean = np.zeros(parts[0][0].sums.shape, dtype=np.float64)
    counts = np.zeros(parts[0][0].counts.shape, dtype=np.float64)
    weight = np.zeros(counts.shape, dtype=np.float64)
    for e, w in parts:
        seen = e.counts > 0  # an expert that saw no data has no mean to contribute
        mean += np.where(seen[:, None], w * e.mean, 0.0)
        counts += np.where(seen, w * e.counts, 0.0)
        weight += np.where(seen, w, 0.0)
    ok = weight != 0
    mean = np.where(ok[:, None], mean / np.where(ok, weight, 1)[:, None], 0.0)
    counts = np.where(ok, counts / np.where(ok, weight, 1), 0.0)
    mean = np.clip(mean, 0.0, None)
    counts = np.clip(counts, 0.0, None)
    return ImatrixEntry(name, (mean * counts[:, None]).astype(np.float32), counts.astype(np.float32))


# writing -----------------------------------------------------------------------------


class _ImatrixWriter(gguf.GGUFWriter):
    def add_architecture(self) -> None:
        pass  # imatrix files carry no general.architecture


def write_imatrix(imatrix: Imatrix, out: str | Path, *, force: bool = False, recipe: str | None = None) -> Path:
    """Write `imatrix` in llama-imatrix's GGUF format (temp file, then rename).

    `recipe` is recorded under surgery.recipe when given. Legacy-sourced data keeps its
    counts (call counts), with chunk_size 1 so that counts / chunk_size is still a chunk count.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"{out}: exists; pass --force to overwrite")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist")
    if imatrix.path is not None and out.exists() and out.resolve() == imatrix.path.resolve():
        raise OutputError(f"{out}: is the input imatrix; write to another file")
    with atomic_output(out) as tmp:
        w = _ImatrixWriter(tmp, "")
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(Keys.IMatrix.DATASETS, list(imatrix.datasets) or [UNKNOWN_DATASET])
        w.add_uint32(Keys.IMatrix.CHUNK_COUNT, max(0, int(imatrix.chunk_count)))
        w.add_uint32(Keys.IMatrix.CHUNK_SIZE, int(imatrix.chunk_size) if imatrix.chunk_size > 0 else 1)
        if recipe:
            w.add_string(RECIPE_KEY, recipe)
        for name, e in imatrix.entries.items():
            w.add_tensor(name + SUMS_SUFFIX, np.ascontiguousarray(e.sums, dtype=np.float32))
            w.add_tensor(name + COUNTS_SUFFIX, np.ascontiguousarray(e.counts.reshape(-1, 1), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


# one call for the CLI and quantize ---------------------------------------------------


@dataclass(frozen=True)
class RemapReport:
    """What `remap_file` did."""

    source: Path
    out: Path
    recipe: str
    source_format: str  # "gguf" or "legacy"
    source_blocks: int  # blocks of the model the imatrix belongs to
    output_blocks: int
    entries_in: int
    entries_out: int
    blended: tuple[int, ...]  # output blocks whose entries are blends

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "out": str(self.out),
            "recipe": self.recipe,
            "source_format": self.source_format,
            "source_blocks": self.source_blocks,
            "output_blocks": self.output_blocks,
            "entries_in": self.entries_in,
            "entries_out": self.entries_out,
            "blended": list(self.blended),
        }


def remap_file(source: str | Path, out: str | Path, plan: LayerPlan, *, force: bool = False) -> RemapReport:
    """Read the imatrix `source`, remap it through `plan`, write GGUF to `out`."""
    im = read_imatrix(source)
    remapped = remap_imatrix(im, plan)
    write_imatrix(remapped, out, force=force, recipe=plan.recipe)
    blended = tuple(i for i, l in enumerate(plan.layers) if not l.is_copy)
    return RemapReport(
        Path(source),
        Path(out),
        plan.recipe,
        "legacy" if im.legacy else "gguf",
        plan.source_block_count,
        len(plan.layers),
        len(im.entries),
        len(remapped.entries),
        blended,
    )
