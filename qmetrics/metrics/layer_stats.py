"""Streaming per-layer error statistics of a candidate's activations against the reference's.

:func:`hidden_row_sums` reduces a pair of activation tensors [..., H] to per-row sums in one fused
pass (:mod:`qmetrics.kernels.hidden_compare` on CUDA, :mod:`qmetrics.kernels.hidden_compare_torch`
elsewhere). :class:`LayerStats` folds them, batch after batch, into float64 totals and returns a
:class:`LayerErrors`.

Rows. A row (one token's activation vector) with a NaN or ±inf in either tensor is
*non-finite*: it is counted (``nonfinite_rows``, and its non-finite entries in
``nonfinite_values``) and enters no statistic. Every other row is *scored*. Over the scored
rows r, with x the reference and y the candidate activations, Δ = x − y, and E the number of
scored elements (Σ_r H):

    MSE            = ΣΣ Δ² / E
    relative error = ‖Δ‖ / ‖x‖ = √(ΣΣ Δ² / ΣΣ x²)          (0 when Δ = 0, +inf when x = 0 ≠ Δ)
    SNR (dB)       = 10·log10(ΣΣ x² / ΣΣ Δ²)               (+inf when Δ = 0, −inf when x = 0 ≠ Δ)
    cosine         = mean_r  Σ x·y / √(Σ x² · Σ y²)        (1 when both rows are 0, 0 when one is)
    max abs error  = max_r max |Δ|

State: counts (int64), the four sums and the maximum (float64), and the per-row cosine as
(n, mean, M2) merged with Chan et al.'s update (:func:`qmetrics.metrics.estimate.chan_merge`) —
for parts a, b with n = n_a + n_b and δ = mean_b − mean_a: mean = mean_a + δ·n_b/n,
M2 = M2_a + M2_b + δ²·n_a·n_b/n — which gives the cosine's standard error s/√n,
s² = M2/(n − 1). Sums add and maxima take the max, so any split
of the data into batches (or accumulators, via :meth:`LayerStats.merge`) gives the same state up
to float64 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qmetrics.metrics.estimate import Estimate, chan_merge
from qmetrics.metrics.functional import Backend, as_rows, check_backend, resolve_backend
from qmetrics.metrics.json_values import json_float
from qmetrics.metrics.validation import FLOAT_DTYPES

SUM_KEYS = ("ref_sq", "cand_sq", "dot", "diff_sq")
_COUNTS = ("rows", "elements", "nonfinite_rows", "nonfinite_values")
_FLOATS = (*SUM_KEYS, "max_abs_diff", "cos_mean", "cos_m2")
STATE_VERSION = 1


def check_hidden_pair(ref: torch.Tensor, cand: torch.Tensor) -> None:
    """Check that ``ref`` and ``cand`` are float tensors of one shape [..., H], H ≥ 1, on one
    device; raises ``ValueError`` naming the problem and the sizes."""
    for name, t in (("reference", ref), ("candidate", cand)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} activations must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} activations must be float32, float16 or bfloat16, got {t.dtype}"
            )
        if t.dim() < 1 or t.shape[-1] == 0:
            raise ValueError(f"{name} activations need a non-empty last dim, got {tuple(t.shape)}")
    if ref.shape != cand.shape:
        raise ValueError(
            f"shape mismatch: reference {tuple(ref.shape)} vs candidate {tuple(cand.shape)}"
        )
    if ref.device != cand.device:
        raise ValueError(f"device mismatch: reference on {ref.device}, candidate on {cand.device}")


def hidden_row_sums(
    ref: torch.Tensor, cand: torch.Tensor, *, backend: Backend = "auto"
) -> dict[str, torch.Tensor]:
    """Per-row sums of activations ``ref``/``cand`` [..., H], flattened to N rows.

    Returns 1-D tensors of length N: ``ref_sq`` = Σx², ``cand_sq`` = Σy², ``dot`` = Σxy,
    ``diff_sq`` = Σ(x−y)², ``max_abs_diff`` = max|x−y| (fp32, over the positions where both
    are finite) and ``nonfinite`` (int32, positions where either is not). ``backend``: "auto"
    (Triton on CUDA), "triton" or "torch", as in :func:`qmetrics.compare_logits`.
    """
    check_hidden_pair(ref, cand)
    which = resolve_backend(backend, ref.device)
    ref2, cand2 = as_rows(ref), as_rows(cand)
    if which == "triton":
        from qmetrics.kernels.hidden_compare import hidden_compare_triton

        return hidden_compare_triton(ref2, cand2)
    from qmetrics.kernels.hidden_compare_torch import hidden_compare_torch

    return hidden_compare_torch(ref2, cand2)


@dataclass(frozen=True)
class LayerErrors:
    """Error statistics of one layer's output over every scored row (formulas: module
    docstring). Float fields are NaN when no row was scored."""

    tokens: int
    elements: int
    nonfinite_rows: int
    nonfinite_values: int
    mse: float
    rel_error: float
    cosine: Estimate
    snr_db: float
    max_abs_error: float
    ref_rms: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: NaN → None, ±inf → "inf" / "-inf" (as :class:`LogitStatsResult`)."""
        return {
            "tokens": self.tokens,
            "elements": self.elements,
            "nonfinite_rows": self.nonfinite_rows,
            "nonfinite_values": self.nonfinite_values,
            "mse": json_float(self.mse),
            "rel_error": json_float(self.rel_error),
            "cosine": self.cosine.to_dict(),
            "snr_db": json_float(self.snr_db),
            "max_abs_error": json_float(self.max_abs_error),
            "ref_rms": json_float(self.ref_rms),
        }


