"""Property tests of :func:`qmetrics.metrics.output_stats.output_stats` (hypothesis): the float64
reference on rows with masked (−inf) entries, the bounds of each statistic, shift invariance,
and that masked entries change nothing. Torch backend (eager and compiled); the Triton
interpreter on a few small examples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qmetrics.kernels.torch_compile import compiler_available

from qmetrics.metrics.output_stats import output_stats, output_stats_rows
from tests.conftest import HAS_TRITON
from tests.float64_reference import reference_output_stats
from tests.test_properties import finite_logit, grid_logit

TOL = 1e-5  # absolute slack for fp32 rounding of O(1)..O(log V) quantities
STATS = ("entropy", "max_prob", "margin", "lse", "nll")


@st.composite
def logit_rows(
    draw, element=finite_logit, max_rows: int = 3, max_vocab: int = 40, masked=True, min_vocab=1
):
    """(logits fp32 [N, V], labels [N]); with ``masked`` some entries are −inf (a row may
    have none finite); labels may be ``-100`` or out of range (NaN NLL)."""
    n = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(min_vocab, max_vocab))
    elem = st.one_of(element, st.just(-math.inf)) if masked else element
    values = draw(st.lists(elem, min_size=n * vocab, max_size=n * vocab))
    label = st.one_of(st.integers(0, vocab - 1), st.sampled_from([-100, -1, vocab, vocab + 3]))
    labels = draw(st.lists(label, min_size=n, max_size=n))
    x = torch.tensor(values, dtype=torch.float32).reshape(n, vocab)
    return x, torch.tensor(labels)


def _against_reference(x: torch.Tensor, labels: torch.Tensor, **kw) -> None:
    """:func:`output_stats` of ``x`` (``kw``: backend, compile) against the float64 reference."""
    _raw_against_reference(output_stats_rows(x, labels, **kw), x, labels)


def _raw_against_reference(raw: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> None:
    """The [6, N] rows ``raw`` of ``x`` [N, V] against the float64 reference (lse and nll to a
    tolerance that grows with the largest |x|)."""
    ref = reference_output_stats(x, labels)
    assert torch.equal(raw[5] > 0, ref["finite"])
    big = 1.0 + float(torch.where(torch.isfinite(x), x.abs(), 0.0).max())  # lse, nll: O(|x|)
    for k, name in enumerate(STATS):
        scale = big if name in ("lse", "nll") else 1.0
        torch.testing.assert_close(raw[k].double(), ref[name], rtol=1e-5, atol=TOL * scale,
                                   equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


@settings(deadline=None, max_examples=200)
@given(logit_rows())
def test_matches_reference(rows) -> None:
    _against_reference(*rows, backend="torch", compile=False)


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C++ compiler")
@settings(deadline=None, max_examples=15)
@given(logit_rows(min_vocab=8, max_vocab=8))
def test_compiled_matches_reference(rows) -> None:
    """One V, so that the examples share one compiled function (new row counts do not
    recompile)."""
    _against_reference(*rows, backend="torch", compile=True)


@settings(deadline=None, max_examples=200)
@given(logit_rows(max_vocab=100))
def test_bounds(rows) -> None:
    """With F finite entries in a finite row: 0 ≤ H ≤ log F, 1/F ≤ p1 ≤ 1, 0 ≤ p1 − p2 ≤ p1,
    lse ≥ max x, nll ≥ −log p1 (+inf exactly on a masked label)."""
    x, labels = rows
    s = output_stats(x, labels, backend="torch", compile=False)
    ok = s.finite
    n_finite = torch.isfinite(x).sum(-1).double()[ok]
    entropy, p1, margin = s.entropy[ok].double(), s.max_prob[ok].double(), s.margin[ok].double()
    assert bool((entropy >= -TOL).all()) and bool((entropy <= n_finite.log() + TOL).all())
    assert bool((p1 <= 1 + TOL).all()) and bool((p1 >= 1 / n_finite - TOL).all())
    assert bool((margin >= -TOL).all()) and bool((margin <= p1 + TOL).all())
    top = x.amax(-1)[ok].double()
    assert bool((s.lse[ok].double() >= top - TOL * (1 + top.abs())).all())
    scored = ok & (labels >= 0) & (labels < x.shape[1])
    picked = x[torch.arange(len(labels)), labels.clamp(0, x.shape[1] - 1)]
    assert torch.equal(s.nll[scored] == math.inf, picked[scored] == -math.inf)
    finite_nll = scored & (picked > -math.inf)
    nll_floor = -s.max_prob[finite_nll].double().log()
    assert bool((s.nll[finite_nll].double() >= nll_floor - TOL * (1 + nll_floor)).all())
    assert bool(s.entropy[~ok].isnan().all()) and bool(s.nll[~ok].isnan().all())


@settings(deadline=None, max_examples=100)
@given(logit_rows(element=grid_logit), st.integers(-40, 40))
def test_shift_invariance(rows, shift) -> None:
    """x + c (exact on the grid) leaves entropy, p1, margin and nll alone and moves lse by c."""
    x, labels = rows
    a = output_stats(x, labels, backend="torch", compile=False)
    b = output_stats(x + shift, labels, backend="torch", compile=False)
    assert torch.equal(a.finite, b.finite)
    for name in ("entropy", "max_prob", "margin", "nll"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=TOL,
                                   equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip
    torch.testing.assert_close(b.lse, a.lse + shift, rtol=1e-5, atol=1e-4, equal_nan=True)


@settings(deadline=None, max_examples=100)
@given(logit_rows(masked=False), st.integers(1, 20), st.data())
def test_masked_entries_change_nothing(rows, extra, data) -> None:
    """−inf entries inserted anywhere in a row (what a top-k or vocabulary mask leaves) give
    the statistics of the row without them."""
    x, labels = rows
    n, vocab = x.shape
    where = data.draw(st.lists(st.integers(0, vocab), min_size=extra, max_size=extra))
    cols, keep = [], []
    for j in range(vocab + 1):
        cols += [torch.full((n, 1), -math.inf)] * where.count(j)
        keep += [False] * where.count(j)
        if j < vocab:
            cols.append(x[:, j : j + 1])
            keep.append(True)
    wide = torch.cat(cols, dim=1)
    index = torch.tensor(keep).nonzero().squeeze(1)
    inside = (labels >= 0) & (labels < vocab)
    wide_labels = torch.where(inside, index[labels.clamp(0, vocab - 1)], -100)
    a = output_stats(x, labels, backend="torch", compile=False)
    b = output_stats(wide, wide_labels, backend="torch", compile=False)
    assert bool(b.finite.all())
    for name in STATS:
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-6, atol=1e-6,
                                   equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@settings(deadline=None, max_examples=15)
@given(logit_rows(max_rows=2, max_vocab=70), st.sampled_from([None, 16]))
def test_matches_reference_triton(rows, block_v) -> None:
    """The kernel as ``output_stats`` launches it (one tile here), and with tiles of 16
    (the online rescaling across tiles, tiles that are all −inf)."""
    if block_v is None:
        _against_reference(*rows, backend="triton")
        return
    from qmetrics.kernels.output_stats import output_stats_triton

    x, labels = rows
    _raw_against_reference(output_stats_triton(x, labels, block_v=block_v), x, labels)
