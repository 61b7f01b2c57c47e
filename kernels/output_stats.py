"""Per-token output statistics of one logit tensor in one read: entropy, max probability, the
margin between the top two probabilities, log-sum-exp and (with labels) the NLL.

One program per row walks V in tiles of BLOCK_V with an online log-sum-exp. With x the row,
c the running maximum m1 (the exp anchor; −inf entries and padding lanes are left out), the
running state is

    s = Σ exp(x − c)     h = Σ exp(x − c)·(x − c)     m1 ≥ m2: the two largest entries
                                                      (with multiplicity: m2 = m1 on a tie)

and when a tile raises the maximum from c to c', with α = exp(c − c'):
s ← α·s, h ← α·h + (α·s)·(c − c'). At the end (formulas as in
:mod:`qmetrics.kernels.output_stats_torch`): lse = m1 + log s, entropy = log s − h/s,
max_prob = 1/s, margin = −expm1(m2 − m1)/s, nll = (m1 − x[label]) + log s.

An entry of −inf is a masked token (probability 0, as in :func:`qmetrics.compare_logits`); a
label on one gets NLL +inf. Entries that are NaN or +inf are counted; a row with any, or with no
finite entry, is non-finite (``finite`` 0, NaN outputs). A label equal to ``ignore_index``, or
outside [0, V), gets a NaN NLL and is never read. The input is read in place through its batch
and sequence strides ([N, V] or [B, T, V], unit stride along V): no copy, one read of the
logits, only [6, N] fp32 written. No splits of V across programs: a decode step's few rows
each take one program (a 128k-entry row is ~256 KB, microseconds on one SM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qmetrics.kernels.output_stats_torch import OUTPUTS

NUM_OUTPUTS = len(OUTPUTS)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # the lowest finite fp32 number


@triton.jit
def _neg_expm1(z):
    """1 − exp(z) for z ≤ 0 in fp32, without cancellation for small |z| (series for |z| < 1/64:
    −z(1 + z/2 + z²/6), truncation < 2e-9 relative)."""
    series = -z * (1.0 + z * (0.5 + z * (1.0 / 6.0)))
    return tl.where(tl.abs(z) < 0.015625, series, 1.0 - tl.exp(z))


@triton.jit
def _output_stats_kernel(
    x_ptr,  # [B, T, V] logits (fp32/fp16/bf16), unit stride along V
    x_sb,  # elements between consecutive batch rows of x
    x_st,  # elements between consecutive positions of x
    label_ptr,  # [B·T] int64 labels (read only when HAS_LABELS)
    out_ptr,  # [6, B·T] fp32 out: entropy, max_prob, margin, lse, nll, finite
    N,  # rows: B·T
    T,  # positions per batch row
    V,  # vocabulary size
    ignore_index,  # label value that is not scored
    HAS_LABELS: tl.constexpr,  # whether label_ptr is read
    BLOCK_V: tl.constexpr,  # tile width along V
):
    row = tl.program_id(0).to(tl.int64)  # int64 before any stride product
    x_row = x_ptr + (row // T) * x_sb + (row % T) * x_st
    lanes = tl.arange(0, BLOCK_V)
    m1 = tl.full([], _NEG_INF, tl.float32)  # largest entry so far (the anchor when finite)
    m2 = tl.full([], _NEG_INF, tl.float32)  # second largest, with multiplicity
    s = tl.zeros([], tl.float32)  # Σ exp(x − anchor)
    h = tl.zeros([], tl.float32)  # Σ exp(x − anchor)·(x − anchor)
    n_bad = tl.zeros([], tl.int32)  # NaN and +inf entries
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        ok = x < _POS_INF  # False for NaN and +inf; −inf stays (probability 0)
        n_bad += tl.sum((mask & ~ok).to(tl.int32), axis=0)
        x = tl.where(mask & ok, x, _NEG_INF)
        # the tile's two largest (with multiplicity), merged with the running pair
        t1 = tl.max(x, axis=0)
        n_top = tl.sum((x == t1).to(tl.int32), axis=0)
        t2 = tl.where(n_top > 1, t1, tl.max(tl.where(x == t1, _NEG_INF, x), axis=0))
        m2 = tl.maximum(tl.maximum(m2, t2), tl.minimum(m1, t1))
        new_m1 = tl.maximum(m1, t1)
        # move the anchor to the new maximum: s ← α s, h ← α h + (α s) (c − c')
        c_old = tl.where(m1 == _NEG_INF, 0.0, m1)
        c_new = tl.where(new_m1 == _NEG_INF, 0.0, new_m1)
        # differences of finite fp32 logits can overflow to −inf (|x| > 1.7e38): clamped to
        # the lowest finite number, whose exp is 0 and whose product with 0 is 0, not NaN
        shift = tl.maximum(tl.minimum(c_old - c_new, 0.0), _LOWEST)  # c_old = 0 only while s = 0
        alpha = tl.exp(shift)
        h = alpha * h + (alpha * s) * shift
        s = alpha * s
        live = x > _NEG_INF
        d = tl.where(live, tl.maximum(x - c_new, _LOWEST), 0.0)
        e = tl.where(live, tl.exp(d), 0.0)
        s += tl.sum(e, axis=0)
        h += tl.sum(e * d, axis=0)
        m1 = new_m1

    nan = float("nan")
    finite = (n_bad == 0) & (m1 > _NEG_INF)
    log_s = tl.log(s)
    entropy = log_s - h / s
    max_prob = 1.0 / s
    margin = _neg_expm1(m2 - m1) / s
    lse = m1 + log_s
    o = out_ptr + row
    tl.store(o + 0 * N, tl.where(finite, entropy, nan))
    tl.store(o + 1 * N, tl.where(finite, max_prob, nan))
    tl.store(o + 2 * N, tl.where(finite, margin, nan))
    tl.store(o + 3 * N, tl.where(finite, lse, nan))
    nll = tl.full([], nan, tl.float32)
    if HAS_LABELS:
        label = tl.load(label_ptr + row)
        readable = (label != ignore_index) & (label >= 0) & (label < V)
        x_label = tl.load(x_row + tl.where(readable, label, 0)).to(tl.float32)
        nll = tl.where(finite & readable, (m1 - x_label) + log_s, nan)
    tl.store(o + 4 * N, nll)
    tl.store(o + 5 * N, tl.where(finite, 1.0, 0.0))


def _block_v(vocab: int, device: torch.device) -> int:
    """Tile width: up to 4096 lanes on the GPU, up to 16384 under the interpreter (fewer, wider
    tiles run faster there)."""
    cap = 4096 if device.type == "cuda" else 16384
    return max(16, min(triton.next_power_of_2(vocab), cap))


def output_stats_triton(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    ignore_index: int = -100,
    block_v: int | None = None,
) -> torch.Tensor:
    """Launch the kernel on ``logits`` [N, V] or [B, T, V] (unit stride along V, any leading
    strides, read in place). ``labels``: N = B·T int64 entries, contiguous, or None. Returns
    the [6, N] fp32 statistics (rows :data:`OUTPUTS`). ``block_v`` overrides the tile width
    (tests use it to run several tiles on short rows)."""
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(f"logits must have a contiguous last dim, got strides {logits.stride()}")
    x3 = logits.unsqueeze(0) if logits.dim() == 2 else logits
    nb, nt, vocab = x3.shape
    n = nb * nt
    out = torch.empty(NUM_OUTPUTS, n, dtype=torch.float32, device=logits.device)
    if labels is not None and labels.numel() != n:
        raise ValueError(f"labels has {labels.numel()} entries for {n} rows of logits")
    if block_v is None:
        block_v = _block_v(vocab, logits.device)
    if n:
        _output_stats_kernel[(n,)](
            x3,
            x3.stride(0),
            x3.stride(1),
            labels if labels is not None else out,
            out,
            n,
            nt,
            vocab,
            ignore_index,
            HAS_LABELS=labels is not None,
            BLOCK_V=block_v,
            num_warps=8 if block_v >= 2048 else 4,
        )
    return out