def _empty_state() -> dict[str, torch.Tensor]:
    state = {k: torch.zeros((), dtype=torch.int64) for k in _COUNTS}
    state.update({k: torch.zeros((), dtype=torch.float64) for k in _FLOATS})
    return state


def _combine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state of the union of the rows behind ``a`` and ``b``."""
    out = {k: a[k] + b[k] for k in (*_COUNTS, *SUM_KEYS)}
    out["max_abs_diff"] = torch.maximum(a["max_abs_diff"], b["max_abs_diff"])
    merged = chan_merge(
        a["rows"], a["cos_mean"], a["cos_m2"], b["rows"], b["cos_mean"], b["cos_m2"]
    )
    out["cos_mean"], out["cos_m2"] = merged.mean, merged.m2
    return out


def row_cosine(sums: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-row cosine dot/√(ref_sq·cand_sq) in float64: 1 when both rows are 0, 0 when one is,
    clamped to [−1, 1]."""
    xx, yy, xy = (sums[k].double() for k in ("ref_sq", "cand_sq", "dot"))
    denom = (xx * yy).sqrt()
    cos = torch.where(denom > 0, xy / denom.clamp_min(1e-300), 0.0)
    cos = torch.where((xx == 0) & (yy == 0), 1.0, cos)
    return cos.clamp(-1.0, 1.0)


