"""Streaming GGUF v3 writer for a Surgery: new header bytes from memory, everything else copied.

Keys kept verbatim and tensor data are copied with os.copy_file_range (kernel-side; shares
extents on reflink filesystems), lined up with the page cache, with a bounded buffer as the
fallback. Blends are computed in row chunks. Output goes to a temp file in
the output's folder and is renamed at the end: an error or Ctrl-C leaves neither.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputError, PlanError
from .files import NAME_MAX, os_reason, reserve_temp, signals_deferred
from .metadata import PADDING_KEY, OutputField, encode_field, encode_string
from .reader import Model, align
from .surgery import OutputTensor, Surgery
from .vocab import GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, GGUFValueType, Keys

COPY_CHUNK = 64 << 20  # bytes per copy_file_range call (a multiple of FOLIO)
FOLIO = 64 << 10  # the page-cache unit kernel-side copies line up with on the output
PAD_MIN_BYTES = 64 << 20  # outputs copying less than this get no folio padding (see _folio_padding)
BUFFER_CHUNK = 8 << 20  # bytes per read/write when copying without copy_file_range
MAX_SHARDS = 0xFFFF  # split.count is a UINT16
BLEND_CHUNK = 2 << 20  # float32 bytes per blended row chunk (dequantize temporaries are a few times this)

Progress = Callable[[int, int], None]  # (bytes written, total bytes)


HeaderPart = bytes | tuple[int, int]  # encoded bytes, or [start, end) of the source's first file


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its keys, tensors, header and data offsets."""

    path: Path
    fields: tuple[OutputField, ...]
    tensors: tuple[OutputTensor, ...]
    header: tuple[HeaderPart, ...]  # magic .. tensor infos, padded to the alignment
    header_size: int
    offsets: tuple[int, ...]  # data offset of each tensor, relative to the data section
    size: int  # total file size


@dataclass(frozen=True)
class WriteResult:
    paths: tuple[Path, ...]
    size: int  # bytes written, all shards
    copy_method: str  # what moved the bytes: "copy_file_range", "buffered", or both joined by "+"
    seconds: float


def shard_path(out: Path, no: int, count: int) -> Path:
    """llama-gguf-split naming: out.gguf -> out-00001-of-00003.gguf."""
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return out.with_name(f"{stem}-{no:05d}-of-{count:05d}.gguf")


def _padding_field(n: int) -> OutputField:
    return OutputField(
        PADDING_KEY,
        encode_string(PADDING_KEY) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.UINT8, n) + bytes(n),
    )


def _folio_padding(
    tensors: tuple[OutputTensor, ...], offsets: tuple[int, ...], head_len: int, alignment: int
) -> OutputField | None:
    """A PADDING_KEY field that starts the data section where most copied bytes keep their
    source's offset within a 64 KiB folio (the kernel then copies whole folios: a swap's write
    took 15% less time here); None where that holds already, or the output copies under PAD_MIN_BYTES."""
    if alignment > FOLIO or FOLIO % alignment:
        return None
    weight: dict[int, int] = {}
    for t, off in zip(tensors, offsets):
        if t.is_copy:
            residue = (t.sources[0][0].offset - off) % FOLIO
            weight[residue] = weight.get(residue, 0) + t.n_bytes
    if sum(weight.values()) < PAD_MIN_BYTES:
        return None
    best = max(weight, key=lambda r: (weight[r], -r))
    if best % alignment or align(head_len, alignment) % FOLIO == best:
        return None
    return _padding_field((best - head_len - _padding_field(0).size) % FOLIO)


