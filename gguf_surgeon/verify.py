"""Structural checks llama.cpp's loader enforces, and byte identity of an edit with its source."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from .diff import tensors_equal
from .hazards import INDEX_HAZARDS
from .metadata import HEAL_TENSORS_KEY
from .plan import LayerPlan
from .reader import Model, align
from .surgery import block_suffix_sets, plan_surgery
from .vocab import GGUFValueType, Keys
from .writer import blend_rows

# keys llama.cpp reads as one value per layer when they are arrays
PER_LAYER_TEMPLATES = (
    Keys.LLM.FEED_FORWARD_LENGTH,
    Keys.Attention.HEAD_COUNT,
    Keys.Attention.HEAD_COUNT_KV,
    Keys.Attention.SLIDING_WINDOW_PATTERN,
)


@dataclass(frozen=True)
class Finding:
    rule: str  # what was checked
    ok: bool
    detail: str


@dataclass(frozen=True)
class Verification:
    path: str
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "findings": [asdict(f) for f in self.findings]}


LOADER_RULES = (
    "tensor names under 64 bytes and unique across shards, non-empty unique keys, every dimension a "
    "non-negative int64 with the element count below INT64_MAX, rows a multiple of the type's block, "
    "general.alignment a UINT32 power of two"
)


def check_structure(model: Model) -> list[Finding]:
    # a file that breaks one of llama.cpp's gguf_init_from_file rules is refused on reading,
    # with the rule named (reader.parse_file); reaching here means they all hold
    findings = [Finding("llama.cpp header rules", True, LOADER_RULES)]
    for shard in model.shards:
        expected = 0
        bad = None
        for t in shard.tensors:
            rel = t.offset - shard.data_offset
            if rel != expected:
                bad = f"{shard.path.name}: tensor {t.name!r} at data offset {rel}, expected {expected} (contiguous, aligned to {shard.alignment}, in tensor-info order)"
                break
            expected = align(rel + t.n_bytes, shard.alignment)
        findings.append(
            Finding(
                "offsets contiguous and aligned", bad is None, bad or f"{shard.path.name}: {len(shard.tensors)} tensors"
            )
        )

    blocks = model.blocks()
    declared = model.value(model.block_count_key)
    findings.append(
        Finding(
            "block_count matches tensors",
            declared == len(blocks),
            f"{model.block_count_key} = {declared}, tensors hold blocks 0-{len(blocks) - 1}",
        )
    )
    for template in PER_LAYER_TEMPLATES:
        key = model.arch_key(template)
        f = model.fields.get(key)
        if f is not None and f.type == GGUFValueType.ARRAY:
            findings.append(
                Finding(
                    "per-layer array length",
                    f.count == len(blocks),
                    f"{key} has {f.count} values for {len(blocks)} blocks",
                )
            )

    sets = block_suffix_sets(blocks)
    odd = [i for i, s in enumerate(sets) if s != sets[0]]
    varies_by_design = model.architecture in INDEX_HAZARDS or model.has(
        model.arch_key(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)
    )
    findings.append(
        Finding(
            "same tensor set in every block",
            not odd or varies_by_design,
            f"blocks {odd[:8]} differ from block 0"
            + (" (expected for this architecture)" if odd and varies_by_design else "")
            if odd
            else f"{len(sets[0])} tensors per block",
        )
    )
    return findings


def check_against(model: Model, source: Model, plan: LayerPlan) -> list[Finding]:
    """Every tensor of `model` equals what `plan` applied to `source` must produce."""
    expected = plan_surgery(source, plan, force=True)
    names = [t.name for t in model.tensors]
    want = [t.name for t in expected.tensors]
    findings = [
        Finding(
            "tensor names and order",
            names == want,
            "as planned"
            if names == want
            else f"got {len(names)} tensors, expected {len(want)}; first difference at "
            f"{next((a, b) for a, b in zip(names + [''] * len(want), want + [''] * len(names)) if a != b)}",
        )
    ]
    if names != want:
        return findings
    copies = mismatched = blends = healed = 0
    first_bad = None
    listed = set(str(model.value(HEAL_TENSORS_KEY) or "").split(","))
    for t in expected.tensors:
        got = model.tensor(t.name)
        if t.healed:  # computed from calibration activations: recorded, not re-derivable here
            healed += 1
            same = got.shape == t.shape and t.name in listed
        elif t.is_copy and t.pieces is not None:  # kept experts: the source's byte ranges, in order
            copies += 1
            src = t.sources[0][0]
            h, g = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
            for a, b in t.pieces:
                for start in range(a, b, 16 << 20):
                    h.update(source.tensor_bytes(src, start, min(b, start + (16 << 20))))
            for chunk in model.tensor_chunks(got):
                g.update(chunk)
            same = (got.shape, got.ggml_type) == (t.shape, t.ggml_type) and g.digest() == h.digest()
        elif t.is_copy:
            copies += 1
            same = got.shape == t.shape and tensors_equal(model, got, source, t.sources[0][0])
        else:
            blends += 1
            h = hashlib.blake2b(digest_size=16)
            for chunk in blend_rows(source, t):
                h.update(chunk)
            g = hashlib.blake2b(digest_size=16)
            for chunk in model.tensor_chunks(got):
                g.update(chunk)
            same = got.ggml_type == t.ggml_type and g.digest() == h.digest()
        if not same:
            mismatched += 1
            first_bad = first_bad or t.name
    findings.append(
        Finding(
            "tensor bytes equal their source",
            mismatched == 0,
            f"{copies} copied and {blends} blended tensors checked"
            + (
                f"; {healed} healed tensor(s) checked for shape and their {HEAL_TENSORS_KEY} entry only "
                "(computed from calibration activations; the key's siblings record how)"
                if healed
                else ""
            )
            + (f"; {mismatched} differ, first {first_bad}" if mismatched else ""),
        )
    )
    return findings


def verify(model: Model, source: Model | None = None, plan: LayerPlan | None = None) -> Verification:
    findings = check_structure(model)
    if source is not None and plan is not None:
        findings += check_against(model, source, plan)
    return Verification(str(model.path), tuple(findings))
