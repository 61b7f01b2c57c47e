"""CI regression gate: ``--fail-if "kl_mean>0.05,top1<0.90,ppl_ratio>1.05"``.

A gate is a comma-separated list of clauses ``METRIC OP VALUE`` with OP one of ``> >= < <=``;
a clause is *broken* by a candidate when ``value_of_metric OP VALUE`` holds (``kl_mean>0.05``
fails every candidate whose mean KL exceeds 0.05). :func:`parse_gate` turns the text into
:class:`Threshold` objects, :func:`check_gate` checks them against a report dict (the JSON body
of :meth:`qmetrics.evaluation.compare.EvaluationResult.to_dict`) and returns one message per broken
(candidate, threshold) pair. A metric a candidate lacks (e.g. ``ppl_ratio`` from a run without
labels) breaks the threshold too: a gate never passes silently for want of data.

The metric names and how each is read from the report live in one table, :data:`METRICS`.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qmetrics.reports.compare import as_number, dig

#: A candidate's view of the report: its comparison dict (``LogitStatsResult.to_dict()``) and
#: its model dict (``{perplexity, figures, origin}``; empty when absent).
Extractor = Callable[[Mapping[str, Any], Mapping[str, Any]], Any]

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass(frozen=True)
class GateMetric:
    """A metric the gate knows: its name, a one-line description and its extractor."""

    name: str
    description: str
    extract: Extractor


def _path(*keys: str) -> Extractor:
    """Extractor of the number at ``comparison[keys[0]][keys[1]]...``."""
    return lambda cmp, model: as_number(dig(cmp, *keys))


def _ppl_delta_pct(cmp: Mapping[str, Any], model: Mapping[str, Any]) -> float | None:
    ratio = as_number(dig(cmp, "perplexity", "ppl_ratio", "value"))
    return None if ratio is None else 100.0 * (ratio - 1.0)


def _ppl(cmp: Mapping[str, Any], model: Mapping[str, Any]) -> float | None:
    value = as_number(dig(cmp, "perplexity", "ppl_quant", "value"))
    return value if value is not None else as_number(dig(model, "perplexity", "value"))


def _nonfinite_frac(cmp: Mapping[str, Any], model: Mapping[str, Any]) -> float | None:
    """Non-finite rows over the rows that were not ignored (scored + non-finite)."""
    bad = as_number(dig(cmp, "counts", "nonfinite"))
    scored = as_number(dig(cmp, "counts", "scored"))
    if bad is None or scored is None or bad + scored <= 0:
        return None
    return bad / (bad + scored)


def _table(*rows: tuple[str, str, Extractor]) -> dict[str, GateMetric]:
    return {name: GateMetric(name, desc, fn) for name, desc, fn in rows}


#: Every metric name the gate accepts, in the order of the help text.
METRICS: dict[str, GateMetric] = _table(
    ("kl_mean", "mean per-token KL(ref ‖ cand), nats", _path("means", "kl", "value")),
    ("kl_p50", "median per-token KL", _path("kl_distribution", "percentiles", "50")),
    ("kl_p90", "90th percentile of per-token KL", _path("kl_distribution", "percentiles", "90")),
    ("kl_p95", "95th percentile of per-token KL", _path("kl_distribution", "percentiles", "95")),
    ("kl_p99", "99th percentile of per-token KL", _path("kl_distribution", "percentiles", "99")),
    (
        "kl_p999",
        "99.9th percentile of per-token KL",
        _path("kl_distribution", "percentiles", "99.9"),
    ),
    ("kl_max", "largest per-token KL", _path("kl_distribution", "max")),
    ("reverse_kl_mean", "mean per-token KL(cand ‖ ref)", _path("means", "reverse_kl", "value")),
    ("top1", "top-1 agreement, fraction 0..1", _path("agreement", "top1", "value")),
    ("topk", "top-k agreement, fraction 0..1", _path("agreement", "topk", "value")),
    ("rms_dp", "RMS of Δp on the label token, 0..1", _path("rms_delta_p", "value")),
    ("ppl_ratio", "PPL(cand) / PPL(ref)", _path("perplexity", "ppl_ratio", "value")),
    ("ppl_delta_pct", "100·(ppl_ratio − 1), percent", _ppl_delta_pct),
    ("ln_ppl_ratio", "ln(PPL(cand) / PPL(ref))", _path("perplexity", "ln_ppl_ratio", "value")),
    ("ppl", "the candidate's perplexity", _ppl),
    ("cosine_mean", "mean cosine similarity of the logits", _path("means", "cosine", "value")),
    ("mse_mean", "mean squared error of the logits", _path("means", "mse", "value")),
    ("nonfinite", "count of non-finite token rows", _path("counts", "nonfinite")),
    ("nonfinite_frac", "non-finite rows / (scored + non-finite)", _nonfinite_frac),
)


@dataclass(frozen=True)
class Threshold:
    """One gate clause: a candidate breaks it when ``metric op value`` holds."""

    metric: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; {_known()}")
        if self.op not in OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}; use one of > >= < <=")

    def broken_by(self, x: float) -> bool:
        """Whether the measured value ``x`` breaks this threshold."""
        return OPERATORS[self.op](x, self.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


def known_metrics() -> list[str]:
    """The metric names :func:`parse_gate` accepts."""
    return list(METRICS)


def _known() -> str:
    return "known metrics: " + ", ".join(METRICS)


_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*")
_OP = re.compile(r"(>=|<=|>|<)\s*")
_OP_LIKE = re.compile(r"[<>=!~≤≥]+")


def _clause_error(index: int, clause: str, problem: str) -> ValueError:
    return ValueError(f"--fail-if clause {index} {clause.strip()!r}: {problem}; {_known()}")


def _parse_clause(index: int, clause: str) -> Threshold:
    if not clause.strip():
        raise _clause_error(index, clause, "empty clause (stray comma?)")
    m = _NAME.match(clause)
    if m is None:
        raise _clause_error(index, clause, "expected METRIC OP VALUE, e.g. kl_mean>0.05")
    name = m.group(1).lower()
    if name not in METRICS:
        close = difflib.get_close_matches(name, METRICS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _clause_error(index, clause, f"unknown metric {m.group(1)!r}{hint}")
    rest = clause[m.end() :]
    op_m = _OP.match(rest)
    # ">=" etc. must not be followed by more operator characters (e.g. ">>", "<=>").
    if op_m is None or _OP_LIKE.match(rest, op_m.end()):
        bad = _OP_LIKE.match(rest)
        problem = (
            f"unknown operator {bad.group(0)!r} (use > >= < <=)"
            if bad
            else "missing operator (use > >= < <=)"
        )
        raise _clause_error(index, clause, problem)
    text = rest[op_m.end() :].strip()
    if not text:
        raise _clause_error(index, clause, "missing value after the operator")
    try:
        value = float(text)
    except ValueError:
        raise _clause_error(index, clause, f"value {text!r} is not a number") from None
    if not math.isfinite(value):
        raise _clause_error(index, clause, f"value {text!r} is not a finite number")
    return Threshold(name, op_m.group(1), value)


def parse_gate(text: str) -> list[Threshold]:
    """Parse ``"kl_mean>0.05, top1 < 0.90"`` into thresholds (metric names are case-blind).

    Raises ``ValueError`` naming the bad clause and listing the known metrics for an empty
    expression or clause, an unknown metric, a missing or unknown operator, or a value that is
    not a finite number.
    """
    if text is None or not text.strip():
        raise ValueError(f"--fail-if expression is empty; expected METRIC OP VALUE,...; {_known()}")
    return [_parse_clause(i, clause) for i, clause in enumerate(text.split(","), start=1)]


def metric_value(report: Mapping[str, Any], candidate: str, metric: str) -> float | None:
    """The value of ``metric`` for ``candidate`` in a report dict (None when not available)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; {_known()}")
    cmp = dig(report, "comparisons", candidate)
    model = dig(report, "models", candidate)
    return METRICS[metric].extract(
        cmp if isinstance(cmp, Mapping) else {}, model if isinstance(model, Mapping) else {}
    )


