"""Finding and running the llama.cpp tools gguf-surgeon drives (llama-quantize, llama-imatrix, ...).

A tool is looked up in an explicit folder (``--llama-bin DIR``), then in the folder named by
``GGUF_SURGEON_LLAMA_BIN``, then on PATH. Nothing here prints: callers get records and
`ToolError`s whose message says how to get the missing tool.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ToolError, ToolFailedError, ToolNotFoundError

ENV_VAR = "GGUF_SURGEON_LLAMA_BIN"
# the quantization ladder of a typical release (the seed model card's)
DEFAULT_LADDER = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")
BUILD_SCRIPT = "bash scripts/build-llama-cpp.sh"
RELEASES_URL = "https://github.com/ggml-org/llama.cpp/releases"

# tool -> what gguf-surgeon uses it for
TOOLS: dict[str, str] = {
    "llama-quantize": "quantize outputs (gguf-surgeon quantize)",
    "llama-imatrix": "compute importance matrices for low-bit quants",
    "llama-perplexity": "measure the perplexity of edited models",
    "llama-completion": "generate text with edited models",
    "llama-server": "serve edited models with their chat template",
}

HOW_TO_GET = (
    f"build the pinned tools with `{BUILD_SCRIPT}` and set {ENV_VAR} to the folder it prints "
    f"(or pass --llama-bin), install llama.cpp with a package manager (brew install llama.cpp, "
    f"nix, winget), or unpack a release from {RELEASES_URL}"
)

# "version: 4567 (abc1234)" (classic) or "version: 0.5.0-dev (build 1, commit 0c1e570)"
_VERSION_LINE = re.compile(r"^version:\s*(?P<version>\S+)\s*\((?P<detail>[^)]*)\)", re.MULTILINE)
_BUILD = re.compile(r"build\s+(\d+)")
_COMMIT = re.compile(r"(?:commit\s+)?\b([0-9a-f]{7,40})\b")


@dataclass(frozen=True)
class ToolVersion:
    """What a llama.cpp tool says about its build."""

    version: str  # "0.5.0-dev", or the build number for builds that print only that
    build: int | None  # llama.cpp build number, when printed
    commit: str | None  # short git commit, when printed

    def __str__(self) -> str:
        parts = [
            p
            for p in (
                f"build {self.build}" if self.build is not None else None,
                f"commit {self.commit}" if self.commit else None,
            )
            if p
        ]
        if self.version.isdigit() and self.build is not None and int(self.version) == self.build:
            return ", ".join(parts)
        return self.version + (f" ({', '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class ToolStatus:
    """One line of `doctor()`: where a tool was found and what it is, or how to get it."""

    name: str
    purpose: str
    path: Path | None  # None when missing
    found_via: str | None  # "--llama-bin", ENV_VAR or "PATH"
    version: ToolVersion | None  # None when missing or when it printed no version
    how_to_get: str | None  # None when found

    @property
    def found(self) -> bool:
        return self.path is not None

    def to_dict(self) -> dict:
        v = self.version
        return {
            "name": self.name,
            "purpose": self.purpose,
            "found": self.found,
            "path": str(self.path) if self.path else None,
            "found_via": self.found_via,
            "version": str(v) if v else None,
            "build": v.build if v else None,
            "commit": v.commit if v else None,
            "how_to_get": self.how_to_get,
        }


def search_dirs(llama_bin: str | Path | None = None) -> list[tuple[str, Path | None]]:
    """The places looked in, in order: (label, folder); folder None means PATH.

    Raises ToolError when `llama_bin` is given but is not a folder (a typo should not fall
    through silently to another build).
    """
    places: list[tuple[str, Path | None]] = []
    if llama_bin is not None:
        d = Path(llama_bin).expanduser()
        if not d.is_dir():
            raise ToolNotFoundError(f"--llama-bin {llama_bin}: no such folder")
        places.append(("--llama-bin", d))
    env = os.environ.get(ENV_VAR)
    if env:
        places.append((ENV_VAR, Path(env).expanduser()))
    places.append(("PATH", None))
    return places


def _locate(name: str, llama_bin: str | Path | None) -> tuple[Path | None, str | None, list[str]]:
    looked: list[str] = []
    for label, folder in search_dirs(llama_bin):
        if folder is None:
            hit = shutil.which(name)
            looked.append("PATH")
        else:
            hit = shutil.which(name, path=str(folder)) if folder.is_dir() else None
            looked.append(f"{label} {folder}" + ("" if folder.is_dir() else " (no such folder)"))
        if hit:
            return Path(hit), label, looked
    return None, None, looked


def find_tool(name: str, llama_bin: str | Path | None = None) -> Path:
    """The path of llama.cpp tool `name` (e.g. "llama-quantize").

    Raises ToolError naming the tool, the places looked in and how to get it.
    """
    path, _, looked = _locate(name, llama_bin)
    if path is None:
        raise ToolNotFoundError(f"{name} not found (looked in {', '.join(looked)}); to get it, {HOW_TO_GET}")
    return path


def _probe_args(path: Path) -> list[list[str]]:
    # llama-quantize has no --version; a dry run of nothing prints its build info and exits
    if path.name.startswith("llama-quantize"):
        return [["--version"], ["--dry-run", os.devnull, "Q8_0"]]
    return [["--version"]]


def parse_version(text: str) -> ToolVersion | None:
    """The build information in a tool's `version: ...` line, or None when there is none."""
    m = _VERSION_LINE.search(text)
    if not m:
        return None
    version, detail = m.group("version"), m.group("detail")
    b = _BUILD.search(detail)
    build = int(b.group(1)) if b else int(version) if version.isdigit() else None
    c = _COMMIT.search(detail.replace(b.group(0), "") if b else detail)
    return ToolVersion(version, build, c.group(1) if c else None)


