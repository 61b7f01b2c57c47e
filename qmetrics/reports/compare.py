"""Reports of an evaluation run: JSON, Markdown, a KL CDF plot and the terminal table.

Everything here reads the report dict (the JSON body of
:meth:`qmetrics.evaluation.compare.EvaluationResult.to_dict`): ``settings``, ``reference``,
``tokens_total``, ``windows``, ``models`` {name: {perplexity {value, stderr, stderr_seq}, figures
{forward_seconds, tokens, tokens_per_second, peak_memory_mb}, origin}}, ``comparisons``
{name: :meth:`qmetrics.metrics.logit_stats.LogitStatsResult.to_dict`}, ``environment`` and
``kl_quantiles`` {name: per-token KL at the quantile levels 0, 0.001, ..., 1}. Missing pieces
show as "n/a" rather than failing, so a partial report still renders.

:func:`markdown_sections` returns the Markdown report as a list of self-contained sections, so
other commands can add their own before joining them (:func:`markdown_summary` joins them).
Number formatting and tables come from :mod:`qmetrics.reports.format`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmetrics.metrics.json_values import json_safe
from qmetrics.reports.format import (
    NA,
    PlotUnavailableError,
    as_number,
    dig,
    fmt_count,
    fmt_memory,
    fmt_pct,
    fmt_pm,
    fmt_ppl,
    fmt_rate,
    fmt_small,
    key_value_section,
    md_table,
    table,
    text_table,
)

if TYPE_CHECKING:
    from rich.table import Table

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
PLOT_NAME = "kl_cdf.png"


# --- reading the report -----------------------------------------------------------------------


def _est(d: Any) -> tuple[float | None, float | None]:
    """(value, error) of an ``{value, stderr, stderr_seq}`` dict: the per-window (clustered)
    standard error where there is one, else the per-token one; (None, None) when absent."""
    err = as_number(dig(d, "stderr_seq"))
    return as_number(dig(d, "value")), err if err is not None else as_number(dig(d, "stderr"))


def _candidates(report: Mapping[str, Any]) -> list[str]:
    return list(report.get("comparisons") or {})


def _model_names(report: Mapping[str, Any]) -> list[str]:
    """The reference first, then the candidates, then any other model in ``models``."""
    names = [report.get("reference"), *_candidates(report), *(report.get("models") or {})]
    return list(dict.fromkeys(n for n in names if n is not None))


def _top_k(report: Mapping[str, Any]) -> int | None:
    for cmp in (report.get("comparisons") or {}).values():
        if dig(cmp, "top_k") is not None:
            return int(cmp["top_k"])
    k = dig(report, "settings", "top_k")
    return int(k) if k is not None else None


def _ppl_delta_pct(report: Mapping[str, Any], name: str) -> tuple[float | None, float | None]:
    """100·(PPL ratio − 1) ± its stderr, paired from the comparison; else from the two PPLs."""
    ratio, err = _est(dig(report, "comparisons", name, "perplexity", "ppl_ratio"))
    if ratio is not None:
        return 100.0 * (ratio - 1.0), None if err is None else 100.0 * err
    ref = as_number(dig(report, "models", report.get("reference"), "perplexity", "value"))
    cand = as_number(dig(report, "models", name, "perplexity", "value"))
    if ref and cand is not None and math.isfinite(ref):
        return 100.0 * (cand / ref - 1.0), None
    return None, None


def _small_pm(x: float | None, err: float | None, signed: bool = False) -> str:
    """``x ± err`` with :func:`fmt_small`, the error in the value's style."""
    value = fmt_small(x, signed=signed)
    return fmt_pm(value, None if err is None else fmt_small(err, like=x))


# --- table contents (shared by Markdown and the terminal) --------------------------------------


def _model_row(report: Mapping[str, Any], name: str) -> dict[str, str]:
    ref = report.get("reference")
    model = dig(report, "models", name) or {}
    ppl, ppl_err = _est(dig(model, "perplexity"))
    if ppl is None:  # e.g. a models entry without perplexity: use the comparison's
        key = "ppl_ref" if name == ref else "ppl_quant"
        ppl, ppl_err = _est(dig(report, "comparisons", name, "perplexity", key))
    if name == ref:
        delta = "(reference)"
    else:
        d, d_err = _ppl_delta_pct(report, name)
        d_text = fmt_pct(d, signed=True, scale=1.0)
        delta = fmt_pm(d_text, None if d_err is None else fmt_pct(d_err, scale=1.0))
    return {
        "model": name,
        "ppl": fmt_pm(fmt_ppl(ppl), None if ppl_err is None else fmt_ppl(ppl_err)),
        "delta": delta,
        "rate": fmt_rate(as_number(dig(model, "figures", "tokens_per_second"))),
        "memory": fmt_memory(as_number(dig(model, "figures", "peak_memory_mb"))),
    }


