"""Compare two models: metadata differences, and B's blocks expressed in A's by comparing tensor bytes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SurgeonError
from .metadata import HEAL_TENSORS_KEY
from .operations import build_plan, format_layer_spec
from .reader import Model, TensorInfo
from .recipe import parse_recipe
from .surgery import HEAL_TENSOR
from .vocab import GGUFValueType

LONG_ARRAY = 16  # arrays longer than this are summarized, not listed, in a diff


@dataclass(frozen=True)
class KeyDiff:
    key: str
    a: Any  # None when only in B
    b: Any  # None when only in A


@dataclass(frozen=True)
class ModelDiff:
    metadata: tuple[KeyDiff, ...]
    block_map: tuple[int | None, ...]  # B's block i equals A's block block_map[i] (None: no match)
    globals_changed: tuple[str, ...]  # non-block tensors whose bytes differ or that exist in one only
    recipe: str | None  # a recipe turning A's blocks into B's, when every B block matches one of A's
    healed: tuple[str, ...] = ()  # B's tensors a heal rewrote (its surgery.heal.tensors), left out of matching

    def to_dict(self) -> dict:
        return {
            "metadata": [{"key": d.key, "a": d.a, "b": d.b} for d in self.metadata],
            "block_map": list(self.block_map),
            "globals_changed": list(self.globals_changed),
            "recipe": self.recipe,
            "healed": list(self.healed),
        }


SAMPLE = 4096  # bytes hashed at the start, middle and end of each tensor for a block's signature
COMPARE_CHUNK = 2 << 20  # small enough that both pieces stay in the CPU cache while compared
_buffers: list[np.ndarray] = []  # two reusable read buffers: fresh allocations would fault in new pages


def tensors_equal(a: Model, ta: TensorInfo, b: Model, tb: TensorInfo) -> bool:
    """Same shape, type and bytes; compared in chunks (bounded memory, memcmp speed)."""
    if (ta.shape, ta.ggml_type) != (tb.shape, tb.ggml_type):
        return False
    if not _buffers:
        _buffers.extend(np.empty(COMPARE_CHUNK, dtype=np.uint8) for _ in range(2))
    for start in range(0, ta.n_bytes, COMPARE_CHUNK):
        stop = min(ta.n_bytes, start + COMPARE_CHUNK)
        x = a.tensor_bytes(ta, start, stop, _buffers[0])
        y = b.tensor_bytes(tb, start, stop, _buffers[1])
        words = (stop - start) // 8 * 8  # compare 8 bytes at a time, then the tail
        if not (
            np.array_equal(x[:words].view(np.uint64), y[:words].view(np.uint64))
            and np.array_equal(x[words:], y[words:])
        ):
            return False
    return True


def block_signature(model: Model, block: list[TensorInfo]) -> str:
    """A cheap fingerprint of a block (names, shapes, types, sampled bytes): equal blocks have
    equal signatures; equal signatures are confirmed byte by byte with `blocks_equal`."""
    h = hashlib.blake2b(digest_size=16)
    for t in sorted(block, key=lambda t: t.block_suffix or ""):
        h.update(f"{t.block_suffix}|{t.shape}|{int(t.ggml_type)}|".encode())
        for start in sorted({0, max(0, t.n_bytes // 2 - SAMPLE // 2), max(0, t.n_bytes - SAMPLE)}):
            h.update(model.tensor_bytes(t, start, min(t.n_bytes, start + SAMPLE)))
    return h.hexdigest()


def blocks_equal(a: Model, block_a: list[TensorInfo], b: Model, block_b: list[TensorInfo]) -> bool:
    by_suffix = {t.block_suffix: t for t in block_b}
    if set(by_suffix) != {t.block_suffix for t in block_a}:
        return False
    return all(tensors_equal(a, t, b, by_suffix[t.block_suffix]) for t in block_a)


def match_blocks(a: Model, b: Model, healed: frozenset[str] = frozenset()) -> tuple[int | None, ...]:
    """For each block of B, the first block of A with identical tensors (None when none is).
    B's tensors named in `healed` (rewritten by a heal) are left out of the comparison."""
    blocks_a, blocks_b = a.blocks(), b.blocks()
    candidates: dict[str, list[int]] = {}
    for i, block in enumerate(blocks_a):
        candidates.setdefault(block_signature(a, block), []).append(i)
    out = []
    for block in blocks_b:
        found = None
        skip = {t.block_suffix for t in block if t.name in healed}
        if skip:  # the signature covers every tensor: compare the rest of the block directly
            rest = [t for t in block if t.block_suffix not in skip]
            for i, cand in enumerate(blocks_a):
                if {t.block_suffix for t in cand} == {t.block_suffix for t in block} and blocks_equal(
                    a, [t for t in cand if t.block_suffix not in skip], b, rest
                ):
                    found = i
                    break
        else:
            for i in candidates.get(block_signature(b, block), []):
                if blocks_equal(a, blocks_a[i], b, block):
                    found = i
                    break
        out.append(found)
    return tuple(out)


