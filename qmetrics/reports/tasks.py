"""Reports of a downstream-task comparison: ``tasks.json``, ``tasks.md`` and the terminal table.

Everything reads the report dict of :func:`build_tasks_report`: ``settings`` (the
:class:`qmetrics.evaluation.tasks.runner.TaskSettings` plus ``alpha`` and ``n_resamples``),
``reference``, ``candidate``, ``models`` {name: {seconds, origin}}, ``comparisons`` (a list of
:meth:`qmetrics.evaluation.tasks.comparison.TaskComparison.to_dict`, per-item pairs included) and
``environment``. :func:`markdown_section` is one self-contained section that a ``qmetrics compare``
report can include.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qmetrics.evaluation.tasks.comparison import TaskComparison
from qmetrics.evaluation.tasks.runner import TaskRun, TaskSettings
from qmetrics.metrics.json_values import json_safe
from qmetrics.reports.format import (
    NA,
    as_number,
    fmt_p,
    fmt_pct,
    fmt_small,
    key_value_section,
    md_table,
    plain,
    table,
)

JSON_NAME = "tasks.json"
MARKDOWN_NAME = "tasks.md"
TEST_NAMES = {"mcnemar_exact": "McNemar", "paired_permutation": "permutation"}

HOW_TO_READ = (
    "## How to read the task table\n\nBoth models ran the same lm-evaluation-harness tasks with "
    "the same settings; scores ± stderr are lm-eval's. *Δ* = candidate − reference, with a "
    "paired percentile-bootstrap interval over the items both models answered. *p* is McNemar's "
    "exact test on the items only one model got right for 0/1 metrics (acc, exact match), else "
    "a paired sign-flip permutation test of the aggregated score. *W/L* (won/lost) count items on "
    "which the candidate did better/worse; *agree* is how often both gave the same answer. "
    "A row is flagged ▼ when the candidate is worse and p < alpha. Group rows (e.g. mmlu) test "
    "the items of all their tasks pooled."
)


def build_tasks_report(
    settings: TaskSettings,
    reference: TaskRun,
    candidate: TaskRun,
    comparisons: Sequence[TaskComparison],
    *,
    alpha: float,
    n_resamples: int,
    origins: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report dict (see the module docstring)."""
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    origins = origins or {}
    return {
        "settings": {**settings.to_dict(), "alpha": alpha, "n_resamples": n_resamples},
        "reference": reference.model,
        "candidate": candidate.model,
        "models": {
            run.model: {"seconds": run.seconds, "origin": dict(origins.get(run.model, {}))}
            for run in (reference, candidate)
        },
        "comparisons": [c.to_dict() for c in comparisons],
        "environment": {p: pkg(p) for p in ("lm_eval", "transformers", "torch", "scipy")},
    }


# --- rows (shared by Markdown and the terminal) --------------------------------------------------


def _score(x: float | None, err: float | None) -> str:
    value = fmt_small(x)
    return value if err is None or value == NA else f"{value} ± {fmt_small(err, like=x)}"


def _delta(metric: Mapping[str, Any]) -> str:
    text = fmt_small(as_number(metric.get("delta")), signed=True)
    test = metric.get("test") or {}
    lo, hi = as_number(test.get("ci_low")), as_number(test.get("ci_high"))
    if lo is None or hi is None or text == NA:
        return text
    like = as_number(metric.get("delta"))
    low, high = (fmt_small(x, signed=True, like=like) for x in (lo, hi))
    return f"{text} [{low}, {high}]"


def _task_label(cmp: Mapping[str, Any]) -> str:
    name = str(cmp.get("task"))
    if cmp.get("is_group"):
        name += " (group)"
    filt = cmp.get("filter")
    return name if filt in (None, "none") else f"{name} [{filt}]"


