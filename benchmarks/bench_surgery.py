"""Surgery at disk speed with flat memory: gguf-surgeon vs cp vs llama-quantize vs gguf-py.

Generates Qwen3-shaped BF16 GGUFs deterministically (finite values; llama-quantize rejects
NaN/Inf), then times each command in paired runs with cp (a warm-up pair, then ABBA order,
sync between runs) and reports medians, the median of the per-pair ratios, the ratio of the
fastest runs and peak RSS. Not a timed test: the suite runs it once on the tiny size to keep
it working.

    python benchmarks/bench_surgery.py --sizes 0.5G,1.7B,3.4B --repeat 7 --drop-caches --json results.json
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

import gguf_surgeon

ROOT = Path(__file__).resolve().parents[1]
VOCAB_FULL = 151_936
MERGES_FULL = 151_387


@dataclass(frozen=True)
class Shape:
    """A Qwen3-like model shape."""

    blocks: int
    hidden: int
    ff: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    merges: int


SHAPES = {
    "tiny": Shape(6, 256, 512, 4, 2, 64, 4_096, 1_000),
    "0.5G": Shape(12, 1024, 2048, 8, 4, 128, VOCAB_FULL, MERGES_FULL),  # 0.53 GB, the full Qwen3 vocab
    "1.7B": Shape(28, 2048, 6144, 16, 8, 128, VOCAB_FULL, MERGES_FULL),  # Qwen3-1.7B, 3.45 GB in BF16
    "3.4B": Shape(56, 2048, 6144, 16, 8, 128, VOCAB_FULL, MERGES_FULL),  # twice the blocks
}

PATTERN_BYTES = 16 << 20


def pattern() -> bytes:
    """16 MiB of finite BF16 values (normal * 0.02), the same on every run."""
    x = (np.random.default_rng(0).standard_normal(PATTERN_BYTES // 2) * 0.02).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def tensor_list(s: Shape) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]:
    bf16, f32 = gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F32
    out = [("token_embd.weight", (s.hidden, s.vocab), bf16)]
    for i in range(s.blocks):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (s.hidden,), f32),
            (p + "attn_q.weight", (s.hidden, s.heads * s.head_dim), bf16),
            (p + "attn_k.weight", (s.hidden, s.kv_heads * s.head_dim), bf16),
            (p + "attn_v.weight", (s.hidden, s.kv_heads * s.head_dim), bf16),
            (p + "attn_output.weight", (s.heads * s.head_dim, s.hidden), bf16),
            (p + "attn_q_norm.weight", (s.head_dim,), f32),
            (p + "attn_k_norm.weight", (s.head_dim,), f32),
            (p + "ffn_norm.weight", (s.hidden,), f32),
            (p + "ffn_gate.weight", (s.hidden, s.ff), bf16),
            (p + "ffn_up.weight", (s.hidden, s.ff), bf16),
            (p + "ffn_down.weight", (s.ff, s.hidden), bf16),
        ]
    out.append(("output_norm.weight", (s.hidden,), f32))
    return out


def generate(path: Path, s: Shape) -> Path:
    """Write a synthetic model (tied embeddings like Qwen3-1.7B); reused when present."""
    if path.exists():
        return path
    tmp = path.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "qwen3")
    w.add_name(f"synthetic qwen3 {s.blocks}x{s.hidden}")
    w.add_block_count(s.blocks)
    w.add_context_length(40960)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.ff)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([f"tok{i}" for i in range(s.vocab)])
    w.add_token_types([1] * s.vocab)
    w.add_token_merges([f"t{i} k{i}" for i in range(s.merges)])
    w.add_eos_token_id(0)
    w.add_chat_template("{%- for m in messages %}{{ m.content }}{%- endfor %}{# enable_thinking #}")
    tensors = tensor_list(s)
    for name, shape, t in tensors:
        block, size = gguf.GGML_QUANT_SIZES[t]
        n = int(np.prod(shape)) // block * size
        w.add_tensor_info(
            name,
            tuple(reversed(shape)),
            np.dtype(np.float32 if t == gguf.GGMLQuantizationType.F32 else np.uint16),
            n,
            raw_dtype=t,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    pat = pattern()
    ones = np.ones(1 << 16, dtype=np.float32).tobytes()
    f = w.fout[0]
    f.write(b"\0" * (-f.tell() % w.data_alignment))
    for i, (name, shape, t) in enumerate(tensors):
        n = int(np.prod(shape)) * (4 if t == gguf.GGMLQuantizationType.F32 else 2)
        src = ones if t == gguf.GGMLQuantizationType.F32 else pat
        start = (i * 7919 * 2) % (len(src) // 2)  # a different window per tensor: blocks hash differently
        left = n
        while left:
            chunk = src[start : start + left] or src[:left]
            f.write(chunk)
            left -= len(chunk)
            start = 0
        f.write(b"\0" * (-n % w.data_alignment))
    w.close()
    tmp.rename(path)
    return path


GGUF_PY_DELETE = r"""
import sys, gguf
src, dst, drop = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = gguf.GGUFReader(src)
arch = r.fields["general.architecture"].contents()
w = gguf.GGUFWriter(dst, arch)
for f in r.fields.values():
    if f.name.startswith("GGUF.") or f.name == "general.architecture":
        continue
    v = f.contents()
    if f.name == arch + ".block_count":
        v -= 1
    sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
    w.add_key_value(f.name, v, f.types[0], sub_type=sub)
