"""Lazy GGUF reading: header, metadata and tensor infos by offset, values decoded on demand.

Unlike gguf.GGUFReader this builds no object per array element: a string array (a tokenizer
vocab) is skipped by walking its length prefixes, and decoded only when a caller asks for it.
Split models (``name-00001-of-00004.gguf``) are read as one model from their first shard.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from .errors import FormatError, ModelError
from .files import open_regular, reading
from .vocab import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType, Keys

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name takes at most 63 bytes (and the NUL)
INT64_MAX = (1 << 63) - 1

# struct format and size of each fixed-size value type (little-endian)
SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
NUMPY_TYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
SPLIT_KEYS = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
BLOCK_NAME = re.compile(r"^blk\.(0|[1-9][0-9]*)\.(.+)$")  # ASCII digits, no leading zero: the names llama.cpp looks up


@dataclass(frozen=True)
class Field:
    """One metadata key-value pair, located in its file; the value is decoded on demand."""

    key: str
    type: GGUFValueType
    item_type: GGUFValueType | None  # element type when type is ARRAY
    count: int  # number of elements for arrays, 1 for scalars
    start: int  # offset of the key's length prefix: raw bytes are [start, end)
    value_start: int  # offset of the value (the array's item type for arrays)
    end: int


class BlockNamed:
    """`blk.N.suffix` parsing for records with a `name` (tensors, imatrix entries)."""

    name: str

    @property
    def block_index(self) -> int | None:
        m = BLOCK_NAME.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def block_suffix(self) -> str | None:
        m = BLOCK_NAME.match(self.name)
        return m.group(2) if m else None


@dataclass(frozen=True)
class TensorInfo(BlockNamed):
    """One tensor: its name, shape and type, and where its bytes lie."""

    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the contiguous row length) first
    ggml_type: GGMLQuantizationType
    offset: int  # absolute offset of the data in `path`
    n_bytes: int
    path: Path  # the file (shard) holding the data

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return self.shape[0] // block * size


@dataclass(frozen=True)
class GGUFFile:
    """One parsed GGUF file (a whole model or one shard of a split model)."""

    path: Path
    version: int
    alignment: int
    fields: dict[str, Field]  # in file order
    tensors: tuple[TensorInfo, ...]  # in tensor-info order
    tensor_info_end: int  # offset just past the last tensor info
    data_offset: int  # start of the aligned data section
    size: int  # file size in bytes


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; errors name the file and offset."""

    def __init__(self, buf: Any, path: Path, pos: int = 0):
        self.buf = buf
        self.path = path
        self.pos = pos
        self.size = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated at offset {self.pos} while reading {what}")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def length(self, what: str) -> int:
        """A string's u64 length prefix, refused when it runs past the end of the buffer."""
        at = self.pos
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise FormatError(
                f"{self.path}: {what} at offset {at} claims {n} bytes, more than the file holds (truncated or corrupt)"
            )
        return n

    def string(self, what: str) -> str:
        n = self.length(what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} at offset {self.pos - n} is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        n = self.length(what)  # before `self.pos +=`: length() advances pos past the prefix
        self.pos += n

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise FormatError(f"{self.path}: unknown value type {raw} for {what} at offset {at}") from None


def align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def _skip_strings(cur: _Cursor, count: int, what: str) -> int:
    """The offset after `count` length-prefixed strings from cur.pos (a vocab: the hot loop)."""
    buf, start, size = cur.buf, cur.pos, cur.size
    unpack = struct.Struct("<Q").unpack_from
    pos, limit = start, size - 8
    for _ in range(count):  # fast path: one comparison per string
        if pos > limit:
            break
        pos += 8 + unpack(buf, pos)[0]
    else:
        if pos <= size:
            return pos
    pos = start  # something is off: walk again, checking each string, to say exactly where
    for k in range(count):
        if pos + 8 > size:
            raise FormatError(f"{cur.path}: truncated at offset {pos} while reading string #{k} of array {what!r}")
        n = unpack(buf, pos)[0]
        if n > size - pos - 8:
            raise FormatError(
                f"{cur.path}: string #{k} of array {what!r} at offset {pos} claims {n} bytes, "
                "more than the file holds (truncated or corrupt)"
            )
        pos += 8 + n
    raise AssertionError("unreachable: the fast path found a problem the checked walk did not")