def tool_version(path: str | Path, timeout: float = 30) -> ToolVersion | None:
    """Run the tool with `--version` (or a harmless probe for tools without it) and parse it.

    Returns None when the tool prints no version line. Raises ToolError when it cannot run.
    """
    path = Path(path)
    for args in _probe_args(path):
        try:
            out = subprocess.run(
                [str(path), *args],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except OSError as e:
            raise ToolFailedError(f"{path}: cannot run: {e.strerror or e}") from None
        except subprocess.TimeoutExpired:
            raise ToolFailedError(f"{path}: no answer to {' '.join(args)} within {timeout:g} s") from None
        v = parse_version(out.stdout + "\n" + out.stderr)
        if v is not None:
            return v
    return None


def doctor(llama_bin: str | Path | None = None, tools: Sequence[str] = tuple(TOOLS)) -> tuple[ToolStatus, ...]:
    """Where each llama.cpp tool is, its version, or how to get it; never raises for a missing tool."""
    records = []
    for name in tools:
        path, via, looked = _locate(name, llama_bin)
        version = None
        if path is not None:
            try:
                version = tool_version(path)
            except ToolError:
                version = None
        records.append(
            ToolStatus(
                name,
                TOOLS.get(name, ""),
                path,
                via,
                version,
                None if path else f"not found (looked in {', '.join(looked)}); {HOW_TO_GET}",
            )
        )
    return tuple(records)


# running -----------------------------------------------------------------------------

# a line that reports a failure, in the output of any llama.cpp tool
ERROR_LINE = re.compile(
    r"error|failed|invalid|cannot|unable|abort|exception|what\(\)|disabled|usage:|not found|not enough|you need",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ToolRun:
    """The end of one tool run."""

    returncode: int
    error_lines: tuple[str, ...]  # the last lines that look like errors, else the last lines
    printed_usage: bool  # the tool rejected its arguments and printed its usage


def run_tool(
    path: Path,
    args: Sequence[str],
    on_line: Callable[[str], None] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> ToolRun:
    """Run a tool with stdout and stderr merged, feeding each line to `on_line`.

    The child is killed if the caller is interrupted (Ctrl-C), or after `timeout` seconds.
    Raises ToolError when the tool cannot be started or ran out of time; a non-zero exit is
    returned for the caller to word.
    """
    try:
        proc = subprocess.Popen(
            [str(path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
            cwd=cwd,
        )
    except OSError as e:
        raise ToolFailedError(f"{path}: cannot run: {e.strerror or e}") from None
    timed_out = threading.Event()

    def kill_on_timeout() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, kill_on_timeout) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    tail: deque[str] = deque(maxlen=5)
    errors: deque[str] = deque(maxlen=5)
    usage = False
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if on_line is not None:
                on_line(line)
            stripped = line.strip()
            if not stripped:
                continue
            tail.append(stripped)
            if stripped.startswith("usage:"):
                usage = True
            # the usage text's option descriptions contain "error"-like words; keep its first line only
            if ERROR_LINE.search(stripped) and (not usage or stripped.startswith("usage:")):
                errors.append(stripped)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if proc.stdout is not None:
            proc.stdout.close()
    if timed_out.is_set():
        raise ToolFailedError(f"{path.name} did not finish within {timeout:g} s")
    return ToolRun(rc, tuple(errors or tail), usage)
