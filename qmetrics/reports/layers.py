"""Reports of a layer analysis: ``layers.json``, the bar chart ``layers.png`` and ranked
terminal tables.

Everything reads the report dict: ``settings``, ``errors``
(:meth:`qmetrics.evaluation.layers.LayerAnalysis.to_dict`) and ``ablation``
(:meth:`qmetrics.evaluation.layers.AblationResult.to_dict`, or None).

Ranking. Modules are ranked worst first by the SNR of their input-matched (local) error when
it was measured, else by the SNR of the propagated error; units by their ablation KL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qmetrics.metrics.json_values import json_safe
from qmetrics.reports.format import (
    NA,
    PlotUnavailableError,
    as_number,
    fmt_count,
    fmt_db,
    fmt_pct,
    fmt_small,
    table,
)

JSON_NAME = "layers.json"
PLOT_NAME = "layers.png"


def _snr(layer: Mapping[str, Any], kind: str) -> float | None:
    part = layer.get(kind)
    return None if part is None else as_number(part.get("snr_db"))


def ranked_layers(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The layers of ``report["errors"]``, lowest SNR (local if measured) first; layers
    without a value last, in model order."""
    layers = list((report.get("errors") or {}).get("layers") or [])
    kind = "local" if layers and layers[0].get("local") is not None else "propagated"

    def key(layer: Mapping[str, Any]) -> float:
        v = _snr(layer, kind)
        return math.inf if v is None else v

    return sorted(layers, key=key)


def _error_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    layers = ranked_layers(report)
    local = bool(layers) and layers[0].get("local") is not None
    headers = ["#", "module", "SNR dB", "rel err", "cosine", "max |Δ|", "non-finite"]
    if local:
        headers[6:6] = ["local SNR dB", "local rel err"]
    rows = []
    for i, layer in enumerate(layers, 1):
        p = layer["propagated"]
        row = [str(i), layer["name"], fmt_db(as_number(p.get("snr_db"))),
               fmt_small(as_number(p.get("rel_error"))),
               fmt_small(as_number((p.get("cosine") or {}).get("value"))),
               fmt_small(as_number(p.get("max_abs_error"))),
               fmt_count(p.get("nonfinite_values"))]  # fmt: skip
        if local:
            q = layer["local"]
            row[6:6] = [
                fmt_db(as_number(q.get("snr_db"))),
                fmt_small(as_number(q.get("rel_error"))),
            ]
        rows.append(row)
    return headers, rows


def _ablation_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    abl = report.get("ablation") or {}
    total = sum(as_number(u["kl"]["value"]) or 0.0 for u in abl.get("units") or [])
    headers = ["#", "unit", "mean KL", "share of Σ KL", "top-1"]
    rows = []
    for u in abl.get("units") or []:
        kl = as_number(u["kl"]["value"])
        share = kl / total if kl is not None and total > 0 else None
        rows.append([str(u["rank"]), u["name"], fmt_small(kl), fmt_pct(share),
                     fmt_pct(as_number(u["top1"]["value"]))])  # fmt: skip
    joint = abl.get("joint")
    if joint:
        rows.append(["", f"{joint['name']} (all units)", fmt_small(as_number(joint["kl"]["value"])),
                     f"Σ/joint = {fmt_small(as_number(abl.get('additivity')))}",
                     fmt_pct(as_number(joint["top1"]["value"]))])  # fmt: skip
    return headers, rows


def render_layer_tables(report: Mapping[str, Any]) -> list[Any]:
    """Ranked tables (rich Tables, or plain text without rich): the per-module error, then
    the ablation when there is one."""
    errors = report.get("errors") or {}
    title = (f"layer error: {errors.get('candidate', NA)} vs {errors.get('reference', NA)} "
             f"({fmt_count(errors.get('tokens'))} tokens), worst first")  # fmt: skip
    tables = [(title, *_error_rows(report))]
    abl = report.get("ablation")
    if abl:
        title = (f"sensitivity: one unit ablated ({abl.get('mode')}), "
                 f"{fmt_count(abl.get('tokens'))} tokens, highest KL first")  # fmt: skip
        tables.append((title, *_ablation_rows(report)))
    return [table(title, headers, rows, left=(1,)) for title, headers, rows in tables]


def plot_layers(report: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart: per-module SNR in dB (propagated, and local when measured; higher is
    better, infinite SNR drawn at the top of the axis), and with an ablation a second panel
    of each unit's share of Σ single-unit KL. Raises :class:`PlotUnavailableError` without
    matplotlib or without layers."""
    layers = list((report.get("errors") or {}).get("layers") or [])
    if not layers:
        raise PlotUnavailableError("the report holds no layers")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailableError(
            "matplotlib is not installed (pip install 'qmetrics[report]')"
        ) from None
    abl = report.get("ablation")
    panels = 2 if abl else 1
    width = min(24.0, max(7.5, 0.25 * len(layers)))
    fig = Figure(figsize=(width, 3.6 * panels), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(panels, 1, 1)
    kinds = [k for k in ("propagated", "local") if layers[0].get(k) is not None]
    finite = [v for lay in layers for k in kinds if (v := _snr(lay, k)) is not None
              and math.isfinite(v)]  # fmt: skip
    top = (max(finite) if finite else 0.0) + 10.0
    bar_w = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        values = [_snr(lay, kind) for lay in layers]
        ys = [top if v is not None and v == math.inf else (v or 0.0) for v in values]
        xs = [i + (j - (len(kinds) - 1) / 2) * bar_w for i in range(len(layers))]
        ax.bar(xs, ys, width=bar_w, label=f"{kind} SNR")
    ax.set_xticks(range(len(layers)), [lay["name"] for lay in layers], rotation=90, fontsize=7)
    ax.set_ylabel("SNR, dB (higher: less error)")
    ax.set_title("per-module output SNR 10·log10(‖ref‖²/‖Δ‖²)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if abl:
        units = abl.get("units") or []
        kls = [as_number(u["kl"]["value"]) or 0.0 for u in units]
        total = sum(kls)
        ax2 = fig.add_subplot(panels, 1, 2)
        ax2.bar(range(len(units)), [k / total if total > 0 else 0.0 for k in kls])
        ax2.set_xticks(range(len(units)), [u["name"] for u in units], rotation=90, fontsize=7)
        ax2.set_ylabel("share of Σ single-unit KL")
        ax2.set_title(f"sensitivity ({abl.get('mode')}), highest first")
        ax2.grid(True, axis="y", alpha=0.3)
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out


def write_layer_reports(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``layers.json`` and ``layers.png`` (when it can be drawn; a stale one is removed
    otherwise) into ``out_dir``. Returns the paths written, keyed "json" and "plot"."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME}
    paths["json"].write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    try:
        paths["plot"] = plot_layers(report, out / PLOT_NAME)
    except PlotUnavailableError:
        (out / PLOT_NAME).unlink(missing_ok=True)
    return paths