def _skip_value(cur: _Cursor, vtype: GGUFValueType, what: str) -> tuple[GGUFValueType | None, int]:
    """Advance past one value; return (item type, count) for arrays, (None, 1) for scalars."""
    if vtype == GGUFValueType.STRING:
        cur.skip_string(f"value of {what!r}")
        return None, 1
    if vtype == GGUFValueType.ARRAY:
        item = cur.value_type(f"item type of {what!r}")
        at = cur.pos
        count = cur.u64(f"element count of {what!r}")
        if item == GGUFValueType.ARRAY:
            raise FormatError(f"{cur.path}: nested arrays are not supported (key {what!r} at offset {at - 4})")
        if item == GGUFValueType.STRING:
            # each string needs at least its 8-byte length: refuse absurd counts before looping
            if count * 8 > cur.size - cur.pos:
                raise FormatError(
                    f"{cur.path}: array {what!r} at offset {at} claims {count} strings, more than the file holds (truncated or corrupt)"
                )
            cur.pos = _skip_strings(cur, count, what)
        else:
            nbytes = struct.calcsize(SCALAR_FORMATS[item]) * count
            if nbytes > cur.size - cur.pos:
                raise FormatError(
                    f"{cur.path}: array {what!r} at offset {at} claims {count} elements, more than the file holds (truncated or corrupt)"
                )
            cur.pos += nbytes
        return item, count
    n = struct.calcsize(SCALAR_FORMATS[vtype])
    cur.need(n, f"value of {what!r}")
    cur.pos += n
    return None, 1


def parse_file(path: Path, buf: Any) -> GGUFFile:
    """Parse the header of one GGUF file held in `buf` (an mmap or bytes). Refuses what
    llama.cpp's own loader (ggml/src/gguf.cpp) refuses, naming the rule."""
    cur = _Cursor(buf, path)
    version, n_tensors, n_kv = _read_header(cur)
    fields = _read_fields(cur, n_kv)
    alignment = _alignment(buf, fields, path)
    raw_infos = _read_tensor_infos(cur, n_tensors)
    tensor_info_end = cur.pos
    data_offset = align(tensor_info_end, alignment)
    tensors = _locate_tensors(path, raw_infos, data_offset, cur.size)
    return GGUFFile(path, version, alignment, fields, tensors, tensor_info_end, data_offset, cur.size)


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    """Magic, version, tensor and key counts: (version, n_tensors, n_kv)."""
    path, buf = cur.path, cur.buf
    if cur.size < 4 or struct.unpack_from("<I", buf, 0)[0] != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file (bad magic at offset 0)")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
            raise FormatError(
                f"{path}: big-endian GGUF (byte-swapped version at offset 4) is not supported; convert it to little-endian first"
            )
        raise FormatError(f"{path}: unsupported GGUF version {version} at offset 4 (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata key count")
    # refuse absurd counts before looping; the smallest key-value is 13 bytes (8-byte key length, 4-byte type, 1-byte value)
    if n_kv * 13 > cur.size - cur.pos:
        raise FormatError(
            f"{path}: header claims {n_kv} metadata keys (offset 16), more than the {cur.size - cur.pos} bytes after offset {cur.pos} can hold (truncated or corrupt)"
        )
    return version, n_tensors, n_kv


