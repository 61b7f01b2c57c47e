"""Functional API: :func:`output_stats`, per-token statistics of one logit tensor in one pass.

Per token, with P = softmax(logits), p1 ≥ p2 its two largest probabilities:

- ``entropy``  H(P) = −Σ p log p (nats)
- ``max_prob`` p1 (the model's confidence)
- ``margin``   p1 − p2 (0 on a tie for the top)
- ``lse``      log Σ exp(logits)
- ``nll``      −log p[label] (with labels; NaN where the label is ``ignore_index`` or out of
  range)
- ``finite``   False when the token's logits hold a NaN or +inf, or no finite entry: its other
  fields are NaN

A logit of −inf is a masked token (probability 0, as in :func:`qmetrics.compare_logits`:
logits after top-k or vocabulary masks are finite rows); a label on one has NLL +inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmetrics.kernels.output_stats_torch import OUTPUTS, output_stats_torch
from qmetrics.metrics.functional import Backend, logit_view, resolve_backend
from qmetrics.metrics.validation import FLOAT_DTYPES, check_labels


@dataclass(frozen=True)
class OutputStats:
    """Per-token output statistics, each shaped like the logits' leading dims (module
    docstring); ``nll`` is None without labels."""

    entropy: torch.Tensor
    max_prob: torch.Tensor
    margin: torch.Tensor
    lse: torch.Tensor
    finite: torch.Tensor
    nll: torch.Tensor | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        out = {name: getattr(self, name) for name in ("entropy", "max_prob", "margin", "lse")}
        out["finite"] = self.finite
        if self.nll is not None:
            out["nll"] = self.nll
        return out


def check_logits(logits: object) -> None:
    """Check ``logits`` is a float32/float16/bfloat16 tensor [..., V] with V ≥ 1 and tokens."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension, got a scalar")
    if logits.shape[-1] == 0:
        raise ValueError(f"empty vocabulary: logits have shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"empty input: logits have shape {tuple(logits.shape)} (no tokens)")


def checked_labels(labels: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    """``labels`` (shaped like the logits' leading dims, integer) as N contiguous int64 entries
    on the logits' device, or None; a shape or dtype mismatch raises ``ValueError``."""
    if labels is None:
        return None
    check_labels(labels, logits.shape[:-1])
    return labels.to(device=logits.device, dtype=torch.int64).reshape(-1).contiguous()


def output_stats_rows(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    backend: Backend = "auto",
    compile: bool | None = None,
) -> torch.Tensor:
    """The raw [6, N] fp32 result (rows ``entropy, max_prob, margin, lse, nll, finite``; N the
    number of tokens, ``finite`` 1.0/0.0, ``nll`` NaN without labels) of :func:`output_stats`,
    for callers that keep the statistics stacked (:class:`qmetrics.metrics.output_monitor.
    OutputMonitor`). Same checks, views and no host synchronisation."""
    check_logits(logits)
    labels = checked_labels(labels, logits)
    which = resolve_backend(backend, logits.device)
    rows = logit_view(logits)
    if which == "triton":
        from qmetrics.kernels.output_stats import output_stats_triton

        return output_stats_triton(rows, labels, ignore_index=ignore_index)
    return output_stats_torch(rows, labels, ignore_index=ignore_index, compile=compile)


def output_stats(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    backend: Backend = "auto",
    compile: bool | None = None,
) -> OutputStats:
    """Entropy, max probability, top-2 margin, log-sum-exp and (with ``labels``) NLL of every
    token of ``logits`` [..., V], in one pass over V (module docstring for the formulas).

    The logits are read in place (any [..., V] view with unit stride along V, as in
    :func:`qmetrics.compare_logits`) and the call makes no host synchronisation (labels on
    the logits' device): on CUDA it only enqueues work. ``backend``: ``"auto"`` (Triton on
    CUDA, torch elsewhere), ``"triton"`` or ``"torch"``. ``compile`` (torch backend on the
    CPU): the ``torch.compile``d path (True), the eager one (False), or by size (None: see
    :mod:`qmetrics.kernels.output_stats_torch`). Bad input raises ``ValueError``.
    """
    raw = output_stats_rows(
        logits, labels, ignore_index=ignore_index, backend=backend, compile=compile
    )
    lead = logits.shape[:-1]
    fields = {name: raw[k].view(lead) for k, name in enumerate(OUTPUTS)}
    finite = fields.pop("finite") > 0
    nll = fields.pop("nll")
    nll = nll if labels is not None else None
    return OutputStats(finite=finite, nll=nll, **fields)
