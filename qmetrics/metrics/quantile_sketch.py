"""A fixed-size, mergeable summary of a stream of real values for percentiles (bounded memory).

:class:`QuantileSketch` is a relative-error histogram in the manner of DDSketch (Masson et al.,
2019) plus exact extremes and exact tails. With ``lo``, ``hi`` and bin ratio γ, the magnitude
edges are e_j = lo·γ^j for j = 0..K, K = ⌈ln(hi/lo)/ln γ⌉, and the bins are, in value order:

    (−∞, −e_K] | (−e_j, −e_{j−1}] for j = K..1 | (−lo, 0) | {0} |
    (0, lo) | [e_{j−1}, e_j) for j = 1..K | [e_K, ∞)

that is 2K + 5 int64 counts (magnitudes ≥ e_K, and those below lo, have a bin on each side;
exact zeros, −0.0 included, have theirs). Beside the counts it keeps the exact min and max, and
the ``tail`` largest and ``tail`` smallest values exactly (float64).

Query (:meth:`QuantileSketch.quantiles`) follows ``numpy.quantile``'s linear rule: with n values
and v_(i) the i-th smallest, q ↦ v_(⌊r⌋) + (r − ⌊r⌋)(v_(⌊r⌋+1) − v_(⌊r⌋)), r = q·(n − 1). Each
v_(i) is exact when i falls among the kept tails (so every quantile is exact for n ≤ ``tail``,
and p99.9 is exact up to n = 1000·``tail``); otherwise it is estimated inside its bin [L, U]
(clamped to [min, max]) as L + t·(U − L), t = (i − F + ½)/c, with F the values below the bin and
c its count. An estimate lies in the bin of the true value, so for |x| ∈ [lo, hi] its relative
error is below γ − 1 (0.8 % with the default γ = 1.008), and the linear step between two such
estimates keeps that bound; for |x| < lo the error is below lo in absolute terms.

:meth:`update` makes no host synchronisation (``bucketize``, ``index_add_``, ``topk`` into
fixed-size tensors on the values' device), so it can run on CUDA inside a training or
evaluation loop; :meth:`quantiles` reads the counts back (one sync). :meth:`merge` of two
sketches is exact: the sketch of the union of their values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

#: Defaults: bin ratio γ (relative error < γ − 1) and how many extreme values are kept exactly.
BIN_RATIO = 1.008
TAIL = 1024
_STATE_KEYS = ("layout", "counts", "extremes", "top", "bottom")


class QuantileSketch:
    """Fixed-size, mergeable percentile summary of a stream of finite values (module docstring).

    ``lo`` / ``hi``: the magnitudes covered with relative accuracy; ``bin_ratio``: γ > 1;
    ``tail``: how many largest and smallest values are kept exactly. The size is fixed by these
    (:attr:`nbytes`), whatever the number of values.
    """

    def __init__(
        self,
        lo: float = 1e-10,
        hi: float = 1e3,
        bin_ratio: float = BIN_RATIO,
        tail: int = TAIL,
        device: torch.device | str | None = None,
    ):
        if not (0.0 < lo < hi < math.inf):
            raise ValueError(f"need 0 < lo < hi < inf, got lo={lo!r}, hi={hi!r}")
        if not (1.0 < bin_ratio < math.inf):
            raise ValueError(f"bin_ratio must be > 1, got {bin_ratio!r}")
        if isinstance(tail, bool) or not isinstance(tail, int) or tail < 1:
            raise ValueError(f"tail must be a positive int, got {tail!r}")
        self.lo, self.hi, self.bin_ratio, self.tail = float(lo), float(hi), float(bin_ratio), tail
        self.magnitude_bins = math.ceil(math.log(hi / lo) / math.log(bin_ratio))  # K
        device = torch.device("cpu") if device is None else torch.device(device)
        k = self.magnitude_bins
        self.edges = lo * bin_ratio ** torch.arange(k + 1, dtype=torch.float64, device=device)
        self.counts = torch.zeros(2 * k + 5, dtype=torch.int64, device=device)
        self.extremes = torch.tensor([math.inf, -math.inf], dtype=torch.float64, device=device)
        self.top = torch.full((tail,), -math.inf, dtype=torch.float64, device=device)
        self.bottom = torch.full((tail,), math.inf, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @property
    def center(self) -> int:
        """Index of the bin of exact zeros."""
        return self.magnitude_bins + 2

    @property
    def nbytes(self) -> int:
        """Bytes of state (counts, extremes and tails), independent of the number of values."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.counts, self.extremes, self.top, self.bottom)

    # --- accumulation ------------------------------------------------------------------------

    def update(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add ``values`` (any shape): the finite ones, or where ``valid`` is True (the
        caller then vouches that they are finite there).

        No host synchronisation: values must be on the sketch's device. The bin of x is
        ``center + sign(x)·(1 + b)`` with b = #{j : e_j ≤ |x|} = ⌊ln(|x|/lo)/ln γ⌋ + 1 clamped
        to [0, K + 1] (from the logarithm, which is cheaper than a search of the edges; a value
        within rounding of an edge may land in the next bin, still within γ − 1 of it)."""
        x = values.reshape(-1).to(torch.float64)
        if x.numel() == 0:
            return
        keep = torch.isfinite(x) if valid is None else valid.reshape(-1).to(torch.bool)
        xs = torch.where(keep, x, 0.0)
        b = xs.abs().mul_(1.0 / self.lo).log_().mul_(1.0 / math.log(self.bin_ratio))
        b = b.floor_().add_(1.0).clamp_(0.0, self.magnitude_bins + 1.0).to(torch.int64)
        index = b.add_(1).mul_(torch.sign(xs).to(torch.int64)).add_(self.center)
        self.counts.index_add_(0, index, keep.to(torch.int64))
        inf = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
        low = torch.where(keep, x, inf).amin()
        high = torch.where(keep, x, -inf).amax()
        self.extremes = torch.stack(
            [torch.minimum(self.extremes[0], low), torch.maximum(self.extremes[1], high)]
        )
        self.top = torch.cat([self.top, torch.where(keep, x, -inf)]).topk(self.tail).values
        smallest = torch.cat([self.bottom, torch.where(keep, x, inf)])
        self.bottom = smallest.topk(self.tail, largest=False).values

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Fold ``other`` in (it is unchanged): exactly the sketch of both streams. Returns self.
        Raises ``ValueError`` if the layouts (lo, hi, bin_ratio, tail) differ."""
        if self.layout() != other.layout():
            raise ValueError(
                f"cannot merge sketches with different layouts: {self.layout()} vs {other.layout()}"
            )
        o = [t.to(self.device) for t in other._tensors()]
        self.counts = self.counts + o[0]
        self.extremes = torch.stack(
            [torch.minimum(self.extremes[0], o[1][0]), torch.maximum(self.extremes[1], o[1][1])]
        )
        self.top = torch.cat([self.top, o[2]]).topk(self.tail).values
        self.bottom = torch.cat([self.bottom, o[3]]).topk(self.tail, largest=False).values
        return self

    def clone(self, device: torch.device | str | None = None) -> QuantileSketch:
        """A copy (on ``device``, default this sketch's)."""
        out = QuantileSketch(
            self.lo, self.hi, self.bin_ratio, self.tail, device=device or self.device
        )
        out.counts, out.extremes, out.top, out.bottom = (
            t.to(out.device, copy=True) for t in self._tensors()
        )
        return out

    # --- persistence -------------------------------------------------------------------------

    def layout(self) -> tuple[float, float, float, int]:
        """(lo, hi, bin_ratio, tail): what fixes the bins."""
        return (self.lo, self.hi, self.bin_ratio, self.tail)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU tensors only: ``layout`` [lo, hi, bin_ratio, tail] (float64), ``counts``,
        ``extremes`` [min, max], ``top`` (largest, descending, −inf padded), ``bottom``
        (smallest, ascending, +inf padded)."""
        return {
            "layout": torch.tensor(self.layout(), dtype=torch.float64),
            **{
                name: t.detach().to("cpu", copy=True)
                for name, t in zip(_STATE_KEYS[1:], self._tensors(), strict=True)
            },
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> QuantileSketch:
        """The sketch saved by :meth:`state_dict`. Raises ``ValueError`` on missing keys or
        tensors that do not fit the layout."""
        missing = [k for k in _STATE_KEYS if k not in sd]
        if missing:
            raise ValueError(f"sketch state lacks {missing}")
        layout = sd["layout"]
        if not isinstance(layout, torch.Tensor) or layout.shape != (4,):
            raise ValueError("sketch state 'layout' must be a tensor [lo, hi, bin_ratio, tail]")
        lo, hi, ratio, tail = layout.tolist()
        if tail != int(tail):
            raise ValueError(f"sketch state 'layout' has a fractional tail {tail!r}")
        out = cls(lo, hi, ratio, int(tail))
        for name, ref in zip(_STATE_KEYS[1:], out._tensors(), strict=True):
            t = sd[name]
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
                raise ValueError(
                    f"sketch state {name!r}: got {got}, expected {ref.dtype} {tuple(ref.shape)}"
                )
        out.counts, out.extremes, out.top, out.bottom = (
            sd[name].detach().to("cpu", copy=True) for name in _STATE_KEYS[1:]
        )
        if bool((out.counts < 0).any()):
            raise ValueError("sketch state 'counts' has negative entries")
        return out

    # --- query (reads the device) ------------------------------------------------------------

    @property
    def count(self) -> int:
        """How many values were added."""
        return int(self.counts.sum())

    @property
    def min(self) -> float:
        return float(self.extremes[0])

    @property
    def max(self) -> float:
        return float(self.extremes[1])

    def quantiles(self, levels: Sequence[float] | np.ndarray) -> np.ndarray:
        """Estimated ``numpy.quantile(values, levels)`` (linear), levels in [0, 1]; float64.
        Raises ``ValueError`` when the sketch is empty or a level is outside [0, 1]."""
        q = np.asarray(levels, dtype=np.float64).reshape(-1)
        if q.size and not bool(((q >= 0.0) & (q <= 1.0)).all()):
            raise ValueError(f"quantile levels must lie in [0, 1], got {q.tolist()}")
        counts = self.counts.cpu().numpy()
        n = int(counts.sum())
        if n == 0:
            raise ValueError("the sketch holds no values")
        r = q * (n - 1)
        below = np.floor(r).astype(np.int64)
        above = np.minimum(below + 1, n - 1)
        lower, upper = self._order_statistics(np.concatenate([below, above]), counts, n)
        return _lerp(lower, upper, r - below)

    def _order_statistics(
        self, ranks: np.ndarray, counts: np.ndarray, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Estimates of v_(i) for the 0-based ``ranks`` (both halves of the array returned as
        (first half, second half)): exact from the tails where kept, else inside the bin."""
        lo_v, hi_v = self.extremes.cpu().tolist()
        top = self.top.cpu().numpy()
        bottom = self.bottom.cpu().numpy()
        kept = min(n, self.tail)
        # bin bounds in value order (module docstring), clamped to [min, max]
        edges = self.edges.cpu().numpy()
        k = self.magnitude_bins
        mag_low = np.concatenate([[0.0], edges])  # b = 0 .. K+1
        mag_high = np.concatenate([edges, [math.inf]])
        low = np.concatenate([-mag_high[::-1], [0.0], mag_low])
        high = np.concatenate([-mag_low[::-1], [0.0], mag_high])
        assert low.size == counts.size == 2 * k + 5
        low = np.clip(low, lo_v, hi_v)
        high = np.clip(high, lo_v, hi_v)
        cum = np.cumsum(counts)
        bins = np.searchsorted(cum, ranks, side="right")  # first bin with cum > rank
        before = cum[bins] - counts[bins]
        t = (ranks - before + 0.5) / np.maximum(counts[bins], 1)
        est = low[bins] + t * (high[bins] - low[bins])
        from_top = ranks >= n - kept
        est[from_top] = top[n - 1 - ranks[from_top]]
        from_bottom = ranks < kept
        est[from_bottom] = bottom[ranks[from_bottom]]
        half = ranks.size // 2
        return est[:half], est[half:]

    def __repr__(self) -> str:
        return (
            f"QuantileSketch(lo={self.lo:g}, hi={self.hi:g}, bin_ratio={self.bin_ratio:g}, "
            f"tail={self.tail}, bins={self.counts.numel()}, device={self.device})"
        )


def _lerp(a: np.ndarray, b: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """a + frac·(b − a), computed from the nearer end as ``numpy.quantile`` does."""
    diff = b - a
    return np.where(frac >= 0.5, b - diff * (1.0 - frac), a + diff * frac)