def _read_fields(cur: _Cursor, n_kv: int) -> dict[str, Field]:
    fields: dict[str, Field] = {}
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"metadata key #{i}")
        if not key:
            raise FormatError(f"{cur.path}: metadata key #{i} at offset {start} is empty")
        vtype = cur.value_type(f"key {key!r}")
        value_start = cur.pos
        item, count = _skip_value(cur, vtype, key)
        if key in fields:
            raise FormatError(f"{cur.path}: duplicate metadata key {key!r} at offset {start}")
        fields[key] = Field(key, vtype, item, count, start, value_start, cur.pos)
    return fields


def _alignment(buf: Any, fields: dict[str, Field], path: Path) -> int:
    field = fields.get(Keys.General.ALIGNMENT)
    if field is None:
        return GGUF_DEFAULT_ALIGNMENT
    if field.type != GGUFValueType.UINT32:
        raise FormatError(
            f"{path}: key {Keys.General.ALIGNMENT!r} at offset {field.start} is a {field.type.name}; "
            "llama.cpp requires a UINT32"
        )
    alignment = int_field(buf, field, path)
    if alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{path}: key {Keys.General.ALIGNMENT!r} is {alignment}, not a power of two")
    return alignment


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]]:
    path = cur.path
    # checked after the keys, so that a file truncated inside them says where; the smallest tensor
    # info is 32 bytes (8-byte name length, 4-byte dimension count, one dimension, 4-byte type, 8-byte offset)
    if n_tensors * 32 > cur.size - cur.pos:
        raise FormatError(
            f"{path}: header claims {n_tensors} tensors (offset 8), more than the {cur.size - cur.pos} bytes after offset {cur.pos} can hold (truncated or corrupt)"
        )
    raw_infos = []
    for i in range(n_tensors):
        at = cur.pos
        name = cur.string(f"name of tensor #{i}")
        if len(name.encode()) >= MAX_NAME:
            raise FormatError(
                f"{path}: tensor #{i} name {name!r} at offset {at} is {len(name.encode())} bytes; "
                f"llama.cpp allows at most {MAX_NAME - 1}"
            )
        at = cur.pos
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(
                f"{path}: tensor {name!r} has {n_dims} dimensions at offset {at} (1 to {MAX_DIMS} allowed)"
            )
        at = cur.pos
        shape = tuple(cur.u64(f"shape of tensor {name!r}") for _ in range(n_dims))
        check_shape(shape, f"{path}: tensor {name!r} at offset {at}")
        at = cur.pos
        raw_type = cur.u32(f"type of tensor {name!r}")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise FormatError(f"{path}: tensor {name!r} has unknown type {raw_type} at offset {at}") from None
        if ggml_type not in GGML_QUANT_SIZES:
            raise FormatError(f"{path}: tensor {name!r} has unsupported type {ggml_type.name} at offset {at}")
        offset = cur.u64(f"data offset of tensor {name!r}")
        raw_infos.append((name, shape, ggml_type, offset))
    return raw_infos


def check_shape(shape: tuple[int, ...], where: str) -> None:
    """llama.cpp's shape rules: every dimension a non-negative int64, the element count below
    INT64_MAX (FormatError naming the rule)."""
    if any(d > INT64_MAX for d in shape):
        raise FormatError(f"{where}: dimension {max(shape)} of shape {list(shape)} is not a non-negative int64")
    n = shape[0]
    for d in shape[1:]:
        if d > 1 and INT64_MAX // d < n:
            raise FormatError(f"{where}: shape {list(shape)} has more than INT64_MAX elements")
        n *= d


def _locate_tensors(
    path: Path, raw_infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]], data_offset: int, size: int
) -> tuple[TensorInfo, ...]:
    tensors = []
    seen: set[str] = set()
    for name, shape, ggml_type, offset in raw_infos:
        if name in seen:
            raise FormatError(f"{path}: duplicate tensor name {name!r}")
        seen.add(name)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if shape[0] % block:
            raise FormatError(
                f"{path}: tensor {name!r} row length {shape[0]} is not a multiple of {ggml_type.name}'s block {block}"
            )
        n = 1
        for d in shape:
            n *= d
        n_bytes = n // block * type_size
        start = data_offset + offset
        if start + n_bytes > size:
            raise FormatError(
                f"{path}: truncated: data of tensor {name!r} ends at offset {start + n_bytes}, file has {size} bytes"
            )
        tensors.append(TensorInfo(name, shape, ggml_type, start, n_bytes, path))
    return tuple(tensors)


