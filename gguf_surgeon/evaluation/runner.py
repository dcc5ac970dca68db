"""Score a GGUF model, alone or against its base, through llama.cpp's own binaries.

    report = evaluate("edited.gguf", base="original.gguf")
    report.score            # Estimate(value=81.2, low=77.0, high=85.1): overall 0-100
    report.versus_base.verdict   # "better" | "worse" | "not distinguishable"

Parts (docs/evaluation.md has the formula and the reasoning):
- factual accuracy: the bundled questions (data/questions.toml), asked through the model's own
  chat template in non-thinking mode, greedy, matched after normalization;
- perplexity of an evaluation text (data/eval_text.txt or any file) with llama-perplexity;
- with a base: KL divergence, same-top-token rate and delta-perplexity with
  llama-perplexity --kl-divergence-base / --kl-divergence, and the base's perplexity of the
  model's free continuations;
- coherence (distinct n-grams, length) and repetition of greedy continuations of open prompts;
- thinking / non-thinking checks where the chat template has an enable_thinking switch.

Every score carries a bootstrap 95% interval over the items it is made of (questions, text
chunks, prompts); every difference to the base is a paired bootstrap over the same items, and
a verdict says whether its interval excludes zero. Everything runs at temperature 0 with a
fixed seed, thread count and batch size. Raw results (replies, per-chunk values) are cached
by the model file's SHA-256 and the settings that affect them, so a rerun spawns nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
import unicodedata
import urllib.error
import urllib.request
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys

from ..errors import EvalError, OutputError, SurgeonError, ToolError
from ..files import read_toml, write_text_atomic
from ..llama.server import LlamaServer
from ..llama.tools import find_tool, run_tool
from ..reader import Model
from ..records import Record

SUITE_VERSION = 1  # bump when a change alters any score of an unchanged model
DATA = Path(__file__).resolve().parent.parent / "data"
QUESTIONS_FILE = DATA / "questions.toml"
EVAL_TEXT_FILE = DATA / "eval_text.txt"

# generation settings (all greedy; part of the generation cache key)
FACTUAL_SYSTEM_PROMPT = "Answer the question in one short sentence."
FACTUAL_N_PREDICT = 32
COHERENCE_PROMPTS = (
    "The old lighthouse keeper climbed the stairs one last time. He",
    "Here is a short explanation of why the sky is blue:",
    "My favourite recipe for a simple vegetable soup starts with",
)
COHERENCE_N_PREDICT = 128
THINKING_PROMPTS = ("What is 12 plus 7?", "Name one colour of the rainbow.")
THINKING_N_PREDICT = 512  # thinking mode: room for the reasoning and the answer
NON_THINKING_N_PREDICT = 64
SERVER_CTX = 1024  # prompts are short; the longest request is a thinking prompt + 512 tokens

# scoring constants (docs/evaluation.md)
WEIGHTS = {"factual": 0.40, "perplexity": 0.20, "coherence": 0.15, "repetition": 0.10, "thinking": 0.15}
PPL_CEILING = 1000.0  # perplexity that scores 0; 1 scores 1; log scale in between
COHERENCE_TARGET_WORDS = 48  # a continuation this long gets the full length factor
REPETITION_N = 4  # repetition ratio: share of word 4-grams that repeat an earlier one
CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
VERDICTS = ("better", "worse", "not distinguishable")

Progress = Callable[[str, int, "int | None"], None]
"""progress(step, done, total): called as each long step advances; total None when unknown."""


# --- options and suite ----------------------------------------------------------------


def default_threads() -> int:
    """A fixed thread count: 4, or fewer on smaller machines (recorded in every report)."""
    return max(1, min(4, os.cpu_count() or 1))


def default_cache_dir() -> Path:
    """$GGUF_SURGEON_CACHE/eval, else $XDG_CACHE_HOME/gguf-surgeon/eval, else ~/.cache/gguf-surgeon/eval."""
    root = os.environ.get("GGUF_SURGEON_CACHE")
    if root:
        return Path(root).expanduser() / "eval"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gguf-surgeon" / "eval"


@dataclass(frozen=True)
class EvalOptions:
    """How to run an evaluation; the defaults are the suite's reference settings."""

    llama_bin: Path | None = None  # folder of llama.cpp tools (else GGUF_SURGEON_LLAMA_BIN, PATH)
    text: Path | None = None  # evaluation text; None: the bundled data/eval_text.txt
    questions: int | None = None  # ask only the first N questions (quick runs)
    threads: int = field(default_factory=default_threads)
    seed: int = 42
    ctx: int = 256  # llama-perplexity chunk length; the second half of each chunk is scored
    batch: int = 512  # llama-perplexity -b (results depend on it, so it is fixed)
    bootstrap_samples: int = BOOTSTRAP_SAMPLES
    cache_dir: Path | None = None  # None: default_cache_dir()
    use_cache: bool = True  # False: compute everything, keep nothing
    timeout: float = 3600.0  # seconds for one llama-perplexity run
    request_timeout: float = 600.0  # seconds for one llama-server request


@dataclass(frozen=True)
class Question:
    """One factual question and the answers that count as correct."""

    id: str
    question: str
    answers: tuple[str, ...]  # any one, matched as whole words after normalization
    reject: tuple[str, ...] = ()  # any one of these makes the reply wrong (hedges)


@dataclass(frozen=True)
class Suite:
    """The items a model is scored on."""

    questions: tuple[Question, ...]
    text: str  # the perplexity text
    text_name: str  # file name, for reports
    coherence_prompts: tuple[str, ...] = COHERENCE_PROMPTS
    thinking_prompts: tuple[str, ...] = THINKING_PROMPTS

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def load_questions(path: Path = QUESTIONS_FILE) -> tuple[Question, ...]:
    """The questions of a TOML file of [[question]] tables (id, question, answers, reject)."""
    data = read_toml(Path(path), EvalError)
    out: list[Question] = []
    for i, q in enumerate(data.get("question", [])):
        try:
            answers = tuple(str(a) for a in q["answers"])
            item = Question(str(q["id"]), str(q["question"]), answers, tuple(str(r) for r in q.get("reject", ())))
        except (KeyError, TypeError) as e:
            raise EvalError(f"{path}: question {i + 1} lacks {e}") from None
        if not answers or not all(answer_tokens(a) for a in answers):
            raise EvalError(f"{path}: question {item.id} has an empty answer")
        out.append(item)
    if not out:
        raise EvalError(f"{path}: no [[question]] entries")
    ids = [q.id for q in out]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise EvalError(f"{path}: duplicate question ids {sorted(dup)}")
    return tuple(out)


