"""Input checks shared by the functional API and the accumulators: each raises ``ValueError``
naming what is wrong and the sizes involved."""

from __future__ import annotations

import torch

from qmetrics.kernels.limits import MAX_TOP_K

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_logit_pair(ref: torch.Tensor, quant: torch.Tensor) -> None:
    """Check that ``ref`` and ``quant`` are float tensors of one shape [..., V] with V ≥ 1."""
    for name, t in (("ref", ref), ("quant", quant)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} logits must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} logits must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} logits must have a vocabulary dimension, got a scalar")
    if ref.shape[-1] != quant.shape[-1]:
        raise ValueError(
            f"vocab size mismatch: ref has V={ref.shape[-1]}, quant has V={quant.shape[-1]}"
        )
    if ref.shape != quant.shape:
        raise ValueError(f"shape mismatch: ref {tuple(ref.shape)} vs quant {tuple(quant.shape)}")
    if ref.device != quant.device:
        raise ValueError(f"device mismatch: ref on {ref.device}, quant on {quant.device}")
    if ref.shape[-1] == 0:
        raise ValueError(f"empty vocabulary: logits have shape {tuple(ref.shape)}")
    if ref.numel() == 0:
        raise ValueError(f"empty input: logits have shape {tuple(ref.shape)} (no tokens)")


def check_top_k(top_k: int, vocab_size: int) -> None:
    """Check 1 ≤ top_k ≤ min(V, MAX_TOP_K)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k < 1 or top_k > vocab_size:
        raise ValueError(f"top_k must be in [1, V={vocab_size}], got {top_k}")
    if top_k > MAX_TOP_K:
        raise ValueError(f"top_k must be at most {MAX_TOP_K}, got {top_k}")


def check_labels(
    labels: object, lead_shape: torch.Size, device: torch.device | None = None
) -> None:
    """Check labels are an integer tensor shaped like the leading dims (and, given ``device``,
    on that device). Metadata only: no host synchronisation (the values are checked by
    :func:`check_label_values`, or counted on the device with :func:`out_of_range_labels`)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the logits' leading "
            f"shape {tuple(lead_shape)}"
        )
    if device is not None and labels.device != device:
        raise ValueError(f"device mismatch: labels on {labels.device}, logits on {device}")


def out_of_range_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Bool mask, on the labels' device and shaped like them, of the labels that are neither
    ``ignore_index`` nor in [0, V). Elementwise ops only: no host synchronisation."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))


def bad_labels_error(count: int, first: int, vocab_size: int, ignore_index: int) -> ValueError:
    """The error for ``count`` out-of-range labels, ``first`` being the first one seen."""
    return ValueError(
        f"labels out of range: {count} label(s) outside [0, V={vocab_size}) "
        f"and not ignore_index={ignore_index} (e.g. {first})"
    )


def check_label_values(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise :func:`bad_labels_error` when a label is neither ``ignore_index`` nor in [0, V).
    Eager: reads the result on the host, so it synchronises with the labels' device."""
    bad = out_of_range_labels(labels, vocab_size, ignore_index)
    if bool(bad.any()):
        first = int(labels[bad].reshape(-1)[0].item())
        raise bad_labels_error(int(bad.sum()), first, vocab_size, ignore_index)