def field_value(buf: Any, field: Field, path: Path = Path("?")) -> Any:
    """Decode a field's value: int/float/bool/str for scalars, a list for arrays."""
    cur = _Cursor(buf, path, field.value_start)
    if field.type == GGUFValueType.STRING:
        return cur.string(field.key)
    if field.type == GGUFValueType.ARRAY:
        cur.pos += 12  # item type and count, already parsed into the field
        assert field.item_type is not None
        if field.item_type == GGUFValueType.STRING:
            return [cur.string(field.key) for _ in range(field.count)]
        import numpy as np  # here, not at the top: a byte-copying surgery never needs numpy

        arr = np.frombuffer(buf, dtype=NUMPY_TYPES[field.item_type], count=field.count, offset=cur.pos)
        if field.item_type == GGUFValueType.BOOL:
            return [bool(x) for x in arr]
        return arr.tolist()
    v = struct.unpack_from(SCALAR_FORMATS[field.type], buf, cur.pos)[0]
    return v


INTEGER_TYPES = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)


def int_field(buf: Any, field: Field, path: Path) -> int:
    """An integer-valued key's value; FormatError when the file gives it another type."""
    if field.type not in INTEGER_TYPES:
        raise FormatError(f"{path}: key {field.key!r} at offset {field.start} is a {field.type.name}, not an integer")
    return int(field_value(buf, field, path))