def _batch_state(sums: Mapping[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """The state of one batch of per-row sums (reduced on their device, then moved to CPU)."""
    bad = sums["nonfinite"] > 0
    ok = ~bad
    n = int(ok.sum())
    state = _empty_state()
    state["rows"] += n
    state["elements"] += n * hidden
    state["nonfinite_rows"] += int(bad.sum())
    state["nonfinite_values"] += int(sums["nonfinite"].sum(dtype=torch.int64))
    if n:
        for k in SUM_KEYS:
            state[k] += sums[k][ok].double().sum().cpu()
        state["max_abs_diff"] = sums["max_abs_diff"][ok].double().max().cpu()
        cos = row_cosine({k: sums[k][ok] for k in ("ref_sq", "cand_sq", "dot")})
        mean = cos.mean()
        state["cos_mean"] = mean.cpu()
        state["cos_m2"] = (cos - mean).square().sum().cpu()
    return state


class LayerStats:
    """Streaming accumulator of one layer's activation error (formulas: module docstring).

    ``update(ref, cand)`` compares one batch of activations [..., H]; ``compute()`` returns a
    :class:`LayerErrors`. The state is a handful of CPU scalars: no activation is kept.
    """

    def __init__(self, backend: Backend = "auto"):
        check_backend(backend)
        self.backend: Backend = backend
        self._state = _empty_state()

    @property
    def tokens_seen(self) -> int:
        """Rows seen so far (scored + non-finite)."""
        return int(self._state["rows"]) + int(self._state["nonfinite_rows"])

    def update(self, ref: torch.Tensor, cand: torch.Tensor) -> None:
        """Compare one batch of reference / candidate activations [..., H] and fold it in."""
        self.update_sums(hidden_row_sums(ref, cand, backend=self.backend), ref.shape[-1])

    def update_sums(self, sums: Mapping[str, torch.Tensor], hidden: int) -> None:
        """Fold in precomputed per-row sums (from :func:`hidden_row_sums`) of rows of length
        ``hidden``."""
        self._state = _combine(self._state, _batch_state(sums, hidden))

    def reset(self) -> None:
        """Drop all data."""
        self._state = _empty_state()

    def merge(self, other: LayerStats) -> LayerStats:
        """Fold ``other``'s data into this accumulator (``other`` unchanged); returns ``self``."""
        if not isinstance(other, LayerStats):
            raise ValueError(f"can only merge a LayerStats, got {type(other).__name__}")
        self._state = _combine(self._state, other._state)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state as a flat dict of 0-d CPU tensors (``version`` first); saves with
        ``safetensors`` or ``torch.save``."""
        sd = {"version": torch.tensor(STATE_VERSION, dtype=torch.int64)}
        sd.update({k: v.clone() for k, v in self._state.items()})
        return sd

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with ``sd`` (from :meth:`state_dict`). Raises ``ValueError`` on a
        missing key, a wrong dtype or shape, or another version."""
        missing = [k for k in ("version", *_COUNTS, *_FLOATS) if k not in sd]
        if missing:
            raise ValueError(f"state dict lacks {missing}")
        if int(sd["version"]) != STATE_VERSION:
            raise ValueError(f"state dict version {int(sd['version'])}, expected {STATE_VERSION}")
        state = {}
        for k, dtype in [(k, torch.int64) for k in _COUNTS] + [(k, torch.float64) for k in _FLOATS]:
            v = sd[k]
            if not isinstance(v, torch.Tensor) or v.dtype != dtype or v.shape != ():
                raise ValueError(f"state entry {k!r} must be a 0-d {dtype} tensor, got {v!r}")
            state[k] = v.detach().cpu().clone()
        self._state = state

    def compute(self) -> LayerErrors:
        """The statistics of the scored rows so far (NaN floats when there is none)."""
        st = {k: v.item() for k, v in self._state.items()}
        n, elements = int(st["rows"]), int(st["elements"])
        ref_sq, diff_sq = st["ref_sq"], st["diff_sq"]
        nan = math.nan
        if n == 0:
            mse = rel = snr = max_abs = ref_rms = nan
            cosine = Estimate(nan, nan)
        else:
            mse = diff_sq / elements
            ref_rms = math.sqrt(ref_sq / elements)
            max_abs = st["max_abs_diff"]
            if diff_sq == 0:
                rel, snr = 0.0, math.inf
            elif ref_sq == 0:
                rel, snr = math.inf, -math.inf
            else:
                rel = math.sqrt(diff_sq / ref_sq)
                snr = 10.0 * math.log10(ref_sq / diff_sq)
            se = math.sqrt(st["cos_m2"] / (n - 1) / n) if n > 1 else nan
            cosine = Estimate(st["cos_mean"], se)
        return LayerErrors(
            tokens=n,
            elements=elements,
            nonfinite_rows=int(st["nonfinite_rows"]),
            nonfinite_values=int(st["nonfinite_values"]),
            mse=mse,
            rel_error=rel,
            cosine=cosine,
            snr_db=snr,
            max_abs_error=max_abs,
            ref_rms=ref_rms,
        )

    def __repr__(self) -> str:
        return (
            f"LayerStats(backend={self.backend!r}, rows={int(self._state['rows'])}, "
            f"nonfinite_rows={int(self._state['nonfinite_rows'])})"
        )
