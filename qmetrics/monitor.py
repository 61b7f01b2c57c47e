"""Production monitoring, the public names: ``from qmetrics.monitor import OutputMonitor``.

A re-export of :mod:`qmetrics.metrics.output_monitor`, :mod:`qmetrics.metrics.drift` and
:func:`qmetrics.metrics.output_stats.output_stats` (one copy of each, reachable here)."""

from qmetrics.metrics.drift import Alarm, MonitorProfile, Thresholds, WindowSummary
from qmetrics.metrics.output_monitor import OutputMonitor
from qmetrics.metrics.output_stats import OutputStats, output_stats

__all__ = [
    "Alarm",
    "MonitorProfile",
    "OutputMonitor",
    "OutputStats",
    "Thresholds",
    "WindowSummary",
    "output_stats",
]
