"""Strided inputs: ``compare_logits`` reads views of the logits and labels it is given, never a
copy of the logits, and gives the result of the same values made contiguous (to fp32 rounding).

Layouts: next-token shifts ``x[:, :-1]`` / ``x[:, 1:]`` of [B, T, V] with B > 1, transposed
batch/sequence dims, a misaligned base ``x[..., 1:]`` (V odd), ref and quant in different
layouts, 4-D and 1-D inputs; labels strided (``ids[:, 1:]``, ``ids[:, -1:]``), expanded and
sliced. The Triton backend runs in the interpreter: shapes stay small.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import qmetrics.metrics.functional as functional
from qmetrics.metrics.token_metrics import TokenMetrics

BACKENDS = ["torch", "triton"]
compare_logits = inspect.unwrap(functional.compare_logits)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    ref = 3.0 * torch.randn(*shape, generator=g)
    return ref, ref + torch.randn(*shape, generator=g)


def assert_same(got: TokenMetrics, want: TokenMetrics) -> None:
    """Equal flags, floats equal to a few fp32 ulps (a backend may group the rows of a view
    differently into chunks, which changes the rounding of its fp32 partial sums)."""
    assert got.to_dict().keys() == want.to_dict().keys()
    for name, value in want.to_dict().items():
        torch.testing.assert_close(getattr(got, name), value, rtol=1e-6, atol=1e-9, equal_nan=True)


def check(ref: torch.Tensor, quant: torch.Tensor, labels, backend: str) -> TokenMetrics:
    """compare_logits of the views equals that of contiguous copies; returns the former."""
    got = compare_logits(ref, quant, labels, top_k=3, backend=backend)
    want = compare_logits(
        ref.contiguous(),
        quant.contiguous(),
        None if labels is None else labels.contiguous(),
        top_k=3,
        backend=backend,
    )
    assert got.shape == ref.shape[:-1]
    assert_same(got, want)
    return got


def labels_for(lead: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, lead, generator=gen(seed))
    labels.view(-1)[0] = -100
    return labels


LAYOUTS = {
    "shift_last": lambda x: x[:, :-1],
    "shift_first": lambda x: x[:, 1:],
    "transposed": lambda x: x.transpose(0, 1)[:, :-1],  # [T, B, V] storage seen as [B, T, V]
    "misaligned": lambda x: x[:, :-1, 1:],
    "row_gaps": lambda x: x[:, :-1, :-3],  # row stride ≠ V
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_leading_dim_views_equal_contiguous(backend: str, layout: str) -> None:
    ref, quant = pair((3, 4, 67), seed=1)
    view = LAYOUTS[layout]
    r, q = view(ref), view(quant)
    check(r, q, labels_for(r.shape[:-1], r.shape[-1], 2), backend)
    if backend == "torch":  # the interpreter is slow; the label-free path is the same launch
        check(r, q, None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_and_quant_in_different_layouts(backend: str) -> None:
    ref, quant = pair((3, 4, 64), seed=3)
    quant_t = quant.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [T, B] storage
    check(ref[:, 1:], quant_t[:, 1:], labels_for((3, 3), 64, 4), backend)
    check(ref[:, 1:], quant[:, 1:].contiguous(), None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_4d_and_1d_inputs(backend: str) -> None:
    ref, quant = pair((2, 3, 3, 40), seed=5)
    for sl in ((slice(None), slice(None), slice(1, None)),  # collapses to [4, 2, V]: a view
               (slice(None), slice(1, None), slice(1, None))):  # no view: copied  # fmt: skip
        r, q = ref[sl], quant[sl]
        check(r, q, labels_for(r.shape[:-1], 40, 6), backend)
    check(ref[1, 2, 0], quant[1, 2, 0], torch.tensor(7), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_expanded_and_sliced_labels(backend: str) -> None:
    ref, quant = pair((2, 3, 50), seed=7)
    ids = torch.randint(0, 50, (2, 7), generator=gen(8))
    ids[0, 4] = -100
    # ids[:, 4:5] is [2, 1] with stride 7: reshape(-1) of it is a strided view
    check(ref[:, :1], quant[:, :1], ids[:, 4:5], backend)
    check(ref, quant, ids[:, 1:7:2], backend)  # sliced with a step
    check(ref, quant, torch.tensor([5]).expand(2, 3), backend)  # expanded: stride 0
    check(ref, quant, ids[:, -3:].transpose(0, 1).contiguous().transpose(0, 1), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [50257, 32001, 128256])
def test_real_vocabularies_sliced(backend: str, vocab: int) -> None:
    # GPT-2, a 32001-token Llama, Llama 3: [2, 1, V] next-token slices of [2, 2, V + 1] with a
    # misaligned base (x[:, 1:, 1:]), and strided labels
    ref, quant = pair((2, 2, vocab + 1), seed=vocab)
    labels = labels_for((2, 2), vocab, vocab + 1)
    check(ref[:, 1:, 1:], quant[:, 1:, 1:], labels[:, :1], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_logits_are_not_copied(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``x[:, :-1]`` of [B, T, V], B > 1: the backend gets views of the caller's storage, and no
    ``contiguous`` / ``reshape`` / ``clone`` / ``view`` call copies the logits anywhere."""
    ref, quant = pair((3, 5, 96), seed=9)
    storages = {t.untyped_storage().data_ptr() for t in (ref, quant)}

    def shares(t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in storages

    for name in ("contiguous", "reshape", "clone", "flatten"):
        original = getattr(torch.Tensor, name)

        def no_copy(self, *args, _original=original, _name=name, **kwargs):
            out = _original(self, *args, **kwargs)
            if shares(self) and not shares(out):
                raise AssertionError(f"Tensor.{_name}() copied the logits {tuple(self.shape)}")
            return out

        monkeypatch.setattr(torch.Tensor, name, no_copy)

    seen: list[torch.Tensor] = []
    if backend == "torch":
        spied = functional.logit_compare_torch
        target, attr = functional, "logit_compare_torch"
    else:
        import qmetrics.kernels.logit_compare as target

        spied, attr = target.logit_compare_triton, "logit_compare_triton"

    def spy(ref_in, quant_in, *args, **kwargs):
        seen.extend([ref_in, quant_in])
        return spied(ref_in, quant_in, *args, **kwargs)

    monkeypatch.setattr(target, attr, spy)
    labels = labels_for((3, 4), 96, 10)
    compare_logits(ref[:, :-1], quant[:, :-1], labels, top_k=3, backend=backend)
    assert len(seen) == 2 and all(shares(t) and t.shape == (3, 4, 96) for t in seen)
