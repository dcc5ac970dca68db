"""Header fuzzing (issue 16): mutated fixtures (truncated, bytes flipped, counts and lengths grown,
types swapped) must each end in one clean `Error:` line with nothing left behind, or in an
output llama.cpp's own loader accepts. A fixed seed runs every time, plus a random one that is
printed (rerun a failure with GGUF_SURGEON_FUZZ_SEED=<seed>)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_surgeon.cli import main
from gguf_surgeon.reader import Model

FIXED_SEED = 20261202
CASES = int(os.environ.get("GGUF_SURGEON_FUZZ_CASES", "120"))  # per seed
COMMANDS = (["swap", "1", "2"], ["delete", "0"], ["keep", "0-5,5"], ["bridge", "2"])


def header_spots(path: Path) -> dict[str, list[int]]:
    """Offsets of the header's counts, string lengths and type codes, from our own reader."""
    with Model(path) as m:
        spots: dict[str, list[int]] = {"count": [8, 16], "length": [], "vtype": [], "ttype": [], "dim": []}
        for f in m.fields.values():
            spots["length"].append(f.start)
            spots["vtype"].append(f.value_start - 4)
            if f.item_type is not None:
                spots["vtype"].append(f.value_start)
                spots["count"].append(f.value_start + 4)
        data = path.read_bytes()[: m.file.tensor_info_end]
        for t in m.tensors:
            name = t.name.encode()
            at = data.find(struct.pack("<Q", len(name)) + name)
            spots["length"].append(at)
            dims_at = at + 8 + len(name)
            n_dims = struct.unpack_from("<I", data, dims_at)[0]
            spots["count"].append(dims_at)
            spots["dim"] += [dims_at + 4 + 8 * k for k in range(n_dims)]
            spots["ttype"].append(dims_at + 4 + 8 * n_dims)
        spots["end"] = [m.file.tensor_info_end, m.file.size]
    return spots


def mutate(data: bytes, spots: dict[str, list[int]], rng: random.Random) -> tuple[str, bytes]:
    d = bytearray(data)
    header_end = spots["end"][0]
    kind = rng.choice(["truncate", "flip", "count", "length", "vtype", "ttype", "dim"])
    if kind == "truncate":
        n = rng.randrange(0, header_end + 64) if rng.random() < 0.8 else rng.randrange(len(d))
        return f"truncate at {n}", bytes(d[:n])
    if kind == "flip":
        at = rng.randrange(header_end)
        d[at] ^= 1 << rng.randrange(8)
        return f"flip a bit at {at}", bytes(d)
    at = rng.choice(spots[kind])
    if kind in ("count", "length", "dim"):
        size = 4 if kind == "count" and at in spots["count"] and struct.unpack_from("<I", d, at)[0] <= 4 else 8
        value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1, rng.randrange(2**16)])
        value &= (1 << (8 * size)) - 1
        d[at : at + size] = value.to_bytes(size, "little")
        return f"{kind} at {at} = {value}", bytes(d)
    value = rng.randrange(0, 48)
    d[at : at + 4] = struct.pack("<I", value)
    return f"{kind} at {at} = {value}", bytes(d)


def seeds() -> list[int]:
    extra = int(os.environ.get("GGUF_SURGEON_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    return [FIXED_SEED, extra]


@pytest.mark.parametrize("seed", seeds(), ids=lambda s: f"seed={s}")
def test_mutated_headers_fail_cleanly_or_load(tmp_path: Path, tiny: Path, gguf_loader, seed: int) -> None:
    print(f"fuzz seed {seed} (rerun: GGUF_SURGEON_FUZZ_SEED={seed})")
    rng = random.Random(seed)
    data = tiny.read_bytes()
    spots = header_spots(tiny)
    work = tmp_path / "work"
    work.mkdir()
    runner = CliRunner()
    outcomes = {"error": 0, "written": 0}
    for case in range(CASES):
        what, mutated = mutate(data, spots, rng)
        src = work / "in.gguf"
        src.write_bytes(mutated)
        out = work / "out.gguf"
        command = rng.choice(COMMANDS)
        r = runner.invoke(main, [*command, str(src), str(out)])
        where = f"seed {seed} case {case} ({what}; {' '.join(command)})"
        assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), (
            f"{where}: {r.exception!r}\n{r.output}"
        )
        if r.exit_code == 0:
            refusal = gguf_loader.refusal(out)
            assert refusal is None, f"{where}: wrote {out.name}, which llama.cpp refuses: {refusal}"
            outcomes["written"] += 1
            out.unlink()
        else:
            lines = r.stderr.splitlines()
            assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), f"{where}: {r.stderr}"
            outcomes["error"] += 1
        assert src.read_bytes() == mutated, f"{where}: the input changed"
        assert sorted(p.name for p in work.iterdir()) == ["in.gguf"], f"{where}: left {os.listdir(work)}"
    print(f"seed {seed}: {outcomes}")
    assert outcomes["error"] > 0 and outcomes["written"] > 0  # the mutations reach both outcomes
