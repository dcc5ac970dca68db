"""Files every layer shares: atomic outputs (temp file next to the target, rename at the end)
and one TOML reader for recipes, search spaces and question files."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import Interrupted, OutputError, SurgeonError

NAME_MAX = 255  # bytes in one file name on Linux filesystems


class _Deferral:
    depth = 0
    pending: int | None = None


_DEFER = _Deferral()


def interrupt(signum: int) -> None:
    """What the command line's SIGINT/SIGTERM/SIGHUP handler calls: raise Interrupted now, or,
    while a cleanup runs (signals_deferred), once it has finished."""
    if _DEFER.depth:
        _DEFER.pending = signum
        return
    raise Interrupted(signum)


def hold_signals() -> None:
    """Start deferring interrupts, as signals_deferred does, until release_signals()."""
    _DEFER.depth += 1


def release_signals(drop: bool = False) -> None:
    """End a hold_signals(): an interrupt that came meanwhile is raised now (unless one is already
    being handled), or forgotten with `drop`."""
    _DEFER.depth -= 1
    if _DEFER.depth == 0 and _DEFER.pending is not None:
        signum, _DEFER.pending = _DEFER.pending, None
        if not drop and not isinstance(sys.exc_info()[1], KeyboardInterrupt):  # one interrupt is enough
            raise Interrupted(signum)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Run a cleanup (removing temp files) to its end even if another Ctrl-C or SIGTERM comes
    in meanwhile; that interrupt is raised when the cleanup is done."""
    hold_signals()
    try:
        yield
    finally:
        release_signals()


def os_reason(e: OSError) -> str:
    """An OSError's reason for an `Error:` line ('Permission denied'), never 'None'."""
    return e.strerror or str(e) or type(e).__name__


@contextmanager
def reading(path: Path, error: type[SurgeonError], noun: str = "file", label: str | None = None) -> Iterator[None]:
    """Map what reading `path` raises to one `error` naming it: no such file, a folder, not a
    regular file, cannot read (and bad UTF-8 for text)."""
    label = str(path) if label is None else label
    try:
        yield
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except IsADirectoryError:
        raise error(f"{label}: is a folder, not a {noun}") from None
    except OSError as e:
        raise error(f"{label}: cannot read{' ' + noun if noun != 'file' else ''}: {os_reason(e)}") from None
    except UnicodeDecodeError as e:
        raise error(f"{label}: not UTF-8 text (byte {e.start})") from None


def open_regular(path: Path, error: type[SurgeonError], noun: str = "file", label: str | None = None) -> Any:
    """Open an input for binary reading, refusing what is not a regular file first: a FIFO
    would block open() forever, a pipe or device cannot be mapped or sized."""
    with reading(path, error, noun, label):
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{label or path}: not a regular file (a pipe, FIFO or device); give a {noun}")
        return open(path, "rb")


def read_text(path: Path, error: type[SurgeonError], noun: str = "file", label: str | None = None) -> str:
    """A UTF-8 text input, every failure one `error` naming it."""
    with reading(path, error, noun, label), open_regular(path, error, noun, label) as f:
        return f.read().decode("utf-8")


def read_toml(
    path: Path, error: type[SurgeonError], label: str | None = None, noun: str | None = None
) -> dict[str, Any]:
    """The file's top-level table. A missing or unreadable file, bad UTF-8 or bad TOML raise
    `error("<label>: cannot read [noun]: ...")` or `error("<label>: not valid TOML: ...")`
    (`not a valid TOML <noun>` with a noun). tomllib is imported on first use only."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    label = str(path) if label is None else label
    text = read_text(Path(path), error, noun or "file", label)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{label}: {'not a valid TOML ' + noun if noun else 'not valid TOML'}: {e}") from None
    except RecursionError:
        raise error(f"{label}: nested too deeply to be a {noun or 'TOML file'}") from None


def temp_name(out: Path) -> Path:
    """A hidden, unique name next to `out`, within NAME_MAX however long out's name is."""
    suffix = f".{os.getpid()}-{os.urandom(4).hex()}.tmp"
    room = NAME_MAX - 1 - len(suffix)
    stem = os.fsencode(out.name)[:room].decode("utf-8", "ignore") if len(os.fsencode(out.name)) > room else out.name
    return out.with_name(f".{stem}{suffix}")


def reserve_temp(out: Path) -> Path:
    """Create an empty, uniquely named temp file next to `out` (mode from the umask, like any output)."""
    while True:
        tmp = temp_name(out)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"{out}: cannot create a file in {out.parent}: {os_reason(e)}") from None


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """A fresh temp file next to `out` for the block to fill; renamed onto `out` when the block
    succeeds, removed whatever happens. An OSError becomes OutputError naming `out`."""
    tmp: Path | None = None
    try:
        with signals_deferred():  # an interrupt between creating and naming the temp would leak it
            tmp = reserve_temp(out)
        yield tmp
        os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"{out}: cannot write: {os_reason(e)}") from None
    finally:
        with signals_deferred():
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, force: bool = False) -> Path:
    """Write a small text file through a temp file in the same folder and a rename.

    OutputError when `path` exists without `force`, or cannot be written; nothing is left behind.
    """
    if path.exists() and not force:
        raise OutputError(f"{path}: exists; pass --force to overwrite")
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def format_size(n: float, decimal: bool = False) -> str:
    """'1.50 KiB' (binary units, the command line) or, with `decimal`, '1.54 KB' (the units of
    a Hugging Face model card)."""
    base, units = (1000, ("B", "KB", "MB", "GB", "TB")) if decimal else (1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    for unit in units:
        if abs(n) < base or unit == units[-1]:
            break
        n /= base
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
