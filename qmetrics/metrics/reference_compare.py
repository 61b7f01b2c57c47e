"""Functional API of the compact reference: :func:`summarize_reference_topk` turns reference
logits into the per-token top-K summary a reference store keeps, and
:func:`compare_to_reference_topk` compares candidate logits with it, giving
:class:`qmetrics.metrics.token_metrics.TokenMetrics` with the fields a summary allows.

Exact (to float rounding): ``entropy_ref``, ``entropy_quant``, ``nll_*``, ``prob_*`` (hence Δp,
PPL and its ratio), ``top1_match`` and ``topk_match`` for k ≤ K. ``kl`` and ``reverse_kl`` are
the divergences of the two distributions coarse-grained to the K stored ids plus one "rest"
bucket: lower bounds of the full KL by the data-processing inequality
(``TokenMetrics.kl_lower_bound`` is True). ``cosine`` and ``mse`` of raw logits need every
logit: they are None (absent). Formulas: :mod:`qmetrics.kernels.topk_reference_compare_torch`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qmetrics.kernels.topk_reference_compare_torch import (
    SUMMARY_FIELDS,
    reference_topk_summary_torch,
    topk_reference_compare_torch,
)
from qmetrics.metrics.functional import logit_view
from qmetrics.metrics.token_metrics import LABEL_FIELDS, TokenMetrics
from qmetrics.metrics.validation import FLOAT_DTYPES, check_labels


def summarize_reference_topk(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    top_k: int,
    *,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """The per-token top-``top_k`` summary of reference ``logits`` [..., V] (fields:
    :data:`qmetrics.kernels.topk_reference_compare_torch.SUMMARY_FIELDS`, each [N, ...] with
    N the flattened leading dims)."""
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    lead = logits.shape[:-1]
    if labels is not None:
        check_labels(labels, lead)
        labels = labels.to(device=logits.device, dtype=torch.int64).reshape(-1)
    return reference_topk_summary_torch(logit_view(logits), labels, top_k, ignore_index)


def compare_to_reference_topk(
    reference: Mapping[str, torch.Tensor],
    quant: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    top_k: int = 5,
    ignore_index: int = -100,
) -> TokenMetrics:
    """Per-token metrics of candidate logits ``quant`` [..., V] against a stored top-K summary
    ``reference`` ({field: [N, ...]}, N the flattened leading dims of ``quant``; from
    :func:`summarize_reference_topk`). ``top_k`` (the k of ``topk_match``) must be ≤ the
    summary's K. Labels out of [0, V) that are not ``ignore_index`` raise ``ValueError``.
    Returns TokenMetrics shaped like the leading dims, ``cosine``/``mse`` None,
    ``kl_lower_bound`` True."""
    missing = [f for f in SUMMARY_FIELDS if f not in reference]
    if missing:
        raise ValueError(f"reference summary lacks {missing}")
    if quant.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quant logits must be float32, float16 or bfloat16, got {quant.dtype}")
    lead = quant.shape[:-1]
    rows = lead.numel()
    if reference["topk_ids"].shape[0] != rows:
        raise ValueError(
            f"the reference summary has {reference['topk_ids'].shape[0]} rows, the candidate "
            f"logits {rows} (shape {tuple(quant.shape)})"
        )
    stored_k = reference["topk_ids"].shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= stored_k:
        raise ValueError(f"top_k must be an int in [1, K={stored_k}] of the store, got {top_k!r}")
    vocab = quant.shape[-1]
    flat_labels = None
    if labels is not None:
        check_labels(labels, lead)
        flat_labels = labels.to(device=quant.device, dtype=torch.int64).reshape(-1)
        bad = (flat_labels != ignore_index) & ((flat_labels < 0) | (flat_labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels out of range: {int(bad.sum())} outside [0, V={vocab})")
    ref = {k: reference[k].to(quant.device) for k in SUMMARY_FIELDS}
    raw = topk_reference_compare_torch(ref, logit_view(quant), flat_labels, top_k, ignore_index)
    out = {name: t.reshape(lead) for name, t in raw.items()}
    if labels is None:
        for name in LABEL_FIELDS:
            out.pop(name, None)
    return TokenMetrics(top_k=top_k, cosine=None, mse=None, kl_lower_bound=True, **out)