def _candidate_row(report: Mapping[str, Any], name: str) -> dict[str, str]:
    cmp = dig(report, "comparisons", name) or {}
    kl, kl_err = _est(dig(cmp, "means", "kl"))
    t1, t1_err = _est(dig(cmp, "agreement", "top1"))
    tk, tk_err = _est(dig(cmp, "agreement", "topk"))
    rms, _ = _est(dig(cmp, "rms_delta_p"))
    ln, ln_err = _est(dig(cmp, "perplexity", "ln_ppl_ratio"))
    bad = as_number(dig(cmp, "counts", "nonfinite"))
    scored = as_number(dig(cmp, "counts", "scored"))
    nonfinite = fmt_count(bad)
    if bad and scored is not None:
        nonfinite += f" ({fmt_pct(bad / (bad + scored))})"
    bound = "≥" if dig(cmp, "kl_lower_bound") else ""  # top-K reference store: a lower bound
    return {
        "model": name,
        "kl": bound + _small_pm(kl, kl_err),
        "kl_p99": bound + fmt_small(as_number(dig(cmp, "kl_distribution", "percentiles", "99"))),
        "top1": fmt_pm(fmt_pct(t1), None if t1_err is None else fmt_pct(t1_err)),
        "topk": fmt_pm(fmt_pct(tk), None if tk_err is None else fmt_pct(tk_err)),
        "rms_dp": fmt_pct(rms),
        "ln_ppl": _small_pm(ln, ln_err, signed=True),
        "nonfinite": nonfinite,
    }


#: (label, key in kl_distribution) of the KL percentile table.
KL_COLUMNS = (
    ("p50", ("percentiles", "50")),
    ("p90", ("percentiles", "90")),
    ("p95", ("percentiles", "95")),
    ("p99", ("percentiles", "99")),
    ("p99.9", ("percentiles", "99.9")),
    ("max", ("max",)),
)
#: (label, key in delta_p_distribution) of the Δp percentile table (llama.cpp's columns).
DELTA_P_COLUMNS = (
    ("min", ("min",)),
    *((f"p{p}", ("percentiles", p)) for p in ("1", "5", "10", "25", "50", "75", "90", "95", "99")),
    ("max", ("max",)),
)


# --- Markdown ---------------------------------------------------------------------------------

HOW_TO_READ = (
    "## How to read this\n\nEvery candidate was run on exactly the same tokens as the reference "
    "and compared position by position. *KL* is KL(P_ref ‖ Q_cand) of the next-token "
    "distributions in nats: 0 means identical predictions; the mean summarises typical drift "
    "and the high percentiles (p99, p99.9, max) show the rare tokens where the candidate goes "
    "badly wrong, which a mean hides. *Top-1 agreement* is how often both models pick the same "
    "most likely token; *top-k* how often the candidate's pick is among the reference's k most "
    "likely. *RMS Δp* is the root mean square change in the probability given to the actual "
    "next token. *ln PPL ratio* = mean(NLL_cand − NLL_ref) is computed per token pair, so its "
    "standard error is far smaller than the error of either perplexity; ΔPPL % = 100·(PPL "
    "ratio − 1) comes from it. Errors are ± one standard error clustered by window "
    "(cluster-robust: tokens within a window are correlated, so errors over tokens treated "
    "as independent would be too small; report.json holds both, `stderr_seq` and `stderr`). "
    "Non-finite rows (NaN/inf logits, or "
    "infinite KL) are counted and left out of every statistic."
)