def _lay_out_file(
    path: Path, fields: tuple[OutputField, ...], tensors: tuple[OutputTensor, ...], alignment: int
) -> ShardLayout:
    """Encode one output file's header (with folio padding where it pays) and place its tensors."""
    infos, offsets = [], []
    pos = 0
    for t in tensors:
        offsets.append(pos)
        infos.append(
            encode_string(t.name)
            + struct.pack("<I", len(t.shape))
            + struct.pack(f"<{len(t.shape)}Q", *t.shape)
            + struct.pack("<IQ", t.ggml_type, pos)
        )
        pos = align(pos + t.n_bytes, alignment)
    info_bytes = b"".join(infos)
    head_len = 24 + sum(f.size for f in fields) + len(info_bytes)
    padding = _folio_padding(tensors, tuple(offsets), head_len, alignment)
    if padding is not None:
        fields += (padding,)
        head_len += padding.size
    parts: list[HeaderPart] = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(fields))]

    def add(part: HeaderPart) -> None:  # neighbouring bytes joined, neighbouring source ranges merged
        last = parts[-1]
        if isinstance(part, bytes) and isinstance(last, bytes):
            parts[-1] = last + part
        elif isinstance(part, tuple) and isinstance(last, tuple) and last[1] == part[0]:
            parts[-1] = (last[0], part[1])
        else:
            parts.append(part)

    for f in fields:
        add(f.raw if f.span is None else f.span)
    tail = info_bytes + b"\0" * (-head_len % alignment)
    add(tail)
    size = head_len + len(tail) - len(info_bytes)
    return ShardLayout(path, fields, tensors, tuple(parts), size, tuple(offsets), size + pos)


def _split_groups(
    tensors: tuple[OutputTensor, ...], max_size: int | None, max_tensors: int | None
) -> list[tuple[OutputTensor, ...]]:
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        cur = groups[-1]
        if cur and ((max_tensors and len(cur) >= max_tensors) or (max_size and size + t.n_bytes > max_size)):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.n_bytes
    return [tuple(g) for g in groups]


