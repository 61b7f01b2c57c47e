"""Functional API: :func:`compare_logits`, one fused pass over two logit tensors."""

from __future__ import annotations

import os
from typing import Literal

import torch

from qmetrics.kernels.logit_compare_torch import logit_compare_torch
from qmetrics.metrics.token_metrics import LABEL_FIELDS, TokenMetrics
from qmetrics.metrics.validation import (
    check_label_values,
    check_labels,
    check_logit_pair,
    check_top_k,
    out_of_range_labels,
)

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> None:
    """Check that ``backend`` is one of :data:`BACKENDS`; raises ``ValueError`` otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the implementation: Triton on CUDA tensors (or under ``TRITON_INTERPRET=1`` when
    asked for explicitly), torch otherwise."""
    check_backend(backend)
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
    """View ``t`` as [N, V] with a contiguous last dim, copying only when no such view exists.
    For the hidden-state kernels (2-D only); logits go through :func:`logit_view`."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


#: Backends that read [B, T, V] views with arbitrary leading strides. For any other, a 3-D view
#: whose leading dims do not collapse into one row stride is copied to [N, V].
BACKENDS_TAKING_3D: frozenset[str] = frozenset({"torch", "triton"})


def logit_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., V] as the [N, V] or [B, T, V] tensor the logit backends read: last stride 1,
    leading strides arbitrary. A view whenever one exists — slices along the leading dims
    (``x[:, :-1]``, ``x[:, 1:]``), transposed batch/sequence dims, any row strides, misaligned
    bases (``x[..., 1:]``). A copy is made only when the last stride is not 1 (and V > 1), or
    when more than two leading dims cannot be collapsed by a view into at most two.
    """
    vocab = t.shape[-1]
    if t.stride(-1) != 1 and vocab > 1:
        t = t.contiguous()
    elif t.stride(-1) != 1:  # the stride of a size-1 dim is never used: restride, no copy
        t = t.as_strided(t.shape, (*t.stride()[:-1], 1))
    if t.dim() == 1:
        return t.view(1, vocab)
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, vocab)
    except RuntimeError:
        pass
    if t.dim() == 3:
        return t
    lead = t.shape[:-1]
    for split in range(1, len(lead)):  # [prod(lead[:split]), prod(lead[split:]), V]
        try:
            return t.view(lead[:split].numel(), lead[split:].numel(), vocab)
        except RuntimeError:
            continue
    return t.reshape(-1, vocab)  # no view exists: a copy


def _backend_input(t: torch.Tensor, backend: str) -> torch.Tensor:
    """:func:`logit_view`, flattened to [N, V] (by a copy) for backends without 3-D support."""
    t = logit_view(t)
    if t.dim() == 3 and backend not in BACKENDS_TAKING_3D:
        t = t.reshape(-1, t.shape[-1])
    return t


def compare_logits(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    top_k: int = 5,
    ignore_index: int = -100,
    backend: Backend = "auto",
    validate: bool = False,
) -> TokenMetrics:
    """Compare reference and quantized logits [..., V] token by token in one pass.

    Returns a :class:`TokenMetrics` whose fields are shaped like the leading dims: KL(P‖Q),
    KL(Q‖P), both entropies, cosine and MSE of the raw logits, top-1 and top-k agreement, and
    with ``labels`` the NLL and probability of the label under each model. The formulas are in
    :mod:`qmetrics.metrics.token_metrics`.

    The logits are read in place: any [..., V] tensor with unit stride along V is passed to
    the backend as a view (see :func:`logit_view` for the one case that copies).

    No host synchronisation (with labels on the logits' device): the call only enqueues work,
    so it fits a training step on CUDA. A label that is neither ``ignore_index`` nor in [0, V)
    is never read out of bounds: its token gets NaN ``nll_*`` / ``prob_*`` and stays ``scored``
    (so :class:`qmetrics.LogitStats` counts it and raises in ``compute()``).
    ``validate=True`` checks the labels eagerly instead and raises ``ValueError`` naming the
    count and the first bad label; it reads the result on the host, a sync on CUDA, hence off
    by default (and the same NaN behaviour on every device): use it interactively.
    """
    check_logit_pair(ref, quant)
    vocab = ref.shape[-1]
    lead = ref.shape[:-1]
    check_top_k(top_k, vocab)
    bad = None
    if labels is not None:
        check_labels(labels, lead)
        if validate:
            check_label_values(labels, vocab, ignore_index)
        # contiguous int64 [N]: reshape(-1) of a strided label tensor may be a strided view
        labels = labels.to(device=ref.device, dtype=torch.int64).reshape(-1).contiguous()
        # out-of-range labels go to the backend as ignore_index: never read, NaN below
        bad = out_of_range_labels(labels, vocab, ignore_index)
        labels = torch.where(bad, ignore_index, labels)
    which = resolve_backend(backend, ref.device)

    ref_in, quant_in = _backend_input(ref, which), _backend_input(quant, which)
    # one collapsed to [N, V], the other did not: split the [N, V] one likewise (a view)
    if ref_in.dim() < quant_in.dim():
        ref_in = ref_in.view(quant_in.shape)
    elif quant_in.dim() < ref_in.dim():
        quant_in = quant_in.view(ref_in.shape)
    if which == "triton":
        from qmetrics.kernels.logit_compare import logit_compare_triton

        raw = logit_compare_triton(ref_in, quant_in, labels, top_k=top_k, ignore_index=ignore_index)
    else:
        raw = logit_compare_torch(ref_in, quant_in, labels, top_k=top_k, ignore_index=ignore_index)

    if bad is not None:
        for name in LABEL_FIELDS:
            raw[name] = torch.where(bad, torch.nan, raw[name])
        raw["scored"] = raw["scored"] | bad
    out = {name: t.reshape(lead) for name, t in raw.items()}
    if labels is None:
        for name in LABEL_FIELDS:
            out.pop(name, None)
    return TokenMetrics(top_k=top_k, **out)
