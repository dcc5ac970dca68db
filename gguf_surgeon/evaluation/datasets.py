"""The benchmark data files llama.cpp's own scripts and docs use, fetched once into a data folder.

    path = fetch("hellaswag")        # downloads, resumes a cut transfer, checks the pinned SHA-256
    [s.name for s in listing()]      # what the data folder holds

A file is downloaded to `<file>.part` next to its final place; a transfer cut short is resumed
with an HTTP Range request (a server that ignores Range restarts it), and only a complete file
whose check passes is renamed into place. A file with a pinned SHA-256 must match it (else
nothing is kept); llama.cpp pins none for the others, so they are checked by reading every
task the way llama-perplexity reads them, and their SHA-256 is recorded (data folder's
`sha256.json`) so that `data list` shows a later change. urllib only: no dependency.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvalError
from ..files import write_text_atomic
from ..records import Record
from .benchmarks import DATASETS, data_dir, read_bench_data

RESUME_ATTEMPTS = 4  # transfers per fetch: the first and up to three resumptions
CHUNK = 1 << 16


@dataclass(frozen=True)
class DataFile(Record):
    """A data set in the data folder (or absent), for `data fetch` and `data list`."""

    name: str
    path: Path
    present: bool
    size: int
    sha256: str | None  # of the file present
    check: str  # pinned SHA-256 matches | parsed, SHA-256 recorded | ... what was checked
    tasks: int | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _recorded(directory: Path) -> dict[str, str]:
    try:
        return json.loads((directory / "sha256.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _record(directory: Path, file: str, sha: str) -> None:
    sums = {**_recorded(directory), file: sha}
    write_text_atomic(directory / "sha256.json", json.dumps(sums, indent=1, sort_keys=True) + "\n", force=True)


def _download(url: str, part: Path, progress: Callable[[int, int | None], None], timeout: float) -> None:
    """Append the rest of `url` to `part` (Range from its size; restarted when the server
    ignores Range). Raises EvalError on a failed or short transfer (`part` kept to resume)."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (https or a mirror the user names)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is whole (the check decides)
            return
        raise EvalError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise EvalError(f"{url}: cannot download: {reason}") from None
    with resp:
        resumed = resp.status == 206 and have > 0
        mode = "ab" if resumed else "wb"
        done = have if resumed else 0
        length = resp.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        try:
            with open(part, mode) as f:
                progress(done, total)
                while block := resp.read(CHUNK):
                    f.write(block)
                    done += len(block)
                    progress(done, total)
        except (http.client.IncompleteRead, OSError, http.client.HTTPException) as e:
            raise EvalError(f"{url}: transfer cut at {done:,} bytes: {e.__class__.__name__}") from None
    if total is not None and done < total:
        raise EvalError(f"{url}: transfer cut at {done:,} of {total:,} bytes")


def check(name: str, path: Path) -> DataFile:
    """What a data file is: its SHA-256 against the pin (EvalError on a mismatch), or, with no
    pin, every task read as llama-perplexity reads them (EvalError when they cannot be)."""
    ds = DATASETS[name]
    sha = _sha256(path)
    if ds.sha256 is not None:
        if sha != ds.sha256:
            raise EvalError(f"{path}: SHA-256 {sha} is not the pinned {ds.sha256}")
        return DataFile(name, path, True, path.stat().st_size, sha, "pinned SHA-256 matches")
    tasks = len(read_bench_data(ds.kind, path).tasks)
    return DataFile(
        name,
        path,
        True,
        path.stat().st_size,
        sha,
        "no pinned SHA-256 (llama.cpp pins none): every task parsed, SHA-256 recorded",
        tasks,
    )


def fetch(
    name: str,
    directory: Path | None = None,
    url: str | None = None,
    progress: Callable[[int, int | None], None] = lambda done, total: None,
    timeout: float = 60.0,
) -> DataFile:
    """Download data set `name` into the data folder (from `url` when given, e.g. a mirror;
    the same checks apply) unless a checked copy is there. Resumes a cut transfer up to
    RESUME_ATTEMPTS times; EvalError (one line) when the download fails (a cut `.part` is kept
    for the next fetch to resume) or the file fails its check (nothing is kept)."""
    if name not in DATASETS:
        raise EvalError(f"unknown data set {name!r}: one of {', '.join(DATASETS)}")
    ds = DATASETS[name]
    folder = data_dir(directory)
    target = folder / ds.file
    if target.is_file():
        return _checked(name, target, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"{folder}: cannot create the data folder: {e.strerror}") from None
    part = folder / f"{ds.file}.part"
    source = url or ds.url
    for attempt in range(1, RESUME_ATTEMPTS + 1):
        try:
            _download(source, part, progress, timeout)
            break
        except EvalError as e:
            cut = "transfer cut" in str(e)
            if not cut or attempt == RESUME_ATTEMPTS:
                if part.exists() and part.stat().st_size == 0:
                    part.unlink()
                hint = f" ({part.name} kept: run the fetch again to resume)" if part.exists() else ""
                raise EvalError(f"{e}{hint}") from None
    try:
        result = check(name, part)
    except EvalError as e:
        part.unlink(missing_ok=True)
        raise EvalError(f"{source}: download refused, nothing kept: {e}") from None
    os.replace(part, target)
    if ds.sha256 is None:
        _record(folder, ds.file, result.sha256 or "")
    return DataFile(name, target, True, result.size, result.sha256, result.check, result.tasks)


def _checked(name: str, path: Path, folder: Path) -> DataFile:
    """A present file's check: the pin, or the SHA-256 recorded when it was fetched."""
    ds = DATASETS[name]
    if ds.sha256 is not None:
        return check(name, path)
    sha = _sha256(path)
    recorded = _recorded(folder).get(ds.file)
    if recorded is None:
        return DataFile(name, path, True, path.stat().st_size, sha, "placed by hand: not checked")
    state = "recorded SHA-256 matches" if recorded == sha else f"changed since fetched (recorded {recorded[:12]}…)"
    return DataFile(name, path, True, path.stat().st_size, sha, state)


def listing(directory: Path | None = None) -> list[DataFile]:
    """Every known data set: present (and checked) or absent."""
    folder = data_dir(directory)
    out = []
    for name, ds in DATASETS.items():
        path = folder / ds.file
        if not path.is_file():
            out.append(DataFile(name, path, False, 0, None, "absent"))
            continue
        try:
            out.append(_checked(name, path, folder))
        except EvalError as e:
            out.append(DataFile(name, path, True, path.stat().st_size, _sha256(path), f"fails its check: {e}"))
    return out
