"""CPU path of the fused distillation loss: torch ops over row chunks, same outputs as the Triton
kernel (:mod:`qmetrics.kernels.distill_loss`).

Per row, with student logits s, teacher logits t, temperature T, x = s/T, z = t/T,
log q = log_softmax(x), log p = log_softmax(z) and d/dx the derivative w.r.t. x (the gradient
w.r.t. the student logits s is d/dx divided by T):

    kl          L = KL(P‖Q) = Σ p (log p − log q)            dL/dx = q − p
    reverse_kl  L = KL(Q‖P) = Σ q (log q − log p)            dL/dx = q ⊙ (log q − log p − L)
    jsd         log m = logaddexp(log β + log p, log(1−β) + log q)
                L = β·Σ p (log p − log m) + (1−β)·Σ q (log q − log m)
                dL/dx = (1−β)·q ⊙ (log q − log m − KL(Q‖M))

Rows whose ``counted`` flag is False get loss 0 and gradient 0. Work is done in fp32 (float64
for float64 inputs); the gradient, times ``grad_scale``, is stored in the student's dtype.
Extra memory is O(chunk·V): a handful of [chunk, V] planes per chunk.

Two implementations of a chunk, with the same outputs (the plan of
:mod:`qmetrics.kernels.logit_compare_torch`): eager in-place torch ops (~12 passes over the
chunk), or :func:`plain_chunk` under ``torch.compile`` (:mod:`qmetrics.kernels.torch_compile`;
inductor's fused loops write the gradient straight into its rows of the output; 2-5× faster on
the CPU and unaffected by a busy second core), used for calls of at least
``COMPILE_MIN_ELEMENTS`` logits or as ``compile``/``$QMETRICS_TORCH_COMPILE`` say. Chunks have
dynamic row counts: the last, shorter one does not recompile.
"""

from __future__ import annotations

import math

import torch
from qmetrics.kernels.torch_compile import (
    COMPILE_MIN_ELEMENTS,
    CompiledCPU,
    compiled_view,
    want_compile,
)

# About 4 MiB of fp32 per [chunk, V] plane (32 rows at V = 32k).
_CHUNK_ELEMENTS = 1 << 20
# Compiled chunks are larger (fewer calls; inductor keeps ~1 temporary plane).
_COMPILED_CHUNK_ELEMENTS = 1 << 22
DIVERGENCES = ("kl", "reverse_kl", "jsd")


