"""The CI regression gate of every command: ``--fail-if "kl_mean>0.05&top1<0.9, ppl_ratio>1.05"``.

Grammar (one for ``compare``, ``demo`` and ``tasks``)::

    gate   := rule (("," | ";") rule)*        the run fails if ANY rule is broken
    rule   := clause (("&" | " and ") clause)*  a rule is broken when ALL its clauses hold
    clause := NAME OP VALUE                   OP one of > >= < <=, VALUE a finite number

so ``A&B, C`` fails when (A and B) or C. Names are case-blind; which names exist is the
command's :class:`Vocabulary`: :data:`COMPARE` (the :data:`METRICS` table: ``kl_mean``,
``top1``, ...; each candidate is a subject) or :data:`TASKS` (``[METRIC_]QUANTITY`` with
QUANTITY one of :data:`QUANTITIES`; each (task, metric) row is a subject, and a METRIC prefix
restricts the rule to rows of that metric). :func:`parse_gate` is the one parser and
:func:`check_rules` the one checker; :func:`check_gate` and :func:`check_task_gate` feed it
the subjects of a compare or a tasks report.

A subject lacking a value a rule needs (``ppl_ratio`` from a run without labels, ``p`` for a
metric without a paired test) breaks the rule, as does a rule that no subject applies to: a
gate never passes for want of data.

The tasks gate once read ``,`` as AND; a tasks gate with a comma but no ``&``/``and`` is
therefore refused as ambiguous rather than silently read the other way.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from qmetrics.reports.format import as_number, dig, format_value

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


# --- structure ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """``name op value``: holds for a measured ``x`` when ``x op value``."""

    name: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}; use one of > >= < <=")

    def holds(self, x: float) -> bool:
        """Whether the measured value ``x`` satisfies the clause."""
        return OPERATORS[self.op](x, self.value)

    # the name of the 0.1 compare gate, where every clause was a rule of its own
    broken_by = holds

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.value:g}"


#: the 0.1 name of a compare clause
Threshold = Clause


@dataclass(frozen=True)
class Rule:
    """Clauses that must all hold for a subject to break the rule."""

    clauses: tuple[Clause, ...]

    def __iter__(self) -> Iterator[Clause]:
        return iter(self.clauses)

    def __len__(self) -> int:
        return len(self.clauses)

    def __str__(self) -> str:
        return " & ".join(str(c) for c in self.clauses)


@dataclass(frozen=True)
class Vocabulary:
    """The names one command's gate accepts.

    ``resolve``: a lower-cased name → its canonical form, or None when unknown;
    ``suggest``: an unknown name → the closest known one (for "did you mean"), or None;
    ``known``: the hint appended to every parse error; ``check_rule``: raises ``ValueError``
    (a message without the ``--fail-if`` prefix) for a rule the command cannot check;
    ``comma_was_and``: the command's old grammar read ``,`` as AND (see the module docstring).
    """

    resolve: Callable[[str], str | None]
    suggest: Callable[[str], str | None]
    known: str
    check_rule: Callable[[Rule], None] | None = None
    comma_was_and: bool = False


@dataclass(frozen=True)
class Subject:
    """What a gate is checked against: one compare candidate or one tasks row.

    ``value(name)``: the measured value of a clause name (None: not available);
    ``applies(rule)``: whether the rule concerns this subject."""

    label: str
    value: Callable[[str], float | None]
    applies: Callable[[Rule], bool] = field(default=lambda rule: True)


# --- parsing ------------------------------------------------------------------------------------

_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*")
_OP = re.compile(r"(>=|<=|>|<)\s*")
_OP_LIKE = re.compile(r"[<>=!~≤≥]+")
_RULE_SEP = re.compile(r"[,;]")
_AND = re.compile(r"&|\s+and\s+", re.IGNORECASE)


def _clause_error(index: int, clause: str, problem: str, vocab: Vocabulary) -> ValueError:
    return ValueError(f"--fail-if clause {index} {clause.strip()!r}: {problem}; {vocab.known}")


def _parse_clause(index: int, clause: str, vocab: Vocabulary) -> Clause:
    if not clause.strip():
        raise _clause_error(index, clause, "empty clause (stray separator?)", vocab)
    m = _NAME.match(clause)
    if m is None:
        raise _clause_error(index, clause, "expected METRIC OP VALUE, e.g. kl_mean>0.05", vocab)
    name = vocab.resolve(m.group(1).lower())
    if name is None:
        close = vocab.suggest(m.group(1).lower())
        hint = f" (did you mean {close!r}?)" if close else ""
        raise _clause_error(index, clause, f"unknown metric {m.group(1)!r}{hint}", vocab)
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
        raise _clause_error(index, clause, problem, vocab)
    text = rest[op_m.end() :].strip()
    if not text:
        raise _clause_error(index, clause, "missing value after the operator", vocab)
    try:
        value = float(text)
    except ValueError:
        raise _clause_error(index, clause, f"value {text!r} is not a number", vocab) from None
    if not math.isfinite(value):
        raise _clause_error(index, clause, f"value {text!r} is not a finite number", vocab)
    return Clause(name, op_m.group(1), value)


def parse_gate(text: str, vocabulary: Vocabulary | None = None) -> list[Rule]:
    """Parse a gate (grammar in the module docstring) with a command's vocabulary (default
    :data:`COMPARE`) into rules.

    Raises ``ValueError`` (one line, naming the clause by its 1-based position and ending with
    the known names) for an empty gate or clause, an unknown name (with a did-you-mean), a
    missing or unknown operator, a value that is not a finite number, a rule the command
    cannot check, and — with ``comma_was_and`` — a gate that holds a comma but no ``&``/``and``.
    """
    vocab = COMPARE if vocabulary is None else vocabulary
    if text is None or not text.strip():
        raise ValueError(f"--fail-if expression is empty; expected METRIC OP VALUE; {vocab.known}")
    if vocab.comma_was_and and "," in text and not _AND.search(text):
        raise ValueError(
            f"--fail-if {text.strip()!r} is ambiguous: ',' used to mean AND here and now "
            "separates rules like ';' — use '&' to require all clauses, ';' to fail on any"
        )
    rules: list[Rule] = []
    index = 0
    for rule_text in _RULE_SEP.split(text):
        clauses = []
        for clause_text in _AND.split(rule_text):
            index += 1
            clauses.append(_parse_clause(index, clause_text, vocab))
        rule = Rule(tuple(clauses))
        if vocab.check_rule is not None:
            try:
                vocab.check_rule(rule)
            except ValueError as exc:
                raise ValueError(f"--fail-if rule {rule_text.strip()!r}: {exc}") from None
        rules.append(rule)
    return rules


# --- checking -----------------------------------------------------------------------------------


def _verdict(rule: Rule, subject: Subject) -> str | None:
    """The message of ``subject`` breaking ``rule`` (or lacking a value it needs); else None."""
    pairs = [(c, subject.value(c.name)) for c in rule]
    measured = [(c, v) for c, v in pairs if v is not None]
    if len(measured) < len(pairs):
        missing = ", ".join(c.name for c, v in pairs if v is None)
        return f"{subject.label}: {missing} not available (gate: {rule})"
    if all(c.holds(v) for c, v in measured):
        parts = [f"{c.name} = {format_value(v, c.value)} {c.op} {c.value:g}" for c, v in measured]
        return f"{subject.label}: " + " and ".join(parts)
    return None


def check_rules(
    rules: Iterable[Rule], subjects: Iterable[Subject], nothing: Callable[[Rule], str]
) -> list[str]:
    """The one gate check: a message per rule that no subject applies to (``nothing(rule)``),
    then, subject by subject in order, one per (subject, rule) broken — every clause holds,
    e.g. ``"rtn-int4: kl_mean = 0.0712 > 0.05 and top1 = 0.85 < 0.9"`` — or lacking a value
    (``"<label>: ppl_ratio not available (gate: ppl_ratio > 1.05)"``). ``[]``: the gate passes."""
    rules, subjects = list(rules), list(subjects)
    out = [nothing(r) for r in rules if not any(s.applies(r) for s in subjects)]
    for subject in subjects:
        for rule in rules:
            if subject.applies(rule) and (message := _verdict(rule, subject)) is not None:
                out.append(message)
    return out


# --- compare: one subject per candidate -------------------------------------------------------

#: A candidate's view of the report: its comparison dict (``LogitStatsResult.to_dict()``) and
#: its model dict (``{perplexity, figures, origin}``; empty when absent).
Extractor = Callable[[Mapping[str, Any], Mapping[str, Any]], Any]


@dataclass(frozen=True)
class GateMetric:
    """A metric the compare gate knows: its name, a one-line description and its extractor."""

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


#: Every metric name the compare gate accepts, in the order of the help text.
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


def _closest(name: str, names: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, list(names), n=1)
    return close[0] if close else None


COMPARE = Vocabulary(
    resolve=lambda name: name if name in METRICS else None,
    suggest=lambda name: _closest(name, METRICS),
    known="known metrics: " + ", ".join(METRICS),
)


def metric_value(report: Mapping[str, Any], candidate: str, metric: str) -> float | None:
    """The value of ``metric`` for ``candidate`` in a compare report dict (None when not
    available)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; {COMPARE.known}")
    cmp = dig(report, "comparisons", candidate)
    model = dig(report, "models", candidate)
    return METRICS[metric].extract(
        cmp if isinstance(cmp, Mapping) else {}, model if isinstance(model, Mapping) else {}
    )