def load_suite(options: EvalOptions = EvalOptions()) -> Suite:
    """The bundled suite, with the options' text and question limit applied."""
    questions = load_questions()
    if options.questions is not None:
        if options.questions < 1:
            raise EvalError(f"--questions {options.questions}: must be at least 1")
        questions = questions[: options.questions]
    path = options.text or EVAL_TEXT_FILE
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"--text {path}: no such file") from None
    except UnicodeDecodeError:
        raise EvalError(f"--text {path}: not UTF-8 text") from None
    except OSError as e:
        raise EvalError(f"--text {path}: cannot read: {e.strerror}") from None
    if not text.strip():
        raise EvalError(f"--text {path}: empty")
    return Suite(questions, text, Path(path).name)


# --- answers, n-grams, thinking -------------------------------------------------------

NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
NUMBER_WORDS.update(
    {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90"}
)
ARTICLES = frozenset({"a", "an", "the"})
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")
_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?(?:" + re.escape(THINK_CLOSE) + r"|$)", re.DOTALL)


def answer_tokens(text: str) -> list[str]:
    """Normalized word tokens: no accents or case, "1,000" -> 1000, "7.0" -> 7, number words
    up to twenty and the tens as digits, articles dropped, punctuation ignored."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    toks = []
    for t in _TOKEN.findall(text):
        t = re.sub(r"^(\d+)\.0+$", r"\1", t)
        t = NUMBER_WORDS.get(t, t)
        if t not in ARTICLES:
            toks.append(t)
    return toks


def strip_thinking(text: str) -> str:
    """`text` without <think>...</think> blocks (an unclosed one runs to the end)."""
    return _THINK_BLOCK.sub(" ", text).replace(THINK_CLOSE, " ")


def _contains(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def is_correct(reply: str, question: Question) -> bool:
    """True when the reply (thinking removed) holds an accepted answer as whole words and no
    rejected one."""
    toks = answer_tokens(strip_thinking(reply))
    return any(_contains(toks, answer_tokens(a)) for a in question.answers) and not any(
        _contains(toks, answer_tokens(r)) for r in question.reject
    )


def words(text: str) -> list[str]:
    """Lower-case words of a continuation, for the n-gram measures."""
    return re.findall(r"[^\W_]+(?:'[^\W_]+)?", text.lower())


def distinct_ratio(ws: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams; 0 when there are none."""
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def coherence_of(text: str) -> float:
    """min(1, words/48) x mean(distinct-2, distinct-3): long, non-looping text scores near 1."""
    ws = words(text)
    if len(ws) < 3:
        return 0.0
    return min(1.0, len(ws) / COHERENCE_TARGET_WORDS) * (distinct_ratio(ws, 2) + distinct_ratio(ws, 3)) / 2


def repetition_of(text: str) -> float:
    """Share of word 4-grams that repeat an earlier one (0: none; near 1: a loop)."""
    ws = words(text)
    return 1.0 - distinct_ratio(ws, REPETITION_N) if len(ws) >= REPETITION_N else 0.0


@dataclass(frozen=True)
class ThinkingParse:
    """What a chat reply holds in terms of <think> blocks."""

    opens: int  # <think> tags (counting one the prompt left open)
    closes: int  # </think> tags
    well_formed: bool  # exactly one <think>...</think>, at the start, closed
    thinking: str  # the text inside the block ("" when none)
    answer: str  # the text after the block, or the whole reply without tags


def parse_thinking(prompt: str, reply: str) -> ThinkingParse:
    """Parse a reply; when the rendered prompt ends inside an open <think> (templates that
    start the block themselves), the reply is read as if it began with <think>."""
    text = reply
    if prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE):
        text = THINK_OPEN + text
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    m = re.fullmatch(r"\s*" + re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE) + r"(.*)", text, re.DOTALL)
    if m and opens == 1 and closes == 1:
        return ThinkingParse(opens, closes, True, m.group(1).strip(), m.group(2).strip())
    return ThinkingParse(opens, closes, False, "", text.replace(THINK_OPEN, " ").replace(THINK_CLOSE, " ").strip())


def thinking_check(mode: str, prompt: str, reply: str) -> bool:
    """Thinking mode: a well-formed <think>...</think> followed by an answer. Non-thinking
    mode: no think tag in the reply at all, and an answer."""
    p = parse_thinking(prompt, reply)
    if mode == "thinking":
        return p.well_formed and bool(p.answer)
    return p.opens == 0 and p.closes == 0 and bool(p.answer)


# --- records --------------------------------------------------------------------------


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
    verdict: str  # better | worse | not distinguishable (interval includes 0)


@dataclass(frozen=True)
class ModelInfo(Record):
    path: Path
    sha256: str  # of all shards' bytes, in order
    name: str | None  # general.name
    thinking_switch: bool  # the chat template reads enable_thinking
    vocab_size: int


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