def layout(
    surgery: Surgery, out: Path, split_max_size: int | None = None, split_max_tensors: int | None = None
) -> list[ShardLayout]:
    """Lay out the output as one file, or as llama-gguf-split shards when a split limit is set."""
    if not split_max_size and not split_max_tensors:
        return [_lay_out_file(out, surgery.fields, surgery.tensors, surgery.alignment)]
    groups = _split_groups(surgery.tensors, split_max_size, split_max_tensors)
    if len(groups) > MAX_SHARDS:
        raise PlanError(f"{out}: the split would make {len(groups)} shards; split.count holds at most {MAX_SHARDS}")
    shards = []
    for no, group in enumerate(groups):
        split_fields = (
            encode_field(Keys.Split.LLM_KV_SPLIT_NO, GGUFValueType.UINT16, no),
            encode_field(Keys.Split.LLM_KV_SPLIT_COUNT, GGUFValueType.UINT16, len(groups)),
            encode_field(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, GGUFValueType.INT32, len(surgery.tensors)),
        )
        # as llama-gguf-split does: all metadata in the first shard, only split keys after it
        fields = surgery.fields + split_fields if no == 0 else split_fields
        if no > 0 and any(f.key == Keys.General.ALIGNMENT for f in surgery.fields):
            fields += tuple(f for f in surgery.fields if f.key == Keys.General.ALIGNMENT)
        shards.append(_lay_out_file(shard_path(out, no + 1, len(groups)), fields, group, surgery.alignment))
    return shards


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse a missing folder, an output that is an input (also via links), an existing file
    (a symbolic link too, dangling or looping), a name no filesystem here takes."""
    if len(os.fsencode(out.name)) > NAME_MAX:
        raise OutputError(f"{out}: file name too long ({len(os.fsencode(out.name))} bytes; at most {NAME_MAX})")
    try:
        parent = out.parent
        if not parent.is_dir():
            raise OutputError(f"{out}: output folder {parent} does not exist")
        real = os.path.realpath(out)
        for src in inputs:
            if real == os.path.realpath(src) or (out.exists() and os.path.samefile(out, src)):
                raise OutputError(f"{out}: output is the input file {src}; write to a new file")
        if os.path.lexists(out) and not force:
            kind = " (a symbolic link)" if out.is_symlink() else ""
            raise OutputError(f"{out}: already exists{kind}; use --force to overwrite")
    except OSError as e:
        raise OutputError(f"{out}: cannot write there: {os_reason(e)}") from None


class _Copier:
    """Copies byte ranges between files inside the kernel where it can, lined up with the page cache.

    copy_file_range (which also shares extents on XFS and btrfs) is cut so that every call but
    a range's first starts on a 64 KiB folio boundary of the output: the page cache then fills
    whole folios. Where the output offset is also page-congruent with the source (see
    _folio_padding), the copy runs as fast as `cp`. A bounded buffer is the fallback where the
    call does not work (another OS; across filesystems, which current kernels refuse).
    """

    def __init__(self) -> None:
        self.used: set[str] = set()  # what moved bytes: copy_file_range, buffered
        self.kernel = hasattr(os, "copy_file_range")

    @property
    def method(self) -> str:
        return "+".join(m for m in ("copy_file_range", "buffered") if m in self.used) or (
            "copy_file_range" if self.kernel else "buffered"
        )

    def copy(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> None:
        while n > 0 and self.kernel:
            step = min(n, (-dst_off % FOLIO) or COPY_CHUNK)
            try:
                done = os.copy_file_range(src_fd, dst_fd, step, src_off, dst_off)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    self.kernel = False
                    break
                raise
            if done == 0:
                raise OutputError(f"source ended early at offset {src_off} (was the input truncated while writing?)")
            self.used.add("copy_file_range")
            src_off, dst_off, n = src_off + done, dst_off + done, n - done
        while n > 0:
            chunk = os.pread(src_fd, min(n, BUFFER_CHUNK), src_off)
            if not chunk:
                raise OutputError(f"source ended early at offset {src_off} (was the input truncated while writing?)")
            _pwrite_all(dst_fd, chunk, dst_off)
            self.used.add("buffered")
            src_off, dst_off, n = src_off + len(chunk), dst_off + len(chunk), n - len(chunk)


def _pwrite_all(fd: int, data: bytes | memoryview, off: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, off)
        view = view[done:]
        off += done


BLEND_WORKERS = min(2, os.cpu_count() or 1)  # numpy releases the GIL: row chunks blend in parallel


_scratch_space = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """A buffer of this thread, reused from row chunk to row chunk: fresh memory for every
    chunk costs a page fault per 4 KiB, which on a virtual machine is most of a blend's time."""
    import numpy as np

    n = 1
    for d in shape:
        n *= d
    buf = getattr(_scratch_space, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype)
        setattr(_scratch_space, name, buf)
    return buf[:n].reshape(shape)


def rows_f32(raw: Any, ggml_type: GGMLQuantizationType, k: int, ne0: int) -> Any:
    """k rows of a tensor's bytes as float32: the float types in scratch buffers, the rest by gguf."""
    import numpy as np
    from gguf.quants import dequantize

    if ggml_type == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(k, ne0)
    if ggml_type == GGMLQuantizationType.F16:
        out = _scratch("f32", (k, ne0), np.float32)
        np.copyto(out, raw.view(np.float16).reshape(k, ne0))
        return out
    if ggml_type == GGMLQuantizationType.BF16:  # the high half of a float32
        bits = _scratch("u32", (k, ne0), np.uint32)
        np.copyto(bits, raw.view(np.uint16).reshape(k, ne0))
        bits <<= 16
        return bits.view(np.float32)
    return dequantize(raw.reshape(k, -1), ggml_type).reshape(k, ne0)


