"""Files every layer shares: atomic outputs (temp file next to the target, rename at the end)
and one TOML reader for recipes, search spaces and question files."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OutputError, SurgeonError


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
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{label}: cannot read{' ' + noun if noun else ''}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{label}: {'not a valid TOML ' + noun if noun else 'not valid TOML'}: {e}") from None


def reserve_temp(out: Path) -> Path:
    """Create an empty, uniquely named temp file next to `out` (mode from the umask, like any output)."""
    while True:
        tmp = out.with_name(f".{out.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"{out}: cannot create a file in {out.parent}: {e.strerror}") from None


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """A fresh temp file next to `out` for the block to fill; renamed onto `out` when the block
    succeeds, removed whatever happens. An OSError becomes OutputError naming `out`."""
    tmp = reserve_temp(out)
    try:
        yield tmp
        os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
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
