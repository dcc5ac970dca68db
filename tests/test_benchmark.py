"""The benchmark script keeps working (run once on its tiny size; timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_runs_on_tiny_size(tmp_path, llama_bin):
    out = tmp_path / "rows.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_surgery.py"),
            "--sizes",
            "tiny",
            "--repeat",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--llama-bin",
            str(llama_bin),
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = {r["command"]: r for r in json.loads(out.read_text())}
    for name in (
        "cp",
        "delete",
        "swap",
        "duplicate",
        "keep",
        "apply delete;swap",
        "interpolate",
        "inspect",
        "diff",
        "gguf-py delete",
        "llama-quantize --prune-layers",
    ):
        assert name in rows, name
        assert rows[name]["peak_rss_mib"] > 0
    assert rows["delete"]["median_s"] > 0 and rows["delete"]["ratio"] > 0 and rows["delete"]["best_ratio"] > 0