def encode_rows(acc: Any, ggml_type: GGMLQuantizationType) -> bytes:
    """float32 rows in ggml_type; the same bytes as gguf.quants.quantize."""
    import numpy as np
    from gguf.quants import quantize

    if ggml_type == GGMLQuantizationType.F32:
        return acc.tobytes()
    if ggml_type == GGMLQuantizationType.F16:
        return acc.astype(np.float16).tobytes()
    if ggml_type == GGMLQuantizationType.BF16:
        bits = acc.view(np.uint32)
        tmp = _scratch("u32", acc.shape, np.uint32)
        np.bitwise_and(bits, 0x7FFFFFFF, out=tmp)
        if tmp.max(initial=0) <= 0x7F800000:  # no NaN: round to nearest even, as ggml does
            np.right_shift(bits, 16, out=tmp)
            tmp &= 1
            tmp += 0x7FFF
            tmp += bits
            tmp >>= 16
            out = _scratch("u16", acc.shape, np.uint16)
            np.copyto(out, tmp, casting="unsafe")
            return out.tobytes()
    return np.ascontiguousarray(quantize(acc, ggml_type)).tobytes()


def _blend_chunk(model: Model, t: OutputTensor, r0: int, r1: int) -> bytes:
    """Rows [r0, r1) of the blend: dequantize each source, mix in float32, quantize to t's type."""
    import numpy as np

    k, ne0 = r1 - r0, t.shape[0]
    acc = _scratch("acc", (k, ne0), np.float32)
    acc.fill(0)
    for src, w in t.sources:
        rb = src.row_bytes
        raw = model.tensor_bytes(src, r0 * rb, r1 * rb, out=_scratch("raw", (k * rb,), np.uint8))
        rows = rows_f32(raw, src.ggml_type, k, ne0)
        rows *= np.float32(w)  # a scratch buffer or a fresh array: ours to change
        acc += rows
    if not np.isfinite(acc).all():
        raise PlanError(
            f"{t.name}: the blend is not finite in float32 (weights {', '.join(f'{w:g}' for _, w in t.sources)}); "
            "nothing was kept"
        )
    return encode_rows(acc, t.ggml_type)


