"""Score a GGUF model, alone or against its base, through llama.cpp's own binaries.

    report = evaluate("edited.gguf", base="original.gguf")
    report.score            # Estimate(value=81.2, low=77.0, high=85.1): overall 0-100
    report.versus_base.verdict   # "better" | "worse" | "equivalent" | "inconclusive"

Parts (docs/evaluation.md has the formula and the reasoning; metrics.py the registry):
- factual accuracy: the bundled questions (data/questions.toml), asked through the model's own
  chat template in non-thinking mode, greedy, matched after normalization (answers.py);
- perplexity of an evaluation text (data/eval_text.txt or any file) with llama-perplexity
  (llama/perplexity.py);
- with a base: KL divergence, same-top-token rate and delta-perplexity with
  llama-perplexity --kl-divergence-base / --kl-divergence, and the base's perplexity of the
  model's free continuations;
- coherence (distinct n-grams, length) and repetition of greedy continuations of open prompts;
- thinking / non-thinking checks where the chat template has an enable_thinking switch.

Every score carries a bootstrap 95% interval over the items it is made of (questions, text
chunks, prompts); every difference to the base is a paired bootstrap over the same items, and
a verdict says whether its interval excludes zero (stats.py). Everything runs at temperature 0
with a fixed seed, thread count and batch size. Raw results (replies, per-chunk values) are
cached by the model file's SHA-256 and the settings that affect them (cache.py), so a rerun
spawns nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys

from ..errors import EvalError, ToolError
from ..llama.perplexity import PerplexityTool, scored_tokens_per_chunk
from ..llama.server import LlamaServer, apply_chat_template, complete, gbnf_literal
from ..llama.tools import find_tool
from ..reader import Model
from .answers import coherence_of, is_correct, repetition_of, thinking_check, words
from .benchmarks import BENCH_CTX, BenchData, BenchSpec, read_bench_data, score_tasks
from .cache import EvalCache, cache_key
from .metrics import (
    CONTINUATION,
    Raw,
    Scored,
    benchmark_metric,
    differences,
    overall_verdict,
    paired,
    score,
    weights,
)
from .records import (
    Answer,
    BaseComparison,
    BenchResult,
    Continuation,
    EvalReport,
    FactualResult,
    GenerationResult,
    KldResult,
    ModelInfo,
    PerplexityResult,
    ThinkingResult,
    ThinkingSample,
    Timings,
)
from .stats import CONFIDENCE, _Draws, _interval, _mean_reps
from .suite import (
    CHAT_FORMAT,
    COHERENCE_N_PREDICT,
    DEFAULT_OPTIONS,
    FACTUAL_N_PREDICT,
    FACTUAL_SYSTEM_PROMPT,
    FEW_SHOT_FORMAT,
    NON_THINKING_N_PREDICT,
    SERVER_CTX,
    SUITE_VERSION,
    THINKING_N_PREDICT,
    EvalOptions,
    Suite,
    few_shot_prompt,
    load_suite,
)

Progress = Callable[[str, int, "int | None"], None]
"""progress(step, done, total): called as each long step advances; total None when unknown."""


class _Clock:
    """Accumulates the seconds spent waiting on llama.cpp, by kind."""

    def __init__(self) -> None:
        self.load = self.perplexity = self.generation = 0.0
        self.ran = False  # anything had to be computed

    def perplexity_run(self, load: float, compute: float) -> None:
        """One llama-perplexity run: its model loading and its computing."""
        self.load += load
        self.perplexity += compute
        self.ran = True


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
        CHAT_FORMAT if isinstance(tmpl, str) and tmpl.strip() else FEW_SHOT_FORMAT,
    )


class _Evaluator:
    """One evaluate() call: tools, cache, clock and progress shared by its steps."""

    def __init__(self, suite: Suite, options: EvalOptions, cache: EvalCache, progress: Progress | None):
        self.suite, self.options, self.cache = suite, options, cache
        self.progress = progress or (lambda step, done, total: None)
        self.clock = _Clock()
        o = options
        self.tool = PerplexityTool(
            find_tool("llama-perplexity", o.llama_bin),
            ctx=o.ctx,
            batch=o.batch,
            threads=o.threads,
            seed=o.seed,
            timeout=o.timeout,
            on_time=self.clock.perplexity_run,
        )
        # the benchmark modes at their own context (BENCH_CTX x -np: room for one task's answers)
        self.bench_tool = PerplexityTool(
            self.tool.binary,
            ctx=BENCH_CTX,
            batch=o.batch,
            threads=o.threads,
            seed=o.seed,
            timeout=o.timeout,
            on_time=self.clock.perplexity_run,
        )
        self.bench_data: dict[str, BenchData] = {}
        for spec in o.benches:
            benchmark_metric(spec.name, spec.label)
            self.bench_data[spec.name] = read_bench_data(spec.kind, spec.file)
        self.llama_bin = o.llama_bin
        self.text_key = cache_key(SUITE_VERSION, suite.text_sha256, o.ctx, o.batch, o.threads)
        self.gen_key = cache_key(
            SUITE_VERSION,
            o.seed,
            o.threads,
            SERVER_CTX,
            FACTUAL_N_PREDICT,
            COHERENCE_N_PREDICT,
            THINKING_N_PREDICT,
            NON_THINKING_N_PREDICT,
        )

    def bench_specs(self) -> list[tuple[BenchSpec, BenchData]]:
        return [(spec, self.bench_data[spec.name]) for spec in self.options.benches]

    def draws(self) -> _Draws:
        return _Draws(self.options.seed, self.options.bootstrap_samples)

    def _chunk_progress(self, step: str) -> Callable[[int, int | None], None]:
        return lambda done, total: self.progress(step, done, total)

    # perplexity and KLD
    def perplexity(self, target: _Target, save_logits: bool = False) -> list[float]:
        """Per-chunk NLL of the text; with save_logits also writes the base logits file."""
        sha = target.info.sha256
        cached = self.cache.load(sha, "ppl", self.text_key)
        logits = self.cache.logits(sha, self.text_key)
        if cached is not None and (not save_logits or logits.exists()):
            return cached["chunk_nll"]
        step = f"{target.label}: " + ("perplexity and base logits" if save_logits else "perplexity")
        nll = self.tool.chunk_nll(
            target.info.path, self.suite.text, self._chunk_progress(step), logits if save_logits else None
        )
        self.cache.save(sha, "ppl", self.text_key, {"chunk_nll": nll})
        return nll

    def kld(self, target: _Target, base: _Target) -> dict[str, Any]:
        """KLD statistics of the model against the base logits (which must exist)."""
        key = cache_key(self.text_key, base.info.sha256)
        cached = self.cache.load(target.info.sha256, "kld", key)
        if cached is not None:
            return cached
        logits = self.cache.logits(base.info.sha256, self.text_key)
        out = self.tool.kld(target.info.path, logits, self._chunk_progress(f"{target.label}: KL divergence vs base"))
        self.cache.save(target.info.sha256, "kld", key, out)
        if self.cache.load(target.info.sha256, "ppl", self.text_key) is None:
            self.cache.save(target.info.sha256, "ppl", self.text_key, {"chunk_nll": out["chunk_nll"]})
        return out

    # benchmarks
    def benches(self, target: _Target) -> dict[str, tuple[bool, ...]]:
        """Each --bench benchmark's per-task results (cached per task)."""
        out = {}
        for spec in self.options.benches:
            out[spec.name] = score_tasks(
                self.bench_tool,
                self.cache,
                target.info.path,
                target.info.sha256,
                spec,
                self.bench_data[spec.name],
                self._chunk_progress(f"{target.label}: {spec.label} tasks"),
            )
        return out

    # generation
    def generation_items(self, target: _Target) -> list[tuple[str, str, dict[str, Any]]]:
        """(step, item key, request) for every generation the suite asks of this model."""
        items = []
        for q in self.suite.questions:
            if target.info.prompt_format == FEW_SHOT_FORMAT:
                req: dict[str, Any] = {
                    "prompt": few_shot_prompt(q.question),
                    "n_predict": FACTUAL_N_PREDICT,
                    "stop": ["\n"],
                }
                items.append(("factual questions", cache_key("raw", req), req))
                continue
            msgs = [{"role": "system", "content": FACTUAL_SYSTEM_PROMPT}, {"role": "user", "content": q.question}]
            req = {
                "messages": msgs,
                "enable_thinking": False if target.info.thinking_switch else None,
                "n_predict": FACTUAL_N_PREDICT,
            }
            items.append(("factual questions", cache_key("chat", req), req))
        for p in self.suite.coherence_prompts:
            req = {"prompt": p, "n_predict": COHERENCE_N_PREDICT}
            items.append(("open continuations", cache_key("raw", req), req))
        if target.info.thinking_switch:
            for mode, n in (("thinking", THINKING_N_PREDICT), ("non-thinking", NON_THINKING_N_PREDICT)):
                for p in self.suite.thinking_prompts:
                    req = {
                        "messages": [{"role": "user", "content": p}],
                        "enable_thinking": mode == "thinking",
                        "n_predict": n,
                    }
                    items.append((f"{mode} mode", cache_key("chat", req), req))
        return items

    def continuations(self, target: _Target, replies: dict[str, Any]) -> list[tuple[str, str]]:
        """(prompt, text) of the model's open continuations, for the base to be forced through."""
        return [
            (replies[key]["prompt"], replies[key]["text"])
            for step, key, _ in self.generation_items(target)
            if step == "open continuations"
        ]

    @staticmethod
    def _score_own(replies: dict[str, Any], forced: Sequence[tuple[str, str]], scores: dict[str, Any]) -> None:
        """A text the model itself generated after the same raw prompt needs no forced run:
        its generation log-probabilities are the ones forcing would give."""
        own = {cache_key(r["prompt"], r["text"]): r["logprobs"] for r in replies.values() if "logprobs" in r}
        for p, t in forced:
            k = cache_key(p, t)
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
        if not todo and not [(p, t) for p, t in forced if cache_key(p, t) not in scores and t]:
            return replies, scores
        start = time.perf_counter()
        o = self.options
        server = LlamaServer(
            find_tool("llama-server", self.llama_bin).parent,  # only generation needs it
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
            self._ask(server.url, target, todo, replies)
            self._score_own(replies, forced, scores)
            self._force(server.url, target, [(p, t) for p, t in forced if cache_key(p, t) not in scores and t], scores)
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

    def _ask(self, url: str, target: _Target, todo: list[tuple[str, str, dict[str, Any]]], replies: dict) -> None:
        """Generate the reply to each item, into `replies` as it comes."""
        o = self.options
        totals: dict[str, int] = {}
        for step, _, _ in todo:
            totals[step] = totals.get(step, 0) + 1
        done = {s: 0 for s in totals}
        for step, key, req in todo:
            label = f"{target.label}: {step}"
            self.progress(label, done[step], totals[step])
            t0 = time.perf_counter()
            if "messages" in req:
                prompt = apply_chat_template(url, req["messages"], req["enable_thinking"], o.request_timeout)
            else:
                prompt = req["prompt"]
            c = complete(url, prompt, req["n_predict"], o.seed, o.request_timeout, stop=req.get("stop"))
            self.clock.generation += time.perf_counter() - t0
            replies[key] = {"prompt": prompt, "text": c.text, "stop": c.stop, "logprobs": list(c.logprobs)}
            done[step] += 1
            self.progress(label, done[step], totals[step])

    def _force(self, url: str, target: _Target, todo: list[tuple[str, str]], scores: dict) -> None:
        """The model's log-probabilities of each (prompt, text), generated under a grammar that
        matches only `text`; None where the model did not end exactly there."""
        o = self.options
        for i, (prompt, text) in enumerate(todo):
            self.progress(f"{target.label}: scoring continuations", i, len(todo))
            t0 = time.perf_counter()
            n_tokens = len(text.encode("utf-8")) + 16  # a token holds at least one byte
            c = complete(url, prompt, n_tokens, o.seed, o.request_timeout, grammar=gbnf_literal(text))
            self.clock.generation += time.perf_counter() - t0
            scores[cache_key(prompt, text)] = list(c.logprobs) if c.stop == "eos" and c.text == text else None
            self.progress(f"{target.label}: scoring continuations", i + 1, len(todo))


# --- from replies to reports ------------------------------------------------------------


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
    benches: dict[str, tuple[bool, ...]],
) -> Raw:
    suite = ev.suite
    by_step: dict[str, list[dict[str, Any]]] = {}
    for step, key, _ in ev.generation_items(target):
        by_step.setdefault(step, []).append(replies[key])
    answers = tuple(
        Answer(q.id, q.question, r["text"], is_correct(r["text"], q))
        for q, r in zip(suite.questions, by_step.get("factual questions", []))
    )
    conts, base_nll, self_nll = [], [], []
    for p, r in zip(suite.coherence_prompts, by_step.get("open continuations", [])):
        b = None if base_scores is None else _mean_nll(base_scores.get(cache_key(p, r["text"])))
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
    return Raw(
        target.info,
        answers,
        np.array(chunk_nll, float),
        tuple(conts),
        tuple(base_nll),
        tuple(self_nll),
        tuple(thinking),
        benches,
    )


