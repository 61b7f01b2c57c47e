"""Property tests of :func:`qmetrics.compare_logits` (hypothesis).

Mostly on the torch backend; a few with the Triton backend (interpreter on CPU, slow, so few
examples). Logits are fp32 values away from the subnormal range (0 or |x| in [2^-10, 30]), so
that fp32 rounding, not underflow, is what the tolerances have to cover.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qmetrics.metrics.functional import compare_logits
from qmetrics.metrics.token_metrics import TokenMetrics
from tests.conftest import HAS_TRITON
from tests.float64_reference import reference_compare

TOL = 1e-5  # absolute slack for fp32 rounding of O(1)..O(log V) quantities

finite_logit = st.one_of(
    st.just(0.0),
    st.floats(min_value=2.0**-10, max_value=30.0, width=32),
    st.floats(min_value=-30.0, max_value=-(2.0**-10), width=32),
)
# a small grid of exactly representable values: shifting them by an integer stays exact
grid_logit = st.integers(min_value=-240, max_value=240).map(lambda i: i / 8)


@st.composite
def logit_pair(
    draw, element=finite_logit, max_rows: int = 3, max_vocab: int = 40, masked: bool = False
):
    """(ref, quant) fp32 tensors [N, V]; with ``masked``, some entries are -inf."""
    n = draw(st.integers(1, max_rows))
    V = draw(st.integers(1, max_vocab))
    elem = st.one_of(element, st.just(-math.inf)) if masked else element
    ref = draw(st.lists(elem, min_size=n * V, max_size=n * V))
    quant = draw(st.lists(elem, min_size=n * V, max_size=n * V))
    return (
        torch.tensor(ref, dtype=torch.float32).reshape(n, V),
        torch.tensor(quant, dtype=torch.float32).reshape(n, V),
    )


def run(ref: torch.Tensor, quant: torch.Tensor, backend: str = "torch", **kw) -> TokenMetrics:
    return compare_logits(ref, quant, top_k=kw.pop("top_k", 1), backend=backend, **kw)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = TOL, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)


# --- torch backend ---------------------------------------------------------------------------


@settings(deadline=None, max_examples=100)
@given(logit_pair(masked=True))
def test_kl_nonnegative(pair) -> None:
    ref, quant = pair
    m = run(ref, quant)
    ok = m.finite
    assert bool((m.kl[ok] >= -TOL).all()), m.kl
    assert bool((m.reverse_kl[ok] >= -TOL).all()), m.reverse_kl
    assert bool(m.kl[~ok].isnan().all()) and bool(m.reverse_kl[~ok].isnan().all())


@settings(deadline=None, max_examples=100)
@given(logit_pair(masked=True))
def test_kl_of_self_is_zero(pair) -> None:
    ref, _ = pair
    m = run(ref, ref.clone())
    ok = m.finite
    assert bool((m.kl[ok].abs() <= TOL).all()), m.kl
    assert bool((m.reverse_kl[ok].abs() <= TOL).all()), m.reverse_kl
    assert bool((m.mse[ok] == 0).all()), m.mse
    assert bool(m.top1_match[ok].all()) and bool(m.topk_match[ok].all())
    # cosine of a row with itself: 1, or 0 when its finite part is all zeros (norm 0)
    x = torch.where(torch.isfinite(ref), ref, 0.0)
    expected = torch.where((x != 0).any(-1), 1.0, 0.0)
    close(m.cosine[ok], expected[ok], atol=1e-6)


@settings(deadline=None, max_examples=100)
@given(logit_pair(masked=True))
def test_cosine_in_range(pair) -> None:
    ref, quant = pair
    m = run(ref, quant)
    cos = m.cosine[m.finite]
    assert bool((cos >= -1.0).all()) and bool((cos <= 1.0).all()), cos


@settings(deadline=None, max_examples=100)
@given(
    logit_pair(element=grid_logit, masked=True),
    st.lists(st.integers(-1000, 1000), min_size=6, max_size=6),
)
def test_shift_invariance(pair, shifts) -> None:
    # adding a constant to a row leaves P (or Q) unchanged; the grid values keep x + c exact
    ref, quant = pair
    n = ref.shape[0]
    c_ref = torch.tensor(shifts[:n], dtype=torch.float32)[:, None]
    c_quant = torch.tensor(shifts[3 : 3 + n], dtype=torch.float32)[:, None]
    a = run(ref, quant)
    b = run(ref + c_ref, quant + c_quant)
    for name in ("kl", "reverse_kl", "entropy_ref", "entropy_quant"):
        close(getattr(a, name), getattr(b, name))
    assert torch.equal(a.top1_match, b.top1_match)
    assert torch.equal(a.topk_match, b.topk_match)
    assert torch.equal(a.finite, b.finite)


@settings(deadline=None, max_examples=100)
@given(logit_pair(masked=True), st.integers(1, 64))
def test_top1_symmetric_and_implies_topk(pair, top_k) -> None:
    ref, quant = pair
    top_k = min(top_k, ref.shape[-1])
    a = run(ref, quant, top_k=top_k)
    b = run(quant, ref, top_k=top_k)
    assert torch.equal(a.top1_match, b.top1_match)
    assert bool((a.topk_match | ~a.top1_match).all())  # top1 => topk
    # KL(P‖Q) computed as reverse KL of the swapped pair
    assert bool(torch.isclose(a.kl, b.reverse_kl, rtol=1e-5, atol=TOL, equal_nan=True).all())
    if top_k == ref.shape[-1]:
        assert torch.equal(a.topk_match, a.finite)


@settings(deadline=None, max_examples=100)
@given(logit_pair(masked=True, max_vocab=100))
def test_entropy_bounds(pair) -> None:
    ref, quant = pair
    m = run(ref, quant)
    for t, name in ((ref, "entropy_ref"), (quant, "entropy_quant")):
        h = getattr(m, name)[m.finite]
        # at most log(number of tokens with non-zero probability) <= log V
        support = torch.isfinite(t).sum(-1)[m.finite].double()
        assert bool((h >= -TOL).all()), h
        assert bool((h.double() <= torch.log(support) + TOL).all()), (h, support)


@settings(deadline=None, max_examples=200)
@given(logit_pair(masked=True), st.data())
def test_matches_reference(pair, data) -> None:
    ref, quant = pair
    n, V = ref.shape
    top_k = data.draw(st.integers(1, min(V, 64)))
    labels = torch.tensor(
        data.draw(st.lists(st.one_of(st.integers(0, V - 1), st.just(-100)), min_size=n, max_size=n))
    )
    _check_against_reference(ref, quant, labels, top_k, "torch")


def _check_against_reference(ref, quant, labels, top_k, backend) -> None:
    m = compare_logits(ref, quant, labels, top_k=top_k, backend=backend)
    exp = reference_compare(ref, quant, labels, top_k=top_k)
    got = m.to_dict()
    assert set(got) == set(exp)
    both_finite = (torch.isfinite(ref) & torch.isfinite(quant)).any(-1)
    for name, e in exp.items():
        g = got[name]
        if e.dtype == torch.bool:
            assert torch.equal(g, e), (name, g, e)
            continue
        if name in ("cosine", "mse"):  # not pinned down when no position is finite in both
            g, e = g[both_finite], e[both_finite]
        torch.testing.assert_close(
            g.double(),
            e,
            rtol=1e-5,
            atol=TOL,
            equal_nan=True,
            msg=lambda msg, name=name: f"{name}: {msg}",
        )


# --- triton backend (interpreter: few, small examples) ---------------------------------------

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@needs_triton
@settings(deadline=None, max_examples=15)
@given(logit_pair(masked=True, max_rows=2, max_vocab=70), st.data())
def test_matches_reference_triton(pair, data) -> None:
    ref, quant = pair
    n, V = ref.shape
    top_k = data.draw(st.integers(1, min(V, 64)))
    labels = torch.tensor(
        data.draw(st.lists(st.one_of(st.integers(0, V - 1), st.just(-100)), min_size=n, max_size=n))
    )
    _check_against_reference(ref, quant, labels, top_k, "triton")


@needs_triton
@settings(deadline=None, max_examples=10)
@given(logit_pair(max_rows=2, max_vocab=70))
def test_kl_properties_triton(pair) -> None:
    ref, quant = pair
    m = run(ref, quant, backend="triton")
    assert bool((m.kl >= -TOL).all()) and bool((m.reverse_kl >= -TOL).all())
    s = run(ref, ref.clone(), backend="triton")
    assert bool((s.kl.abs() <= TOL).all()) and bool(s.top1_match.all())
    cos = m.cosine
    assert bool((cos >= -1.0).all()) and bool((cos <= 1.0).all())
    swapped = run(quant, ref, backend="triton")
    assert torch.equal(m.top1_match, swapped.top1_match)


wide_logit = st.one_of(
    st.just(0.0),
    st.floats(min_value=-1e4, max_value=1e4, width=32, allow_subnormal=False),
)


@settings(deadline=None, max_examples=100)
@given(logit_pair(element=wide_logit, masked=True))
def test_finite_rows_have_no_nan(pair) -> None:
    # logits up to |x| = 1e4: far more spread than exp() can represent in fp32; a finite row
    # must still get non-NaN KLs and entropies (inf is allowed for KL with masks)
    ref, quant = pair
    m = run(ref, quant)
    ok = m.finite
    for name in ("kl", "reverse_kl", "entropy_ref", "entropy_quant"):
        values = getattr(m, name)[ok]
        assert not bool(values.isnan().any()), (name, values)
    assert bool((m.kl[ok] >= -TOL).all()) and bool((m.reverse_kl[ok] >= -TOL).all())