def _rows_loss_grad(
    x: torch.Tensor, z: torch.Tensor, divergence: str, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (float64) and dL/dx of the temperature-scaled rows x (student), z (teacher).

    Everything is written with d = log p − log q = (z − x) − (lse(z) − lse(x)), the log-sum-exp
    difference taken in float64, so that no term carries the rounding of a large log-sum-exp;
    for jsd, log m − log q = r(d) = logaddexp(log β + d, log(1−β)). Overwrites x and z.
    """
    f64 = torch.float64
    m_x = x.amax(-1, keepdim=True)
    m_z = z.amax(-1, keepdim=True)
    q = torch.exp(x - m_x)
    p = torch.exp(z - m_z)
    s_x = q.sum(-1, keepdim=True, dtype=f64)
    s_z = p.sum(-1, keepdim=True, dtype=f64)
    delta = (m_z.to(f64) + s_z.log()) - (m_x.to(f64) + s_x.log())
    q.div_(s_x.to(q.dtype))
    p.div_(s_z.to(p.dtype))
    d = z.sub_(x).sub_(delta.to(z.dtype))  # log p − log q
    if divergence == "kl":
        loss = (p * d).sum(-1, dtype=f64)
        return loss, q.sub_(p)
    if divergence == "reverse_kl":
        loss = -(q * d).sum(-1, dtype=f64)
        # dL/dx = q (log q − log p − L) = −q (d + L)
        return loss, q.mul_(d.add_(loss[:, None].to(d.dtype))).neg_()
    r = torch.logaddexp(d + math.log(beta), torch.full_like(d[:1, :1], math.log1p(-beta)))
    kl_pm = (p * d.sub_(r)).sum(-1, dtype=f64)  # Σ p (log p − log m), d − r
    kl_qm = -(q * r).sum(-1, dtype=f64)  # Σ q (log q − log m) = −Σ q r
    loss = beta * kl_pm + (1.0 - beta) * kl_qm
    # dL/dx = (1−β) q (log q − log m − KL(Q‖M)) = −(1−β) q (r + KL(Q‖M))
    return loss, q.mul_(r.add_(kl_qm[:, None].to(r.dtype))).mul_(beta - 1.0)


def plain_chunk(
    student: torch.Tensor,
    teacher: torch.Tensor,
    counted: torch.Tensor,
    grad_out: torch.Tensor | None,
    scale: torch.Tensor,
    divergence: str,
    beta: float,
    inv_t: float,
) -> torch.Tensor:
    """Per-row loss of a chunk of rows (work dtype, 0 where not ``counted``) and, into
    ``grad_out`` (the chunk's rows of the gradient), ``scale·inv_t · dL/dx`` (0 where not
    counted): the formulas of :func:`_rows_loss_grad` as plain tensor ops for
    ``torch.compile``. Uncompiled it would materialise several [chunk, V] tensors."""
    f64 = torch.float64
    work = f64 if student.dtype == f64 else torch.float32
    x = student.to(work) * inv_t
    z = teacher.to(work) * inv_t
    m_x = x.amax(-1, keepdim=True)
    m_z = z.amax(-1, keepdim=True)
    s_x = torch.exp(x - m_x).sum(-1, keepdim=True, dtype=f64)
    s_z = torch.exp(z - m_z).sum(-1, keepdim=True, dtype=f64)
    delta = (m_z.to(f64) + s_z.log()) - (m_x.to(f64) + s_x.log())
    q = torch.exp(x - m_x) / s_x.to(work)
    p = torch.exp(z - m_z) / s_z.to(work)
    d = (z - x) - delta.to(work)  # log p − log q
    if divergence == "kl":
        loss = (p * d).sum(-1, dtype=f64)
        g = q - p
    elif divergence == "reverse_kl":
        loss = -(q * d).sum(-1, dtype=f64)
        g = -q * (d + loss[:, None].to(work))
    else:
        r = torch.logaddexp(d + math.log(beta), torch.full_like(d, math.log1p(-beta)))
        kl_pm = (p * (d - r)).sum(-1, dtype=f64)
        kl_qm = -(q * r).sum(-1, dtype=f64)
        loss = beta * kl_pm + (1.0 - beta) * kl_qm
        g = q * (r + kl_qm[:, None].to(work)) * (beta - 1.0)
    if grad_out is not None:
        # ignored rows are zeroed, not scaled by 0: their logits may hold NaN (padding)
        grad_out.copy_(torch.where(counted[:, None], g * (scale * inv_t), 0.0))
    return torch.where(counted, loss, 0.0).to(work)


_COMPILED = CompiledCPU(plain_chunk, name="distill_loss", dynamic=None, max_signatures=8)


def distill_loss_torch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    counted: torch.Tensor,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    grad_scale: float | torch.Tensor = 1.0,
    need_grad: bool = True,
    chunk_rows: int | None = None,
    compile: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss [N] (fp32, float64 for float64 inputs) and, with ``need_grad``, the gradient
    ``grad_scale · dL/ds`` [N, V] in the student's dtype, for ``student``/``teacher`` [N, V]
    and the bool row mask ``counted`` [N] (formulas in the module docstring). ``grad_scale``: a
    float or a device scalar tensor (applied in the work precision, no host sync).
    ``compile``: the compiled chunk function (None: by size, see the module docstring)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    n, vocab = student.shape
    dev = student.device
    work = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = torch.zeros(n, dtype=torch.float64, device=dev)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else None
    inv_t = 1.0 / temperature
    compiled = want_compile(compile, dev, n * vocab >= COMPILE_MIN_ELEMENTS)
    if chunk_rows is None:
        chunk_rows = max(1, (_COMPILED_CHUNK_ELEMENTS if compiled else _CHUNK_ELEMENTS) // vocab)
    if compiled:
        scale = torch.as_tensor(grad_scale, dtype=work, device=dev)
        signature = (student.dtype, teacher.dtype, vocab, divergence, beta, inv_t, need_grad)
    for start in range(0, n, chunk_rows):
        sl = slice(start, min(n, start + chunk_rows))
        keep = counted[sl]
        if compiled:
            rows = _COMPILED(
                signature,
                compiled_view(student[sl]),
                compiled_view(teacher[sl]),
                compiled_view(keep),
                None if grad is None else compiled_view(grad[sl]),
                scale,
                divergence,
                beta,
                inv_t,
            )
            if rows is not None:
                loss[sl] = rows
                continue
        x = student[sl].to(work).mul_(inv_t) if student.dtype != work else student[sl] * inv_t
        z = teacher[sl].to(work).mul_(inv_t) if teacher.dtype != work else teacher[sl] * inv_t
        rows_loss, g = _rows_loss_grad(x, z, divergence, beta)
        loss[sl] = torch.where(keep, rows_loss, 0.0)
        if grad is not None:
            # ignored rows are zeroed, not scaled by 0: their logits may hold NaN (padding)
            grad[sl] = g.mul_(grad_scale * inv_t).masked_fill_(~keep[:, None], 0.0)
    return loss.to(work), grad
