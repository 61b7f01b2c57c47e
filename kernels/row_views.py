"""The [B, T, V] view the torch twins read their logits through."""

from __future__ import annotations

import torch


def as_3d(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` [N, V] or [B, T, V] (last stride 1) as a detached [B, T, V] view (never a copy);
    ``name`` appears in the error for any other shape or a strided last dim."""
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, V] or [B, T, V], got shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    t = t.detach()
    return t.unsqueeze(0) if t.dim() == 2 else t
