"""The habits that keep the layout (docs/architecture.md): import contracts and ruff, run as tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    """The core imports no periphery, the periphery is layered, only cli imports click or rich, no cycles."""
    r = run(str(BIN / "lint-imports"), "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"])
def test_ruff_passes(args):
    r = run(str(BIN / "ruff"), *args)
    assert r.returncode == 0, r.stdout + r.stderr
