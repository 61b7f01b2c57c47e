"""Training losses for distillation and quantization-aware training: the divergences of
:func:`qmetrics.compare_logits`, differentiable, fused and chunked.

Per token, with P = softmax(teacher/T) and Q = softmax(student/T):

    "kl"          KL(P‖Q) = Σ p (log p − log q)
    "reverse_kl"  KL(Q‖P) = Σ q (log q − log p)
    "jsd"         β·KL(P‖M) + (1−β)·KL(Q‖M),   M = β·P + (1−β)·Q,   0 < β < 1

:func:`distill_loss` takes logits; :func:`linear_distill_loss` takes final hidden states and
output heads and never holds more than a chunk of tokens' logits. The ops are in
:mod:`qmetrics.kernels.distill_loss` (Triton: loss and student-logit gradient in one launch) and
:mod:`qmetrics.kernels.distill_loss_torch` (chunked torch, same outputs).

No host synchronisation in the forward or the backward: the "mean" weight 1/#counted tokens
stays a device scalar that the kernels read, and the backward always multiplies the stored
gradient by the incoming one (no test for 1, which would read the device): in place when the
graph is not kept, so no second [N, V] gradient exists; into a new tensor when it is kept for
another backward (``retain_graph``, ``gradcheck``), leaving the stored one intact.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from qmetrics.kernels.distill_loss_torch import distill_loss_torch
from qmetrics.metrics.functional import as_rows, resolve_backend
from qmetrics.metrics.validation import check_labels

Divergence = Literal["kl", "reverse_kl", "jsd"]
Reduction = Literal["mean", "sum", "none", "batchmean"]
DIVERGENCES: tuple[str, ...] = ("kl", "reverse_kl", "jsd")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none", "batchmean")
LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Logit elements per chunk of linear_distill_loss when chunk_tokens is not given (32 MiB of
# fp32 per [chunk, V] plane: 262 tokens at V = 32k, 65 at V = 128k).
_LINEAR_CHUNK_ELEMENTS = 1 << 23


# ----------------------------------------------------------------------------- validation


def _check_options(
    divergence: str, beta: float, temperature: float, reduction: str, ignore_index: int
) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be a float in the open interval (0, 1), got {beta!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


def _check_float(name: str, t: object, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in LOSS_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    _check_float("student_logits", student)
    _check_float("teacher_logits", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"vocab size mismatch: student has V={student.shape[-1]}, "
            f"teacher has V={teacher.shape[-1]}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"shape mismatch: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"device mismatch: student on {student.device}, teacher on {teacher.device}"
        )
    if student.shape[-1] == 0 or student.numel() == 0:
        raise ValueError(f"empty input: logits have shape {tuple(student.shape)}")


# ----------------------------------------------------------------------------- shared pieces


def _counted_and_scale(
    labels: torch.Tensor | None,
    n: int,
    lead: torch.Size,
    ignore_index: int,
    reduction: str,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, float | torch.Tensor]:
    """Bool mask of counted rows, flat int64 labels (or None) and the reduction's weight w,
    with loss = w · Σ_counted loss_row (w = 1 for "none": rows are returned as they are).
    For "mean" with labels w = 1/#counted is a float64 device scalar (no host sync)."""
    if labels is None:
        counted = torch.ones(n, dtype=torch.bool, device=device)
        flat = None
    else:
        flat = labels.reshape(-1).to(torch.int64)
        counted = flat != ignore_index
    if reduction == "mean" and labels is not None:
        # no counted token: loss 0 and gradient 0, so an all-padding batch changes nothing
        n_counted = counted.sum(dtype=torch.float64)
        scale = torch.where(n_counted > 0, 1.0 / n_counted.clamp_min(1.0), 0.0)
    elif reduction == "mean":
        scale = 1.0 / n
    elif reduction == "batchmean":
        scale = 1.0 / lead[0] if len(lead) else 1.0
    else:
        scale = 1.0
    return counted, flat, scale