# --- cache ----------------------------------------------------------------------------


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_json_atomic(path: Path, data: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot create the cache folder: {e.strerror}") from None
    write_text_atomic(path, json.dumps(data), force=True)


class EvalCache:
    """JSON results and base logits under one folder, keyed by file hash and settings.

    Layout: hashes.json (path, size, mtime -> sha256), <sha256>/<kind>-<key>.json, and
    logits/<base sha256>-<key>.bin (llama-perplexity --kl-divergence-base files, large:
    vocabulary x scored tokens x 2 bytes). Disabled: results and logits live in memory and a
    temporary folder for one call and nothing is read from earlier runs.
    """

    def __init__(self, root: Path | None, enabled: bool = True):
        self.enabled = enabled
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._memory: dict[Path, Any] = {}  # disabled: results live for this call only
        if enabled:
            self.root = Path(root) if root else default_cache_dir()
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="gguf-surgeon-eval-")
            self.root = Path(self._tmp.name)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def path(self, sha: str, kind: str, key: str) -> Path:
        return self.root / sha[:32] / f"{kind}-{key}.json"

    def load(self, sha: str, kind: str, key: str) -> Any:
        if not self.enabled:
            return self._memory.get(self.path(sha, kind, key))
        try:
            return json.loads(self.path(sha, kind, key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, sha: str, kind: str, key: str, data: Any) -> None:
        if not self.enabled:
            self._memory[self.path(sha, kind, key)] = data
        else:
            try:
                _write_json_atomic(self.path(sha, kind, key), data)
            except OSError:
                pass  # a cache that cannot be written only costs a rerun

    def logits(self, sha: str, key: str) -> Path:
        return self.root / "logits" / f"{sha[:32]}-{key}.bin"

    def file_sha256(self, paths: Sequence[Path]) -> str:
        """SHA-256 of the files' bytes in order, memoized by (path, size, mtime)."""
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
        memo_key = _key(stats)
        memo_path = self.root / "hashes.json"
        memo: dict[str, str] = {}
        if self.enabled:
            try:
                memo = json.loads(memo_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                memo = {}
            if memo_key in memo:
                return memo[memo_key]
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        sha = h.hexdigest()
        if self.enabled:
            memo[memo_key] = sha
            try:
                _write_json_atomic(memo_path, memo)
            except OSError:
                pass
        return sha


# --- running llama.cpp ----------------------------------------------------------------


class _Clock:
    """Accumulates the seconds spent waiting on llama.cpp, by kind."""

    def __init__(self) -> None:
        self.load = self.perplexity = self.generation = 0.0
        self.ran = False  # anything had to be computed


# llama.cpp's logger thread is not flushed at exit (llama.cpp issue 22142), so the last lines
# of a run are sometimes lost: often for millisecond runs on a loaded machine, rarely for
# real models (0 in 10 SmolLM2 runs at load 5). Such a run is repeated, after a short pause.
OUTPUT_ATTEMPTS = 6
_CHUNKS_LINE = re.compile(r"over (\d+) chunks")
_ERROR_LINE = re.compile(
    r"error|failed|invalid|cannot|unable|abort|exception|what\(\)|not enough|you need", re.IGNORECASE
)
_LOADED_LINE = re.compile(r"calculating perplexity over|computing over \d+ chunks")


def _run_perplexity_tool(
    binary: Path, args: Sequence[str], clock: _Clock, timeout: float, on_line: Callable[[str], None]
) -> tuple[int, list[str], list[str]]:
    """Run llama-perplexity through run_tool (killed on timeout or Ctrl-C), each line to
    `on_line`; the time until the model has loaded goes to clock.load, the rest to
    clock.perplexity. Returns (exit status, all lines, error lines without log prefixes)."""
    start = time.perf_counter()
    lines: list[str] = []
    errors: deque[str] = deque(maxlen=6)
    loaded_at: float | None = None

    def each(line: str) -> None:
        nonlocal loaded_at
        lines.append(line)
        if loaded_at is None and _LOADED_LINE.search(line):
            loaded_at = time.perf_counter()
        if _ERROR_LINE.search(line):
            errors.append(re.sub(r"^[\d.]+ [EWI] ", "", line.strip()))
        on_line(line)

    try:
        run = run_tool(binary, args, each, timeout=timeout)
    finally:
        end = time.perf_counter()
        loaded = loaded_at if loaded_at is not None else end
        clock.load += loaded - start
        clock.perplexity += end - loaded
        clock.ran = True
    return run.returncode, lines, list(errors)


# "       0  15.3000  2.727853  0.223038": --ppl-output-type 1, one line per chunk, cumulative
_PPL_LINE = re.compile(r"^\s*\d+\s+(\S+)\s+(\S+)\s+(\S+)\s*$")
# "   3    20.1405 ±    0.0123    0.00012 ±    0.00003    0.00045 ±  ...  %    99.123 ±  0.123 %"
_PM = r"\s*±\s*"
_KLD_LINE = re.compile(
    r"^\s*(\d+)\s+(\S+)"
    + _PM
    + r"(\S+)\s+(\S+)"
    + _PM
    + r"(\S+)\s+(\S+)"
    + _PM
    + r"(\S+)\s+(\S+)"
    + _PM
    + r"(\S+)\s*%\s+(\S+)"
    + _PM
    + r"(\S+)\s*%\s*$"
)
_KLD_STAT = {
    "median": re.compile(r"^Median\s+KLD:\s*(\S+)"),
    "p99": re.compile(r"^99\.0%\s+KLD:\s*(\S+)"),
    "maximum": re.compile(r"^Maximum\s+KLD:\s*(\S+)"),
}


def _per_chunk(cumulative: Sequence[float]) -> list[float]:
    """Per-chunk means from running means over equal-sized chunks."""
    return [k * m - (k - 1) * prev for k, (m, prev) in enumerate(zip(cumulative, [0.0, *cumulative[:-1]]), start=1)]


def _finite(values: Sequence[float], what: str, model: Path) -> list[float]:
    bad = [i + 1 for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise EvalError(
            f"{model.name}: llama-perplexity gave a non-finite {what} for chunk {bad[0]}: "
            f"the model produces NaN or infinite logits"
        )
    return list(values)


def parse_perplexity_output(lines: Iterable[str]) -> list[float]:
    """Per-chunk mean NLL from llama-perplexity --ppl-output-type 1 lines."""
    cumulative = []
    for line in lines:
        m = _PPL_LINE.match(line)
        if m:
            try:
                cumulative.append(float(m.group(2)))
            except ValueError:
                continue
    return _per_chunk(cumulative)


def parse_kld_output(lines: Iterable[str]) -> dict[str, Any]:
    """Per-chunk NLL, KLD, same-top fraction and the token-level statistics of a
    llama-perplexity --kl-divergence run."""
    ppl, kld, top, stats = [], [], [], {}
    for line in lines:
        m = _KLD_LINE.match(line)
        if m:
            ppl.append(float(m.group(2)))
            kld.append(float(m.group(6)))
            top.append(float(m.group(10)) / 100)
            continue
        for name, rx in _KLD_STAT.items():
            s = rx.match(line.strip())
            if s:
                stats[name] = float(s.group(1)) + 0.0  # "-0.000000" -> 0.0
    nll = _per_chunk([math.log(p) if p > 0 else float("nan") for p in ppl])
    return {
        "chunk_nll": nll,
        "chunk_kld": [max(0.0, v) for v in _per_chunk(kld)],
        "chunk_same_top": [min(1.0, max(0.0, v)) for v in _per_chunk(top)],
        **stats,
    }


def _tool_failure(binary: Path, model: Path, rc: int, errors: list[str], lines: list[str]) -> SurgeonError:
    reason = "; ".join(errors) or "; ".join(l.strip() for l in lines[-4:] if l.strip()) or "no output"
    if any("tokens to evaluate perplexity" in e or "tokenizes to only" in e for e in errors):
        return EvalError(f"{model.name}: the evaluation text is too short for chunks of this length: {reason}")
    status = f"exited with status {rc}" if rc else "produced no results"
    return ToolError(f"{binary.name} {status} for {model.name}: {reason}")


# --- HTTP helpers for llama-server (functions of the server's base URL) ----------------


def post_json(base_url: str, path: str, body: dict[str, Any], timeout: float) -> Any:
    """POST a JSON body to llama-server and decode its answer; ToolError on any failure."""
    req = urllib.request.Request(
        base_url + path,
        data=json.dumps(body).encode("utf-8"),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:1000]
        raise ToolError(f"llama-server POST {path}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        raise ToolError(f"llama-server POST {path}: {getattr(e, 'reason', e)}") from None


def apply_chat_template(
    base_url: str, messages: list[dict[str, str]], enable_thinking: bool | None, timeout: float = 60.0
) -> str:
    """The prompt text the model's own template (--jinja) makes of `messages`, with the
    generation prompt added; `enable_thinking` goes to the template as a kwarg when not None."""
    body: dict[str, Any] = {"messages": messages}
    if enable_thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": enable_thinking}
    return str(post_json(base_url, "/apply-template", body, timeout)["prompt"])


@dataclass(frozen=True)
class Completion(Record):
    text: str
    stop: str  # eos | limit | word
    logprobs: tuple[float, ...]  # of each generated token under the serving model (EOS excluded)


def complete(
    base_url: str,
    prompt: str,
    n_predict: int,
    seed: int,
    timeout: float,
    grammar: str | None = None,
    logprobs: bool = True,
) -> Completion:
    """Greedy continuation of a raw prompt (special tokens in it are parsed), no prompt cache,
    so an answer does not depend on earlier requests."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0.0,
        "top_k": 1,
        "seed": seed,
        "cache_prompt": False,
        "n_probs": 1 if logprobs else 0,
        "post_sampling_probs": False,
    }
    if grammar is not None:
        body["grammar"] = grammar
    ans = post_json(base_url, "/completion", body, timeout)
    stop = str(ans.get("stop_type") or ("eos" if ans.get("stopped_eos") else "limit"))
    probs = ans.get("completion_probabilities") or []
    lps = [float("-inf") if p.get("logprob") is None else float(p["logprob"]) for p in probs]
    if stop == "eos" and lps:
        lps = lps[:-1]  # the end-of-generation token itself is listed last
    return Completion(str(ans.get("content", "")), stop, tuple(lps))


def gbnf_literal(text: str) -> str:
    """A GBNF grammar matching exactly `text`."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return 'root ::= "' + "".join(out) + '"'


# --- measuring one model --------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    info: ModelInfo
    label: str  # for progress steps


def identify(path: Path, cache: EvalCache) -> ModelInfo:
    """Hash and describe a model file (all shards)."""
    path = Path(path)
    with Model(path) as m:
        tmpl = m.value(Keys.Tokenizer.CHAT_TEMPLATE)
        name = m.value(Keys.General.NAME)
        tokens = m.fields.get(Keys.Tokenizer.LIST)
        shard_paths = [s.path for s in m.shards]
    return ModelInfo(
        path,
        cache.file_sha256(shard_paths),
        name if isinstance(name, str) else None,
        isinstance(tmpl, str) and "enable_thinking" in tmpl,
        tokens.count if tokens else 0,
    )


class _Evaluator:
    """One evaluate() call: tools, cache, clock and progress shared by its steps."""

    def __init__(self, suite: Suite, options: EvalOptions, cache: EvalCache, progress: Progress | None):
        self.suite, self.options, self.cache = suite, options, cache
        self.progress = progress or (lambda step, done, total: None)
        self.clock = _Clock()
        self.perplexity_bin = find_tool("llama-perplexity", options.llama_bin)
        self.llama_bin = options.llama_bin
        o = options
        self.text_key = _key(SUITE_VERSION, suite.text_sha256, o.ctx, o.batch, o.threads)
        self.gen_key = _key(
            SUITE_VERSION,
            o.seed,
            o.threads,
            SERVER_CTX,
            FACTUAL_N_PREDICT,
            COHERENCE_N_PREDICT,
            THINKING_N_PREDICT,
            NON_THINKING_N_PREDICT,
        )

    # perplexity and KLD
    def _perplexity_args(self, *extra: str) -> list[str]:
        o = self.options
        return ["-c", str(o.ctx), "-b", str(o.batch), "-t", str(o.threads), "--seed", str(o.seed), *extra]

    def _run_ppl(
        self, target: _Target, args: list[str], step: str, count_lines: re.Pattern, needs_stats: bool = False
    ) -> list[str]:
        """Run llama-perplexity until its output is complete: llama.cpp's logger may drop the
        last lines at exit (its queue is not flushed), so a run whose chunk lines (or, with
        `needs_stats`, KLD statistics) fall short of what it announced is repeated."""
        for attempt in range(1, OUTPUT_ATTEMPTS + 1):
            if attempt > 1:
                time.sleep(0.1 * attempt)
            done, total = 0, None

            def on_line(line: str) -> None:
                nonlocal done, total
                if total is None and (m := _CHUNKS_LINE.search(line)):
                    total = int(m.group(1))
                if count_lines.match(line):
                    done += 1
                self.progress(step, done, total)

            self.progress(step, 0, None)
            rc, lines, errors = _run_perplexity_tool(
                self.perplexity_bin, ["-m", str(target.info.path), *args], self.clock, self.options.timeout, on_line
            )
            if (rc != 0 and (errors or attempt == OUTPUT_ATTEMPTS)) or (done == 0 and errors):
                raise _tool_failure(self.perplexity_bin, target.info.path, rc, errors, lines)
            if rc != 0:
                continue  # failed, and the reason was among the lost lines: run again to get it
            if total is not None and done == total:
                scored = total * (self.options.ctx - 1 - self.options.ctx // 2)
                if not needs_stats or scored < 100 or any(_KLD_STAT["median"].match(l.strip()) for l in lines):
                    return lines
        if done == 0:
            raise _tool_failure(self.perplexity_bin, target.info.path, rc, errors, lines)
        raise ToolError(
            f"{self.perplexity_bin.name} output for {target.info.path.name} was cut short "
            f"{OUTPUT_ATTEMPTS} times ({done} of {total} chunk lines)"
        )

    def perplexity(self, target: _Target, save_logits: bool = False) -> list[float]:
        """Per-chunk NLL of the text; with save_logits also writes the base logits file."""
        sha = target.info.sha256
        cached = self.cache.load(sha, "ppl", self.text_key)
        logits = self.cache.logits(sha, self.text_key)
        if cached is not None and (not save_logits or logits.exists()):
            return cached["chunk_nll"]
        with tempfile.TemporaryDirectory(prefix="gguf-surgeon-eval-") as tmp:
            text_file = Path(tmp) / "text.txt"
            text_file.write_text(self.suite.text, encoding="utf-8")
            args = self._perplexity_args("-f", str(text_file), "--ppl-output-type", "1")
            partial = logits.with_name(f".{logits.name}.{os.getpid()}.tmp")
            if save_logits:
                logits.parent.mkdir(parents=True, exist_ok=True)
                args += ["--kl-divergence-base", str(partial)]
            step = f"{target.label}: " + ("perplexity and base logits" if save_logits else "perplexity")
            try:
                lines = self._run_ppl(target, args, step, _PPL_LINE)
                if save_logits:
                    os.replace(partial, logits)
            finally:
                partial.unlink(missing_ok=True)
        nll = _finite(parse_perplexity_output(lines), "perplexity", target.info.path)
        self.cache.save(sha, "ppl", self.text_key, {"chunk_nll": nll})
        return nll

    def kld(self, target: _Target, base: _Target) -> dict[str, Any]:
        """KLD statistics of the model against the base logits (which must exist)."""
        key = _key(self.text_key, base.info.sha256)
        cached = self.cache.load(target.info.sha256, "kld", key)
        if cached is not None:
            return cached
        logits = self.cache.logits(base.info.sha256, self.text_key)
        args = self._perplexity_args("--kl-divergence-base", str(logits), "--kl-divergence")
        lines = self._run_ppl(target, args, f"{target.label}: KL divergence vs base", _KLD_LINE, needs_stats=True)
        out = parse_kld_output(lines)
        _finite(out["chunk_nll"], "perplexity", target.info.path)
        _finite(out["chunk_kld"], "KL divergence", target.info.path)
        self.cache.save(target.info.sha256, "kld", key, out)
        if self.cache.load(target.info.sha256, "ppl", self.text_key) is None:
            self.cache.save(target.info.sha256, "ppl", self.text_key, {"chunk_nll": out["chunk_nll"]})
        return out

    # generation
    def generation_items(self, target: _Target) -> list[tuple[str, str, dict[str, Any]]]:
        """(step, item key, request) for every generation the suite asks of this model."""
        items = []
        for q in self.suite.questions:
            msgs = [{"role": "system", "content": FACTUAL_SYSTEM_PROMPT}, {"role": "user", "content": q.question}]
            req = {
                "messages": msgs,
                "enable_thinking": False if target.info.thinking_switch else None,
                "n_predict": FACTUAL_N_PREDICT,
            }
            items.append(("factual questions", _key("chat", req), req))
        for p in self.suite.coherence_prompts:
            req = {"prompt": p, "n_predict": COHERENCE_N_PREDICT}
            items.append(("open continuations", _key("raw", req), req))
        if target.info.thinking_switch:
            for mode, n in (("thinking", THINKING_N_PREDICT), ("non-thinking", NON_THINKING_N_PREDICT)):
                for p in self.suite.thinking_prompts:
                    req = {
                        "messages": [{"role": "user", "content": p}],
                        "enable_thinking": mode == "thinking",
                        "n_predict": n,
                    }
                    items.append((f"{mode} mode", _key("chat", req), req))
        return items

    @staticmethod
    def _score_own(replies: dict[str, Any], forced: Sequence[tuple[str, str]], scores: dict[str, Any]) -> None:
        """A text the model itself generated after the same raw prompt needs no forced run:
        its generation log-probabilities are the ones forcing would give."""
        own = {_key(r["prompt"], r["text"]): r["logprobs"] for r in replies.values() if "logprobs" in r}
        for p, t in forced:
            k = _key(p, t)
            if k not in scores and k in own:
                scores[k] = own[k]

    def generations(
        self, target: _Target, forced: Sequence[tuple[str, str]] = ()
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's replies to every item (key -> {prompt, text, stop, logprobs}), and for
        each (prompt, text) in `forced` the model's log-probabilities of `text` after `prompt`
        (key -> [token logprobs] or None when the text could not be forced)."""
        sha = target.info.sha256
        replies: dict[str, Any] = self.cache.load(sha, "gen", self.gen_key) or {}
        scores: dict[str, Any] = self.cache.load(sha, "forced", self.gen_key) or {}
        todo = [it for it in self.generation_items(target) if it[1] not in replies]
        self._score_own(replies, forced, scores)
        todo_forced = [(p, t) for p, t in forced if _key(p, t) not in scores and t]
        if not todo and not todo_forced:
            return replies, scores
        o = self.options
        totals: dict[str, int] = {}
        for step, _, _ in todo:
            totals[step] = totals.get(step, 0) + 1
        done = {s: 0 for s in totals}
        start = time.perf_counter()
        server_dir = find_tool("llama-server", self.llama_bin).parent  # only generation needs it
        server = LlamaServer(
            server_dir,
            target.info.path,
            ctx_size=SERVER_CTX,
            threads=o.threads,
            extra_args=("--jinja", "--seed", str(o.seed), "-b", str(o.batch)),
            request_timeout=o.request_timeout,
        )
        self.clock.ran = True
        try:
            self.progress(f"{target.label}: starting llama-server", 0, 1)
            server.start()
            self.clock.load += time.perf_counter() - start
            self.progress(f"{target.label}: starting llama-server", 1, 1)
            url = server.url
            for step, key, req in todo:
                label = f"{target.label}: {step}"
                self.progress(label, done[step], totals[step])
                t0 = time.perf_counter()
                if "messages" in req:
                    prompt = apply_chat_template(url, req["messages"], req["enable_thinking"], o.request_timeout)
                else:
                    prompt = req["prompt"]
                c = complete(url, prompt, req["n_predict"], o.seed, o.request_timeout)
                self.clock.generation += time.perf_counter() - t0
                replies[key] = {"prompt": prompt, "text": c.text, "stop": c.stop, "logprobs": list(c.logprobs)}
                done[step] += 1
                self.progress(label, done[step], totals[step])
            self._score_own(replies, forced, scores)
            todo_forced = [(p, t) for p, t in forced if _key(p, t) not in scores and t]
            for i, (prompt, text) in enumerate(todo_forced):
                self.progress(f"{target.label}: scoring continuations", i, len(todo_forced))
                t0 = time.perf_counter()
                n_tokens = len(text.encode("utf-8")) + 16  # a token holds at least one byte
                c = complete(url, prompt, n_tokens, o.seed, o.request_timeout, grammar=gbnf_literal(text))
                self.clock.generation += time.perf_counter() - t0
                scores[_key(prompt, text)] = list(c.logprobs) if c.stop == "eos" and c.text == text else None
                self.progress(f"{target.label}: scoring continuations", i + 1, len(todo_forced))
        except ToolError as e:
            tail = server.log_tail(1500).strip()
            raise ToolError(
                f"{target.info.path.name}: {e}" + (f"\nllama-server log:\n{tail}" if tail else "")
            ) from None
        finally:
            t0 = time.perf_counter()
            server.stop()
            self.clock.load += time.perf_counter() - t0
            self.cache.save(sha, "gen", self.gen_key, replies)
            self.cache.save(sha, "forced", self.gen_key, scores)
        return replies, scores


# --- scoring --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    """Per-item results of one model, the input of scoring."""

    info: ModelInfo
    answers: tuple[Answer, ...]
    chunk_nll: np.ndarray
    continuations: tuple[Continuation, ...]
    continuation_nll: tuple[float | None, ...]  # of each continuation under the base (with a base)
    self_nll: tuple[float | None, ...]  # of each continuation under the model itself
    thinking: tuple[ThinkingSample, ...]


class _Draws:
    """Bootstrap index draws per item kind, shared by a model and its base (paired); each
    kind's draws depend only on (seed, kind, item count), not on the order of use."""

    def __init__(self, seed: int, samples: int):
        self.seed = seed
        self.samples = samples
        self._by_kind: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, kind: str, n: int) -> np.ndarray:
        if (kind, n) not in self._by_kind:
            rng = np.random.default_rng([self.seed, zlib.crc32(kind.encode()), n])
            self._by_kind[(kind, n)] = (
                rng.integers(0, n, size=(self.samples, n)) if n else np.zeros((self.samples, 0), int)
            )
        return self._by_kind[(kind, n)]


def _interval(point: float, reps: np.ndarray) -> Estimate:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return Estimate(point, float("nan"), float("nan"))
    a = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    return Estimate(float(point), float(min(lo, point)), float(max(hi, point)))


def _mean_reps(values: np.ndarray, draws: _Draws, kind: str) -> tuple[float, np.ndarray]:
    if values.size == 0:
        return float("nan"), np.full(draws.samples, np.nan)
    return float(values.mean()), values[draws(kind, values.size)].mean(axis=1)


def ppl_subscore(ppl: np.ndarray | float) -> np.ndarray | float:
    """Perplexity on a 0-1 scale: 1 at PPL 1, 0 at PPL_CEILING and above, log-linear between."""
    return np.clip(1 - np.log(ppl) / math.log(PPL_CEILING), 0.0, 1.0)


@dataclass(frozen=True)
class _Scored:
    report_parts: dict[str, float]
    overall: tuple[float, np.ndarray]
    metrics: dict[str, tuple[float, np.ndarray]]  # name -> (point, bootstrap replicates)


def _score(raw: _Raw, draws: _Draws) -> _Scored:
    """Point values and bootstrap replicates of every measure and of the overall score."""
    correct = np.array([a.correct for a in raw.answers], float)
    coh = np.array([c.coherence for c in raw.continuations], float)
    rep = np.array([c.repetition for c in raw.continuations], float)
    think = np.array([s.passed for s in raw.thinking], float)
    metrics = {
        "factual": _mean_reps(correct, draws, "question"),
        "coherence": _mean_reps(coh, draws, "prompt"),
        "repetition": _mean_reps(rep, draws, "prompt"),
    }
    nll_point, nll_reps = _mean_reps(raw.chunk_nll, draws, "chunk")
    metrics["perplexity"] = (math.exp(nll_point), np.exp(nll_reps))
    if think.size:
        metrics["thinking"] = _mean_reps(think, draws, "thinking")
    sub = {
        "factual": metrics["factual"],
        "perplexity": (float(ppl_subscore(metrics["perplexity"][0])), ppl_subscore(metrics["perplexity"][1])),
        "coherence": metrics["coherence"],
        "repetition": (1 - metrics["repetition"][0], 1 - metrics["repetition"][1]),
    }
    if "thinking" in metrics:
        sub["thinking"] = metrics["thinking"]
    wsum = sum(WEIGHTS[k] for k in sub)
    point = 100 * sum(WEIGHTS[k] * v[0] for k, v in sub.items()) / wsum
    reps = 100 * sum(WEIGHTS[k] * v[1] for k, v in sub.items()) / wsum
    return _Scored({k: v[0] for k, v in sub.items()}, (point, reps), metrics)


def _verdict(delta: Estimate, higher_is_better: bool) -> str:
    if not (math.isfinite(delta.low) and math.isfinite(delta.high)) or delta.low <= 0 <= delta.high:
        return "not distinguishable"
    up = delta.low > 0
    return "better" if up == higher_is_better else "worse"


def _difference(
    metric: str, higher_is_better: bool, model: tuple[float, np.ndarray], base: tuple[float, np.ndarray]
) -> Difference:
    d = _interval(model[0] - base[0], model[1] - base[1])
    return Difference(metric, higher_is_better, d, _verdict(d, higher_is_better))


def _report(
    raw: _Raw,
    scored: _Scored,
    options: EvalOptions,
    suite: Suite,
    timings: Timings,
    cached: bool,
    versus: BaseComparison | None = None,
) -> EvalReport:
    m = scored.metrics
    answers = raw.answers
    ppl = m["perplexity"]
    tokens_per_chunk = options.ctx - 1 - options.ctx // 2
    thinking_samples = raw.thinking
    per_mode = len(suite.thinking_prompts) if raw.info.thinking_switch else 0
    return EvalReport(
        model=raw.info,
        suite_version=SUITE_VERSION,
        settings={
            "threads": options.threads,
            "seed": options.seed,
            "ctx": options.ctx,
            "batch": options.batch,
            "bootstrap_samples": options.bootstrap_samples,
            "confidence": CONFIDENCE,
            "questions": len(suite.questions),
            "text": suite.text_name,
            "text_sha256": suite.text_sha256,
            "weights": dict(WEIGHTS),
        },
        score=_interval(*scored.overall),
        parts=scored.report_parts,
        factual=FactualResult(sum(a.correct for a in answers), len(answers), _interval(*m["factual"]), answers),
        perplexity=PerplexityResult(
            _interval(*ppl),
            len(raw.chunk_nll),
            options.ctx,
            len(raw.chunk_nll) * tokens_per_chunk,
            suite.text_name,
            tuple(float(x) for x in raw.chunk_nll),
        ),
        generation=GenerationResult(_interval(*m["coherence"]), _interval(*m["repetition"]), raw.continuations),
        thinking=ThinkingResult(
            raw.info.thinking_switch,
            sum(s.passed for s in thinking_samples if s.mode == "thinking"),
            sum(s.passed for s in thinking_samples if s.mode == "non-thinking"),
            per_mode,
            thinking_samples,
        ),
        versus_base=versus,
        timings=timings,
        cached=cached,
    )


def _mean_nll(lps: Sequence[float] | None) -> float | None:
    if not lps:
        return None
    v = -float(np.mean(lps))
    return v if math.isfinite(v) else None


def _raw(
    ev: _Evaluator,
    target: _Target,
    chunk_nll: Sequence[float],
    replies: dict[str, Any],
    base_scores: dict[str, Any] | None,
) -> _Raw:
    suite = ev.suite
    items = ev.generation_items(target)
    by_step: dict[str, list[dict[str, Any]]] = {}
    for step, key, _ in items:
        by_step.setdefault(step, []).append(replies[key])
    answers = tuple(
        Answer(q.id, q.question, r["text"], is_correct(r["text"], q))
        for q, r in zip(suite.questions, by_step.get("factual questions", []))
    )
    conts, base_nll, self_nll = [], [], []
    for p, r in zip(suite.coherence_prompts, by_step.get("open continuations", [])):
        b = None if base_scores is None else _mean_nll(base_scores.get(_key(p, r["text"])))
        conts.append(
            Continuation(
                p,
                r["text"],
                len(r["logprobs"]),
                len(words(r["text"])),
                coherence_of(r["text"]),
                repetition_of(r["text"]),
                None if b is None else math.exp(b),
            )
        )
        base_nll.append(b)
        self_nll.append(_mean_nll(r["logprobs"]))
    thinking = []
    for mode in ("thinking", "non-thinking"):
        for p, r in zip(suite.thinking_prompts, by_step.get(f"{mode} mode", [])):
            thinking.append(ThinkingSample(mode, p, r["text"], thinking_check(mode, r["prompt"], r["text"])))
    return _Raw(
        target.info,
        answers,
        np.array(chunk_nll, float),
        tuple(conts),
        tuple(base_nll),
        tuple(self_nll),
        tuple(thinking),
    )


def _nll_estimate(values: Sequence[float | None], draws: _Draws) -> tuple[float, np.ndarray] | None:
    """exp(mean NLL) over prompts with a value; None when none has one."""
    arr = np.array([np.nan if v is None else v for v in values], float)
    if not np.isfinite(arr).any():
        return None
    vals = arr[draws("prompt", arr.size)]
    ok = np.isfinite(vals)
    counts = ok.sum(axis=1)
    reps = np.where(counts > 0, np.where(ok, vals, 0.0).sum(axis=1) / np.maximum(counts, 1), np.nan)
    return math.exp(float(arr[np.isfinite(arr)].mean())), np.exp(reps)


def evaluate(
    model: str | Path,
    base: str | Path | None = None,
    options: EvalOptions = EvalOptions(),
    progress: Progress | None = None,
) -> EvalReport:
    """Score `model` (and, with `base`, compare it to `base`) on the suite.

    Deterministic for fixed options and files; raw results come from the cache when present.
    Raises EvalError for an unusable text or mismatched vocabularies, ToolError when a
    llama.cpp tool is missing, cannot load a model (its reason quoted) or fails, and the
    reader's FormatError for a file that is not a GGUF.
    """
    t_start = time.perf_counter()
    suite = load_suite(options)
    cache = EvalCache(options.cache_dir, options.use_cache)
    try:
        step = "hashing"
        if progress:
            progress(step, 0, 2 if base else 1)
        target = _Target(identify(Path(model), cache), Path(model).name)
        base_target = None
        if base is not None:
            base_target = _Target(identify(Path(base), cache), f"base {Path(base).name}")
            if progress:
                progress(step, 2, 2)
            _check_vocab(target, base_target)
        elif progress:
            progress(step, 1, 1)
        ev = _Evaluator(suite, options, cache, progress)

        if base_target is None:
            nll = ev.perplexity(target)
            replies, _ = ev.generations(target)
            raw = _raw(ev, target, nll, replies, None)
            draws = _Draws(options.seed, options.bootstrap_samples)
            scored = _score(raw, draws)
            timings = _timings(ev.clock, t_start)
            return _report(raw, scored, options, suite, timings, not ev.clock.ran)

        base_nll = ev.perplexity(base_target, save_logits=True)
        kld = ev.kld(target, base_target)
        model_nll = ev.perplexity(target)  # cached by the KLD run
        replies, _ = ev.generations(target)
        conts = [
            (replies[key]["prompt"], replies[key]["text"])
            for step, key, _ in ev.generation_items(target)
            if step == "open continuations"
        ]
        base_replies, base_scores = ev.generations(base_target, forced=conts)
        raw = _raw(ev, target, model_nll, replies, base_scores)
        base_raw = _raw(ev, base_target, base_nll, base_replies, base_scores)

        draws = _Draws(options.seed, options.bootstrap_samples)
        scored, base_scored = _score(raw, draws), _score(base_raw, draws)
        kld_result = _kld_result(Path(model), kld, raw.chunk_nll, base_raw.chunk_nll, draws)
        m, b = scored.metrics, base_scored.metrics
        diffs = [
            _difference("overall score", True, scored.overall, base_scored.overall),
            _difference("factual accuracy", True, m["factual"], b["factual"]),
            _difference("perplexity", False, m["perplexity"], b["perplexity"]),
            _difference("coherence", True, m["coherence"], b["coherence"]),
            _difference("repetition", False, m["repetition"], b["repetition"]),
        ]
        if "thinking" in m and "thinking" in b:
            diffs.append(_difference("thinking checks", True, m["thinking"], b["thinking"]))
        cont = _nll_estimate(raw.continuation_nll, draws)
        base_cont = _nll_estimate(base_raw.self_nll, draws)
        if cont and base_cont:
            diffs.append(_difference("continuation perplexity under base", False, cont, base_cont))
        timings = _timings(ev.clock, t_start)
        base_report = _report(base_raw, base_scored, options, suite, timings, not ev.clock.ran)
        versus = BaseComparison(
            base_report,
            kld_result,
            _interval(*cont) if cont else None,
            _interval(*base_cont) if base_cont else None,
            tuple(diffs),
            diffs[0].verdict,
        )
        return _report(raw, scored, options, suite, timings, not ev.clock.ran, versus)
    finally:
        cache.close()


def _kld_result(
    model: Path, kld: dict[str, Any], model_nll: np.ndarray, base_nll: np.ndarray, draws: _Draws
) -> KldResult:
    if not (len(kld["chunk_kld"]) == model_nll.size == base_nll.size):
        raise EvalError(
            f"{model.name}: {len(kld['chunk_kld'])} KLD chunks for {model_nll.size} text chunks "
            f"({base_nll.size} for the base)"
        )
    kld_point, kld_reps = _mean_reps(np.array(kld["chunk_kld"]), draws, "chunk")
    top_point, top_reps = _mean_reps(np.array(kld["chunk_same_top"]) * 100, draws, "chunk")
    m_point, m_reps = _mean_reps(model_nll, draws, "chunk")
    b_point, b_reps = _mean_reps(base_nll, draws, "chunk")
    return KldResult(
        _interval(kld_point, kld_reps),
        kld.get("median"),
        kld.get("p99"),
        kld.get("maximum"),
        _interval(top_point, top_reps),
        _interval(math.exp(m_point) - math.exp(b_point), np.exp(m_reps) - np.exp(b_reps)),
        tuple(kld["chunk_kld"]),
        tuple(kld["chunk_same_top"]),
    )


def kl_divergence(
    model: str | Path, base: str | Path, options: EvalOptions = EvalOptions(), progress: Progress | None = None
) -> KldResult:
    """Only the KL divergence of `model` to `base` on the options' text (no generation): the
    quick measure for searches over many edits. Shares evaluate()'s cache: the base logits are
    computed once per (base, text, settings), a model's result once per file hash."""
    suite = load_suite(options)
    cache = EvalCache(options.cache_dir, options.use_cache)
    try:
        target = _Target(identify(Path(model), cache), Path(model).name)
        base_target = _Target(identify(Path(base), cache), f"base {Path(base).name}")
        _check_vocab(target, base_target)
        ev = _Evaluator(suite, options, cache, progress)
        base_nll = ev.perplexity(base_target, save_logits=True)
        kld = ev.kld(target, base_target)
        model_nll = ev.perplexity(target)  # cached by the KLD run
        return _kld_result(
            Path(model),
            kld,
            np.array(model_nll, float),
            np.array(base_nll, float),
            _Draws(options.seed, options.bootstrap_samples),
        )
    finally:
        cache.close()


def _check_vocab(target: _Target, base: _Target) -> None:
    if base.info.vocab_size != target.info.vocab_size:
        raise EvalError(
            f"{target.info.path.name} has {target.info.vocab_size} tokens and base {base.info.path.name} "
            f"{base.info.vocab_size}: KL divergence needs the same vocabulary"
        )


def _timings(clock: _Clock, t_start: float) -> Timings:
    return Timings(clock.load, clock.perplexity, clock.generation, time.perf_counter() - t_start)


def compare(
    models: Sequence[str | Path], options: EvalOptions = EvalOptions(), progress: Progress | None = None
) -> tuple[EvalReport, ...]:
    """The first model scored alone, then each other model scored against it."""
    if len(models) < 2:
        raise EvalError("compare needs at least two models")
    first = evaluate(models[0], None, options, progress)
    return (first, *(evaluate(m, models[0], options, progress) for m in models[1:]))


# --- tables ---------------------------------------------------------------------------


def _fmt_ci(e: Estimate, digits: int, pct: bool = False) -> str:
    k = 100 if pct else 1
    if not math.isfinite(e.low):
        return f"{e.value * k:.{digits}f}"
    return f"{e.value * k:.{digits}f} [{e.low * k:.{digits}f}, {e.high * k:.{digits}f}]"


def _fmt_delta(d: Difference | None, digits: int, pct: bool = False) -> str:
    if d is None:
        return ""
    k = 100 if pct else 1
    e = d.delta
    return f"Δ {e.value * k:+.{digits}f} [{e.low * k:+.{digits}f}, {e.high * k:+.{digits}f}] {d.verdict}"


def _mode(ok: bool | None, passed: int, total: int) -> str:
    return "n/a (no switch)" if ok is None else f"{'✅' if ok else '❌'} {passed}/{total}"


def comparison_table(reports: Sequence[EvalReport]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the model-card table: one column per report; reports after the first
    are expected to carry versus_base (compare()) and show their deltas to the first."""
    header = ["Metric"] + [r.model.path.name for r in reports]

    def cells(fn: Callable[[EvalReport, dict[str, Difference]], str]) -> list[str]:
        return [fn(r, {d.metric: d for d in (r.versus_base.differences if r.versus_base else ())}) for r in reports]

    def with_delta(text: str, d: Difference | None, digits: int, pct: bool = False) -> str:
        return text if d is None else f"{text}  {_fmt_delta(d, digits, pct)}"

    rows = [
        ["Overall score / 100"] + cells(lambda r, d: with_delta(_fmt_ci(r.score, 1), d.get("overall score"), 1)),
        ["Factual accuracy"]
        + cells(
            lambda r, d: with_delta(
                f"{r.factual.correct}/{r.factual.total} ({_fmt_ci(r.factual.accuracy, 0, pct=True)}%)",
                d.get("factual accuracy"),
                0,
                pct=True,
            )
        ),
        ["Perplexity"] + cells(lambda r, d: with_delta(_fmt_ci(r.perplexity.ppl, 2), d.get("perplexity"), 2)),
        ["KLD vs first (mean)"] + cells(lambda r, d: "—" if not r.versus_base else _fmt_ci(r.versus_base.kld.mean, 4)),
        ["KLD median / p99"]
        + cells(
            lambda r, d: (
                "—" if not r.versus_base else f"{_num(r.versus_base.kld.median, 4)} / {_num(r.versus_base.kld.p99, 4)}"
            )
        ),
        ["Same top token %"] + cells(lambda r, d: "—" if not r.versus_base else _fmt_ci(r.versus_base.kld.same_top, 2)),
        ["Coherence"] + cells(lambda r, d: with_delta(_fmt_ci(r.generation.coherence, 3), d.get("coherence"), 3)),
        ["Repetition"] + cells(lambda r, d: with_delta(_fmt_ci(r.generation.repetition, 3), d.get("repetition"), 3)),
        ["Thinking mode"]
        + cells(lambda r, d: _mode(r.thinking.thinking_ok, r.thinking.thinking_passed, r.thinking.per_mode)),
        ["Non-thinking mode"]
        + cells(lambda r, d: _mode(r.thinking.non_thinking_ok, r.thinking.non_thinking_passed, r.thinking.per_mode)),
        ["Verdict vs first"] + cells(lambda r, d: "—" if not r.versus_base else r.versus_base.verdict),
    ]
    return header, rows


def _num(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v + 0.0:.{digits}f}"  # no "-0.0000"
