"""The comparison table of evaluation reports (the CLI's table and the model card's): the
overall score, each registered metric's rows, and the verdict against the first model."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .metrics import METRICS, OVERALL, Row
from .records import Difference, Estimate, EvalReport


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


def _with_delta(text: str, d: Difference | None, digits: int, pct: bool = False) -> str:
    return text if d is None else f"{text}  {_fmt_delta(d, digits, pct)}"


def _differences(r: EvalReport) -> dict[str, Difference]:
    return {d.metric: d for d in (r.versus_base.differences if r.versus_base else ())}


def _cell(row: Row, label: str, r: EvalReport) -> str:
    """One report's cell of a metric's row; `label` names the metric's difference."""
    if row.estimate is None:
        return row.text(r, "") if row.text else "—"
    e = row.estimate(r)
    if e is None:
        return "—"
    shown = _fmt_ci(e, row.digits, row.pct)
    if row.text is not None:
        shown = row.text(r, shown)
    return _with_delta(shown, _differences(r).get(label), row.digits, row.pct) if row.delta else shown


def comparison_table(reports: Sequence[EvalReport]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the model-card table: one column per report; reports after the first
    are expected to carry versus_base (compare()) and show their deltas to the first."""
    header = ["Metric"] + [r.model.path.name for r in reports]
    rows = [
        ["Overall score / 100"] + [_with_delta(_fmt_ci(r.score, 1), _differences(r).get(OVERALL), 1) for r in reports]
    ]
    for metric in METRICS.values():
        rows += [[row.label] + [_cell(row, metric.label, r) for r in reports] for row in metric.rows]
    rows.append(["Verdict vs first"] + ["—" if not r.versus_base else r.versus_base.verdict for r in reports])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (first column left-aligned, the rest centred) with each cell's bare `|`
    escaped: `compare --markdown` and the release card print the same table."""

    def cell(text: str) -> str:
        return re.sub(r"(?<!\\)\|", r"\\|", text)

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|:---|" + ":---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
