"""Finding llama.cpp tools (--llama-bin, $GGUF_SURGEON_LLAMA_BIN, PATH), versions, doctor."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_surgeon.cli import main
from gguf_surgeon.errors import ToolError
from gguf_surgeon.llama.tools import (
    ENV_VAR,
    HOW_TO_GET,
    TOOLS,
    ToolVersion,
    doctor,
    find_tool,
    parse_version,
    run_tool,
    tool_version,
)


def fake_tool(folder: Path, name: str, script: str = "echo 'version: 4567 (abc1234)'") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(f"#!/bin/sh\n{script}\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return p


@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment where no llama.cpp tool can be found: empty PATH folder, no env var."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv(ENV_VAR, raising=False)
    return empty


def test_search_order_explicit_then_env_then_path(tmp_path: Path, no_tools: Path, monkeypatch: pytest.MonkeyPatch):
    explicit = fake_tool(tmp_path / "explicit", "llama-quantize")
    env = fake_tool(tmp_path / "env", "llama-quantize")
    on_path = fake_tool(no_tools, "llama-quantize")
    monkeypatch.setenv(ENV_VAR, str(env.parent))
    assert find_tool("llama-quantize", explicit.parent) == explicit
    assert find_tool("llama-quantize") == env
    # a folder without the tool falls through to the next place
    assert find_tool("llama-quantize", tmp_path / "env") == env
    monkeypatch.delenv(ENV_VAR)
    assert find_tool("llama-quantize") == on_path


def test_missing_tool_names_it_and_how_to_get_it(tmp_path: Path, no_tools: Path, monkeypatch: pytest.MonkeyPatch):
    stale = tmp_path / "gone"
    monkeypatch.setenv(ENV_VAR, str(stale))
    with pytest.raises(ToolError) as e:
        find_tool("llama-imatrix", no_tools)
    assert str(e.value) == (
        f"llama-imatrix not found (looked in --llama-bin {no_tools}, {ENV_VAR} {stale} (no such folder), "
        f"PATH); to get it, {HOW_TO_GET}"
    )
    assert "bash scripts/build-llama-cpp.sh" in str(e.value)
    assert "package manager" in str(e.value)
    assert "github.com/ggml-org/llama.cpp/releases" in str(e.value)


def test_llama_bin_must_be_a_folder(tmp_path: Path):
    with pytest.raises(ToolError, match=r"^--llama-bin .*nope: no such folder$"):
        find_tool("llama-quantize", tmp_path / "nope")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU 12.2.0", ToolVersion("0.5.0-dev", 1, "0c1e570")),
        ("version: 4567 (abc1234)\nbuilt with cc", ToolVersion("4567", 4567, "abc1234")),
        ("load_backend: ...\nversion: 6100 (2241453a)\n", ToolVersion("6100", 6100, "2241453a")),
        ("usage: llama-foo [options]", None),
    ],
)
def test_parse_version(text: str, expected: ToolVersion | None):
    assert parse_version(text) == expected


def test_version_renders_build_and_commit():
    assert str(ToolVersion("0.5.0-dev", 1, "0c1e570")) == "0.5.0-dev (build 1, commit 0c1e570)"
    assert str(ToolVersion("4567", 4567, "abc1234")) == "build 4567, commit abc1234"


def test_tool_version_of_a_fake_tool(tmp_path: Path):
    assert tool_version(fake_tool(tmp_path, "llama-server", "echo 'version: 4567 (abc1234)' >&2")) == ToolVersion(
        "4567", 4567, "abc1234"
    )
    assert tool_version(fake_tool(tmp_path, "llama-x", "echo hello")) is None


def test_run_tool_feeds_lines_and_keeps_error_lines(tmp_path: Path):
    tool = fake_tool(
        tmp_path, "llama-x", "echo '[   1/   2] a'; echo 'main: error: bad thing' >&2; echo 'last'; exit 3"
    )
    lines: list[str] = []
    run = run_tool(tool, [], lines.append)
    assert lines == ["[   1/   2] a", "main: error: bad thing", "last"]
    assert run.returncode == 3
    assert run.error_lines == ("main: error: bad thing",)
    assert not run.printed_usage


def test_doctor_records(tmp_path: Path, no_tools: Path, monkeypatch: pytest.MonkeyPatch):
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "llama-quantize", "echo 'version: 0.5.0-dev (build 1, commit 0c1e570)' >&2; exit 1")
    fake_tool(bin_dir, "llama-server")
    monkeypatch.setenv(ENV_VAR, str(bin_dir))
    records = {r.name: r for r in doctor()}
    assert list(records) == list(TOOLS)
    q = records["llama-quantize"]
    assert (q.found, q.path, q.found_via, q.version, q.how_to_get) == (
        True,
        bin_dir / "llama-quantize",
        ENV_VAR,
        ToolVersion("0.5.0-dev", 1, "0c1e570"),
        None,
    )
    missing = records["llama-imatrix"]
    assert not missing.found and missing.path is None and missing.version is None
    assert missing.how_to_get == f"not found (looked in {ENV_VAR} {bin_dir}, PATH); {HOW_TO_GET}"


def test_doctor_cli_reports_missing_tools_and_exits_1(tmp_path: Path, no_tools: Path):
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "llama-quantize")
    result = CliRunner().invoke(main, ["doctor", "--llama-bin", str(bin_dir)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert (
        lines[0]
        == f"llama-quantize    found    build 4567, commit abc1234  {bin_dir / 'llama-quantize'} (via --llama-bin)"
    )
    assert lines[1] == "llama-imatrix     missing  needed to compute importance matrices for low-bit quants"
    assert lines[-1] == (
        f"Missing: llama-imatrix, llama-perplexity, llama-completion, llama-server. To get them, {HOW_TO_GET}."
    )


def test_doctor_json(tmp_path: Path, no_tools: Path):
    bin_dir = tmp_path / "bin"
    for name in TOOLS:
        fake_tool(bin_dir, name)
    result = CliRunner().invoke(main, ["doctor", "--llama-bin", str(bin_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert [t["name"] for t in data["tools"]] == list(TOOLS)
    assert data["tools"][0] == {
        "name": "llama-quantize",
        "purpose": TOOLS["llama-quantize"],
        "found": True,
        "path": str(bin_dir / "llama-quantize"),
        "found_via": "--llama-bin",
        "version": "build 4567, commit abc1234",
        "build": 4567,
        "commit": "abc1234",
        "how_to_get": None,
    }


def test_doctor_bad_llama_bin(tmp_path: Path):
    result = CliRunner().invoke(main, ["doctor", "--llama-bin", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.stderr == f"Error: --llama-bin {tmp_path / 'nope'}: no such folder\n"


@pytest.mark.slow
def test_doctor_finds_the_pinned_build(llama_bin: Path, no_tools: Path):
    records = doctor(llama_bin)
    assert all(r.found and r.found_via == "--llama-bin" for r in records)
    for r in records:
        assert r.version is not None and r.version.commit, r.name  # llama-quantize needs the dry-run probe
    assert len({r.version for r in records}) == 1  # one build
    result = CliRunner().invoke(main, ["doctor", "--llama-bin", str(llama_bin)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "All llama.cpp tools found."
    assert os.access(records[0].path, os.X_OK)


def test_run_tool_kills_a_tool_that_runs_out_of_time():
    import shutil
    import time

    sleep = Path(shutil.which("sleep") or "/bin/sleep")
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"^sleep did not finish within 0\.5 s$"):
        run_tool(sleep, ["30"], timeout=0.5)
    assert time.monotonic() - started < 10
    assert run_tool(sleep, ["0"], timeout=10).returncode == 0
