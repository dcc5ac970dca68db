"""Scoring candidates: stage 1, the KL divergence to the base on a short text; stage 2, the full
eval suite (the integration with gguf_surgeon.evaluation.runner)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..files import write_text_atomic

SHORT_CHARS = 2500  # of the eval text: about 4 chunks of 128 tokens for a 50k-token vocabulary
SHORT_CTX = 128  # llama-perplexity chunk length of the short KLD stage


@dataclass(frozen=True)
class ShortScore:
    """Stage 1: KL divergence to the base on the short text."""

    kld: float  # mean KL(base || candidate) per token, nats
    low: float  # 95% bootstrap interval over text chunks
    high: float
    same_top: float  # % of tokens whose most likely next token is the base's
    seconds: float


def short_text(chars: int = SHORT_CHARS) -> str:
    """The first `chars` characters of the eval suite's text, cut at a sentence end."""
    from ..evaluation.suite import EVAL_TEXT_FILE

    text = EVAL_TEXT_FILE.read_text(encoding="utf-8")
    if len(text) <= chars:
        return text
    cut = text[:chars]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > chars // 2 else cut


class CandidateScorer:
    """Writes a candidate's GGUF, scores it, deletes it (unless keep).

    The integration point with gguf_surgeon.evaluation: stage 1 runs llama-perplexity
    --kl-divergence-base/--kl-divergence through evaluate's evaluator and cache (base logits
    are computed once per text and cached by the base's hash; a candidate's result is cached
    by its own hash, so a rebuilt identical candidate costs nothing); stage 2 is
    evaluate.evaluate(candidate, base).
    """

    def __init__(
        self,
        base: Path,
        work_dir: Path,
        *,
        llama_bin: Path | None = None,
        ctx: int = SHORT_CTX,
        short_chars: int = SHORT_CHARS,
        threads: int | None = None,
        full_questions: int | None = None,
        yardstick: bool = False,
        benches: tuple = (),
        keep: bool = False,
        cache_dir: Path | None = None,
    ):
        self.base = Path(base)
        self.work_dir = Path(work_dir)
        self.candidates_dir = self.work_dir / "candidates"
        self.llama_bin = llama_bin
        self.ctx = ctx
        self.short_chars = short_chars
        self.threads = threads
        self.full_questions = full_questions
        self.yardstick = yardstick
        self.benches = tuple(benches)  # BenchSpec each: benchmarks added to the full eval
        self.keep = keep
        self.cache_dir = cache_dir

    def _options(self, text: Path | None) -> Any:
        from ..evaluation.suite import EvalOptions

        kw: dict[str, Any] = {"llama_bin": self.llama_bin, "cache_dir": self.cache_dir}
        if self.threads:
            kw["threads"] = self.threads
        if text is not None:
            kw.update(text=text, ctx=self.ctx)
        else:
            kw.update(questions=self.full_questions, benches=self.benches)
        return EvalOptions(**kw)

    def full_options(self) -> Any:
        """The EvalOptions of stage 2 (the suite's text, the questions and benchmarks asked for)."""
        return self._options(None)

    def short_yardstick(self) -> Any:
        """The base's quantization ladder with each rung's KLD on the short text (cached per base)."""
        from ..evaluation.yardstick import yardstick

        return yardstick(self.base, self._options(self.text_file()))

    def text_file(self) -> Path:
        """The short text, written once into the work folder (same bytes: same cache keys)."""
        path = self.work_dir / f"short-text-{self.short_chars}.txt"
        text = short_text(self.short_chars)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            try:
                self.work_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{self.work_dir}: cannot create the work folder: {e.strerror}") from None
            write_text_atomic(path, text, force=True)
        return path

    def prepare(self) -> None:
        """Compute (or find cached) the base logits of the short text before workers start."""
        self.score_file(self.base)

    def score_file(self, candidate: Path) -> ShortScore:
        """Stage 1 for a GGUF file already written (the base itself gives a KLD of about 0)."""
        from ..evaluation.runner import kl_divergence

        start = time.monotonic()
        result = kl_divergence(candidate, self.base, self._options(self.text_file()))
        return ShortScore(
            result.mean.value, result.mean.low, result.mean.high, result.same_top.value, time.monotonic() - start
        )

    def build(self, recipe: str, tag: str) -> Path:
        """Write the candidate; a healed deletion is calibrated first (analysis.heal, defaults:
        the bundled calibration text, auto estimator), so the same recipe gives the same bytes."""
        from ..edit import EditOptions, edit, prepare
        from ..reader import Model

        self.candidates_dir.mkdir(parents=True, exist_ok=True)
        path = self.candidates_dir / f"candidate-{tag}.gguf"
        options = EditOptions(overwrite=True)
        with Model(self.base) as model:
            surgery = prepare(model, recipe, options)
        heal = None
        if surgery.heal_windows:
            from ..analysis.heal import compute_heal

            heal = compute_heal(self.base, surgery, llama_bin=self.llama_bin).data
        edit(self.base, path, recipe, options, heal=heal)
        return path

    def short(self, recipe: str, tag: str) -> ShortScore:
        """Stage 1 for one recipe; the candidate file exists only while it is scored."""
        path = self.build(recipe, tag)
        try:
            return self.score_file(path)
        finally:
            if not self.keep:
                path.unlink(missing_ok=True)

    def full(self, recipe: str, tag: str) -> dict:
        """Stage 2: the full eval suite against the base, summarized for the study."""
        from ..evaluation.runner import evaluate

        path = self.build(recipe, tag)
        try:
            report = evaluate(path, self.base, self.full_options())
        finally:
            if not self.keep:
                path.unlink(missing_ok=True)
        vs = report.versus_base
        assert vs is not None
        overall = vs.differences[0].delta
        ladder = None
        if self.yardstick:  # the ladder measured on the full eval's text, as this KLD is
            from ..evaluation.yardstick import yardstick

            ladder = yardstick(self.base, self.full_options()).place(vs.kld.mean.value)
        return {
            "score": _est(report.score),
            "base_score": _est(vs.base.score),
            "delta": _est(overall),
            "verdict": vs.verdict,
            "factual": [report.factual.correct, report.factual.total],
            "base_factual": [vs.base.factual.correct, vs.base.factual.total],
            "perplexity": _est(report.perplexity.ppl),
            "base_perplexity": _est(vs.base.perplexity.ppl),
            "kld": _est(vs.kld.mean),
            "differences": [d.to_dict() for d in vs.differences],  # overall first, then each measure
            "ladder": ladder,  # the KLD's place on the base's quantization ladder (with yardstick)
            "benches": [str(b) for b in self.benches],  # the specs the full eval ran
            "benchmarks": [
                {"label": b.label, "correct": b.correct, "tasks": b.tasks, "accuracy": _est(b.accuracy)}
                for b in report.benchmarks
            ],
        }


def _est(e: Any) -> list[float]:
    return [e.value, e.low, e.high]
