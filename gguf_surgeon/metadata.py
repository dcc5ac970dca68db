"""What a plan does to metadata: block_count, per-layer arrays, provenance, name.

Every key the plan does not change is copied byte for byte, in its original order.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import OptionError
from .experts import expert_values
from .plan import LayerPlan
from .reader import SCALAR_FORMATS, SPLIT_KEYS, Model
from .vocab import BASE_MODEL_PREFIX, GGUFValueType, Keys

RECIPE_KEY = "surgery.recipe"
HEAL_PREFIX = "surgery.heal."  # how a healed deletion was computed (estimator, calibration hash, tokens, tensors)
HEAL_TENSORS_KEY = HEAL_PREFIX + "tensors"  # comma-separated names of the tensors a heal rewrote
PADDING_KEY = "surgery.padding"  # zeros the writer adds to line tensor data up with the source's


@dataclass(frozen=True)
class OutputField:
    """One key-value pair of the output: newly encoded, or copied verbatim from the source.

    A copied pair is only a byte range of the source's first file: the writer copies it inside
    the kernel, so a 151,936-token vocabulary is never held in memory.
    """

    key: str
    raw: bytes = b""  # the complete encoded key-value (key, type, value), when newly encoded
    span: tuple[int, int] | None = None  # [start, end) in the source's first file, when copied

    @property
    def size(self) -> int:
        return self.span[1] - self.span[0] if self.span else len(self.raw)


@dataclass(frozen=True)
class MetadataChange:
    key: str
    old: Any  # None when the key is added
    new: Any  # None when the key is removed


def encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype: GGUFValueType, value: Any, item_type: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return encode_string(value)
    if vtype == GGUFValueType.ARRAY:
        assert item_type is not None
        out = struct.pack("<IQ", item_type, len(value))
        return out + b"".join(encode_value(item_type, v) for v in value)
    return struct.pack(SCALAR_FORMATS[vtype], value)


def encode_field(key: str, vtype: GGUFValueType, value: Any, item_type: GGUFValueType | None = None) -> OutputField:
    return OutputField(key, encode_string(key) + struct.pack("<I", vtype) + encode_value(vtype, value, item_type))


def per_layer_keys(model: Model) -> list[str]:
    """`<arch>.*` arrays whose length equals the source block count: re-indexed by a plan."""
    prefix = model.architecture + "."
    n = model.block_count
    return [
        k for k, f in model.fields.items() if k.startswith(prefix) and f.type == GGUFValueType.ARRAY and f.count == n
    ]


INTEGER_RANGES = {
    GGUFValueType.UINT8: (0, 0xFF),
    GGUFValueType.INT8: (-0x80, 0x7F),
    GGUFValueType.UINT16: (0, 0xFFFF),
    GGUFValueType.INT16: (-0x8000, 0x7FFF),
    GGUFValueType.UINT32: (0, 0xFFFFFFFF),
    GGUFValueType.INT32: (-0x80000000, 0x7FFFFFFF),
}


def _count_type(vtype: GGUFValueType, value: int) -> GGUFValueType:
    """The source's integer type for a count when the value fits, else UINT32 (llama.cpp's own)."""
    lo, hi = INTEGER_RANGES.get(vtype, (0, 1 << 64))
    return vtype if lo <= value <= hi else GGUFValueType.UINT32


def default_name(model: Model, plan: LayerPlan) -> str:
    base = model.value(Keys.General.NAME) or model.path.stem
    # prune-experts' per-block lists (kilobytes on a 48-block model) stay in surgery.recipe only
    recipe = re.sub(r" --keep \S+", "", plan.recipe)
    return f"{base} (gguf-surgeon: {recipe})"


def plan_metadata(
    model: Model,
    plan: LayerPlan,
    name: str | None = None,
    alignment: int | None = None,
    heal: Mapping[str, str | int] | None = None,
) -> tuple[list[OutputField], list[MetadataChange], list[str]]:
    """The output's key-value list, the changes made, and warnings about per-layer values.

    `alignment` sets general.alignment (e.g. 4096, so a reflink filesystem can share extents).
    `heal` adds `surgery.heal.<key>` values (strings, or integers as UINT64); the source's own
    `surgery.heal.*` keys never carry over (they describe the source's surgery, not this one).
    """
    warnings: list[str] = []
    new_values: dict[str, tuple[GGUFValueType, Any, GGUFValueType | None]] = {}
    bc = model.block_count_key
    bc_field = model.fields.get(bc)
    bc_type = bc_field.type if bc_field else GGUFValueType.UINT32
    new_values[bc] = (_count_type(bc_type, len(plan.layers)), len(plan.layers), None)
    if new_values[bc][0] != bc_type:
        warnings.append(f"{bc}: a {bc_type.name} cannot hold {len(plan.layers)}; written as a UINT32")
    for key in per_layer_keys(model):
        f = model.fields[key]
        old = model.value(key)
        new = []
        for out_i, src in enumerate(plan.layers):
            vals = {old[i] for i, _ in src.parts}
            if len(vals) > 1:
                warnings.append(
                    f"{key}: blended block {out_i} mixes blocks with different values {sorted(vals)}; using block {src.primary}'s"
                )
            new.append(old[src.primary])
        new_values[key] = (GGUFValueType.ARRAY, new, f.item_type)
    new_values.update(expert_values(model, plan))  # expert_count and the kept experts (prune-experts)

    if name is not None:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise OptionError(
                f"--name {name.encode('utf-8', 'backslashreplace').decode()!r} is not valid UTF-8"
            ) from None
    source_name = model.value(Keys.General.NAME)
    new_values[Keys.General.NAME] = (GGUFValueType.STRING, name or default_name(model, plan), None)
    provenance: dict[str, tuple[GGUFValueType, Any, None]] = {
        Keys.General.BASE_MODEL_COUNT: (GGUFValueType.UINT32, 1, None)
    }
    for template, source_key in (
        (Keys.General.BASE_MODEL_NAME, Keys.General.NAME),
        (Keys.General.BASE_MODEL_ORGANIZATION, Keys.General.ORGANIZATION),
        (Keys.General.BASE_MODEL_VERSION, Keys.General.VERSION),
        (Keys.General.BASE_MODEL_REPO_URL, Keys.General.REPO_URL),
    ):
        v = source_name if source_key == Keys.General.NAME else model.value(source_key)
        if isinstance(v, str):
            provenance[template.format(id=0)] = (GGUFValueType.STRING, v, None)
    provenance[RECIPE_KEY] = (GGUFValueType.STRING, plan.recipe, None)
    new_values.update(provenance)
    for key, value in (heal or {}).items():
        if isinstance(value, str):
            new_values[HEAL_PREFIX + key] = (GGUFValueType.STRING, value, None)
        else:
            new_values[HEAL_PREFIX + key] = (GGUFValueType.UINT64, int(value), None)
    if alignment is not None and alignment != model.file.alignment:
        new_values[Keys.General.ALIGNMENT] = (GGUFValueType.UINT32, alignment, None)

    fields: list[OutputField] = []
    changes: list[MetadataChange] = []
    for key in model.fields:
        if key in SPLIT_KEYS or key == PADDING_KEY:
            continue  # the writer adds split keys and padding again where its layout needs them
        if (key.startswith(BASE_MODEL_PREFIX) or key.startswith(HEAL_PREFIX)) and key not in new_values:
            changes.append(MetadataChange(key, model.value(key), None))
            continue
        if key in new_values:
            vtype, value, item = new_values.pop(key)
            old = model.value(key)
            if old != value:
                changes.append(MetadataChange(key, old, value))
            fields.append(encode_field(key, vtype, value, item))
        else:
            f = model.fields[key]
            fields.append(OutputField(key, span=(f.start, f.end)))
    for key, (vtype, value, item) in new_values.items():
        changes.append(MetadataChange(key, None, value))
        fields.append(encode_field(key, vtype, value, item))
    return fields, changes, warnings
