"""The report of ``qmetrics bench``: a terminal table (rich, or plain text), the same table as
Markdown, and the JSON document (:meth:`qmetrics.evaluation.bench.BenchResult.to_dict`).

Everything here reads that JSON-shaped dict, so a saved ``--json`` file renders the same way.
Columns, one row per provider of each case (op at N tokens, vocabulary V, dtype):

- ``ms median (p20–p80)``: call time; ``GB/s``: the op's minimal traffic over the median;
  ``% copy``: the copy's median over this median (100% = as fast as ``copy_`` moving the same
  bytes);
- ``× eager`` / ``× seed`` / ``× compile``: that baseline's median over this median (> 1: this
  row is faster);
- ``peak extra``: memory above the inputs at the call's peak; ``1st call s``: the first call,
  including compiling (torch.compile, Triton JIT).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qmetrics.metrics.json_values import json_safe
from qmetrics.reports.format import NA, fmt_memory, md_table, table

__all__ = ["render_markdown", "render_terminal_table", "title", "write_json"]


def _ms(x: float | None) -> str:
    if x is None:
        return NA
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _times(row: Mapping[str, Any]) -> str:
    if row.get("median_ms") is None:
        return f"failed: {row.get('error') or 'no timing'}"
    return f"{_ms(row['median_ms'])} ({_ms(row.get('p20_ms'))}–{_ms(row.get('p80_ms'))})"


def _num(x: float | None, spec: str, suffix: str = "") -> str:
    return "" if x is None else f"{x:{spec}}{suffix}"


def _gbs(x: float | None) -> str:
    """GB/s: whole numbers from 100, three significant digits below."""
    return "" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _headers(report: Mapping[str, Any]) -> list[str]:
    baselines = (report.get("settings") or {}).get("baselines") or []
    return ["op", "N", "V", "dtype", "provider", "ms median (p20–p80)", "GB/s", "% copy",
            *(f"× {b}" for b in baselines), "peak extra", "1st call s"]  # fmt: skip


def _rows(report: Mapping[str, Any]) -> list[list[str]]:
    baselines = (report.get("settings") or {}).get("baselines") or []
    out = []
    for case in report.get("cases") or []:
        for row in case.get("rows") or []:
            speedup = row.get("speedup") or {}
            out.append([
                case["op"], str(case["tokens"]), str(case["vocab"]), case["dtype"],
                row["provider"], _times(row),
                _gbs(row.get("gb_per_s")), _num(row.get("pct_copy"), ".0f", "%"),
                *(_num(speedup.get(b), ".2f", "×") for b in baselines),
                "" if row.get("peak_extra_mib") is None else fmt_memory(row["peak_extra_mib"]),
                _num(row.get("first_call_s"), ".2f"),
            ])  # fmt: skip
    return out


def title(report: Mapping[str, Any]) -> str:
    """One line: device, versions, date and repeat count."""
    dev = report.get("device") or {}
    where = dev.get("name", NA)
    if dev.get("type") == "cpu":
        where += f", {dev.get('threads')} threads"
    ver = report.get("versions") or {}
    names = ("qmetrics", "torch", "triton")
    versions = ", ".join(f"{k} {ver[k]}" for k in names if ver.get(k))
    repeat = (report.get("settings") or {}).get("repeat")
    return f"qmetrics bench on {where} ({versions}; {report.get('date', NA)}; {repeat} rounds)"


def render_terminal_table(report: Mapping[str, Any]) -> Any:
    """A rich Table (plain text without rich); qmetrics rows bold, copy rows dim."""
    rows = _rows(report)
    styles = ["bold" if r[4] == "qmetrics" else "dim" if r[4] == "copy" else None for r in rows]
    return table(title(report), _headers(report), rows, left=(0, 3, 4), styles=styles)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The title line and the table as GitHub Markdown."""
    headers = _headers(report)
    align = "lrrll" + "r" * (len(headers) - 5)
    return f"{title(report)}\n\n{md_table(headers, _rows(report), align=align)}\n"


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the report as JSON (NaN → null, ±inf → "inf"), creating the folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    return out