def _report(
    raw: Raw,
    scored: Scored,
    options: EvalOptions,
    suite: Suite,
    timings: Timings,
    cached: bool,
    versus: BaseComparison | None = None,
    bench_specs: Sequence[tuple[BenchSpec, BenchData]] = (),
) -> EvalReport:
    m = scored.metrics
    answers = raw.answers
    benchmarks = tuple(
        BenchResult(
            spec.name,
            spec.label,
            spec.kind,
            spec.file,
            data.sha256,
            len(raw.benches[spec.name]),
            sum(raw.benches[spec.name]),
            _interval(*m[spec.name]),
            tuple(data.selected(spec.tasks)),
            raw.benches[spec.name],
        )
        for spec, data in bench_specs
        if spec.name in raw.benches
    )
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
            "weights": weights(),
            "benches": [str(spec) for spec in options.benches],
            "bench_ctx": BENCH_CTX,
        },
        score=_interval(*scored.overall),
        parts=scored.report_parts,
        factual=FactualResult(sum(a.correct for a in answers), len(answers), _interval(*m["factual"]), answers),
        perplexity=PerplexityResult(
            _interval(*m["perplexity"]),
            len(raw.chunk_nll),
            options.ctx,
            len(raw.chunk_nll) * scored_tokens_per_chunk(options.ctx),
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
        benchmarks=benchmarks,
    )


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
        kld.get("mean"),
    )