def format_value(x: float, threshold: float) -> str:
    """``x`` with 4 significant digits, or more if needed to tell it apart from the threshold."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    for digits in (4, 6, 8, 12, 17):
        text = f"{x:.{digits}g}"
        if x == threshold or float(text) != threshold:
            return text
    return repr(x)


def check_gate(thresholds: Iterable[Threshold], report: Mapping[str, Any]) -> list[str]:
    """One message per (candidate, threshold) broken, candidates in report order, e.g.
    ``"rtn-int4: kl_mean = 0.0712 > 0.05"``; ``[]`` when every candidate passes.

    A metric a candidate lacks gives ``"<cand>: <metric> not available (gate: <threshold>)"``.
    With thresholds but no candidate in the report, the single message says so.
    """
    thresholds = list(thresholds)
    if not thresholds:
        return []
    comparisons = report.get("comparisons") or {}
    if not comparisons:
        gate = ", ".join(str(t) for t in thresholds)
        return [f"no candidate comparisons in the report to check (gate: {gate})"]
    violations: list[str] = []
    for name in comparisons:
        for t in thresholds:
            x = metric_value(report, name, t.metric)
            if x is None:
                violations.append(f"{name}: {t.metric} not available (gate: {t})")
            elif t.broken_by(x):
                violations.append(
                    f"{name}: {t.metric} = {format_value(x, t.value)} {t.op} {t.value:g}"
                )
    return violations
