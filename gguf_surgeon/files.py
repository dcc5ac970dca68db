"""One TOML file reader for recipes, search spaces and question files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import SurgeonError


def read_toml(path: Path, error: type[SurgeonError], label: str | None = None, noun: str | None = None) -> dict[str, Any]:
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
