"""What `inspect` reports about a model, as plain records (rendering is the CLI's job)."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from .reader import Model
from .vocab import GGUFValueType, Keys, file_type_name

PREVIEW_ITEMS = 8  # array elements shown by --meta


@dataclass(frozen=True)
class ChatTemplateInfo:
    sha256: str  # first 16 hex digits of the template's SHA-256
    first_line: str
    length: int  # characters
    thinking_switch: bool  # the template reads an enable_thinking variable


@dataclass(frozen=True)
class LayerInfo:
    index: int
    tensors: int
    parameters: int
    bytes: int
    types: dict[str, int]  # ggml type name -> tensor count


@dataclass(frozen=True)
class ModelSummary:
    path: str
    shards: int
    version: int
    name: str | None
    architecture: str
    block_count: int  # blk.N blocks found in the tensors
    block_count_key: int | None  # what <arch>.block_count says
    embedding_length: Any
    feed_forward_length: Any  # an int, or a per-layer list
    head_count: Any
    head_count_kv: Any
    context_length: Any
    rope_freq_base: Any
    vocab_size: int | None
    tokenizer_model: str | None
    tokenizer_pre: str | None
    chat_template: ChatTemplateInfo | None
    file_type: str | None
    tensor_types: dict[str, int]  # ggml type name -> tensor count
    parameters: int
    tensor_bytes: int
    file_bytes: int
    metadata_keys: int
    tensor_count: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(model: Model) -> ModelSummary:
    """The default `inspect` report; reads no tokenizer string (fast on a 151,936-token vocab)."""
    arch = model.architecture
    key = lambda template: model.arch_key(template)  # noqa: E731
    tokens = model.fields.get(Keys.Tokenizer.LIST)
    vocab = model.value(key(Keys.LLM.VOCAB_SIZE)) or (tokens.count if tokens else None)
    template = model.value(Keys.Tokenizer.CHAT_TEMPLATE)
    tmpl = None
    if isinstance(template, str):
        tmpl = ChatTemplateInfo(
            hashlib.sha256(template.encode()).hexdigest()[:16],
            template.strip().splitlines()[0][:120] if template.strip() else "",
            len(template),
            "enable_thinking" in template,
        )
    types = Counter(t.ggml_type.name for t in model.tensors)
    blocks = model.blocks()
    return ModelSummary(
        path=str(model.path),
        shards=len(model.shards),
        version=model.file.version,
        name=model.value(Keys.General.NAME),
        architecture=arch,
        block_count=len(blocks),
        block_count_key=model.value(model.block_count_key),
        embedding_length=model.value(key(Keys.LLM.EMBEDDING_LENGTH)),
        feed_forward_length=model.value(key(Keys.LLM.FEED_FORWARD_LENGTH)),
        head_count=model.value(key(Keys.Attention.HEAD_COUNT)),
        head_count_kv=model.value(key(Keys.Attention.HEAD_COUNT_KV)),
        context_length=model.value(key(Keys.LLM.CONTEXT_LENGTH)),
        rope_freq_base=model.value(key(Keys.Rope.FREQ_BASE)),
        vocab_size=vocab,
        tokenizer_model=model.value(Keys.Tokenizer.MODEL),
        tokenizer_pre=model.value(Keys.Tokenizer.PRE),
        chat_template=tmpl,
        file_type=file_type_name(model.value(Keys.General.FILE_TYPE)),
        tensor_types=dict(types.most_common()),
        parameters=sum(t.n_elements for t in model.tensors),
        tensor_bytes=sum(t.n_bytes for t in model.tensors),
        file_bytes=sum(s.size for s in model.shards),
        metadata_keys=len(model.fields),
        tensor_count=len(model.tensors),
    )


def layer_table(model: Model) -> list[LayerInfo]:
    return [
        LayerInfo(
            i,
            len(b),
            sum(t.n_elements for t in b),
            sum(t.n_bytes for t in b),
            dict(Counter(t.ggml_type.name for t in b)),
        )
        for i, b in enumerate(model.blocks())
    ]


def tensor_table(model: Model) -> list[dict]:
    return [
        {"name": t.name, "shape": list(t.shape), "type": t.ggml_type.name, "bytes": t.n_bytes, "offset": t.offset}
        for t in model.tensors
    ]


def metadata_table(model: Model, full: bool = False) -> list[dict]:
    """Every key with its type and value; long arrays are previewed unless `full`."""
    rows = []
    for k, f in model.fields.items():
        if f.type == GGUFValueType.ARRAY:
            assert f.item_type is not None
            value = model.value(k)
            if not full and f.count > PREVIEW_ITEMS:
                value = value[:PREVIEW_ITEMS]
            rows.append({"key": k, "type": f"[{f.item_type.name}]", "count": f.count, "value": value})
        else:
            rows.append({"key": k, "type": f.type.name, "count": 1, "value": model.value(k)})
    return rows
