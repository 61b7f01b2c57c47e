"""The CPU twin (``logit_compare_torch``) on [B, T, V] views (issue 10, items 1-2): slices,
transposed batch/sequence dims and misaligned bases give the contiguous result, without a copy
of the logits and without a host sync; out-of-range labels give NaN, never an OOB read."""

from __future__ import annotations

import contextlib

import pytest
import torch
from qmetrics.kernels.logit_compare_torch import logit_compare_torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.float64_reference import FLOAT_KEYS, LABEL_KEYS, MATCH_KEYS, reference_compare

FLAGS = (*MATCH_KEYS, "finite", "scored")


def _run(ref, quant, labels=None, **kw):
    return logit_compare_torch(ref, quant, labels, top_k=5, ignore_index=-100, **kw)


def _logits(b: int, t: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ref = 3 * torch.randn(b, t, vocab, generator=gen)
    return ref, ref + 0.1 * torch.randn(b, t, vocab, generator=gen)


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in got:
        if k in FLAGS:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, equal_nan=True)


VIEWS = {
    "shift [:, :-1]": lambda x: x[:, :-1],
    "shift [:, 1:]": lambda x: x[:, 1:],
    "transposed B/T": lambda x: x.transpose(0, 1),
    "misaligned [..., 1:]": lambda x: x[..., 1:],
    "every other row": lambda x: x[:, ::2],
}


@pytest.mark.parametrize("vocab", [50257, 32001, 128256])
@pytest.mark.parametrize("view", list(VIEWS))
def test_views_equal_contiguous(vocab, view):
    ref, quant = _logits(2, 5, vocab, seed=vocab)
    x, y = VIEWS[view](ref), VIEWS[view](quant)
    assert x.stride(-1) == 1 and not x.is_contiguous()
    n, v = x.shape[0] * x.shape[1], x.shape[-1]
    labels = torch.arange(n) * 7919 % v
    got = _run(x, y, labels, chunk_rows=2)
    _assert_same(got, _run(x.contiguous(), y.contiguous(), labels))


def test_different_layouts_for_ref_and_quant():
    ref, quant = _logits(3, 4, 1000)
    y_t = quant.transpose(0, 1).contiguous().transpose(0, 1)  # same values, B/T-swapped memory
    _assert_same(_run(ref[:, 1:], y_t[:, 1:]), _run(ref[:, 1:].contiguous(), quant[:, 1:]))
    _assert_same(_run(ref, y_t), _run(ref, quant))


def test_2d_input_and_3d_input_agree():
    ref, quant = _logits(2, 3, 700)
    _assert_same(_run(ref.view(6, 700), quant.view(6, 700)), _run(ref, quant))


@pytest.mark.parametrize(
    "make_labels",
    [
        lambda ids: ids[:, -1:],  # stride 6
        lambda ids: ids[:, :1].expand(4, 1),  # stride 0
        lambda ids: ids.t()[1],  # a strided row
    ],
    ids=["sliced", "expanded", "strided"],
)
def test_label_layouts(make_labels):
    ref, quant = _logits(4, 1, 300)
    ids = torch.randint(0, 300, (4, 6), generator=torch.Generator().manual_seed(1))
    labels = make_labels(ids)
    got = _run(ref, quant, labels)
    want = reference_compare(ref, quant, labels.contiguous())
    for k in LABEL_KEYS:
        torch.testing.assert_close(got[k].double(), want[k].reshape(-1), rtol=1e-6, atol=1e-7)


def test_out_of_range_labels_are_nan_not_read():
    ref, quant = _logits(1, 6, 50)
    labels = torch.tensor([3, 50, -1, 10**12, -100, 49])
    got = _run(ref, quant, labels)
    valid = torch.tensor([True, False, False, False, False, True])
    want = reference_compare(ref, quant, torch.where(valid, labels, -100))
    for k in LABEL_KEYS:
        assert torch.isnan(got[k][~valid]).all(), k
        torch.testing.assert_close(got[k][valid].double(), want[k][0, valid], rtol=1e-6, atol=0)
    assert got["scored"].tolist() == [True, True, True, True, False, True]
    for k in FLOAT_KEYS:  # the other fields as usual
        torch.testing.assert_close(got[k].double(), want[k][0], rtol=2e-5, atol=1e-6)


