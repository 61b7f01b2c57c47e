"""Formatting shared by every report: reading values out of a report dict, number formatting,
Markdown tables, terminal tables (rich, or plain text without it) and printing them.

Missing or NaN values format as :data:`NA` ("n/a"), infinities as "inf" / "-inf", so a partial
report still renders.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

NA = "n/a"


class PlotUnavailableError(RuntimeError):
    """A plot cannot be drawn (matplotlib missing, or nothing to plot in the report)."""


# --- reading a report -------------------------------------------------------------------------


def dig(d: Any, *keys: str) -> Any:
    """``d[k0][k1]...``, or None when any level is missing or not a mapping."""
    for key in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def as_number(x: Any) -> float | None:
    """A report value as a float: "inf" / "-inf" → ±inf, None / NaN / non-numbers → None."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, str):
        return {"inf": math.inf, "-inf": -math.inf}.get(x)
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


# --- numbers ----------------------------------------------------------------------------------


def special(x: float | None) -> str | None:
    """ "n/a" for None/NaN, "inf"/"-inf" for infinities, None for an ordinary number."""
    if x is None or math.isnan(x):
        return NA
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def _is_sci(x: float) -> bool:
    return x != 0 and (abs(x) < 0.01 or abs(x) >= 1e4)


def fmt_small(x: float | None, signed: bool = False, like: float | None = None) -> str:
    """A quantity that is often tiny (KL, ln PPL ratio): scientific below 0.01, else 4 dp.

    ``like``: format in the style chosen for that value instead (for a stderr next to its
    value, so that ``0.1231 ± 0.0038`` does not read ``0.1231 ± 3.82e-03``)."""
    if (s := special(x)) is not None:
        return s
    assert x is not None
    sign = "+" if signed else ""
    ref = x if like is None or not math.isfinite(like) else like
    if x == 0 and like is None:
        return "0"
    if _is_sci(ref) or (ref == 0 and _is_sci(x)):
        return f"{x:{sign}.2e}"
    return f"{x:{sign}.4f}"


def fmt_pct(frac: float | None, signed: bool = False, scale: float = 100.0) -> str:
    """A fraction as a percentage with 2 decimals (``scale=1`` when already in percent)."""
    if (s := special(frac)) is not None:
        return s
    assert frac is not None
    value = frac * scale
    if round(value, 2) == 0:
        value = 0.0  # no "-0.00%"
    return f"{value:{'+' if signed else ''}.2f}%"


def fmt_ppl(x: float | None) -> str:
    """A perplexity: 3 decimals, fewer when large."""
    if (s := special(x)) is not None:
        return s
    assert x is not None
    return f"{x:,.3f}" if abs(x) < 1000 else f"{x:,.1f}"


def fmt_pm(value: str, err: str | None) -> str:
    """``value ± err``, or just the value when the error is unknown."""
    return value if err in (None, NA) or value == NA else f"{value} ± {err}"


def fmt_rate(x: float | None) -> str:
    """Tokens per second."""
    if (s := special(x)) is not None:
        return s
    assert x is not None
    return f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


def fmt_memory(mb: float | None) -> str:
    """Memory in MiB, shown as MiB or GiB."""
    if (s := special(mb)) is not None:
        return s
    assert mb is not None
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.1f} MiB"


def fmt_count(x: Any) -> str:
    """An integer count with thousands separators."""
    v = as_number(x)
    if (s := special(v)) is not None:
        return s
    assert v is not None
    return f"{int(v):,}"


def fmt_db(x: float | None) -> str:
    """A level in dB with one decimal; +inf (no error at all) as "inf"."""
    if (s := special(x)) is not None:
        return s
    assert x is not None
    return f"{x:.1f}"


def fmt_p(p: float | None) -> str:
    """A p-value: 3 significant digits, scientific with 2 below 1e-4 (``3.2e-06``)."""
    if (s := special(p)) is not None:
        return s
    assert p is not None
    if p == 0:
        return "0"
    return f"{p:.1e}" if p < 1e-4 else f"{p:.3g}"


def format_value(x: float, threshold: float) -> str:
    """``x`` with 4 significant digits, or more if needed to tell it apart from the threshold."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    for digits in (4, 6, 8, 12, 17):
        text = f"{x:.{digits}g}"
        if x == threshold or float(text) != threshold:
            return text
    return repr(x)


def plain(v: Any) -> str:
    """A settings value as text: None → "n/a", lists comma-joined, padded strings quoted."""
    if v is None:
        return NA
    if isinstance(v, (list, tuple)):
        return ", ".join(plain(x) for x in v) or "(none)"
    if isinstance(v, str):
        return repr(v) if v != v.strip() or not v else v
    return str(v)


# --- Markdown ---------------------------------------------------------------------------------


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A GitHub Markdown table; ``align`` holds one of l/r per column (default: l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = [
        "| " + " | ".join(_md_cell(h) for h in headers) + " |",
        "| " + " | ".join(sep) + " |",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def key_value_section(title: str, d: Any) -> str | None:
    """``## title`` and a Key/Value table of a mapping (values through :func:`plain`); None
    for an empty or missing mapping."""
    if not isinstance(d, Mapping) or not d:
        return None
    rows = [[k, plain(v)] for k, v in d.items()]
    return f"## {title}\n\n" + md_table(["Key", "Value"], rows, align="ll")


# --- terminal ---------------------------------------------------------------------------------


def text_table(
    title: str | None,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    left: Collection[int] = (0,),
) -> str:
    """A plain-text table: an optional title line, the headers, a rule of dashes, the rows;
    columns two spaces apart, the columns in ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        cols = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in cols).rstrip()

    body = [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
    return "\n".join(([title] if title else []) + body)


def table(
    title: str | None,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    left: Collection[int] = (0,),
    styles: Sequence[str | None] | None = None,
) -> Any:
    """A rich ``Table`` (``styles``: one rich style or None per row), or without rich the same
    table as :func:`text_table`."""
    try:
        from rich.table import Table
    except ImportError:
        return text_table(title, headers, rows, left)
    out = Table(title=title)
    for i, header in enumerate(headers):
        out.add_column(header, justify="left" if i in left else "right", no_wrap=True)
    for i, row in enumerate(rows):
        out.add_row(*row, style=None if styles is None else styles[i])
    return out


def print_table(table_: Any) -> None:
    """Print a :func:`table` result on stdout: rich at the terminal's width, 160 columns when
    stdout is not a terminal (logs and CI), plain ``print`` without rich or for text."""
    try:
        from rich.console import Console
    except ImportError:
        print(table_)
        return
    if isinstance(table_, str):
        print(table_)
        return
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table_)
