"""`gguf-surgeon data fetch/list` against a local HTTP server on 127.0.0.1 serving the real
HellaSwag file from ../shared/data: a good transfer, a cut one (resumed with Range), a wrong
checksum (refused, nothing kept) and a server that is gone (one Error: line)."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_surgeon.cli import main
from gguf_surgeon.errors import EvalError
from gguf_surgeon.evaluation import datasets
from gguf_surgeon.evaluation.benchmarks import DATASETS, mc_file_bytes, mc_task_bytes, parse_bench

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HELLASWAG = SHARED / "hellaswag_val_full.txt"
pytestmark = pytest.mark.skipif(not HELLASWAG.is_file(), reason=f"{HELLASWAG} is absent (the shared test data)")


class _Server:
    """Serves `body` at any path; `cut_first` closes the first transfer after that many bytes
    (announcing the full length); Range requests answered with 206 unless `ignore_range`."""

    def __init__(self, body: bytes, cut_first: int | None = None, ignore_range: bool = False):
        self.body, self.cut, self.ignore_range = body, cut_first, ignore_range
        self.requests: list[str | None] = []  # each request's Range header
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                start = 0
                if rng and not outer.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(outer.body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.body) - 1}/{len(outer.body)}")
                else:
                    self.send_response(200)
                data = outer.body[start:]
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if outer.cut is not None:
                    data, outer.cut = data[: outer.cut], None
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hellaswag_val_full.txt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def body() -> bytes:
    return HELLASWAG.read_bytes()


def test_pinned_checksum_is_the_shared_files():
    assert DATASETS["hellaswag"].sha256 == hashlib.sha256(HELLASWAG.read_bytes()).hexdigest()


def test_good_transfer_lands_checked_and_is_used_by_bench(tmp_path, body):
    with _Server(body) as srv:
        res = CliRunner().invoke(main, ["data", "fetch", "hellaswag", "--data-dir", str(tmp_path), "--url", srv.url])
    assert res.exit_code == 0, res.output
    assert "pinned SHA-256 matches" in res.output
    assert (tmp_path / "hellaswag_val_full.txt").read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hellaswag_val_full.txt"]
    spec = parse_bench("hellaswag:20", tmp_path)
    assert (spec.file, spec.tasks, spec.name) == (tmp_path / "hellaswag_val_full.txt", 20, "hellaswag")
    listed = CliRunner().invoke(main, ["data", "list", "--data-dir", str(tmp_path), "--json"])
    assert listed.exit_code == 0
    assert '"present": true' in listed.output and "pinned SHA-256 matches" in listed.output
    again = CliRunner().invoke(
        main, ["data", "fetch", "hellaswag", "--data-dir", str(tmp_path), "--url", "http://127.0.0.1:9/x"]
    )
    assert again.exit_code == 0, again.output  # present and checked: nothing downloaded


def test_cut_transfer_is_resumed_with_range(tmp_path, body):
    cut = len(body) // 3
    with _Server(body, cut_first=cut) as srv:
        got = datasets.fetch("hellaswag", tmp_path, srv.url)
    assert srv.requests == [None, f"bytes={cut}-"]
    assert got.path.read_bytes() == body
    assert not (tmp_path / "hellaswag_val_full.txt.part").exists()


def test_server_ignoring_range_restarts_the_transfer(tmp_path, body):
    with _Server(body, cut_first=len(body) // 2, ignore_range=True) as srv:
        got = datasets.fetch("hellaswag", tmp_path, srv.url)
    assert len(srv.requests) == 2 and got.path.read_bytes() == body


def test_wrong_checksum_is_refused_and_nothing_kept(tmp_path, body):
    with _Server(body[: len(body) // 2]) as srv:  # a complete transfer of the wrong bytes
        res = CliRunner().invoke(main, ["data", "fetch", "hellaswag", "--data-dir", str(tmp_path), "--url", srv.url])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "is not the pinned" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_server_gone_is_one_error_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(
        main, ["data", "fetch", "hellaswag", "--data-dir", str(tmp_path), "--url", f"http://127.0.0.1:{port}/h.txt"]
    )
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "cannot download" in lines[0], res.output
    assert list(tmp_path.iterdir()) == []


def test_a_cut_that_persists_keeps_the_part_for_the_next_fetch(tmp_path, body, monkeypatch):
    monkeypatch.setattr(datasets, "RESUME_ATTEMPTS", 1)
    with _Server(body, cut_first=1000) as srv:
        with pytest.raises(EvalError, match="transfer cut at 1,000 of .* kept: run the fetch again to resume"):
            datasets.fetch("hellaswag", tmp_path, srv.url)
    assert (tmp_path / "hellaswag_val_full.txt.part").stat().st_size == 1000
    with _Server(body) as srv:
        got = datasets.fetch("hellaswag", tmp_path, srv.url)
    assert srv.requests == ["bytes=1000-"] and got.path.read_bytes() == body


def test_bench_without_data_names_the_fetch_command(tmp_path):
    res = CliRunner().invoke(main, ["eval", "m.gguf", "--bench", "hellaswag:20", "--data-dir", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: --bench hellaswag:20: hellaswag_val_full.txt is not in {tmp_path}; fetch it with "
        "`gguf-surgeon data fetch hellaswag` (or point GGUF_SURGEON_DATA at a folder holding it)"
    ]


def test_unpinned_file_is_parsed_recorded_and_watched(tmp_path):
    """llama.cpp pins no checksum for the multiple-choice sets: a fetched one is read task by
    task, its SHA-256 recorded, and `data list` shows a later change; one that does not parse
    is refused and nothing is kept."""
    good = mc_file_bytes([mc_task_bytes("Two plus two is", ["four.", "five."], 0)] * 3)
    with _Server(good) as srv:
        got = datasets.fetch("arc-easy", tmp_path, srv.url)
    assert got.tasks == 3 and "no pinned SHA-256" in got.check
    assert json.loads((tmp_path / "sha256.json").read_text()) == {
        "arc-easy-validation.bin": hashlib.sha256(good).hexdigest()
    }
    listed = {f.name: f for f in datasets.listing(tmp_path)}
    assert listed["arc-easy"].check == "recorded SHA-256 matches" and not listed["mmlu"].present
    (tmp_path / "arc-easy-validation.bin").write_bytes(good + b"x")
    assert datasets.listing(tmp_path)[2].check.startswith("changed since fetched")

    with _Server(b"<html>not found</html>") as srv:
        res = CliRunner().invoke(main, ["data", "fetch", "mmlu", "--data-dir", str(tmp_path), "--url", srv.url])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "nothing kept" in res.output
    assert not (tmp_path / "mmlu-validation.bin").exists() and not (tmp_path / "mmlu-validation.bin.part").exists()