def _overview_section(report: Mapping[str, Any]) -> str:
    cands = _candidates(report)
    lines = ["# qmetrics report", ""]
    lines.append(f"- Reference: `{report.get('reference', NA)}`")
    lines.append("- Candidates: " + (", ".join(f"`{c}`" for c in cands) if cands else "none"))
    dataset = dig(report, "settings", "dataset")
    if dataset is not None:
        lines.append(f"- Dataset: `{dataset}`")
    lines.append(
        f"- Tokens: {fmt_count(report.get('tokens_total'))} in "
        f"{fmt_count(report.get('windows'))} windows"
    )
    return "\n".join(lines)


def _models_section(report: Mapping[str, Any]) -> str:
    rows = [_model_row(report, n) for n in _model_names(report)]
    table = md_table(
        ["Model", "PPL ± err", "ΔPPL ± err", "tokens/s", "peak memory"],
        [[r["model"], r["ppl"], r["delta"], r["rate"], r["memory"]] for r in rows],
    )
    return "## Models\n\n" + table


def _candidates_section(report: Mapping[str, Any]) -> str:
    cands = _candidates(report)
    if not cands:
        return "## Drift from the reference\n\nNo candidates were compared."
    k = _top_k(report)
    rows = [_candidate_row(report, n) for n in cands]
    table = md_table(
        [
            "Candidate",
            "mean KL ± err",
            "KL p99",
            "top-1 ± err",
            f"top-{k if k is not None else 'k'} ± err",
            "RMS Δp",
            "ln PPL ratio ± err",
            "non-finite",
        ],
        [[r[key] for key in _CANDIDATE_KEYS] for r in rows],
    )
    if any(dig(report, "comparisons", n, "kl_lower_bound") for n in cands):
        table += (
            "\n\nKL marked ≥ is a lower bound: the reference came from a top-K store, so KL "
            "is computed over its K stored tokens plus one bucket for the rest (by the "
            "data-processing inequality it cannot exceed the full KL); cosine and MSE of the "
            "logits are absent."
        )
    return "## Drift from the reference\n\n" + table


_CANDIDATE_KEYS = ("model", "kl", "kl_p99", "top1", "topk", "rms_dp", "ln_ppl", "nonfinite")


def _kl_percentiles_section(report: Mapping[str, Any]) -> str | None:
    cands = _candidates(report)
    if not cands:
        return None
    rows = []
    for name in cands:
        dist = dig(report, "comparisons", name, "kl_distribution")
        rows.append([name, *(fmt_small(as_number(dig(dist, *keys))) for _, keys in KL_COLUMNS)])
    table = md_table(["Candidate", *(label for label, _ in KL_COLUMNS)], rows)
    return "## Per-token KL percentiles (nats)\n\n" + table + _sketch_note(report)


def _delta_p_percentiles_section(report: Mapping[str, Any]) -> str | None:
    """Δp = p_cand − p_ref of the label token, in percent (llama.cpp's Δp percentiles)."""
    cands = [
        n for n in _candidates(report) if dig(report, "comparisons", n, "delta_p_distribution")
    ]
    if not cands:
        return None
    rows = []
    for name in cands:
        dist = dig(report, "comparisons", name, "delta_p_distribution")
        cells = (fmt_pct(as_number(dig(dist, *keys)), signed=True) for _, keys in DELTA_P_COLUMNS)
        rows.append([name, *cells])
    table = md_table(["Candidate", *(label for label, _ in DELTA_P_COLUMNS)], rows)
    return "## Per-token Δp percentiles (p_cand − p_ref of the next token)\n\n" + table


def _sketch_note(report: Mapping[str, Any]) -> str:
    """A note naming the candidates whose percentiles come from the bounded-memory sketch."""
    names = [
        n for n in _candidates(report)
        if dig(report, "comparisons", n, "percentile_method") == "sketch"
    ]  # fmt: skip
    if not names:
        return ""
    return (
        "\n\n_Percentiles of " + ", ".join(f"`{n}`" for n in names) + " (KL and Δp) come from "
        "the fixed-size sketch used past the exact-value limit: within 0.8% relative (1e-10 "
        "absolute near 0); the 1024 largest and 1024 smallest values are exact._"
    )


def _plot_section(plot: str | None, plot_note: str | None) -> str | None:
    if plot:
        return f"## KL distribution\n\n![CDF of per-token KL]({plot})"
    if plot_note:
        return f"## KL distribution\n\n_Plot skipped: {plot_note}._"
    return None