for t in r.tensors:
    parts = t.name.split(".")
    if parts[0] == "blk":
        n = int(parts[1])
        if n == drop:
            continue
        if n > drop:
            parts[1] = str(n - 1)
    w.add_tensor(".".join(parts), t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""


LAUNCHER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\nPEAK_KB {usage.ru_maxrss}\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command.

    The RSS comes from a small launcher (GNU time when installed): a child forked from this
    big benchmark process would report this process's RSS as its own peak.
    """
    timer = (
        ["/usr/bin/time", "-f", "\nPEAK_KB %M"] if Path("/usr/bin/time").exists() else [sys.executable, "-c", LAUNCHER]
    )
    t0 = time.perf_counter()
    proc = subprocess.run(timer + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"Error: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-500:]}")
    peak = [l for l in proc.stderr.splitlines() if l.startswith("PEAK_KB ")][-1]
    return wall, int(peak.split()[1]) / 1024


def settle(work: Path, previous: Path | None = None) -> None:
    """Remove the last output and flush dirty pages, so no run pays for the previous one's
    writeback; with `previous`, leave a copy of it as the output to be overwritten (its pages
    cached, as after a first surgery a user repeats with --force)."""
    out = work / "out.gguf"
    out.unlink(missing_ok=True)
    if previous is not None:
        subprocess.run(["cp", str(previous), str(out)], check=True)
    subprocess.run(["sync"], check=True)


OVERWRITE = " (overwrite)"  # cases run over an existing OUT, against cp over an existing file


def cases(model: Path, work: Path, s: Shape, llama_bin: Path | None) -> dict[str, list[str]]:
    gs = [sys.executable, "-m", "gguf_surgeon"]
    out = str(work / "out.gguf")
    mid = s.blocks // 2
    c = {
        "cp": ["cp", str(model), out],
        "delete": gs + ["delete", str(mid), str(model), out, "--force"],
        "swap": gs + ["swap", str(mid), str(mid + 1), str(model), out, "--force"],
        "duplicate": gs + ["duplicate", str(mid), str(model), out, "--force"],
        "keep": gs
        + [
            "keep",
            f"0-{mid - 1},{mid + 1},{mid}" + (f",{mid + 2}-{s.blocks - 1}" if mid + 2 < s.blocks else ""),
            str(model),
            out,
            "--force",
        ],
        "apply delete;swap": gs + ["apply", f"delete {mid - 1}; swap {mid} {mid + 1}", str(model), out, "--force"],
        "apply delete;swap" + OVERWRITE: gs
        + ["apply", f"delete {mid - 1}; swap {mid} {mid + 1}", str(model), out, "--force"],
        "interpolate": gs + ["interpolate", str(mid), str(mid + 1), str(model), out, "--force"],
        "inspect": gs + ["inspect", str(model)],
        "diff": gs + ["diff", str(model), str(work / "edited.gguf")],
        "gguf-py delete": [sys.executable, "-c", GGUF_PY_DELETE, str(model), out, str(mid)],
    }
    quantize = (llama_bin / "llama-quantize") if llama_bin else None
    if quantize and quantize.exists():
        c["llama-quantize --prune-layers"] = [str(quantize), "--prune-layers", str(mid), str(model), out, "COPY"]
    return c


def bench(size: str, work: Path, repeat: int, llama_bin: Path | None, skip: set[str]) -> list[dict]:
    s = SHAPES[size]
    work.mkdir(parents=True, exist_ok=True)
    model = generate(work / f"synthetic-{size}.gguf", s)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gguf_surgeon",
            "apply",
            f"delete {s.blocks // 2}",
            str(model),
            str(work / "edited.gguf"),
            "--force",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    file_size = model.stat().st_size
    subprocess.run(
        ["cat", str(model), str(work / "edited.gguf")], stdout=subprocess.DEVNULL, check=True
    )  # warm the page cache
    rows = []
    all_cases = cases(model, work, s, llama_bin)
    cp = all_cases["cp"]
    # "reading both once" for diff: the time to stream both files
    read_both = ["cat", str(model), str(work / "edited.gguf")]
    for name, cmd in all_cases.items():
        if name == "cp" or name in skip:
            continue
        base_cmd = read_both if name == "diff" else cp
        walls, bases, rss = [], [], []
        for i in range(repeat + 1):  # pair 0 warms up (first-touch costs) and is not counted
            # ABBA order: the baseline runs first in even pairs, second in odd ones, so a drift
            # of the machine within a pair (cache, writeback) does not favour either side
            pair = {}
            for which in ("base", "cmd") if i % 2 == 0 else ("cmd", "base"):
                settle(work, work / "edited.gguf" if name.endswith(OVERWRITE) else None)
                pair[which] = run(base_cmd if which == "base" else cmd)
            if i == 0:
                continue
            bases.append(pair["base"][0])
            walls.append(pair["cmd"][0])
            rss.append(pair["cmd"][1])
        med, base = statistics.median(walls), statistics.median(bases)
        ratio = statistics.median(w / b for w, b in zip(walls, bases))  # per pair: drift in the machine cancels
        # best against best: interference (writeback of other runs, a busy host) only ever adds
        # time, so the fastest run of each is the closest to what the command itself costs
        best = min(walls) / min(bases)
        rows.append(
            {
                "size": size,
                "file_bytes": file_size,
                "command": name,
                "median_s": round(med, 3),
                "baseline": "read both (cat)" if name == "diff" else "cp",
                "baseline_s": round(base, 3),
                "ratio": round(ratio, 2),
                "best_s": round(min(walls), 3),
                "best_baseline_s": round(min(bases), 3),
                "best_ratio": round(best, 2),
                "peak_rss_mib": round(max(rss), 1),
            }
        )
        print(
            f"{size:>5} {name:<32} {med:8.3f} s  {base:8.3f} s  x{ratio:5.2f}  x{best:5.2f}  {max(rss):8.1f} MiB",
            flush=True,
        )
    _, cp_rss = run(cp)
    rows.insert(
        0,
        {
            "size": size,
            "file_bytes": file_size,
            "command": "cp",
            "median_s": None,
            "baseline": "cp",
            "baseline_s": None,
            "ratio": 1.0,
            "best_s": None,
            "best_baseline_s": None,
            "best_ratio": 1.0,
            "peak_rss_mib": round(cp_rss, 1),
        },
    )
    (work / "out.gguf").unlink(missing_ok=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5G,1.7B,3.4B", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-surgeon-bench"))
    ap.add_argument("--llama-bin", type=Path, default=os.environ.get("GGUF_SURGEON_LLAMA_BIN"))
    ap.add_argument("--skip", default="", help="comma list of commands to skip (e.g. 'gguf-py delete')")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--markdown", type=Path, help="write the rows as a markdown table here")
    ap.add_argument("--keep-models", action="store_true", help="keep the generated models for the next run")
    ap.add_argument(
        "--drop-caches",
        action="store_true",
        help="before each size, write back and drop the page cache (needs root), so the previous "
        "size's files do not crowd this one's out of memory; the model is then read once to warm it",
    )
    args = ap.parse_args()
    print(f"{'size':>5} {'command':<32} {'median':>10}  {'baseline':>10}  {'ratio':>6}  {'best':>6}  {'peak RSS':>12}")
    # bytecode as an installed package has it (pip compiles at install time); an editable
    # install under PYTHONDONTWRITEBYTECODE would otherwise recompile every module per run
    compileall.compile_dir(Path(gguf_surgeon.__file__).parent, quiet=1)
    rows = []
    for size in args.sizes.split(","):
        if args.drop_caches:
            subprocess.run(["sync"], check=True)
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            except OSError as e:
                raise SystemExit(
                    f"Error: --drop-caches: cannot write /proc/sys/vm/drop_caches ({e.strerror}); it needs root"
                )
        rows += bench(size, args.work, args.repeat, args.llama_bin, set(filter(None, args.skip.split(","))))
        if not args.keep_models:
            for p in args.work.glob(f"*{size}*.gguf"):
                p.unlink()
            (args.work / "edited.gguf").unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    """The rows as the table docs/performance.md shows."""
    lines = [
        "| size | file | command | median | baseline | ratio | best vs best | peak RSS |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        med = "" if r["median_s"] is None else f"{r['median_s']:.3f} s"
        base = "" if r["baseline_s"] is None else f"{r['baseline_s']:.3f} s ({r['baseline']})"
        lines.append(
            f"| {r['size']} | {r['file_bytes'] / 1e9:.2f} GB | {r['command']} | {med} | {base} | "
            f"x{r['ratio']:.2f} | x{r['best_ratio']:.2f} | {r['peak_rss_mib']:.1f} MiB |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
