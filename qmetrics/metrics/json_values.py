"""JSON-safe values for reports: NaN → None, ±inf → "inf" / "-inf" (``json.dumps(...,
allow_nan=False)`` then works), numpy and torch scalars as Python numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def json_float(x: float) -> float | str | None:
    """JSON-safe float: NaN → None, ±inf → "inf" / "-inf", anything else a Python float."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def json_safe(x: Any) -> Any:
    """``x`` with every float made JSON-safe as in :func:`json_float`, mappings and sequences
    converted recursively, numpy / torch scalars as Python numbers, other objects as str."""
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return json_float(x)
    if hasattr(x, "item") and hasattr(x, "dtype"):  # numpy / torch scalars
        try:
            return json_safe(x.item())
        except (TypeError, ValueError):
            pass
    return str(x)