def _timings(clock: _Clock, t_start: float) -> Timings:
    return Timings(clock.load, clock.perplexity, clock.generation, time.perf_counter() - t_start)


# --- the entry points -------------------------------------------------------------------


def _check_vocab(target: _Target, base: _Target) -> None:
    if base.info.vocab_size != target.info.vocab_size:
        raise EvalError(
            f"{target.info.path.name} has {target.info.vocab_size} tokens and base {base.info.path.name} "
            f"{base.info.vocab_size}: KL divergence needs the same vocabulary"
        )


def _targets(
    model: Path, base: Path | None, cache: EvalCache, progress: Progress | None
) -> tuple[_Target, _Target | None]:
    """Hash and describe the model (and the base), checking that their vocabularies match."""
    step = "hashing"
    if progress:
        progress(step, 0, 2 if base else 1)
    target = _Target(identify(model, cache), model.name)
    if base is None:
        if progress:
            progress(step, 1, 1)
        return target, None
    base_target = _Target(identify(base, cache), f"base {base.name}")
    if progress:
        progress(step, 2, 2)
    _check_vocab(target, base_target)
    return target, base_target


def _check_benches(benches: Sequence[BenchSpec]) -> None:
    names = [b.name for b in benches]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalError(f"--bench: {dup[0]} is given more than once (one task count per benchmark)")


