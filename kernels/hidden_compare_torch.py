"""CPU path of the fused hidden-state comparison: torch ops over row chunks, same outputs as the
Triton kernel (:mod:`qmetrics.kernels.hidden_compare`).

Per row of reference activations x and candidate activations y [N, H], over the positions
where both are finite:

    ref_sq = Σ x²,  cand_sq = Σ y²,  dot = Σ x·y,  diff_sq = Σ (x − y)²,  max_abs_diff = max |x − y|

and ``nonfinite`` counts the positions where x or y is NaN or ±inf. Sums are formed in float64
(returned as fp32 like the kernel's); extra memory is a few [chunk, H] float64 buffers.
"""

from __future__ import annotations

import torch

# Rows per chunk: about 8 MiB of float64 per [chunk, H] buffer.
_CHUNK_ELEMENTS = 1 << 20


def hidden_compare_torch(
    ref: torch.Tensor, cand: torch.Tensor, *, chunk_rows: int | None = None
) -> dict[str, torch.Tensor]:
    """Per-row sums of ``ref``/``cand`` [N, H] in row chunks (formulas in the module docstring).

    Returns 1-D tensors of length N: fp32 ``ref_sq``, ``cand_sq``, ``dot``, ``diff_sq``,
    ``max_abs_diff`` and int32 ``nonfinite``.
    """
    n, hidden = ref.shape
    dev = ref.device
    out = {
        name: torch.empty(n, dtype=torch.float32, device=dev)
        for name in ("ref_sq", "cand_sq", "dot", "diff_sq", "max_abs_diff")
    }
    out["nonfinite"] = torch.empty(n, dtype=torch.int32, device=dev)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // hidden)
    for start in range(0, n, chunk_rows):
        sl = slice(start, min(n, start + chunk_rows))
        x = ref[sl].double()
        y = cand[sl].double()
        ok = torch.isfinite(x) & torch.isfinite(y)
        x = torch.where(ok, x, 0.0)
        y = torch.where(ok, y, 0.0)
        d = x - y
        out["ref_sq"][sl] = x.square().sum(-1)
        out["cand_sq"][sl] = y.square().sum(-1)
        out["dot"][sl] = (x * y).sum(-1)
        out["diff_sq"][sl] = d.square().sum(-1)
        out["max_abs_diff"][sl] = d.abs().amax(-1)
        out["nonfinite"][sl] = (~ok).sum(-1, dtype=torch.int32)
    return out
