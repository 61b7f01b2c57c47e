"""Fused hidden-state comparison: one read of two [N, H] activation tensors -> per-row sums.

For each row, with reference activations x and candidate activations y, over the positions i
where both x_i and y_i are finite (the others are counted, not summed):

    ref_sq = Σ x_i²      cand_sq = Σ y_i²      dot = Σ x_i y_i
    diff_sq = Σ (x_i − y_i)²      max_abs_diff = max |x_i − y_i|  (0 for a row with none)
    nonfinite = #{i : x_i or y_i is NaN or ±inf}

Every layer statistic of :mod:`qmetrics.metrics.layer_stats` is built from these: MSE = Σdiff_sq /
#elements, relative error = √(Σdiff_sq / Σref_sq), SNR = 10·log10(Σref_sq / Σdiff_sq) dB, per-row
cosine = dot / √(ref_sq · cand_sq). diff_sq is summed from the differences themselves (not as
ref_sq + cand_sq − 2·dot), so it stays exact when the rows agree to many digits, and an
identical pair gives exactly 0.

One program handles one row, walking H in tiles of BLOCK_H; each lane keeps fp32 partial sums
that are reduced across lanes once at the end. Memory traffic is one read of each tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Order of the per-row outputs in the [NUM_OUTPUTS, N] fp32 result.
OUTPUTS = ("ref_sq", "cand_sq", "dot", "diff_sq", "max_abs_diff", "nonfinite")
NUM_OUTPUTS = len(OUTPUTS)

_POS_INF = tl.constexpr(float("inf"))


@triton.jit
def _hidden_compare_kernel(
    ref_ptr,  # [N, H] reference activations (fp32/fp16/bf16), unit stride along H
    ref_stride,  # elements between consecutive rows of ref
    cand_ptr,  # [N, H] candidate activations, same dtype rules
    cand_stride,  # elements between consecutive rows of cand
    out_ptr,  # [NUM_OUTPUTS, N] fp32 per-row outputs (order: OUTPUTS)
    N,  # rows
    H,  # row length (hidden size)
    BLOCK_H: tl.constexpr,  # tile width along H
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)  # row offsets in int64: N·H may exceed 2^31
    ref_row = ref_ptr + row64 * ref_stride
    cand_row = cand_ptr + row64 * cand_stride
    lanes = tl.arange(0, BLOCK_H)
    f32 = tl.float32
    xx = tl.zeros([BLOCK_H], f32)
    yy = tl.zeros([BLOCK_H], f32)
    xy = tl.zeros([BLOCK_H], f32)
    dd = tl.zeros([BLOCK_H], f32)
    mx = tl.zeros([BLOCK_H], f32)
    bad = tl.zeros([BLOCK_H], f32)
    for start in range(0, H, BLOCK_H):
        offs = start + lanes
        mask = offs < H
        x = tl.load(ref_row + offs, mask=mask, other=0.0).to(f32)
        y = tl.load(cand_row + offs, mask=mask, other=0.0).to(f32)
        # finite: not NaN (x == x) and not ±inf
        ok = (x == x) & (tl.abs(x) < _POS_INF) & (y == y) & (tl.abs(y) < _POS_INF)
        bad += tl.where(mask & ~ok, 1.0, 0.0)
        x = tl.where(ok, x, 0.0)
        y = tl.where(ok, y, 0.0)
        d = x - y
        xx += x * x
        yy += y * y
        xy += x * y
        dd += d * d
        mx = tl.maximum(mx, tl.abs(d))
    o = out_ptr + row
    tl.store(o + 0 * N, tl.sum(xx, axis=0))
    tl.store(o + 1 * N, tl.sum(yy, axis=0))
    tl.store(o + 2 * N, tl.sum(xy, axis=0))
    tl.store(o + 3 * N, tl.sum(dd, axis=0))
    tl.store(o + 4 * N, tl.max(mx, axis=0))
    tl.store(o + 5 * N, tl.sum(bad, axis=0))


def hidden_compare_triton(
    ref: torch.Tensor, cand: torch.Tensor, *, block_h: int | None = None
) -> dict[str, torch.Tensor]:
    """Launch the fused kernel on ``ref``/``cand`` [N, H] (unit stride along H).

    Returns 1-D tensors of length N keyed by :data:`OUTPUTS`: fp32 sums and maximum, int32
    ``nonfinite``. ``block_h`` overrides the tile width (tests use it to exercise several
    tiles on small rows).
    """
    n, hidden = ref.shape
    if ref.stride(1) != 1 or cand.stride(1) != 1:
        raise ValueError("hidden-state rows must be contiguous along the hidden dimension")
    dev = ref.device
    if block_h is None:
        block_h = min(triton.next_power_of_2(hidden), 4096 if dev.type == "cuda" else 8192)
    out = torch.empty(NUM_OUTPUTS, n, dtype=torch.float32, device=dev)
    if n:
        _hidden_compare_kernel[(n,)](
            ref, ref.stride(0), cand, cand.stride(0), out, n, hidden,
            BLOCK_H=block_h, num_warps=8 if block_h >= 2048 else 4,
        )  # fmt: skip
    result = {name: out[i] for i, name in enumerate(OUTPUTS[:-1])}
    result["nonfinite"] = out[-1].to(torch.int32)
    return result
