"""Fused distillation loss: per-row KL / reverse KL / JSD of student vs teacher logits, and the
gradient w.r.t. the student logits written in the same launch.

Per row, with student logits s, teacher logits t, x = s/T, z = t/T, log q = x − lse(x),
log p = z − lse(z) (formulas and derivatives as in :mod:`qmetrics.kernels.distill_loss_torch`):

    kl          L = Σ p (log p − log q)                       dL/dx = q − p
    reverse_kl  L = Σ q (log q − log p)                       dL/dx = q ⊙ (log q − log p − L)
    jsd         L = β·KL(P‖M) + (1−β)·KL(Q‖M),  M = βP + (1−β)Q
                dL/dx = (1−β)·q ⊙ (log q − log m − KL(Q‖M))

One program handles one row, walking V in tiles of BLOCK_V:

1. online log-sum-exp of x and z (running max, sum rescaled when the max moves); for reverse KL
   also the running B = Σ exp(x − m_x)(x − z), so that L = B/s_x − lse(x) + lse(z) is known
   before the gradient sweep;
2. the loss sum Σ p (log p − log q) etc. from the now-known log-probabilities (small terms, no
   difference of two large log-sum-exps), and for kl / reverse_kl the gradient store;
3. jsd only: the gradient store (it needs KL(Q‖M), a full-row sum, first).

Everything is fp32; the gradient is stored in the student's dtype, times ``grad_scale``/T, and
zero for rows whose label is ``ignore_index``. No [N, V] temporary besides the gradient itself.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

DIVERGENCES = ("kl", "reverse_kl", "jsd")

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _log1p(y):
    """log(1 + y) in fp32 without losing small y: log(u)·y/(u − 1), u = 1 + y (Goldberg)."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _log_m_over_q(d, log_beta, log_1m_beta):
    """r = log m − log q = logaddexp(log β + d, log(1−β)), d = log p − log q."""
    a = log_beta + d
    hi = tl.maximum(a, log_1m_beta)
    return hi + _log1p(tl.exp(tl.minimum(a, log_1m_beta) - hi))


@triton.jit
def _distill_loss_kernel(
    s_ptr,  # [N, V] student logits (fp32/fp16/bf16), unit stride along V
    s_stride,  # elements between consecutive rows of s
    t_ptr,  # [N, V] teacher logits, same dtype rules
    t_stride,  # elements between consecutive rows of t
    g_ptr,  # [N, V] out: grad_scale · dL/ds in the student's dtype, unit stride along V
    g_stride,  # elements between consecutive rows of g
    loss_ptr,  # [N] out: fp32 per-row loss (0 for ignored rows)
    label_ptr,  # [N] int64 labels (read only when HAS_LABELS)
    ignore_index,  # label value of a row that counts for nothing
    V,  # vocabulary size
    inv_t,  # 1 / temperature
    beta,  # JSD mixture weight β of the teacher
    log_beta,  # log β
    log_1m_beta,  # log(1 − β)
    scale_ptr,  # [1] fp32: factor of every stored gradient entry (reduction weight), on device
    DIVERGENCE: tl.constexpr,  # 0 kl, 1 reverse_kl, 2 jsd
    HAS_LABELS: tl.constexpr,  # whether label_ptr is read
    WRITE_GRAD: tl.constexpr,  # whether g_ptr is written
    BLOCK_V: tl.constexpr,  # tile width along V
):
    row = tl.program_id(0).to(tl.int64)  # int64 before any stride product: N·V may exceed 2^31
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    lanes = tl.arange(0, BLOCK_V)
    counted = True
    if HAS_LABELS:
        counted = tl.load(label_ptr + row) != ignore_index
    if counted:
        # sweep 1: online log-sum-exp of x and z (and B = Σ e^{x−m_x}(x − z) for reverse KL)
        m_x = -float("inf")
        m_z = -float("inf")
        d_x = 0.0
        d_z = 0.0
        b = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            mask = offs < V
            x = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            z = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            mx_new = tl.maximum(m_x, tl.max(tl.where(mask, x, _NEG_INF), axis=0))
            mz_new = tl.maximum(m_z, tl.max(tl.where(mask, z, _NEG_INF), axis=0))
            ex = tl.where(mask, tl.exp(x - mx_new), 0.0)
            alpha_x = tl.exp(m_x - mx_new)
            d_x = d_x * alpha_x + tl.sum(ex, axis=0)
            d_z = d_z * tl.exp(m_z - mz_new) + tl.sum(
                tl.where(mask, tl.exp(z - mz_new), 0.0), axis=0
            )
            if DIVERGENCE == 1:
                b = b * alpha_x + tl.sum(ex * (x - z), axis=0)
            m_x = mx_new
            m_z = mz_new
        inv_dx = 1.0 / d_x
        inv_dz = 1.0 / d_z
        grad_scale = 1.0
        if WRITE_GRAD:
            grad_scale = tl.load(scale_ptr)
        # log(s_z/s_x): lse(z) − lse(x) = (m_z − m_x) + log(d_z/d_x), without rounding either lse
        log_ratio = tl.log(d_z * inv_dx)
        # reverse KL from sweep 1 (B/s_x + lse(z) − lse(x)), used only in the gradient's constant
        rkl = b * inv_dx + (m_z - m_x) + log_ratio

        # sweep 2: loss sums from d = log p − log q = (z − m_z) − (x − m_x) − log(d_z/d_x), formed
        # from nearby numbers, and q = e^{x−m_x}/d_x, p = e^{z−m_z}/d_z (no rounded lse inside);
        # kl / reverse_kl also store the gradient
        # kl: Σ p d | reverse_kl: −Σ q d | jsd: Σ p (log p − log m) = Σ p (d − r)
        acc_a = tl.zeros([BLOCK_V], tl.float32)
        acc_b = tl.zeros([BLOCK_V], tl.float32)  # jsd: Σ q (log q − log m) = −Σ q r
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            mask = offs < V
            x = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - m_x
            z = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - m_z
            q = tl.where(mask, tl.exp(x) * inv_dx, 0.0)
            d = (z - x) - log_ratio
            if DIVERGENCE == 0:
                p = tl.where(mask, tl.exp(z) * inv_dz, 0.0)
                acc_a += p * d
                if WRITE_GRAD:
                    g = (q - p) * (grad_scale * inv_t)
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
            elif DIVERGENCE == 1:
                acc_a -= q * d
                if WRITE_GRAD:
                    # dL/dx = q (log q − log p − KL(Q‖P)) = −q (d + KL(Q‖P))
                    g = -q * (d + rkl) * (grad_scale * inv_t)
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
            else:
                p = tl.where(mask, tl.exp(z) * inv_dz, 0.0)
                r = _log_m_over_q(d, log_beta, log_1m_beta)
                acc_a += p * (d - r)
                acc_b -= q * r
        kl_a = tl.sum(acc_a, axis=0)
        if DIVERGENCE == 2:
            kl_qm = tl.sum(acc_b, axis=0)
            tl.store(loss_ptr + row, beta * kl_a + (1.0 - beta) * kl_qm)
            if WRITE_GRAD:
                # sweep 3 (jsd): dL/dx = (1−β) q (log q − log m − KL(Q‖M)) = −(1−β) q (r + KL(Q‖M))
                coef = (beta - 1.0) * grad_scale * inv_t
                for start in range(0, V, BLOCK_V):
                    offs = start + lanes
                    mask = offs < V
                    x = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - m_x
                    z = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - m_z
                    r = _log_m_over_q((z - x) - log_ratio, log_beta, log_1m_beta)
                    g = tl.exp(x) * inv_dx * (r + kl_qm) * coef
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(loss_ptr + row, kl_a)
    else:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + lanes
                zero = tl.zeros([BLOCK_V], tl.float32)
                tl.store(g_row + offs, zero.to(g_ptr.dtype.element_ty), mask=offs < V)