def _shown(model: Model, key: str) -> Any:
    f = model.fields[key]
    if f.type == GGUFValueType.ARRAY and f.count > LONG_ARRAY:
        return f"[{f.count} x {f.item_type.name if f.item_type else '?'}]"
    return model.value(key)


def _raw_value(model: Model, key: str) -> bytes:
    f = model.fields[key]
    return model.raw_field(key)[f.value_start - f.start - 4 :]  # type and value


def derive_recipe(order: list[int], n_source: int) -> str:
    """A short recipe (deletions, then swaps, moves, duplicates) that turns range(n_source) into `order`.

    Falls back to a `keep` spec when the short form does not reproduce `order`.
    """
    present = set(order)
    deleted = [i for i in range(n_source) if i not in present]
    cur = [i for i in range(n_source) if i in present]
    steps = ["delete " + " ".join(format_layer_spec(tuple(deleted)).split(","))] if deleted else []
    for pos, target in enumerate(order):
        if pos < len(cur) and cur[pos] == target:
            continue
        if target in cur[pos + 1 :]:
            j = cur.index(target, pos + 1)
            if j < len(order) and order[j] == cur[pos]:
                steps.append(f"swap {pos} {j}")
                cur[pos], cur[j] = cur[j], cur[pos]
            else:
                steps.append(f"move {j} --to {pos}")
                cur.insert(pos, cur.pop(j))
        else:
            k = cur.index(target)
            steps.append(f"duplicate {k} --at {pos}")
            cur.insert(pos, target)
    keep = "keep " + format_layer_spec(tuple(order))
    if not steps:
        return keep if n_source != len(order) else "keep " + format_layer_spec(tuple(range(n_source)))
    text = "; ".join(steps)
    try:
        plan = build_plan(parse_recipe(text), n_source)
    except SurgeonError:
        return keep
    # a few named steps read better than a layer spec; a long chain does not
    if [l.parts[0][0] for l in plan.layers] != order or (len(steps) > 4 and len(text) > len(keep)):
        return keep
    return text


def diff_models(a: Model, b: Model) -> ModelDiff:
    meta: list[KeyDiff] = []
    for key in a.fields:
        if key not in b.fields:
            meta.append(KeyDiff(key, _shown(a, key), None))
        elif _raw_value(a, key) != _raw_value(b, key):
            meta.append(KeyDiff(key, _shown(a, key), _shown(b, key)))
    meta += [KeyDiff(k, None, _shown(b, k)) for k in b.fields if k not in a.fields]

    listed = b.value(HEAL_TENSORS_KEY)
    healed = tuple(n for n in str(listed).split(",") if n) if listed else ()
    block_map = match_blocks(a, b, frozenset(healed))

    globals_changed = []
    ga = {t.name: t for t in a.tensors if t.block_index is None}
    gb = {t.name: t for t in b.tensors if t.block_index is None}
    for name in sorted(set(ga) | set(gb)):
        if name not in ga or name not in gb:
            globals_changed.append(name)
            continue
        if not tensors_equal(a, ga[name], b, gb[name]):
            globals_changed.append(name)

    recipe = None
    if all(i is not None for i in block_map):
        order = [i for i in block_map if i is not None]
        recipe = derive_recipe(order, len(a.blocks()))
        if healed:
            recipe = _with_heal(recipe, order, len(a.blocks()), healed)
    return ModelDiff(tuple(meta), block_map, tuple(globals_changed), recipe, healed)


def _with_heal(recipe: str, order: list[int], n_source: int, healed: tuple[str, ...]) -> str | None:
    """The derived recipe with its deletion healed, when that deletion's windows are exactly the
    ones whose kept blocks B's heal rewrote; else None (the heal is not expressible here)."""
    first, _, rest = recipe.partition("; ")
    if not first.startswith("delete "):
        return None
    deleted = [i for i in range(n_source) if i not in set(order)]
    kept: set[str] = set()
    for start in (i for i in deleted if i - 1 not in deleted):  # each window's first block
        if start - 1 not in order:
            return None
        kept.add(f"blk.{order.index(start - 1)}.{HEAL_TENSOR}")
    if kept != set(healed):
        return None
    return "; ".join([first + " heal", *([rest] if rest else [])])
