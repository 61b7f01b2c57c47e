"""A fixed-bin histogram of several statistics at once: bounded memory, mergeable by addition,
updated on the values' device without host synchronisation.

Statistic k has ``bins`` equal bins over [lo_k, hi_k); a value below lo_k counts in the first
bin and one at or above hi_k in the last, so every finite value is counted. Bin of x:
clamp(⌊(x − lo_k)·bins/(hi_k − lo_k)⌋, 0, bins − 1). The empirical CDF is exact at every bin
edge, which is what the drift tests read (:mod:`qmetrics.metrics.drift`: PSI over groups of
bins, KS as the largest CDF gap over the edges).

(The monitor's own histogram: ``qmetrics.metrics.quantile_sketch`` serves percentiles with a
relative-error layout and exact tails; this one serves CDFs on one fixed linear grid per
statistic, which two runs must share to be compared bin by bin, at a few ops per update.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Grid:
    """``bins`` equal bins over [lo, hi) (values outside go to the end bins)."""

    lo: float
    hi: float
    bins: int

    def edges(self) -> np.ndarray:
        """The bins + 1 edges, float64."""
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def to_list(self) -> list[float]:
        return [self.lo, self.hi, self.bins]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Grid:
        lo, hi, bins = values
        if not (float(lo) < float(hi)) or int(bins) != bins or int(bins) < 1:
            raise ValueError(f"a grid is [lo, hi, bins] with lo < hi and bins ≥ 1, got {values}")
        return cls(float(lo), float(hi), int(bins))


class FixedHistogram:
    """Counts [S, bins] (int64, on ``device``) of S statistics on their own :class:`Grid` each
    (all with the same number of bins)."""

    def __init__(self, grids: Sequence[Grid], device: torch.device | str | None = None):
        bins = {g.bins for g in grids}
        if len(bins) != 1:
            raise ValueError(f"all grids need the same number of bins, got {sorted(bins)}")
        self.grids = tuple(grids)
        self.bins = bins.pop()
        device = torch.device("cpu") if device is None else torch.device(device)
        lo = torch.tensor([g.lo for g in grids], dtype=torch.float32, device=device)
        scale = torch.tensor(
            [g.bins / (g.hi - g.lo) for g in grids], dtype=torch.float32, device=device
        )
        self._lo, self._scale = lo[:, None], scale[:, None]
        self._offset = torch.arange(len(grids), device=device)[:, None] * self.bins
        self.counts = torch.zeros(len(grids), self.bins, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def update(self, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Count ``values`` [S, N] where ``valid`` [S, N] (bool) holds. Sync-free: elementwise
        ops and one ``index_add_`` into the fixed counts."""
        index = ((values - self._lo) * self._scale).nan_to_num_(0.0).clamp_(0, self.bins - 1)
        flat = index.to(torch.int64).add_(self._offset).reshape(-1)
        self.counts.view(-1).index_add_(0, flat, valid.reshape(-1).to(torch.int64))

    def reset(self) -> None:
        self.counts.zero_()