def task_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row per (task, filter, metric)."""
    headers = ["task", "metric", "n", "reference", "candidate", "Δ [CI]", "p (test)", "W/L",
               "agree", "flag"]  # fmt: skip
    rows = []
    for cmp in report.get("comparisons") or []:
        agree = as_number(cmp.get("agreement"))
        for m in cmp.get("metrics") or []:
            test = m.get("test") or {}
            p = fmt_p(as_number(test.get("p_value")))
            if test.get("method"):
                p += f" ({TEST_NAMES.get(test['method'], test['method'])})"
            won_lost = NA if m.get("won") is None else f"{m['won']}/{m['lost']}"
            rows.append([
                _task_label(cmp),
                m["metric"] + ("" if m.get("higher_is_better", True) else " ↓"),
                str(m.get("n_paired", 0)),
                _score(as_number(m.get("reference")), as_number(m.get("reference_stderr"))),
                _score(as_number(m.get("candidate")), as_number(m.get("candidate_stderr"))),
                _delta(m),
                p,
                won_lost,
                NA if agree is None else fmt_pct(agree),
                "▼" if m.get("significant_drop") else "",
            ])  # fmt: skip
    return headers, rows


def significant_drops(report: Mapping[str, Any]) -> list[str]:
    """One line per flagged drop, e.g. ``"hellaswag acc: -0.0412 (p = 0.0031)"``."""
    out = []
    for cmp in report.get("comparisons") or []:
        for m in cmp.get("metrics") or []:
            if m.get("significant_drop"):
                p = fmt_p(as_number((m.get("test") or {}).get("p_value")))
                delta = fmt_small(as_number(m.get("delta")), signed=True)
                out.append(f"{_task_label(cmp)} {m['metric']}: {delta} (p = {p})")
    return out


# --- Markdown -----------------------------------------------------------------------------------


#: how an unset setting reads (the header line and the settings table say the same)
UNSET = {"num_fewshot": "task default", "limit": "none", "max_length": "from the model config"}


def settings_text(report: Mapping[str, Any]) -> dict[str, str]:
    """The report's settings as text: ``plain`` values, unset ones as :data:`UNSET` says."""
    settings = report.get("settings") or {}
    return {k: UNSET[k] if v is None and k in UNSET else plain(v) for k, v in settings.items()}


def markdown_section(report: Mapping[str, Any]) -> str:
    """One Markdown section (``## Downstream tasks``): models, settings in one line, the task
    table and the list of significant drops."""
    s = settings_text(report)
    headers, rows = task_rows(report)
    lines = [
        "## Downstream tasks (lm-evaluation-harness)",
        "",
        f"`{report.get('candidate', NA)}` vs `{report.get('reference', NA)}`; few-shot "
        f"{s.get('num_fewshot', UNSET['num_fewshot'])}, limit {s.get('limit', UNSET['limit'])}, "
        f"seed {s.get('seed', NA)}, alpha {s.get('alpha', NA)}. "
        "↓: lower is better; ▼: significant drop.",
        "",
        md_table(headers, rows, align="llrrrrrrrl") if rows else "No task results.",
    ]
    drops = significant_drops(report)
    lines += ["", "Significant drops: " + ("; ".join(drops) if drops else "none") + "."]
    return "\n".join(lines)


def markdown_report(report: Mapping[str, Any]) -> str:
    """The whole ``tasks.md``: title, :func:`markdown_section`, how to read it, settings (as
    :func:`settings_text`, so they agree with the header line) and environment."""
    sections = [
        "# qmetrics tasks report",
        markdown_section(report),
        HOW_TO_READ,
        key_value_section("Settings", settings_text(report)),
        key_value_section("Environment", report.get("environment")),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


# --- files and terminal -------------------------------------------------------------------------


def write_task_reports(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``tasks.json`` and ``tasks.md`` into ``out_dir`` (created if needed); returns the
    paths keyed "json" and "markdown"."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME}
    paths["json"].write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown_report(report), encoding="utf-8")
    return paths


def render_task_table(report: Mapping[str, Any]) -> Any:
    """The task table as a rich Table (flagged drops in bold red), or as plain text."""
    headers, rows = task_rows(report)
    title = f"tasks: {report.get('candidate', NA)} vs {report.get('reference', NA)}"
    styles = ["bold red" if row[-1] else None for row in rows]
    return table(title, headers, rows, left=(0, 1), styles=styles)