class _LargeOutputs(TorchDispatchMode):
    """Records the largest new tensor any op produces (views of its inputs not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        inputs = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shifted_view_is_not_copied(dtype):
    ref, quant = (t.to(dtype) for t in _logits(4, 65, 2000))
    x, y = ref[:, :-1], quant[:, :-1]  # the next-token shift: rows do not collapse for B > 1
    labels = torch.randint(0, 2000, (4 * 64,))
    with _LargeOutputs() as mode:
        _run(x, y, labels, chunk_rows=8, compile=False)
    # nothing larger than the work buffers (6 planes of 8 rows) is made: no [N, V] copy
    assert mode.largest <= 6 * 8 * 2000, mode.largest
    assert mode.largest < x.numel() // 5


@contextlib.contextmanager
def _no_host_sync():
    """Tensor → Python conversions raise (on CUDA each one is a device sync)."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync: a tensor was converted to a Python value")

    names = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_no_host_sync():
    ref, quant = _logits(2, 9, 500)
    ref[0, 1, 3] = -torch.inf  # a masked row (float64 path)
    quant[1, 2, 5] = torch.nan  # a non-finite row
    quant[1, 3] = ref[1, 3] + 60 * torch.linspace(0, 1, 500)  # t > 40 (float64 path)
    labels = torch.tensor([1, 2, -100, 500, *range(14)])
    with _no_host_sync():
        got = _run(ref[:, 1:], quant[:, 1:], labels[:16])
    assert not bool(got["finite"][8 + 1])  # the conversions are back
    with pytest.raises(AssertionError, match="host sync"), _no_host_sync():
        bool(torch.ones(1))  # the patch does bite


def test_special_rows_compiled_and_eager():
    """Ties, −inf, NaN, +inf and far-apart rows, through both implementations."""
    ref, quant = _logits(2, 9, 300, seed=5)
    ref[0, 0, 7] = ref[0, 0, 9] = ref[0, 0].max() + 1  # tie: the first index wins
    quant[0, 0] = ref[0, 0]
    ref[0, 1, 4] = -torch.inf
    quant[0, 2, 4] = -torch.inf
    quant[0, 3, 1] = torch.nan
    ref[0, 4, 2] = torch.inf
    quant[1, 0] = ref[1, 0] + 80 * torch.linspace(-1, 1, 300)
    labels = torch.arange(18) * 17 % 300
    want = reference_compare(ref, quant, labels.view(2, 9))
    for compile in (False, True):
        got = _run(ref, quant, labels, chunk_rows=3, compile=compile)
        for k in FLAGS:
            assert torch.equal(got[k], want[k].reshape(-1)), (compile, k)
        for k in (*FLOAT_KEYS, *LABEL_KEYS):
            torch.testing.assert_close(
                got[k].double(), want[k].reshape(-1), rtol=2e-5, atol=1e-6, equal_nan=True,
                msg=lambda m, k=k, c=compile: f"compile={c} {k}: {m}",
            )  # fmt: skip


def test_bad_shapes_raise():
    ref, quant = _logits(1, 2, 10)
    with pytest.raises(ValueError, match="differ in shape"):
        _run(ref, quant[:, :1])
    with pytest.raises(ValueError, match="contiguous last dim"):
        _run(ref.transpose(1, 2), quant.transpose(1, 2))
    with pytest.raises(ValueError, match="labels has 3 entries"):
        _run(ref, quant, torch.zeros(3, dtype=torch.int64))


def test_compiled_reads_shifted_views():
    """The compiled path takes the [B, T, V] view whole (rows that do not collapse)."""
    ref, quant = _logits(3, 7, 257, seed=9)
    x, y = ref[:, :-1], quant.transpose(0, 1).contiguous().transpose(0, 1)[:, :-1]
    labels = torch.arange(18) * 31 % 257
    _assert_same(_run(x, y, labels, compile=True), _run(x, y, labels, compile=False))