def compare_subjects(report: Mapping[str, Any]) -> list[Subject]:
    """One subject per candidate of a compare report (the JSON body of
    :meth:`qmetrics.evaluation.compare.EvaluationResult.to_dict`), in report order."""
    return [
        Subject(name, lambda metric, name=name: metric_value(report, name, metric))
        for name in report.get("comparisons") or {}
    ]


def check_gate(rules: Iterable[Rule | Clause], report: Mapping[str, Any]) -> list[str]:
    """:func:`check_rules` over the candidates of a compare report; e.g.
    ``["rtn-int4: kl_mean = 0.0712 > 0.05"]``. A bare :class:`Clause` is a rule of its own.
    With rules but no candidate in the report, each rule gives one message saying so."""
    rules = [r if isinstance(r, Rule) else Rule((r,)) for r in rules]
    return check_rules(
        rules,
        compare_subjects(report),
        lambda rule: f"no candidate comparisons in the report to check (gate: {rule})",
    )


# --- tasks: one subject per (task, metric) row ------------------------------------------------

#: the quantities a tasks clause can test, with what they mean
QUANTITIES: dict[str, str] = {
    "drop": "how much worse the candidate is, in the metric's units (−Δ if higher is better)",
    "delta": "candidate − reference",
    "p": "p-value of the paired test",
    "agreement": "fraction of items with the same answer, 0..1",
    "lost": "items on which the candidate did worse",
    "won": "items on which the candidate did better",
}