def _loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    counted: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    grad_scale: float | torch.Tensor,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss [N] and ``grad_scale · dL/ds`` [N, V] of row-major logits, on one backend
    (``grad_scale``: a float or a device scalar)."""
    if backend == "triton":
        from qmetrics.kernels.distill_loss import distill_loss_triton

        return distill_loss_triton(
            student, teacher, labels, divergence=divergence, beta=beta,
            temperature=temperature, ignore_index=ignore_index, grad_scale=grad_scale,
            need_grad=need_grad,
        )  # fmt: skip
    return distill_loss_torch(
        student, teacher, counted, divergence=divergence, beta=beta, temperature=temperature,
        grad_scale=grad_scale, need_grad=need_grad,
    )  # fmt: skip


def _reduce(
    loss_rows: torch.Tensor, lead: torch.Size, reduction: str, scale: float | torch.Tensor
) -> torch.Tensor:
    """The loss as returned: per-token rows for "none", else w · Σ rows summed in float64."""
    out_dtype = torch.float64 if loss_rows.dtype == torch.float64 else torch.float32
    if reduction == "none":
        return loss_rows.to(out_dtype).reshape(lead)
    return (loss_rows.sum(dtype=torch.float64) * scale).to(out_dtype)


def _scaled(
    grads: tuple[torch.Tensor | None, ...], grad_output: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """The stored gradients times the incoming scalar gradient, always (testing for 1 would
    be a host sync): in place when this backward is the graph's last (no copy: autograd then
    hands the stored tensor on as the gradient), as new tensors when the graph is kept for
    another backward (``retain_graph``, ``gradcheck``)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or keep_graph():
        return tuple(None if g is None else g * grad_output.to(g.dtype) for g in grads)
    for g in grads:
        if g is not None:
            g.mul_(grad_output.to(g.dtype))
    return grads


# ----------------------------------------------------------------------------- from logits


