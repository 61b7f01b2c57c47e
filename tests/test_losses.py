"""Training losses (:mod:`qmetrics.losses`) against a float64 autograd reference, on both
backends (Triton under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import math

import pytest
import torch
from qmetrics.kernels.torch_compile import compiler_available

from qmetrics.losses import DistillLoss, LinearDistillLoss, distill_loss, linear_distill_loss

BACKENDS = ("torch", "triton")


def reference_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The definitions, in float64, differentiable by autograd (the test oracle)."""
    log_q = torch.log_softmax(student.double() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.double().detach() / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl":
        rows = (p * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        rows = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    keep = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    rows = torch.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / rows.shape[0]
    return rows.sum() / keep.sum().clamp_min(1)


def make_pair(lead, vocab, dtype=torch.float32, seed=0, spread=0.7):
    """Student logits (requires grad), a teacher near them, labels with some ignored tokens."""
    gen = torch.Generator().manual_seed(seed)
    teacher = 2.0 * torch.randn(*lead, vocab, generator=gen)
    student = teacher + spread * torch.randn(*lead, vocab, generator=gen)
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels.view(-1)[1::3] = -100
    return student.to(dtype).requires_grad_(), teacher.to(dtype), labels


def check_against_reference(student, teacher, labels, rtol, atol_grad, **opts):
    loss = distill_loss(student, teacher, labels, **opts)
    loss.backward()
    opts.pop("backend")
    s64 = student.detach().double().requires_grad_()
    ref = reference_loss(s64, teacher, labels, **opts)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=1e-12)
    n = int((labels != -100).sum())
    # "per gradient entry scaled by N": the mean's gradient is O(1/N)
    torch.testing.assert_close(
        student.grad.double() * n, s64.grad * n, rtol=0, atol=atol_grad, check_dtype=False
    )


GRID = [("kl", 0.5), ("reverse_kl", 0.5)] + [("jsd", b) for b in (0.1, 0.5, 0.9)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1000, 50257])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("divergence", "beta"), GRID)
def test_fp32_matches_float64_reference(backend, vocab, temperature, divergence, beta):
    student, teacher, labels = make_pair((2, 3), vocab, seed=vocab + int(10 * temperature))
    check_against_reference(
        student, teacher, labels, 1e-5, 1e-5, divergence=divergence, beta=beta,
        temperature=temperature, backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_half_precision_within_its_rounding(backend, dtype, divergence):
    student, teacher, labels = make_pair((3, 4), 1000, dtype=dtype, seed=5)
    loss = distill_loss(student, teacher, labels, divergence=divergence, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == dtype
    s64 = student.detach().double().requires_grad_()
    ref = reference_loss(s64, teacher, labels, divergence=divergence)
    ref.backward()
    # the inputs are exact in float64, the math is fp32: the loss is fp32-accurate; the
    # gradient is rounded once to the input dtype
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    info = torch.finfo(dtype)
    # tiny entries round to the dtype's subnormal grid (spacing tiny·eps: 6e-8 in fp16)
    atol = max(1e-3 * info.eps * float(s64.grad.abs().max()), info.tiny * info.eps)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=info.eps, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_reductions_and_incoming_gradient(backend, reduction, divergence):
    student, teacher, labels = make_pair((3, 5), 300, seed=3)
    opts = dict(divergence=divergence, beta=0.3, temperature=1.5, reduction=reduction)
    loss = distill_loss(student, teacher, labels, backend=backend, **opts)
    s64 = student.detach().double().requires_grad_()
    ref = reference_loss(s64, teacher, labels, **opts)
    assert loss.shape == ref.shape == ((3, 5) if reduction == "none" else ())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    # a non-trivial incoming gradient (per token for "none") must scale the stored one
    weight = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
    (loss * weight).sum().backward()
    (ref * weight.double()).sum().backward()
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    if reduction == "none":
        assert bool((loss[labels == -100] == 0).all())


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64_torch_path(divergence, reduction):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 7, dtype=torch.float64, generator=gen).requires_grad_()
    teacher = torch.randn(2, 3, 7, dtype=torch.float64, generator=gen)
    labels = torch.tensor([[1, -100, 3], [0, 6, 2]])

    def fn(s):
        return distill_loss(
            s, teacher, labels, divergence=divergence, beta=0.3, temperature=0.7,
            reduction=reduction, backend="torch",
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("block_v", [64, 256])
def test_triton_kernel_over_several_tiles_matches_torch_twin(divergence, block_v):
    from qmetrics.kernels.distill_loss import distill_loss_triton
    from qmetrics.kernels.distill_loss_torch import distill_loss_torch

    student, teacher, labels = make_pair((5,), 1000, seed=9)
    student = student.detach()
    opts = dict(divergence=divergence, beta=0.2, temperature=0.8)
    loss_t, grad_t = distill_loss_triton(
        student, teacher, labels, grad_scale=0.5, block_v=block_v, **opts
    )
    loss_c, grad_c = distill_loss_torch(student, teacher, labels != -100, grad_scale=0.5, **opts)
    torch.testing.assert_close(loss_t, loss_c, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_t, grad_c, rtol=1e-4, atol=1e-8)
    assert bool((grad_t[labels == -100] == 0).all()) and bool((loss_t[labels == -100] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_logits_give_zero_loss_and_gradient(backend):
    student, _, labels = make_pair((4,), 500, seed=2)
    for divergence in ("kl", "reverse_kl", "jsd"):
        s = student.detach().clone().requires_grad_()
        loss = distill_loss(s, student.detach(), divergence=divergence, backend=backend)
        loss.backward()
        assert abs(float(loss.detach())) < 1e-6
        assert float(s.grad.abs().max()) < 1e-7


def test_all_ignored_mean_is_zero_with_zero_gradient():
    student, teacher, _ = make_pair((2, 3), 50)
    labels = torch.full((2, 3), -1)
    loss = distill_loss(student, teacher, labels, ignore_index=-1)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((student.grad == 0).all())


def test_teacher_gets_no_gradient_and_module_matches_function():
    student, teacher, labels = make_pair((2, 3), 80)
    teacher.requires_grad_()
    module = DistillLoss(divergence="jsd", beta=0.25, temperature=2.0)
    loss = module(student, teacher, labels)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    expected = distill_loss(student, teacher, labels, divergence="jsd", beta=0.25, temperature=2.0)
    assert torch.equal(loss, expected)
    assert "jsd" in repr(module)


def test_temperature_squared_is_not_applied():
    student, teacher, _ = make_pair((4,), 64)
    at_2 = distill_loss(student, teacher, temperature=2.0)
    ref = reference_loss(student.detach(), teacher, temperature=2.0)
    torch.testing.assert_close(at_2.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(divergence="kl2"), "unknown divergence"),
        (dict(reduction="avg"), "unknown reduction"),
        (dict(beta=0.0), "beta"),
        (dict(beta=1.0), "beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_options_raise(kwargs, message):
    student, teacher, _ = make_pair((2,), 10)
    with pytest.raises(ValueError, match=message):
        distill_loss(student, teacher, **kwargs)
    if "backend" not in kwargs:
        with pytest.raises(ValueError, match=message):
            DistillLoss(**kwargs)


def test_bad_tensors_raise():
    student, teacher, labels = make_pair((2, 3), 10)
    with pytest.raises(ValueError, match="vocab size mismatch"):
        distill_loss(student, teacher[..., :9])
    with pytest.raises(ValueError, match="shape mismatch"):
        distill_loss(student, teacher[:1])
    with pytest.raises(ValueError, match="labels shape"):
        distill_loss(student, teacher, labels[:1])
    with pytest.raises(ValueError, match="integer"):
        distill_loss(student, teacher, labels.float())
    with pytest.raises(ValueError, match="float32"):
        distill_loss(student, teacher.to(torch.int32))
    with pytest.raises(ValueError, match="empty"):
        distill_loss(student[:0], teacher[:0])


# ----------------------------------------------------------------------------- linear


def make_hidden(n_lead, vocab, h_s, h_t, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    w_t = torch.randn(vocab, h_t, generator=gen) / math.sqrt(h_t)
    hid_t = 2.0 * torch.randn(*n_lead, h_t, generator=gen)
    w_s = (torch.randn(vocab, h_s, generator=gen) / math.sqrt(h_s)).requires_grad_()
    hid_s = (2.0 * torch.randn(*n_lead, h_s, generator=gen)).requires_grad_()
    b_s = (0.1 * torch.randn(vocab, generator=gen)).requires_grad_() if bias else None
    b_t = 0.1 * torch.randn(vocab, generator=gen) if bias else None
    labels = torch.randint(0, vocab, n_lead, generator=gen)
    labels.view(-1)[::4] = -100
    return hid_s, w_s, b_s, hid_t, w_t, b_t, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_linear_equals_distill_loss_on_materialised_logits(backend, reduction, divergence):
    hid_s, w_s, b_s, hid_t, w_t, b_t, labels = make_hidden((3, 5), 200, 16, 24, seed=4)
    opts = dict(divergence=divergence, beta=0.4, temperature=1.3, reduction=reduction)
    loss = linear_distill_loss(
        hid_s, w_s, hid_t, w_t, labels, student_bias=b_s, teacher_bias=b_t, chunk_tokens=4,
        backend=backend, **opts,
    )  # fmt: skip
    weight = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
    (loss * weight).sum().backward()
    got = (hid_s.grad, w_s.grad, b_s.grad)
    for t in (hid_s, w_s, b_s):
        t.grad = None
    logits_s = hid_s @ w_s.T + b_s
    logits_t = hid_t @ w_t.T + b_t
    ref = distill_loss(logits_s, logits_t, labels, backend=backend, **opts)
    (ref * weight).sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(got, (hid_s.grad, w_s.grad, b_s.grad), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_linear_module_without_bias_and_bad_shapes():
    hid_s, w_s, _, hid_t, w_t, _, labels = make_hidden((6,), 50, 8, 12, bias=False)
    module = LinearDistillLoss(divergence="reverse_kl", chunk_tokens=2)
    loss = module(hid_s, w_s, hid_t, w_t, labels)
    loss.backward()
    ref = distill_loss(hid_s @ w_s.T, hid_t @ w_t.T, labels, divergence="reverse_kl")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    assert w_t.grad is None and hid_s.grad is not None and w_s.grad is not None
    with pytest.raises(ValueError, match="vocab size mismatch"):
        linear_distill_loss(hid_s, w_s, hid_t, w_t[:40])
    with pytest.raises(ValueError, match="student_weight must be"):
        linear_distill_loss(hid_s, w_s[:, :5], hid_t, w_t)
    with pytest.raises(ValueError, match="token shape mismatch"):
        linear_distill_loss(hid_s, w_s, hid_t[:3], w_t)
    with pytest.raises(ValueError, match="student_bias"):
        linear_distill_loss(hid_s, w_s, hid_t, w_t, student_bias=torch.zeros(49))
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_distill_loss(hid_s, w_s, hid_t, w_t, chunk_tokens=0)
    with pytest.raises(ValueError, match="beta"):
        linear_distill_loss(hid_s, w_s, hid_t, w_t, divergence="jsd", beta=1.5)


@pytest.mark.slow
def test_linear_peak_memory_is_a_fraction_of_the_eager_path():
    from benchmarks.distill_table import cpu_peak_extra_mb

    n, vocab = 4096, 8000
    eager = cpu_peak_extra_mb("eager_linear", n, vocab)
    fused = cpu_peak_extra_mb("qmetrics_linear", n, vocab)
    # eager holds several fp32 [N, V] planes (125 MiB each here); the fused path a few chunks
    assert eager > 3 * n * vocab * 4 / 2**20
    assert fused <= eager / 4, (fused, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_make_no_host_sync(backend, monkeypatch):
    """A training step (mean over labels with ignored tokens, incoming gradient ≠ 1) reads no
    tensor value on the host: the mean's weight stays on the device, the backward always
    multiplies. The Triton interpreter copies storages itself: the guard is lifted inside the
    launcher only."""
    import qmetrics.kernels.distill_loss as kernel

    import qmetrics.metrics.losses as losses
    from tests.test_no_sync import no_host_reads, unguarded

    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 33, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 33, generator=gen)
    h_s = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    w_s = torch.randn(33, 8, generator=gen, requires_grad=True)
    h_t, w_t = torch.randn(2, 5, 8, generator=gen), torch.randn(33, 8, generator=gen)
    labels = torch.randint(0, 33, (2, 5), generator=gen)
    labels[0, 1] = labels[1, 4] = -100
    with no_host_reads() as lifted:
        if backend == "triton":
            monkeypatch.setattr(kernel, "distill_loss_triton",
                                unguarded(kernel.distill_loss_triton, lifted))  # fmt: skip
        loss = losses.distill_loss(student, teacher, labels, backend=backend)
        (loss * 0.25).backward()
        linear = losses.linear_distill_loss(h_s, w_s, h_t, w_t, labels=labels, backend=backend)
        (linear * 3.0).backward()
    want = distill_loss(student.detach().requires_grad_(), teacher, labels, backend="torch")
    torch.testing.assert_close(loss, want)
    ref_student = student.detach().requires_grad_()
    (distill_loss(ref_student, teacher, labels, backend="torch") * 0.25).backward()
    torch.testing.assert_close(student.grad, ref_student.grad)
    assert h_s.grad is not None and w_s.grad is not None


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize(
    ("divergence", "dtype"),
    [("kl", torch.float32), ("reverse_kl", torch.float32), ("jsd", torch.float32),
     ("kl", torch.bfloat16)],
)  # fmt: skip
def test_compiled_twin_equals_the_eager_one(divergence, dtype, monkeypatch):
    """``QMETRICS_TORCH_COMPILE=1``: the compiled chunk function (chunks of 4 rows, the last
    shorter) gives the eager twin's loss and gradient through the public API, NaN logits of
    ignored tokens included, without falling back."""
    import qmetrics.kernels.distill_loss_torch as twin

    gen = torch.Generator().manual_seed(7)
    student = torch.randn(3, 5, 301, generator=gen).to(dtype)
    teacher = torch.randn(3, 5, 301, generator=gen).to(dtype)
    labels = torch.randint(0, 301, (3, 5), generator=gen)
    labels[0, 2] = labels[2, 4] = -100
    student[0, 2] = float("nan")  # padding: never read into the loss or the gradient
    monkeypatch.setattr(twin, "_COMPILED_CHUNK_ELEMENTS", 4 * 301)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("QMETRICS_TORCH_COMPILE", flag)
        s = student.clone().requires_grad_()
        loss = distill_loss(s, teacher, labels, divergence=divergence, beta=0.3,
                            temperature=0.7, backend="torch")  # fmt: skip
        (loss * 0.5).backward()
        results[flag] = (loss.detach(), s.grad)
    assert not twin._COMPILED.failed, "the compiled chunk function fell back to eager"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(results["1"][0], results["0"][0], rtol=tol, atol=1e-7)
    torch.testing.assert_close(results["1"][1], results["0"][1], rtol=tol, atol=1e-6)
    assert torch.isfinite(results["1"][1]).all()
    assert (results["1"][1][0, 2] == 0).all() and (results["1"][1][2, 4] == 0).all()


def test_backward_scales_in_place_unless_the_graph_is_kept():
    """Without ``retain_graph`` the stored gradient is scaled in place and handed on as
    ``student.grad`` (same storage: no second [N, V] tensor); with it, a second backward gives
    the same gradient again (the stored one was left intact)."""
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(4, 6, 50, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 6, 50, generator=gen)
    labels = torch.randint(0, 50, (4, 6), generator=gen)
    labels[1, 2] = -100
    stored: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.shape == (24, 50):
            stored.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = distill_loss(student, teacher, labels, backend="torch")
    (loss * 3.0).backward(retain_graph=True)
    first = student.grad.clone()
    assert student.grad.data_ptr() != stored[0]  # kept graph: a new tensor
    student.grad = None
    (loss * 3.0).backward()
    torch.testing.assert_close(student.grad, first)
    assert student.grad.data_ptr() == stored[0]  # last backward: the stored one, scaled