_TASK_NAME = re.compile(r"^(?:(?P<metric>[a-z0-9_]+)_)?(?P<quantity>" + "|".join(QUANTITIES) + ")$")


def split_task_name(name: str) -> tuple[str | None, str]:
    """``"acc_norm_p"`` → ``("acc_norm", "p")``, ``"drop"`` → ``(None, "drop")``."""
    m = _TASK_NAME.match(name)
    if m is None:
        raise ValueError(f"not a tasks gate name: {name!r}")
    return m.group("metric"), m.group("quantity")


def _task_suggest(name: str) -> str | None:
    prefix, _, last = name.rpartition("_")
    names = list(QUANTITIES) + ([f"{prefix}_{q}" for q in QUANTITIES] if prefix else [])
    return _closest(name, names)


def _rule_metric(rule: Rule) -> str | None:
    """The metric a tasks rule is restricted to (None: every metric)."""
    return next((m for c in rule if (m := split_task_name(c.name)[0]) is not None), None)


def _one_metric(rule: Rule) -> None:
    metrics = {m for c in rule if (m := split_task_name(c.name)[0]) is not None}
    if len(metrics) > 1:
        raise ValueError(
            f"names several metrics ({', '.join(sorted(metrics))}); a row has one metric, "
            "so such a rule never holds: make them separate rules"
        )


TASKS = Vocabulary(
    resolve=lambda name: name if _TASK_NAME.match(name) else None,
    suggest=_task_suggest,
    known="names: [METRIC_]" + "|".join(QUANTITIES) + ", e.g. acc_drop>0.02&p<0.05",
    check_rule=_one_metric,
    comma_was_and=True,
)


def _task_value(cmp: Mapping[str, Any], metric: Mapping[str, Any], name: str) -> float | None:
    quantity = split_task_name(name)[1]
    if quantity == "agreement":
        value = cmp.get("agreement")
    elif quantity == "p":
        value = (metric.get("test") or {}).get("p_value")
    else:
        value = metric.get(quantity)
    return as_number(value)


def _task_subject(label: str, cmp: Mapping[str, Any], metric: Mapping[str, Any]) -> Subject:
    return Subject(
        label,
        lambda name: _task_value(cmp, metric, name),
        lambda rule: _rule_metric(rule) in (None, metric.get("metric")),
    )


def task_subjects(report: Mapping[str, Any]) -> list[Subject]:
    """One subject per (task, filter, metric) row of a tasks report
    (:func:`qmetrics.reports.tasks.build_tasks_report`), labelled ``"task [filter] metric"``;
    a rule with a METRIC prefix applies to that metric's rows only."""
    subjects = []
    for cmp in report.get("comparisons") or []:
        filt = cmp.get("filter")
        task = f"{cmp.get('task')}" + ("" if filt in (None, "none") else f" [{filt}]")
        for m in cmp.get("metrics") or []:
            subjects.append(_task_subject(f"{task} {m.get('metric')}", cmp, m))
    return subjects


def _no_rows(rule: Rule) -> str:
    metric = _rule_metric(rule)
    which = "" if metric is None else f" for metric {metric!r}"
    return f"no task results{which} (gate: {rule})"


def parse_task_gate(text: str) -> list[Rule]:
    """:func:`parse_gate` with the :data:`TASKS` vocabulary."""
    return parse_gate(text, TASKS)


def check_task_gate(rules: Iterable[Rule], report: Mapping[str, Any]) -> list[str]:
    """:func:`check_rules` over the rows of a tasks report, e.g.
    ``["qmetrics_mc acc: acc_drop = 0.0625 > 0.02 and p = 0.0312 < 0.05"]``."""
    return check_rules(rules, task_subjects(report), _no_rows)