class Model:
    """A GGUF model, possibly split across shards, opened read-only and memory-mapped.

    Use as a context manager. `fields` are the first shard's keys in file order; `tensors`
    span all shards in order. Block tensors are `blk.N.*` with N in 0..block_count-1.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._maps: list[mmap.mmap] = []
        self._fds: dict[Path, int] = {}  # opened on first tensor read
        self._bufs: dict[Path, Any] = {}
        try:
            first = self._open(self.path)
            self.shards: tuple[GGUFFile, ...] = (first,) + self._open_other_shards(first)
        except BaseException:
            self.close()
            raise
        self.file = first
        self.fields = first.fields
        self.tensors: tuple[TensorInfo, ...] = tuple(t for s in self.shards for t in s.tensors)
        self._by_name: dict[str, TensorInfo] = {}
        for t in self.tensors:
            if t.name in self._by_name:
                self.close()
                raise FormatError(
                    f"{t.path}: duplicate tensor name {t.name!r} (also in {self._by_name[t.name].path.name})"
                )
            self._by_name[t.name] = t

    def _open(self, path: Path) -> GGUFFile:
        with open_regular(path, FormatError, "GGUF file") as f, reading(path, FormatError, "GGUF file"):
            size = f.seek(0, 2)
            buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if isinstance(buf, mmap.mmap):
            self._maps.append(buf)
        self._bufs[path] = buf
        return parse_file(path, buf)

    def _open_other_shards(self, first: GGUFFile) -> tuple[GGUFFile, ...]:
        if Keys.Split.LLM_KV_SPLIT_COUNT not in first.fields:
            return ()
        count = int_field(self._bufs[first.path], first.fields[Keys.Split.LLM_KV_SPLIT_COUNT], first.path)
        if count <= 1:
            return ()
        m = SPLIT_NAME.match(first.path.name)
        if not m or int(m.group("no")) != 1:
            raise FormatError(
                f"{first.path}: split model (split.count={count}) must be opened from its first shard, named PREFIX-00001-of-{count:05d}.gguf"
            )
        shards = []
        for no in range(2, count + 1):
            p = first.path.with_name(f"{m.group('prefix')}-{no:05d}-of-{count:05d}.gguf")
            if not p.exists():
                raise FormatError(f"{first.path}: shard {no} of {count} is missing ({p.name})")
            shards.append(self._open(p))
        return tuple(shards)

    def close(self) -> None:
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a numpy view still refers to it; the map closes when that view dies
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # metadata
    def has(self, key: str) -> bool:
        return key in self.fields

    def value(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else field_value(self._bufs[self.file.path], f, self.file.path)

    def int_value(self, key: str) -> int | None:
        """An integer key's value, None when absent; FormatError when it is not an integer."""
        f = self.fields.get(key)
        return None if f is None else int_field(self._bufs[self.file.path], f, self.file.path)

    def raw_field(self, key: str) -> bytes:
        """The field's exact bytes in the file (key, type and value), for byte-exact copies."""
        f = self.fields[key]
        return bytes(self._bufs[self.file.path][f.start : f.end])

    @property
    def architecture(self) -> str:
        arch = self.value(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str):
            raise ModelError(f"{self.path}: key {Keys.General.ARCHITECTURE!r} is missing")
        return arch

    def arch_key(self, template: str) -> str:
        return template.format(arch=self.architecture)

    @property
    def block_count_key(self) -> str:
        return self.arch_key(Keys.LLM.BLOCK_COUNT)

    # tensors
    def tensor(self, name: str) -> TensorInfo:
        return self._by_name[name]

    def tensor_bytes(
        self, t: TensorInfo, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The tensor's bytes [start, stop) as a uint8 array (in `out`, a reusable buffer, when given).

        Read with pread rather than through the memory map, so the pages do not count toward
        this process's resident memory: peak RSS stays flat however much a caller reads.
        """
        stop = t.n_bytes if stop is None else stop
        fd = self._fds.get(t.path)
        if fd is None:
            fd = self._fds[t.path] = os.open(t.path, os.O_RDONLY)
        import numpy as np

        out = np.empty(stop - start, dtype=np.uint8) if out is None else out[: stop - start]
        view = memoryview(out)
        done = 0
        while done < len(out):
            n = os.preadv(fd, [view[done:]], t.offset + start + done)
            if n == 0:
                raise FormatError(f"{t.path}: truncated: tensor {t.name!r} ends past the end of the file")
            done += n
        return out

    def tensor_chunks(self, t: TensorInfo, chunk: int = 16 << 20) -> Iterator[np.ndarray]:
        """The tensor's bytes in pieces of at most `chunk` bytes (bounded memory)."""
        for start in range(0, t.n_bytes, chunk):
            yield self.tensor_bytes(t, start, min(t.n_bytes, start + chunk))

    def blocks(self) -> list[list[TensorInfo]]:
        """Block tensors grouped by block index, in file order within each block.

        Raises ModelError when there are no blk.N tensors or the numbering has gaps.
        """
        groups: dict[int, list[TensorInfo]] = {}
        for t in self.tensors:
            i = t.block_index
            if i is not None:
                groups.setdefault(i, []).append(t)
            elif t.name.startswith("blk."):
                raise ModelError(
                    f"{self.path}: tensor {t.name!r} is not named blk.N.* with N in plain digits and no leading "
                    "zero; llama.cpp would not find it as a block tensor"
                )
        if not groups:
            raise ModelError(f"{self.path}: no blk.N tensors; gguf-surgeon edits transformer blocks named blk.N.*")
        n = max(groups) + 1
        if len(groups) != n:
            # found without range(n): a corrupt name like blk.99999999999 must not allocate
            missing = next(i for i, b in enumerate(sorted(groups)) if i != b)
            raise ModelError(
                f"{self.path}: block numbering has gaps: no tensors for blk.{missing} (blocks 0..{n - 1} expected)"
            )
        return [groups[i] for i in range(n)]

    @property
    def block_count(self) -> int:
        v = self.int_value(self.block_count_key)
        return v if v is not None else len(self.blocks())


def open_model(path: str | Path) -> Model:
    return Model(path)