def blend_rows(model: Model, t: OutputTensor, workers: int = BLEND_WORKERS) -> Iterable[bytes]:
    """Yield the blended tensor's bytes in row chunks, in order; at most workers+1 chunks in flight."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if t.n_bytes == 0:  # a tensor with a zero dimension: nothing to blend
        return
    n_rows = 1
    for d in t.shape[1:]:
        n_rows *= d
    step = max(1, BLEND_CHUNK // (4 * t.shape[0]))
    ranges = [(r0, min(n_rows, r0 + step)) for r0 in range(0, n_rows, step)]
    if workers <= 1 or len(ranges) == 1:
        for r0, r1 in ranges:
            yield _blend_chunk(model, t, r0, r1)
        return
    for src, _ in t.sources:
        model.tensor_bytes(src, 0, 0)  # open each source file here, not racily in the workers
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for r0, r1 in ranges:
            pending.append(pool.submit(_blend_chunk, model, t, r0, r1))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_surgery(
    model: Model,
    surgery: Surgery,
    out: Path,
    *,
    force: bool = False,
    split_max_size: int | None = None,
    split_max_tensors: int | None = None,
    progress: Progress | None = None,
) -> WriteResult:
    """Write the surgery's output; returns the paths written. Nothing is left behind on error,
    Ctrl-C, SIGTERM or SIGHUP (the cleanup runs to its end even if another one comes)."""
    started = time.monotonic()
    if surgery.needs_heal_data:
        raise PlanError(
            f"{out}: the recipe heals a deletion, but the corrected tensors ({', '.join(surgery.healed)}) were not "
            "computed; compute them with gguf_surgeon.analysis.heal (the CLI does) and pass them to edit()"
        )
    shards = layout(surgery, out, split_max_size, split_max_tensors)
    inputs = [s.path for s in model.shards]
    for s in shards:
        check_output(s.path, inputs, force)
    if force:
        for s in shards:
            _drop_cached(s.path)
    writer = _ShardWriter(model, inputs, sum(s.size for s in shards), progress)
    temps: list[tuple[Path, Path]] = []
    placed: list[Path] = []  # outputs that did not exist before this call, removed again on failure
    try:
        writer.open_inputs()
        for shard in shards:
            with signals_deferred():  # an interrupt between creating and recording would leak it
                temps.append((reserve_temp(shard.path), shard.path))
            writer.write(shard, temps[-1][0])
        for tmp, final in temps:
            if _place(tmp, final, force):
                placed.append(final)
        temps.clear()
        placed.clear()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(
                f"{out}: disk full after writing {writer.done} of {writer.total} bytes; nothing was kept"
            ) from None
        raise OutputError(f"{out}: cannot write: {os_reason(e)}") from None
    finally:
        with signals_deferred():
            writer.close()
            for p in placed:
                p.unlink(missing_ok=True)
            for tmp, _ in temps:
                tmp.unlink(missing_ok=True)
    if progress:
        progress(writer.total, writer.total)
    return WriteResult(tuple(s.path for s in shards), writer.total, writer.copier.method, time.monotonic() - started)


class _ShardWriter:
    """Writes shards into their temp files: header parts, then each tensor copied or blended."""

    def __init__(self, model: Model, inputs: list[Path], total: int, progress: Progress | None):
        self.model, self.inputs, self.total, self.progress = model, inputs, total, progress
        self.copier = _Copier()
        self.src_fds: dict[Path, int] = {}
        self.done = 0

    def open_inputs(self) -> None:
        for p in self.inputs:
            self.src_fds[p] = os.open(p, os.O_RDONLY)

    def close(self) -> None:
        for fd in self.src_fds.values():
            os.close(fd)
        self.src_fds.clear()

    def write(self, shard: ShardLayout, tmp: Path) -> None:
        start = self.done
        fd = os.open(tmp, os.O_WRONLY)
        try:
            self._header(fd, shard)
            self.done += shard.header_size
            for t, off in zip(shard.tensors, shard.offsets):
                self._tensor(fd, t, shard.header_size + off)
                self.done += t.n_bytes
                if self.progress:
                    self.progress(self.done, self.total)
            os.ftruncate(fd, shard.size)  # zero padding after the last tensor
            self.done = start + shard.size
        finally:
            os.close(fd)

    def _header(self, fd: int, shard: ShardLayout) -> None:
        pos = 0
        for part in shard.header:
            if isinstance(part, bytes):
                _pwrite_all(fd, part, pos)
                pos += len(part)
            else:  # keys copied verbatim from the source's first file
                self.copier.copy(self.src_fds[self.inputs[0]], part[0], fd, pos, part[1] - part[0])
                pos += part[1] - part[0]

    def _tensor(self, fd: int, t: OutputTensor, pos: int) -> None:
        if t.data is not None:  # computed outside the core (a healed tensor)
            _pwrite_all(fd, t.data, pos)
            return
        if t.is_copy:
            src = t.sources[0][0]
            for start, end in t.pieces or ((0, src.n_bytes),):  # pieces: the kept experts' byte ranges
                self.copier.copy(self.src_fds[src.path], src.offset + start, fd, pos, end - start)
                pos += end - start
            return
        for chunk in blend_rows(self.model, t):
            _pwrite_all(fd, chunk, pos)
            pos += len(chunk)


def _drop_cached(path: Path) -> None:
    """Ask the kernel to drop an OUT about to be replaced from the page cache: the atomic
    replace keeps it until the new file is complete, and holding both makes the cache reclaim
    memory while writing (an overwrite took 1.6-2.5x a fresh write on these machines)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not there (or not readable): nothing cached to drop
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _place(tmp: Path, final: Path, force: bool) -> bool:
    """Move a finished temp file onto its output name; True when the name is new (a failure
    later must remove it again)."""
    if force:
        os.replace(tmp, final)
        return False
    try:
        os.link(tmp, final)  # fails, unlike a rename, if OUT appeared while writing
    except FileExistsError:
        raise OutputError(f"{final}: appeared while writing; use --force to overwrite") from None
    except OSError:
        if final.exists():
            raise
        os.replace(tmp, final)  # a filesystem without hard links
    else:
        tmp.unlink()
    return True