def _block_v(vocab: int, device: torch.device) -> int:
    """Tile width: the whole row up to 4096 lanes on the GPU (16 KiB of fp32 per operand), up to
    16384 under the interpreter, where fewer, wider tiles run faster."""
    cap = 4096 if device.type == "cuda" else 16384
    return min(triton.next_power_of_2(vocab), cap)


def distill_loss_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    ignore_index: int = -100,
    grad_scale: float | torch.Tensor = 1.0,
    need_grad: bool = True,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused kernel on ``student``/``teacher`` [N, V] (unit stride along V).

    Returns the fp32 per-row loss [N] and, with ``need_grad``, ``grad_scale · dL/ds`` [N, V] in
    the student's dtype (zero rows where ``labels == ignore_index``). ``grad_scale``: a float or
    a one-element tensor on the logits' device (read by the kernel: a reduction weight that
    depends on the data needs no host sync). ``block_v`` overrides the tile width (tests use it
    to run several tiles on small rows).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if student.stride(-1) != 1 or teacher.stride(-1) != 1:
        raise ValueError("logit rows must be contiguous along the vocabulary dimension")
    n, vocab = student.shape
    dev = student.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    grad = torch.empty(n, vocab, dtype=student.dtype, device=dev) if need_grad else loss
    if block_v is None:
        block_v = _block_v(vocab, dev)
    if isinstance(grad_scale, torch.Tensor):
        scale = grad_scale.to(device=dev, dtype=torch.float32).reshape(1)
    else:
        scale = torch.full((1,), grad_scale, dtype=torch.float32, device=dev)
    if n:
        _distill_loss_kernel[(n,)](
            student, student.stride(0), teacher, teacher.stride(0),
            grad, grad.stride(0) if need_grad else 0, loss,
            labels if labels is not None else loss, ignore_index,
            vocab, 1.0 / temperature, beta, math.log(beta), math.log1p(-beta), scale,
            DIVERGENCE=DIVERGENCES.index(divergence), HAS_LABELS=labels is not None,
            WRITE_GRAD=need_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )  # fmt: skip
    return loss, grad if need_grad else None
