"""The progress bar of long runs (tqdm when installed and wanted, else nothing)."""

from __future__ import annotations

from typing import Any


def progress_bar(enabled: bool, total: int, initial: int) -> Any | None:
    """A tqdm bar over ``total`` batches starting at ``initial``; None when disabled or when
    tqdm is not installed (callers then skip the updates)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="batch", desc="qmetrics", leave=False)
