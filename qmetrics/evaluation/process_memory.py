"""The process's resident memory, read from the OS: current RSS, peak RSS and its reset.

On Linux the values come from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) and the peak mark
is reset by writing ``5`` to ``/proc/self/clear_refs``. Elsewhere ``resource.getrusage``'s
``ru_maxrss`` (KiB on Linux, bytes on macOS) stands in for both, and cannot be reset (a child
process inherits its parent's mark there).
"""

from __future__ import annotations

import sys

__all__ = ["peak_rss_mb", "reset_peak_rss"]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    import resource  # POSIX only; imported here so the module loads everywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_rss_mb() -> float:
    """The process's peak resident set size since start (or the last reset), in MiB."""
    peak = _status_kib("VmHWM")
    return peak / 1024 if peak is not None else _maxrss_mb()


def reset_peak_rss() -> float:
    """Reset the peak-RSS mark to the current RSS where the OS allows it (Linux) and return
    the mark it now holds, in MiB; peak growth after this call = ``peak_rss_mb() − returned``."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return _maxrss_mb()
    current = _status_kib("VmRSS")
    return current / 1024 if current is not None else _maxrss_mb()