def _evaluate_alone(ev: _Evaluator, target: _Target, t_start: float) -> EvalReport:
    """Measure the model on the suite and score it."""
    nll = ev.perplexity(target)
    replies, _ = ev.generations(target)
    raw = _raw(ev, target, nll, replies, None, ev.benches(target))
    scored = score(raw, ev.draws())
    return _report(
        raw, scored, ev.options, ev.suite, _timings(ev.clock, t_start), not ev.clock.ran, None, ev.bench_specs()
    )


def _measure_pair(ev: _Evaluator, target: _Target, base: _Target) -> tuple[Raw, Raw, dict[str, Any]]:
    """Both models on the suite, and the KLD run: the base's logits first (with its
    perplexity), the model's KLD to them (with its perplexity), both models' replies, then the
    base forced through the model's continuations."""
    base_nll = ev.perplexity(base, save_logits=True)
    kld = ev.kld(target, base)
    model_nll = ev.perplexity(target)  # cached by the KLD run
    replies, _ = ev.generations(target)
    base_replies, base_scores = ev.generations(base, forced=ev.continuations(target, replies))
    base_benches, benches = ev.benches(base), ev.benches(target)
    return (
        _raw(ev, target, model_nll, replies, base_scores, benches),
        _raw(ev, base, base_nll, base_replies, base_scores, base_benches),
        kld,
    )