def markdown_sections(
    report: Mapping[str, Any], *, plot: str | None = None, plot_note: str | None = None
) -> list[str]:
    """The Markdown report as self-contained sections (each starts with a heading): overview,
    models, drift, KL percentiles, Δp percentiles (with labels), KL plot (``plot``: image path
    relative to the Markdown file; or ``plot_note``: why it is missing), how to read this,
    settings, environment."""
    sections = [
        _overview_section(report),
        _models_section(report),
        _candidates_section(report),
        _kl_percentiles_section(report),
        _delta_p_percentiles_section(report),
        _plot_section(plot, plot_note),
        HOW_TO_READ,
        key_value_section("Settings", report.get("settings")),
        key_value_section("Environment", report.get("environment")),
    ]
    return [s for s in sections if s]


def markdown_summary(
    report: Mapping[str, Any], *, plot: str | None = None, plot_note: str | None = None
) -> str:
    """The whole Markdown report (the :func:`markdown_sections` joined by blank lines)."""
    return "\n\n".join(markdown_sections(report, plot=plot, plot_note=plot_note)) + "\n"


# --- plot -------------------------------------------------------------------------------------


def plot_kl_cdf(report: Mapping[str, Any], path: str | Path) -> Path:
    """Draw the CDF of per-token KL of every candidate (log x axis) from ``kl_quantiles`` into
    a PNG. Raises :class:`PlotUnavailableError` without matplotlib or without quantiles."""
    curves: dict[str, list[float]] = {}
    for name, values in (report.get("kl_quantiles") or {}).items():
        clean = [
            v for v in (as_number(x) for x in values or []) if v is not None and math.isfinite(v)
        ]
        if len(clean) >= 2:
            curves[name] = clean
    if not curves:
        raise PlotUnavailableError("the report holds no per-token KL quantiles")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailableError(
            "matplotlib is not installed (pip install 'qmetrics[report]')"
        ) from None

    positive = [v for vals in curves.values() for v in vals if v > 0]
    floor = min(positive) if positive else 1e-12  # log axis: zeros are drawn at the floor
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot()
    for name, vals in curves.items():
        n = len(vals)
        levels = [i / (n - 1) for i in range(n)]
        xs = [max(v, floor) for v in vals]
        mean = as_number(dig(report, "comparisons", name, "means", "kl", "value"))
        label = name if mean is None else f"{name} (mean {fmt_small(mean)})"
        (line,) = ax.plot(xs, levels, label=label, linewidth=1.6)
        if mean is not None and mean > 0:
            ax.axvline(mean, color=line.get_color(), linestyle=":", linewidth=1.0)
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(floor / 2, None)
    ax.axhline(0.99, color="0.6", linestyle="--", linewidth=0.8)
    ax.text(floor / 2, 0.99, " p99", va="top", ha="left", fontsize=8, color="0.4")
    ax.set_xlabel("per-token KL(P_ref ‖ Q_cand), nats (log scale)")
    ax.set_ylabel("fraction of tokens with KL ≤ x")
    ax.set_title(f"CDF of per-token KL vs {report.get('reference', 'the reference')}")
    ax.grid(True, which="major", alpha=0.3)
    ax.plot([], [], color="0.4", linestyle=":", linewidth=1.0, label="mean KL (dotted)")
    ax.legend(loc="lower right", fontsize=8)
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


# --- files ------------------------------------------------------------------------------------


