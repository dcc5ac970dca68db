"""The records an evaluation returns: frozen dataclasses with to_dict() for --json, from a
point value with its interval (Estimate) up to the whole report (EvalReport)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..records import Record


@dataclass(frozen=True)
class Estimate(Record):
    """A point value and its bootstrap interval (CONFIDENCE, percentile method)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Difference(Record):
    """This model minus the base on one measure, paired over the same items."""

    metric: str
    higher_is_better: bool
    delta: Estimate
    verdict: str  # better | worse (significant) | equivalent (interval inside ±margin) | inconclusive
    items: int  # paired items the difference is measured over
    discordant: tuple[int, int] | None  # items scored 0/1: (only the model right, only the base right)
    p_value: float  # exact McNemar for items scored 0/1, paired bootstrap otherwise
    detectable: float  # smallest difference this item count detects (80% power, 5% two-sided)
    margin: float  # the equivalence margin, in the measure's units

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Difference:
        """The inverse of to_dict() (where a non-finite number was stored as None)."""

        def num(x: float | None) -> float:
            return float("nan") if x is None else float(x)

        e = d["delta"]
        return Difference(
            d["metric"],
            bool(d["higher_is_better"]),
            Estimate(num(e["value"]), num(e["low"]), num(e["high"])),
            d["verdict"],
            int(d["items"]),
            None if d.get("discordant") is None else (int(d["discordant"][0]), int(d["discordant"][1])),
            num(d["p_value"]),
            num(d["detectable"]),
            num(d["margin"]),
        )


@dataclass(frozen=True)
class ModelInfo(Record):
    path: Path
    sha256: str  # of all shards' bytes, in order
    name: str | None  # general.name
    thinking_switch: bool  # the chat template reads enable_thinking
    vocab_size: int
    prompt_format: str = "chat template"  # or "few-shot Q/A" for a model without a chat template


@dataclass(frozen=True)
class Answer(Record):
    id: str
    question: str
    reply: str
    correct: bool


@dataclass(frozen=True)
class FactualResult(Record):
    correct: int
    total: int
    accuracy: Estimate  # fraction correct, interval over questions
    answers: tuple[Answer, ...]


@dataclass(frozen=True)
class PerplexityResult(Record):
    ppl: Estimate  # exp(mean NLL over scored tokens), interval over chunks
    chunks: int
    ctx: int  # chunk length; its second half is scored
    tokens: int  # scored tokens
    text: str  # text file name
    chunk_nll: tuple[float, ...]  # mean negative log-likelihood of each chunk (nats)


@dataclass(frozen=True)
class Continuation(Record):
    prompt: str
    text: str
    tokens: int
    words: int
    coherence: float
    repetition: float
    base_ppl: float | None  # the base's perplexity of `text` after `prompt` (with a base)


@dataclass(frozen=True)
class GenerationResult(Record):
    coherence: Estimate  # mean per-prompt coherence, interval over prompts
    repetition: Estimate  # mean per-prompt repetition ratio, interval over prompts
    continuations: tuple[Continuation, ...]


@dataclass(frozen=True)
class ThinkingSample(Record):
    mode: str  # thinking | non-thinking
    prompt: str
    reply: str
    passed: bool


@dataclass(frozen=True)
class ThinkingResult(Record):
    supported: bool  # the template has an enable_thinking switch; else no checks ran
    thinking_passed: int
    non_thinking_passed: int
    per_mode: int  # checks per mode
    samples: tuple[ThinkingSample, ...]

    @property
    def thinking_ok(self) -> bool | None:
        return None if not self.supported else self.thinking_passed == self.per_mode

    @property
    def non_thinking_ok(self) -> bool | None:
        return None if not self.supported else self.non_thinking_passed == self.per_mode

    def to_dict(self) -> dict[str, Any]:
        return {**Record.to_dict(self), "thinking_ok": self.thinking_ok, "non_thinking_ok": self.non_thinking_ok}


@dataclass(frozen=True)
class KldResult(Record):
    mean: Estimate  # mean KL(base || model) per token, interval over chunks
    median: float | None  # over tokens, from llama-perplexity (None under 100 tokens)
    p99: float | None
    maximum: float | None
    same_top: Estimate  # % of tokens where both models rank the same token first
    delta_ppl: Estimate  # PPL(model) - PPL(base), paired over chunks
    chunk_kld: tuple[float, ...]
    chunk_same_top: tuple[float, ...]  # fraction per chunk
    token_mean: float | None = None  # llama-perplexity's own mean over tokens (6 decimals; None under 100 tokens)


@dataclass(frozen=True)
class BenchResult(Record):
    """One benchmark scored by llama-perplexity: each task right or wrong."""

    name: str  # the metric's name
    label: str  # e.g. HellaSwag
    kind: str  # hellaswag | winogrande | mc
    file: Path
    file_sha256: str
    tasks: int
    correct: int
    accuracy: Estimate  # fraction right, interval over tasks
    task_ids: tuple[int, ...]  # 0-based task numbers of the file, in llama.cpp's order
    right: tuple[bool, ...]  # per task, in the same order


@dataclass(frozen=True)
class Timings(Record):
    """Wall time of this call, split by what it waited on."""

    load: float  # llama.cpp processes starting, loading the model, stopping
    perplexity: float  # llama-perplexity computing (perplexity, logits, KLD)
    generation: float  # llama-server answering requests
    total: float

    @property
    def llama(self) -> float:
        return self.load + self.perplexity + self.generation

    @property
    def overhead(self) -> float:
        """Time spent in gguf-surgeon itself: hashing, caching, parsing, bootstrap."""
        return max(0.0, self.total - self.llama)

    def to_dict(self) -> dict[str, Any]:
        return {**Record.to_dict(self), "llama": self.llama, "overhead": self.overhead}


@dataclass(frozen=True)
class BaseComparison(Record):
    base: EvalReport  # the base scored alone (same suite, same bootstrap draws)
    kld: KldResult
    continuation_ppl: Estimate | None  # base's perplexity of this model's continuations
    base_continuation_ppl: Estimate | None  # base's perplexity of its own continuations
    differences: tuple[Difference, ...]  # overall first
    verdict: str  # of the overall score difference


@dataclass(frozen=True)
class EvalReport(Record):
    model: ModelInfo
    suite_version: int
    settings: dict  # threads, seed, ctx, batch, bootstrap samples, confidence, questions, text
    score: Estimate  # overall 0-100
    parts: dict  # part -> 0-1 sub-score that entered the overall score
    factual: FactualResult
    perplexity: PerplexityResult
    generation: GenerationResult
    thinking: ThinkingResult
    versus_base: BaseComparison | None
    timings: Timings
    cached: bool  # nothing had to run: every raw result came from the cache
    benchmarks: tuple[BenchResult, ...] = ()  # --bench: llama-perplexity's benchmark modes
