"""Functional API: :func:`compare_logits`, one fused pass over two logit tensors."""

from __future__ import annotations

import os
from typing import Literal

import torch

from qmetrics.kernels.logit_compare_torch import logit_compare_torch
from qmetrics.metrics.token_metrics import LABEL_FIELDS, TokenMetrics
from qmetrics.metrics.validation import check_labels, check_logit_pair, check_top_k

Backend = Literal["auto", "triton", "torch"]


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the implementation: Triton on CUDA tensors (or under ``TRITON_INTERPRET=1`` when
    asked for explicitly), torch otherwise."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _has_triton() else "torch"
    if backend == "triton":
        if not _has_triton():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not _triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                "to run the kernel on CPU tensors"
            )
    return backend


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as [N, V] with a contiguous last dim, copying only when no such view exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def compare_logits(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    top_k: int = 5,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> TokenMetrics:
    """Compare reference and quantized logits [..., V] token by token in one pass.

    Returns a :class:`TokenMetrics` whose fields are shaped like the leading dims: KL(P‖Q),
    KL(Q‖P), both entropies, cosine and MSE of the raw logits, top-1 and top-k agreement, and
    with ``labels`` the NLL and probability of the label under each model. The formulas are in
    :mod:`qmetrics.metrics.token_metrics`.
    """
    check_logit_pair(ref, quant)
    vocab = ref.shape[-1]
    lead = ref.shape[:-1]
    check_top_k(top_k, vocab)
    if labels is not None:
        check_labels(labels, lead, vocab, ignore_index)
        labels = labels.to(device=ref.device, dtype=torch.int64).reshape(-1)
    which = resolve_backend(backend, ref.device)

    ref2, quant2 = as_rows(ref), as_rows(quant)
    if which == "triton":
        from qmetrics.kernels.logit_compare import logit_compare_triton

        raw = logit_compare_triton(ref2, quant2, labels, top_k=top_k, ignore_index=ignore_index)
    else:
        raw = logit_compare_torch(ref2, quant2, labels, top_k=top_k, ignore_index=ignore_index)

    out = {name: t.reshape(lead) for name, t in raw.items()}
    if labels is None:
        for name in LABEL_FIELDS:
            out.pop(name, None)
    return TokenMetrics(top_k=top_k, **out)
