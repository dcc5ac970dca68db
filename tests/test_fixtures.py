"""The bundled fixtures are what the committed script generates; Ctrl-C during a write leaves nothing."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_surgeon.cli import main
from gguf_surgeon.edit import edit
from gguf_surgeon.inspection import summarize
from gguf_surgeon.reader import Model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_fixtures_regenerate_byte_identical(tmp_path: Path):
    subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), str(tmp_path)], check=True, capture_output=True)
    names = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert names == ["tiny-qwen3-28.gguf", "tiny-qwen3-q8_0.gguf", "tiny-qwen3.gguf", "tiny-qwen3moe-q8_0.gguf"]
    for name in names:
        assert sha(tmp_path / name) == sha(FIXTURES / name), (
            f"fixtures/{name} is stale: run python fixtures/make_fixtures.py"
        )


def test_fixtures_have_the_promised_shape():
    expected = {"tiny-qwen3.gguf": (6, "F32"), "tiny-qwen3-q8_0.gguf": (6, "Q8_0"), "tiny-qwen3-28.gguf": (28, "F16")}
    for name, (blocks, ftype) in expected.items():
        with Model(FIXTURES / name) as m:
            s = summarize(m)
        assert (s.architecture, s.block_count, s.file_type) == ("qwen3", blocks, ftype)
        assert s.tokenizer_model == "gpt2" and s.chat_template is not None and s.chat_template.thinking_switch


def test_readme_quick_start_surgery(tmp_path: Path):
    out = tmp_path / "tiny-edited.gguf"
    r = CliRunner().invoke(main, ["apply", "delete 2; swap 3 4", str(FIXTURES / "tiny-qwen3.gguf"), str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["diff", str(FIXTURES / "tiny-qwen3.gguf"), str(out)])
    assert r.exit_code == 0 and "Recipe: delete 2; swap 3 4" in r.stdout


def test_interrupt_during_write_leaves_no_output_and_no_temp(tmp_path: Path):
    def interrupt(done: int, total: int) -> None:
        if done < total:
            raise KeyboardInterrupt

    src = FIXTURES / "tiny-qwen3.gguf"
    before = sha(src)
    with pytest.raises(KeyboardInterrupt):
        edit(src, tmp_path / "out.gguf", "bridge 2", progress=interrupt)
    assert list(tmp_path.iterdir()) == []
    assert sha(src) == before


def test_sigint_to_the_cli_leaves_no_output(tmp_path: Path):
    # a real Ctrl-C: SIGINT to a running gguf-surgeon while it writes a large file
    big = tmp_path / "big.gguf"
    sys.path.insert(0, str(FIXTURES))
    from make_fixtures import build_model

    build_model(big, n_blocks=4, n_embd=1024, ff=4096, n_head=8, n_head_kv=4)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gguf_surgeon", "interpolate", "0", "1", str(big), str(out_dir / "o.gguf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not any(out_dir.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    if proc.returncode == 0:
        pytest.skip("the write finished before the signal arrived")
    assert proc.returncode == 130, err
    assert err.strip() == "Error: interrupted; no partial output was kept"
    assert list(out_dir.iterdir()) == []


def run_in_terminal(args: list[str]) -> tuple[int, bytes]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal; (exit status, all output)."""
    import os
    import pty

    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gguf_surgeon", *args],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        close_fds=True,
    )
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    return proc.wait(timeout=60), out


def test_progress_bar_on_a_terminal_only(tmp_path: Path):
    status, shown = run_in_terminal(["delete", "2", str(FIXTURES / "tiny-qwen3.gguf"), str(tmp_path / "a.gguf")])
    assert status == 0
    assert b"writing a.gguf" in shown and "━".encode() in shown  # rich's bar, then erased
    piped = subprocess.run(
        [
            sys.executable,
            "-m",
            "gguf_surgeon",
            "delete",
            "2",
            str(FIXTURES / "tiny-qwen3.gguf"),
            str(tmp_path / "b.gguf"),
        ],
        capture_output=True,
        check=True,
    )
    assert piped.stderr == b"" and b"\x1b" not in piped.stdout and piped.stdout.startswith(b"Wrote ")