class DistillFunction(torch.autograd.Function):
    """Autograd wrapper of the fused op: the forward computes the loss and stores w·dL/ds (in
    the student's dtype); the backward only scales it by the incoming gradient."""

    @staticmethod
    def forward(
        ctx, student, teacher, labels, divergence, beta, temperature, ignore_index, reduction,
        backend,
    ):  # fmt: skip
        lead = student.shape[:-1]
        s2, t2 = as_rows(student), as_rows(teacher)
        counted, flat, scale = _counted_and_scale(
            labels, s2.shape[0], lead, ignore_index, reduction, student.device
        )
        need_grad = ctx.needs_input_grad[0]
        loss_rows, grad = _loss_rows(
            s2, t2, counted, flat, divergence=divergence, beta=beta, temperature=temperature,
            ignore_index=ignore_index, grad_scale=scale, need_grad=need_grad, backend=backend,
        )  # fmt: skip
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.student_shape = student.shape
        ctx.reduction = reduction
        return _reduce(loss_rows, lead, reduction, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad = grad * grad_output.reshape(-1, 1).to(grad.dtype)
        else:
            (grad,) = _scaled((grad,), grad_output)
        return grad.view(ctx.student_shape), None, None, None, None, None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: Divergence = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss between student and teacher logits [..., V] (any float dtype).

    Per token, with P = softmax(teacher/T), Q = softmax(student/T): ``"kl"`` KL(P‖Q),
    ``"reverse_kl"`` KL(Q‖P), ``"jsd"`` β·KL(P‖M) + (1−β)·KL(Q‖M) with M = β·P + (1−β)·Q.
    There is no T² factor (Hinton et al. multiply by T² to keep gradient magnitudes comparable
    across temperatures): use ``temperature**2 * distill_loss(...)`` for it.

    Tokens whose label equals ``ignore_index`` count for nothing (``labels`` shaped like the
    leading dims; only compared with ``ignore_index``). ``reduction``: ``"mean"`` over counted
    tokens (0 when none counts), ``"sum"``, ``"none"`` (per token, shaped like the leading dims,
    ignored tokens 0) or ``"batchmean"`` (sum / leading dim 0). The loss is fp32 (float64 for
    float64 inputs).

    The gradient flows to the student only. The teacher is a constant: with
    ``teacher_logits.requires_grad`` no gradient reaches it (it is treated as detached), and no
    error is raised. The gradient w.r.t. the student logits is computed in fp32 during the
    forward and kept in the student's dtype (one [..., V] tensor, the size of the logits);
    the backward scales it by the incoming gradient. ``backend``: ``"auto"`` (Triton on CUDA),
    ``"triton"`` or ``"torch"``. Bad input raises ``ValueError`` naming the problem.
    """
    _check_options(divergence, beta, temperature, reduction, ignore_index)
    _check_logits(student_logits, teacher_logits)
    if labels is not None:
        check_labels(labels, student_logits.shape[:-1], student_logits.device)
    which = resolve_backend(backend, student_logits.device)
    return DistillFunction.apply(
        student_logits, teacher_logits.detach(), labels, divergence, float(beta),
        float(temperature), ignore_index, reduction, which,
    )  # fmt: skip


class _DistillOptions(nn.Module):
    """The options the loss modules share, checked once at construction."""

    def __init__(
        self,
        divergence: Divergence = "kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        _check_options(divergence, beta, temperature, reduction, ignore_index)
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def options(self) -> dict[str, object]:
        """The keyword arguments of the functional form."""
        return {
            "divergence": self.divergence,
            "beta": self.beta,
            "temperature": self.temperature,
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
            "backend": self.backend,
        }

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )


class DistillLoss(_DistillOptions):
    """Module form of :func:`distill_loss` with the same options."""

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return distill_loss(student_logits, teacher_logits, labels, **self.options())


# ----------------------------------------------------------------------------- from hidden states


def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(h, w, b)


class LinearDistillFunction(torch.autograd.Function):
    """Chunked head + loss: for each chunk of tokens, logits = h·Wᵀ + b of both models, the
    fused op's loss and w·dL/d(logits) g, then grad_h = g·W_s, grad_W_s += gᵀ·h_s,
    grad_b_s += Σ g. Only one chunk's logits exist at a time. With reduction "none" the
    incoming gradient is per token, so the gradients are computed in the backward (a second
    pass); otherwise in the forward, and the backward scales them."""

    @staticmethod
    def forward(
        ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, divergence, beta, temperature, ignore_index,
        reduction, chunk_tokens, backend,
    ):  # fmt: skip
        lead = h_s.shape[:-1]
        hs2, ht2 = as_rows(h_s), as_rows(h_t)
        n = hs2.shape[0]
        counted, flat, scale = _counted_and_scale(
            labels, n, lead, ignore_index, reduction, h_s.device
        )
        opts = dict(
            divergence=divergence, beta=beta, temperature=temperature,
            ignore_index=ignore_index, backend=backend,
        )  # fmt: skip
        needs = ctx.needs_input_grad[:3]
        ctx.opts, ctx.reduction, ctx.chunk = opts, reduction, chunk_tokens
        ctx.shapes = (h_s.shape, b_s is not None)
        if reduction == "none" and any(needs):
            ctx.save_for_backward(hs2, w_s, b_s, ht2, w_t, b_t, counted, flat)
            loss_rows, _ = _linear_pass(
                hs2, w_s, b_s, ht2, w_t, b_t, counted, flat, chunk_tokens, opts, None, (False,) * 3
            )
        else:
            loss_rows, grads = _linear_pass(
                hs2, w_s, b_s, ht2, w_t, b_t, counted, flat, chunk_tokens, opts, scale, needs
            )
            ctx.save_for_backward(*grads)
        return _reduce(loss_rows, lead, reduction, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        needs = ctx.needs_input_grad[:3]
        if ctx.reduction == "none":
            hs2, w_s, b_s, ht2, w_t, b_t, counted, flat = ctx.saved_tensors
            row_scale = grad_output.reshape(-1).to(torch.float32)
            _, grads = _linear_pass(
                hs2, w_s, b_s, ht2, w_t, b_t, counted, flat, ctx.chunk, ctx.opts, row_scale, needs
            )
        else:
            grads = _scaled(ctx.saved_tensors, grad_output)
        g_h, g_w, g_b = grads
        if g_h is not None:
            g_h = g_h.view(ctx.shapes[0])
        return (g_h, g_w, g_b) + (None,) * 11


def _linear_pass(
    hs2: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    ht2: torch.Tensor,
    w_t: torch.Tensor,
    b_t: torch.Tensor | None,
    counted: torch.Tensor,
    flat: torch.Tensor | None,
    chunk_tokens: int,
    opts: dict,
    scale: float | torch.Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """One sweep over token chunks: per-row loss, and the student gradients asked for by
    ``needs`` (hidden, weight, bias) scaled by ``scale`` (a float, a device scalar, or a
    per-row tensor [N])."""
    n = hs2.shape[0]
    any_grad = any(needs)
    per_row = isinstance(scale, torch.Tensor) and scale.dim() == 1
    g_h = torch.empty_like(hs2) if needs[0] else None
    # weight/bias gradients accumulate in fp32 and are cast to the parameter dtype at the end
    g_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if needs[1] else None
    g_b = (
        torch.zeros(b_s.shape, dtype=torch.float32, device=b_s.device)
        if needs[2] and b_s is not None
        else None
    )
    loss_rows = None
    for start in range(0, n, chunk_tokens):
        sl = slice(start, min(n, start + chunk_tokens))
        logits_s = _linear(hs2[sl], w_s, b_s)
        logits_t = _linear(ht2[sl], w_t, b_t)
        rows, g = _loss_rows(
            logits_s, logits_t, counted[sl], None if flat is None else flat[sl],
            grad_scale=1.0 if per_row or scale is None else scale, need_grad=any_grad, **opts,
        )  # fmt: skip
        if loss_rows is None:
            loss_rows = torch.empty(n, dtype=rows.dtype, device=rows.device)
        loss_rows[sl] = rows
        del logits_s, logits_t
        if g is None:
            continue
        if per_row:
            g.mul_(scale[sl, None].to(g.dtype))
        if g_h is not None:
            torch.mm(g, w_s.to(g.dtype), out=g_h[sl])
        if g_w is not None:
            g_w.add_(torch.mm(g.t(), hs2[sl].to(g.dtype)))
        if g_b is not None:
            g_b.add_(g.sum(0, dtype=torch.float32))
        del g  # before the next chunk's logits exist
    grads = (
        g_h,
        None if g_w is None else g_w.to(w_s.dtype),
        None if g_b is None else g_b.to(b_s.dtype),
    )
    return loss_rows, grads


def linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: Divergence = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`distill_loss` of the logits ``student_hidden @ student_weightᵀ + student_bias`` and
    ``teacher_hidden @ teacher_weightᵀ + teacher_bias``, without materialising either [N, V].

    Hidden states are [..., H_s] and [..., H_t] (the sizes may differ), weights [V, H_s] and
    [V, H_t], biases [V]. Tokens go through in chunks of ``chunk_tokens`` (default: about 8M
    logits per chunk), so the peak extra memory is O(chunk·V) plus the fp32 weight gradient.
    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias``; the teacher's
    tensors are constants (no gradient even if they require one). Options, loss definitions and
    reductions as in :func:`distill_loss`.
    """
    _check_options(divergence, beta, temperature, reduction, ignore_index)
    _check_float("student_hidden", student_hidden)
    _check_float("teacher_hidden", teacher_hidden)
    _check_float("student_weight", student_weight, 2)
    _check_float("teacher_weight", teacher_weight, 2)
    for name, w, h in (
        ("student", student_weight, student_hidden),
        ("teacher", teacher_weight, teacher_hidden),
    ):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"{name}_weight must be [V, H] with H = {name}_hidden.shape[-1] = {h.shape[-1]}, "
                f"got {tuple(w.shape)}"
            )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"vocab size mismatch: student_weight has V={student_weight.shape[0]}, "
            f"teacher_weight has V={teacher_weight.shape[0]}"
        )
    vocab = student_weight.shape[0]
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"token shape mismatch: student_hidden {tuple(student_hidden.shape)} vs "
            f"teacher_hidden {tuple(teacher_hidden.shape)} (leading dims must agree)"
        )
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None:
            _check_float(name, b)
            if b.shape != (vocab,):
                raise ValueError(f"{name} must have shape ({vocab},), got {tuple(b.shape)}")
    tensors = [student_hidden, student_weight, teacher_hidden, teacher_weight]
    tensors += [b for b in (student_bias, teacher_bias) if b is not None]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"device mismatch: inputs are on {sorted(map(str, devices))}")
    if vocab == 0 or student_hidden.numel() == 0:
        raise ValueError(f"empty input: hidden {tuple(student_hidden.shape)}, V={vocab}")
    lead = student_hidden.shape[:-1]
    if labels is not None:
        check_labels(labels, lead, student_hidden.device)
    if chunk_tokens is None:
        chunk_tokens = max(1, _LINEAR_CHUNK_ELEMENTS // vocab)
    elif isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    which = resolve_backend(backend, student_hidden.device)
    return LinearDistillFunction.apply(
        student_hidden, student_weight, student_bias, teacher_hidden.detach(),
        teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(), labels,
        divergence, float(beta), float(temperature), ignore_index, reduction, chunk_tokens, which,
    )  # fmt: skip


class LinearDistillLoss(_DistillOptions):
    """Module form of :func:`linear_distill_loss` with the same options."""

    def __init__(
        self,
        divergence: Divergence = "kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        chunk_tokens: int | None = None,
        backend: str = "auto",
    ):
        super().__init__(divergence, beta, temperature, ignore_index, reduction, backend)
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias,
            chunk_tokens=self.chunk_tokens, **self.options(),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_tokens={self.chunk_tokens}"


__all__ = [
    "DistillFunction",
    "DistillLoss",
    "LinearDistillFunction",
    "LinearDistillLoss",
    "distill_loss",
    "linear_distill_loss",
]
