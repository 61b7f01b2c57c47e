"""CI gate on downstream tasks: ``--fail-if "acc_drop>0.02,p<0.05; drop>0.05"``.

A gate is a list of *rules* separated by ``;``; a rule is a list of clauses ``NAME OP VALUE``
separated by ``,`` that must **all** hold for one (task, metric) row of a task report
(:func:`qmetrics.reports.tasks.build_tasks_report`) to break it. OP is one of ``> >= < <=``
(:data:`qmetrics.reports.gate.OPERATORS`). NAME is ``[METRIC_]QUANTITY`` with QUANTITY one of
:data:`QUANTITIES`; a METRIC prefix (``acc_drop``, ``acc_norm_p``, ``word_perplexity_delta``)
restricts the rule to rows of that metric, so ``acc_drop>0.02,p<0.05`` fails a task whose
accuracy fell by more than 2 points with p < 0.05, and ``drop>0.05`` fails any metric that got
worse by more than 0.05 in its own units. A row lacking a quantity the rule needs (e.g. ``p``
for a metric without a paired test) breaks the rule too, as does a rule whose metric no row
has: a gate never passes for want of data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qmetrics.reports.gate import OPERATORS, format_value

#: the quantities a clause can test, with what they mean
QUANTITIES: dict[str, str] = {
    "drop": "how much worse the candidate is, in the metric's units (−Δ if higher is better)",
    "delta": "candidate − reference",
    "p": "p-value of the paired test",
    "agreement": "fraction of items with the same answer, 0..1",
    "lost": "items on which the candidate did worse",
    "won": "items on which the candidate did better",
}

_CLAUSE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*(\S+)\s*$")
_NAME = re.compile(r"^(?:(?P<metric>[A-Za-z0-9_]+)_)?(?P<quantity>" + "|".join(QUANTITIES) + ")$")


@dataclass(frozen=True)
class TaskClause:
    """``[metric_]quantity op value``; ``metric`` None applies to every metric."""

    metric: str | None
    quantity: str
    op: str
    value: float

    def __str__(self) -> str:
        name = self.quantity if self.metric is None else f"{self.metric}_{self.quantity}"
        return f"{name} {self.op} {self.value:g}"


def _known() -> str:
    return "names: [METRIC_]" + "|".join(QUANTITIES) + ", e.g. acc_drop>0.02,p<0.05"


def _parse_clause(text: str) -> TaskClause:
    m = _CLAUSE.match(text)
    if m is None:
        raise ValueError(f"--fail-if clause {text.strip()!r}: expected NAME OP VALUE; {_known()}")
    name, op, raw = m.groups()
    n = _NAME.match(name.lower())
    if n is None:
        raise ValueError(f"--fail-if clause {text.strip()!r}: unknown name {name!r}; {_known()}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"--fail-if clause {text.strip()!r}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"--fail-if clause {text.strip()!r}: {raw!r} is not a finite number")
    return TaskClause(n.group("metric"), n.group("quantity"), op, value)


def parse_task_gate(text: str) -> list[list[TaskClause]]:
    """Parse ``"acc_drop>0.02,p<0.05; drop>0.05"`` into rules (lists of clauses). Raises
    ``ValueError`` for an empty rule or clause, an unknown name, a bad operator or value, or a
    rule naming two different metrics."""
    if text is None or not text.strip():
        raise ValueError(f"--fail-if expression is empty; {_known()}")
    rules = []
    for rule_text in text.split(";"):
        clauses = rule_text.split(",")
        if any(not c.strip() for c in clauses):
            raise ValueError(f"--fail-if rule {rule_text.strip()!r}: empty clause; {_known()}")
        rule = [_parse_clause(c) for c in clauses]
        metrics = {c.metric for c in rule if c.metric is not None}
        if len(metrics) > 1:
            raise ValueError(
                f"--fail-if rule {rule_text.strip()!r} names several metrics "
                f"({', '.join(sorted(metrics))}); separate rules with ';'"
            )
        rules.append(rule)
    return rules


def _quantity(cmp: Mapping[str, Any], metric: Mapping[str, Any], quantity: str) -> float | None:
    if quantity == "agreement":
        value = cmp.get("agreement")
    elif quantity == "p":
        value = (metric.get("test") or {}).get("p_value")
    else:
        value = metric.get(quantity)
    return None if value is None else float(value)


def check_task_gate(rules: list[list[TaskClause]], report: Mapping[str, Any]) -> list[str]:
    """One message per (rule, row) broken, e.g.
    ``"qmetrics_mc acc: drop = 0.0625 > 0.02 and p = 0.0312 < 0.05"``; [] when all pass."""
    violations: list[str] = []
    rows = [(c, m) for c in report.get("comparisons") or [] for m in c.get("metrics") or []]
    for rule in rules:
        metric = next((c.metric for c in rule if c.metric is not None), None)
        checked = [(c, m) for c, m in rows if metric is None or m.get("metric") == metric]
        gate = ", ".join(str(c) for c in rule)
        if not checked:
            violations.append(f"no task results for metric {metric!r} (gate: {gate})")
        for cmp, m in checked:
            label = f"{cmp.get('task')}" + ("" if cmp.get("filter") in (None, "none")
                                             else f" [{cmp.get('filter')}]")  # fmt: skip
            values = [_quantity(cmp, m, c.quantity) for c in rule]
            missing = [c.quantity for c, v in zip(rule, values, strict=True) if v is None]
            if missing:
                violations.append(
                    f"{label} {m['metric']}: {', '.join(missing)} not available (gate: {gate})"
                )
            elif all(OPERATORS[c.op](v, c.value) for c, v in zip(rule, values, strict=True)):
                parts = [f"{c.quantity} = {format_value(v, c.value)} {c.op} {c.value:g}"
                         for c, v in zip(rule, values, strict=True)]  # fmt: skip
                violations.append(f"{label} {m['metric']}: " + " and ".join(parts))
    return violations