def write_reports(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``kl_cdf.png`` (when it can be drawn) and ``report.md`` into
    ``out_dir`` (created if needed). Returns the paths written, keyed "json", "plot" (only when
    drawn) and "markdown". A skipped plot is explained in the Markdown, and a stale plot from an
    earlier run in the same folder is removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    json_path = out / JSON_NAME
    json_path.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    paths["json"] = json_path

    plot_path = out / PLOT_NAME
    plot: str | None = None
    note: str | None = None
    try:
        paths["plot"] = plot_kl_cdf(report, plot_path)
        plot = PLOT_NAME
    except PlotUnavailableError as exc:
        note = str(exc)
        plot_path.unlink(missing_ok=True)

    md_path = out / MARKDOWN_NAME
    md_path.write_text(markdown_summary(report, plot=plot, plot_note=note), encoding="utf-8")
    paths["markdown"] = md_path
    return paths


# --- terminal ---------------------------------------------------------------------------------

_TERMINAL_HEADERS = (
    ("Model", "model"),
    ("PPL", "ppl"),
    ("ΔPPL", "delta"),
    ("mean KL ± err", "kl"),
    ("KL p99", "kl_p99"),
    ("top-1", "top1"),
    ("top-k", "topk"),
    ("RMS Δp", "rms_dp"),
    ("tokens/s", "rate"),
    ("memory", "memory"),
)


def _terminal_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: the reference first (drift columns "—"), then one row per candidate."""
    k = _top_k(report)
    headers = [h if key != "topk" or k is None else f"top-{k}" for h, key in _TERMINAL_HEADERS]
    ref = report.get("reference")
    names = [n for n in [ref] if n is not None and n in (report.get("models") or {})]
    names += _candidates(report)
    rows = []
    for name in names:
        cells = dict(_model_row(report, name))
        cells["ppl"] = cells["ppl"].split(" ± ")[0]
        cells["delta"] = cells["delta"].split(" ± ")[0]
        if name == ref and name not in (report.get("comparisons") or {}):
            cells["model"] = f"{name} (ref)"
            cells["delta"] = "—"
            cells.update(dict.fromkeys(("kl", "kl_p99", "top1", "topk", "rms_dp"), "—"))
        else:
            cand = _candidate_row(report, name)
            cand["top1"] = cand["top1"].split(" ± ")[0]
            cand["topk"] = cand["topk"].split(" ± ")[0]
            cells.update({k2: cand[k2] for k2 in ("kl", "kl_p99", "top1", "topk", "rms_dp")})
        rows.append([cells[key] for _, key in _TERMINAL_HEADERS])
    return headers, rows


def _terminal_title(report: Mapping[str, Any]) -> str:
    tokens = fmt_count(report.get("tokens_total"))
    return f"qmetrics: candidates vs {report.get('reference', NA)} ({tokens} tokens)"


def render_text_table(report: Mapping[str, Any]) -> str:
    """The terminal table as plain text (used when rich is not installed)."""
    headers, rows = _terminal_rows(report)
    return text_table(_terminal_title(report), headers, rows)


def render_terminal_table(report: Mapping[str, Any]) -> Table | str:
    """A rich Table: the reference's row, then one row per candidate with PPL, ΔPPL %, mean
    KL ± err, KL p99, top-1, top-k, RMS Δp, tokens/s and peak memory. Without rich, the same
    table as plain text (:func:`render_text_table`)."""
    headers, rows = _terminal_rows(report)
    ref_row = f"{report.get('reference')} (ref)"
    styles = ["dim" if row[0] == ref_row else None for row in rows]
    return table(_terminal_title(report), headers, rows, styles=styles)


# --- the running per-chunk line (``compare --per-chunk``) -----------------------------------------

#: The header llama-perplexity --kl-divergence prints above its per-chunk lines.
CHUNK_HEADER = (
    "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
    "              Δp RMS            Same top p"
)


def chunk_lines(windows_done: int, results: Mapping[str, Any]) -> list[str]:
    """One line per compared pair, laid out as llama-perplexity --kl-divergence prints after
    each chunk: the chunk number (windows done), then running PPL(Q), ln(PPL(Q)/PPL(base)),
    mean KL, RMS Δp (%) and same-top-1 (%), each ± its per-token standard error (llama.cpp's
    error; the report adds the per-window one). ``results`` maps names to
    :class:`qmetrics.metrics.logit_stats.LogitStatsResult`; with several pairs each line ends
    with the candidate's name."""

    def pm(est: Any, width: int, digits: int, scale: float = 1.0) -> str:
        value, err = (math.nan, math.nan) if est is None else (est.value, est.stderr)
        return f"{scale * value:{width}.{digits}f} ± {scale * err:{width}.{digits}f}"

    lines = []
    for name, res in results.items():
        line = (
            f"{windows_done:4d}    {pm(res.ppl_quant, 9, 4)}    {pm(res.ln_ppl_ratio, 10, 5)}"
            f"    {pm(res.means.get('kl'), 10, 5)}    {pm(res.rms_delta_p, 6, 3, 100.0)} %"
            f"    {pm(res.top1_agreement, 6, 3, 100.0)} %"
        )
        lines.append(line if len(results) == 1 else f"{line}    {name}")
    return lines