def _evaluate_against(ev: _Evaluator, target: _Target, base: _Target, t_start: float) -> EvalReport:
    """Measure both models, score each with the same draws, and report the model with its
    differences to the base (each metric's paired difference and verdict) and the KLD."""
    raw, base_raw, kld = _measure_pair(ev, target, base)
    draws = ev.draws()
    scored, base_scored = score(raw, draws), score(base_raw, draws)
    kld_result = _kld_result(target.info.path, kld, raw.chunk_nll, base_raw.chunk_nll, draws)
    pairs = paired(raw, base_raw, scored, base_scored, draws)
    diffs = differences(scored, base_scored, pairs, raw, base_raw)
    cont, base_cont = pairs[CONTINUATION.name]
    timings = _timings(ev.clock, t_start)
    cached = not ev.clock.ran
    versus = BaseComparison(
        _report(base_raw, base_scored, ev.options, ev.suite, timings, cached, None, ev.bench_specs()),
        kld_result,
        _interval(*cont) if cont else None,
        _interval(*base_cont) if base_cont else None,
        tuple(diffs),
        overall_verdict(diffs),
    )
    return _report(raw, scored, ev.options, ev.suite, timings, cached, versus, ev.bench_specs())


def evaluate(
    model: str | Path,
    base: str | Path | None = None,
    options: EvalOptions = DEFAULT_OPTIONS,
    progress: Progress | None = None,
    benches: Sequence[BenchSpec] | None = None,
) -> EvalReport:
    """Score `model` (and, with `base`, compare it to `base`) on the suite.

    `benches` (else options.benches) adds benchmarks scored by llama-perplexity, each task
    right or wrong and paired with the base per task: BenchSpec from parse_bench("hellaswag:400").
    Deterministic for fixed options and files; raw results come from the cache when present.
    Raises EvalError for an unusable text or mismatched vocabularies, ToolError when a
    llama.cpp tool is missing, cannot load a model (its reason quoted) or fails, and the
    reader's FormatError for a file that is not a GGUF.
    """
    t_start = time.perf_counter()
    if benches is not None:
        options = replace(options, benches=tuple(benches))
    _check_benches(options.benches)
    suite = load_suite(options)
    cache = EvalCache(options.cache_dir, options.use_cache)
    try:
        target, base_target = _targets(Path(model), None if base is None else Path(base), cache, progress)
        ev = _Evaluator(suite, options, cache, progress)
        if base_target is None:
            return _evaluate_alone(ev, target, t_start)
        return _evaluate_against(ev, target, base_target, t_start)
    finally:
        cache.close()


def kl_divergence(
    model: str | Path, base: str | Path, options: EvalOptions = DEFAULT_OPTIONS, progress: Progress | None = None
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
            ev.draws(),
        )
    finally:
        cache.close()


def compare(
    models: Sequence[str | Path],
    options: EvalOptions = DEFAULT_OPTIONS,
    progress: Progress | None = None,
    benches: Sequence[BenchSpec] | None = None,
) -> tuple[EvalReport, ...]:
    """The first model scored alone, then each other model scored against it."""
    if benches is not None:
        options = replace(options, benches=tuple(benches))
    if len(models) < 2:
        raise EvalError("compare needs at least two models")
    first = evaluate(models[0], None, options, progress)
    return (first, *(evaluate(m, models[0], options, progress) for m in models[1:]))
