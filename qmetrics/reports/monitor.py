"""Reports of the output monitor: JSON lines (a snapshot record, then one record per alarm),
Prometheus (gauges and histograms under a ``qmetrics_`` prefix, through ``prometheus_client``:
the optional extra ``qmetrics[monitor]``), the terminal table and the ``--fail-if`` gate of
``qmetrics monitor check``.

Prometheus metrics (label ``statistic`` ∈ entropy, max_prob, margin, nll):
``qmetrics_monitor_tokens_total``, ``qmetrics_monitor_nonfinite_tokens_total``,
``qmetrics_monitor_window_tokens``, ``qmetrics_monitor_mean`` / ``_se`` (clustered by request),
``qmetrics_monitor_drift`` (label ``test`` ∈ z, psi, ks, paired_z), ``qmetrics_monitor_alarm``
(1 per broken test, labels ``statistic``, ``test``) and the histogram
``qmetrics_monitor_distribution`` (buckets every 1/16 of the statistic's grid).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qmetrics.metrics.drift import GRIDS, Alarm, WindowSummary
from qmetrics.metrics.json_values import json_safe
from qmetrics.reports.format import table
from qmetrics.reports.gate import Rule, Subject, Vocabulary, check_rules, parse_gate

#: Histogram buckets exported per statistic (upper edges every grid.bins/16 bins, then +Inf).
PROMETHEUS_BUCKETS = 16


# --- JSON lines -------------------------------------------------------------------------------


def monitor_records(
    snapshot: Mapping[str, Any], alarms: Sequence[Alarm], values: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """One ``{"type": "snapshot", ...}`` record (with the drift test ``values``), then one
    ``{"type": "alarm", ...}`` per alarm (:meth:`Alarm.to_dict`)."""
    head = {"type": "snapshot", **snapshot, "drift": dict(values or {}), "alarms": len(alarms)}
    return [head, *({"type": "alarm", **a.to_dict()} for a in alarms)]


def write_jsonl(records: Iterable[Mapping[str, Any]], path: Path, append: bool = False) -> Path:
    """Write (or append) one strict JSON object per line (log shippers reject ``NaN`` and
    ``Infinity``: non-finite numbers are written as in every report, :func:`json_safe`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
    return path


def write_snapshot(snapshot: Mapping[str, Any], path: Path) -> Path:
    """Write a monitor snapshot as one strict JSON document (as :func:`write_jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(snapshot), indent=1, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON lines file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# --- Prometheus ---------------------------------------------------------------------------------


def prometheus_families(
    summary: WindowSummary,
    snapshot: Mapping[str, Any],
    values: Mapping[str, float],
    alarms: Sequence[Alarm],
    prefix: str = "qmetrics_",
) -> list[Any]:
    """The metric families (module docstring) of one reading of a monitor."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    p = f"{prefix}monitor_"
    tokens = CounterMetricFamily(f"{p}tokens", "tokens observed")
    tokens.add_metric([], snapshot.get("tokens_total", summary.tokens))
    nonfinite = CounterMetricFamily(
        f"{p}nonfinite_tokens",
        "tokens with NaN/+inf or no finite logits, or a label of probability 0",
    )
    nonfinite.add_metric([], snapshot.get("nonfinite_total", summary.nonfinite))
    window = GaugeMetricFamily(f"{p}window_tokens", "tokens in the current window")
    window.add_metric([], summary.tokens)
    mean = GaugeMetricFamily(f"{p}mean", "window mean", labels=["statistic"])
    se = GaugeMetricFamily(
        f"{p}mean_se", "window mean's error, clustered by request", labels=["statistic"]
    )
    hist = HistogramMetricFamily(f"{p}distribution", "window distribution", labels=["statistic"])
    for name, st in summary.stats.items():
        mean.add_metric([name], st.mean)
        se.add_metric([name], st.se)
        grid = GRIDS[name]
        step = grid.bins // PROMETHEUS_BUCKETS
        cum = np.cumsum(st.hist)
        edges = grid.edges()
        buckets = [(f"{edges[k]:g}", float(cum[k - 1])) for k in range(step, grid.bins, step)]
        buckets.append(("+Inf", float(cum[-1])))
        hist.add_metric([name], buckets, sum_value=st.mean * st.count)
    drift = GaugeMetricFamily(
        f"{p}drift", "drift test value against the profile", labels=["statistic", "test"]
    )
    for key, value in values.items():
        for test in ("paired_z", "z", "psi", "ks"):
            stat = key.removeprefix(f"{test}_")
            if stat != key and stat in GRIDS:
                drift.add_metric([stat, test], value)
                break
    alarm = GaugeMetricFamily(
        f"{p}alarm", "1 for each broken drift test", labels=["statistic", "test"]
    )
    for a in alarms:
        alarm.add_metric([a.statistic, a.test], 1.0)
    return [tokens, nonfinite, window, mean, se, hist, drift, alarm]


class MonitorCollector:
    """A ``prometheus_client`` collector reading an
    :class:`qmetrics.metrics.output_monitor.OutputMonitor` at each scrape (and checking it
    against ``profile`` when given): register it in a ``CollectorRegistry`` and serve it
    (``start_http_server``) or push it (``push_to_gateway``) as that library does."""

    def __init__(self, monitor: Any, profile: Any = None, prefix: str = "qmetrics_"):
        self.monitor, self.profile, self.prefix = monitor, profile, prefix

    def collect(self) -> Iterable[Any]:
        from qmetrics.metrics.drift import check_window, drift_values

        summary, snapshot = self.monitor.read()  # one moment: window and totals agree
        values: dict[str, float] = {}
        alarms: list[Alarm] = []
        if self.profile is not None and any(s.count for s in summary.stats.values()):
            values = drift_values(self.profile, summary)
            alarms = check_window(self.profile, summary)
        yield from prometheus_families(summary, snapshot, values, alarms, self.prefix)


def prometheus_text(
    summary: WindowSummary,
    snapshot: Mapping[str, Any],
    values: Mapping[str, float],
    alarms: Sequence[Alarm],
) -> str:
    """The text exposition format of :func:`prometheus_families` (``metrics.prom``)."""
    from prometheus_client import CollectorRegistry, generate_latest

    class _Fixed:
        def collect(self) -> Iterable[Any]:
            return prometheus_families(summary, snapshot, values, alarms)

    registry = CollectorRegistry()
    registry.register(_Fixed())
    return generate_latest(registry).decode("utf-8")


# --- terminal and gate ----------------------------------------------------------------------------


def render_check_table(
    summary: WindowSummary, values: Mapping[str, float], alarms: Sequence[Alarm]
) -> Any:
    """One row per statistic: window mean ± se, z (paired z when the corpus is the profile's),
    PSI, KS, and the tests that alarmed."""
    broken: dict[str, list[str]] = {}
    for a in alarms:
        broken.setdefault(a.statistic, []).append(a.test)
    rows = []
    for name, st in summary.stats.items():
        z = values.get(f"paired_z_{name}", values.get(f"z_{name}"))
        rows.append(
            [
                name,
                f"{st.mean:.4f} ± {st.se:.4f}",
                _num(z),
                _num(values.get(f"psi_{name}")),
                _num(values.get(f"ks_{name}")),
                ", ".join(broken.get(name, [])) or "-",
            ]
        )
    title = f"tokens {summary.tokens} ({summary.nonfinite} non-finite), {len(alarms)} alarm(s)"
    return table(title, ["statistic", "mean ± se", "z", "PSI", "KS", "alarms"], rows)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _monitor_vocabulary(names: Iterable[str]) -> Vocabulary:
    known = sorted(set(names))

    def resolve(name: str) -> str | None:
        return name if name in known else None

    def suggest(name: str) -> str | None:
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        return close[0] if close else None

    return Vocabulary(resolve, suggest, "known: " + ", ".join(known))


#: Gate names: ``z_``, ``paired_z_``, ``shift_``, ``psi_``, ``ks_`` + statistic, and
#: ``nonfinite_frac``.
GATE_NAMES = ["nonfinite_frac"] + [
    f"{t}_{s}" for t in ("z", "paired_z", "shift", "psi", "ks") for s in GRIDS
]


def parse_monitor_gate(text: str) -> list[Rule]:
    """``--fail-if`` rules over :data:`GATE_NAMES` (the grammar of :mod:`qmetrics.reports.gate`)."""
    return parse_gate(text, _monitor_vocabulary(GATE_NAMES))


def check_monitor_gate(rules: Sequence[Rule], label: str, values: Mapping[str, float]) -> list[str]:
    """The broken rules of one checked run (its drift ``values``), as the gate words them."""
    subject = Subject(label, lambda name: values.get(name))
    return check_rules(rules, [subject], lambda rule: f"no run to check (gate: {rule})")
