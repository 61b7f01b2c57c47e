"""Estimates with error bars, per-token distributions, and the one merge of streaming moments.

:class:`Estimate` is a value with its iid and per-sequence standard errors; :class:`Distribution`
the max, min and percentiles of a per-token metric. :func:`chan_merge` folds two (n, mean, M2)
summaries into one with Chan et al.'s parallel update; for parts a, b with n = n_a + n_b,
δ = mean_b − mean_a and w = n_a·n_b/n:

    mean = mean_a + δ·n_b/n,   M2 = M2_a + M2_b + δ²·w,
    C_ij = C_a,ij + C_b,ij + δ_i·δ_j·w   (co-moment of columns i, j: :meth:`Merged.comoment`).

Both accumulators (:mod:`qmetrics.metrics.logit_stats`, :mod:`qmetrics.metrics.layer_stats`)
merge their moments with it, so any split of the data into batches, accumulators or ranks gives
the same state up to float64 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qmetrics.metrics.json_values import json_float


@dataclass(frozen=True)
class Estimate:
    """A value, its iid standard error and its per-sequence (cluster-robust) standard error
    (NaN when undefined, e.g. with a single token, or a single sequence for ``stderr_seq``)."""

    value: float
    stderr: float
    stderr_seq: float = math.nan

    def to_dict(self) -> dict[str, float | str | None]:
        return {
            "value": json_float(self.value),
            "stderr": json_float(self.stderr),
            "stderr_seq": json_float(self.stderr_seq),
        }


@dataclass(frozen=True)
class Distribution:
    """Max, min and percentiles (``numpy.percentile``, linear) of a per-token metric."""

    max: float
    min: float
    percentiles: dict[float, float]

    @classmethod
    def of(cls, values: torch.Tensor, percentiles: Sequence[float]) -> Distribution:
        """Max, min and ``percentiles`` of a non-empty 1-D tensor (computed in float64,
        ``numpy.percentile`` with linear interpolation). Raises ``ValueError`` when empty."""
        arr = values.detach().cpu().numpy().astype(np.float64).reshape(-1)
        if arr.size == 0:
            raise ValueError("a distribution needs at least one value, got none")
        pct = np.percentile(arr, list(percentiles))
        return cls(
            max=float(arr.max()),
            min=float(arr.min()),
            percentiles={float(p): float(v) for p, v in zip(percentiles, pct, strict=True)},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "max": json_float(self.max),
            "min": json_float(self.min),
            "percentiles": {f"{p:g}": json_float(v) for p, v in self.percentiles.items()},
        }


@dataclass(frozen=True)
class Merged:
    """The merged moments from :func:`chan_merge`, with δ = mean_b − mean_a and the weight
    w = n_a·n_b/n (δ = 0, w = 0 when either part is empty)."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor
    delta: torch.Tensor
    weight: float

    def comoment(self, c_a: torch.Tensor, c_b: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Merged co-moment Σ(x_i − mean_i)(x_j − mean_j): C_a + C_b + δ_i·δ_j·w."""
        return c_a + c_b + self.delta[i] * self.delta[j] * self.weight


def chan_merge(
    n_a: int,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    n_b: int,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> Merged:
    """Chan et al.'s merge of two (count, mean, M2 = Σ(x − mean)²) summaries of float64
    columns (formulas: module docstring). The inputs are not modified; when one part is empty
    the other's mean and M2 come back as copies."""
    n_a, n_b = int(n_a), int(n_b)
    if n_a < 0 or n_b < 0:
        raise ValueError(f"counts must be ≥ 0, got n_a={n_a}, n_b={n_b}")
    if n_b == 0 or n_a == 0:
        mean, m2 = (mean_a, m2_a) if n_b == 0 else (mean_b, m2_b)
        return Merged(n_a + n_b, mean.clone(), m2.clone(), torch.zeros_like(mean), 0.0)
    n = n_a + n_b
    delta = mean_b - mean_a
    weight = n_a * n_b / n
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta.square() * weight
    return Merged(n, mean, m2, delta, weight)
