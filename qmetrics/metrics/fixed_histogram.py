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

    @property
    def layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lo [S, 1], bins/(hi − lo) [S, 1], k·bins [S, 1]): the arguments of
        :func:`bin_counts` for these grids."""
        return self._lo, self._scale, self._offset

    def update(self, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Count ``values`` [S, N] where ``valid`` [S, N] (bool) holds. Sync-free."""
        self.counts += bin_counts(values, valid, *self.layout, self.bins)

    def reset(self) -> None:
        self.counts.zero_()


def bin_counts(
    values: torch.Tensor,
    valid: torch.Tensor,
    lo: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bins: int,
) -> torch.Tensor:
    """Counts [S, bins] (int64) of ``values`` [S, N] where ``valid`` holds, on the grids of
    :attr:`FixedHistogram.layout`: elementwise ops and one ``index_add`` (no host
    synchronisation; plain ops that ``torch.compile`` fuses)."""
    index = ((values - lo) * scale).nan_to_num(0.0).clamp(0, bins - 1)
    flat = (index.to(torch.int64) + offset).reshape(-1)
    counts = torch.zeros(values.shape[0] * bins, dtype=torch.int64, device=values.device)
    return counts.index_add(0, flat, valid.reshape(-1).to(torch.int64)).view(-1, bins)
