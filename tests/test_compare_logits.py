"""Tests of :func:`qmetrics.compare_logits` against the float64 reference, on both backends.

The Triton backend runs in the Triton interpreter on CPU (``TRITON_INTERPRET=1``, set in
conftest.py), which is slow: Triton cases keep to a few rows, and the big-vocabulary cases to 2.
Every random input comes from an explicitly seeded ``torch.Generator``.
"""

from __future__ import annotations

import math

import pytest
import torch

import qmetrics
from qmetrics.metrics.functional import compare_logits, resolve_backend
from qmetrics.metrics.token_metrics import FLOAT_FIELDS, LABEL_FIELDS, TokenMetrics
from tests.conftest import HAS_TRITON
from tests.float64_reference import make_pair_with_kl, reference_compare

BACKENDS = ["torch", "triton"]
BOOL_FIELDS = ("top1_match", "topk_match", "finite", "scored")

# Tolerances for fp32 computation against the float64 reference.
#
# RTOL = 1e-5 (~80 fp32 ulps) leaves room for the rounding of sums over up to ~150k vocabulary
# entries accumulated in fp32 (blockwise / tree sums), and nothing more.
#
# ATOL only matters for quantities near 0. The metrics are built from O(1)..O(10) fp32
# intermediates (probabilities <= 1, log-sum-exp <= log V + max|x| ~ 12 after the max shift), whose
# own resolution is one fp32 ulp: eps32 = 1.19e-7 near 1, ~1e-6 near 10. A value of KL or a
# probability below ~1e-7 cannot be resolved in fp32 from such intermediates, so that is the
# absolute floor for KL / probabilities, ~1e-6 for entropies / NLLs (log-scale quantities of size
# up to log V) and for the cosine (a ratio of sums of V products). The small-KL regime is pinned
# down much more tightly by test_small_kl_is_precise (1% relative at KL ~ 1e-6). MSE is a mean of
# squared differences, which fp32 gets to a relative error (x - y is exact when x ~ y), hence the
# tiny atol there.
RTOL = 1e-5
ATOL = {
    "kl": 1e-7,
    "reverse_kl": 1e-7,
    "entropy_ref": 1e-6,
    "entropy_quant": 1e-6,
    "cosine": 1e-6,
    "mse": 1e-9,
    "nll_ref": 1e-6,
    "nll_quant": 1e-6,
    "prob_ref": 1e-7,
    "prob_quant": 1e-7,
}


# --- helpers ---------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_pair(
    lead: tuple[int, ...],
    V: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    scale: float = 3.0,
    drift: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference logits scale·N(0,1) and a "quantized" copy ref + drift·scale·N(0,1)."""
    g = gen(seed)
    ref = scale * torch.randn(*lead, V, generator=g)
    quant = ref + drift * scale * torch.randn(*lead, V, generator=g)
    return ref.to(dtype), quant.to(dtype)


def make_labels(
    lead: tuple[int, ...], V: int, seed: int, *, ignore_index: int = -100, p_ignore: float = 0.25
) -> torch.Tensor:
    g = gen(seed + 1000)
    labels = torch.randint(0, V, lead, generator=g)
    ignored = torch.rand(lead, generator=g) < p_ignore
    return torch.where(ignored, torch.full_like(labels, ignore_index), labels)


def assert_matches_reference(
    got: TokenMetrics,
    exp: dict[str, torch.Tensor],
    *,
    rtol: float = RTOL,
    atol: dict[str, float] | None = None,
    fields: tuple[str, ...] | None = None,
) -> None:
    """Every field of ``got`` equals the reference: bool fields exactly, float fields to
    rtol/atol, with NaN == NaN and inf == inf. One AssertionError lists every mismatch."""
    atol = {**ATOL, **(atol or {})}
    got_d = got.to_dict()
    assert set(got_d) == set(exp), f"fields {sorted(got_d)} != {sorted(exp)}"
    assert got.has_labels == ("nll_ref" in exp)
    errors = []
    for name in fields or tuple(exp):
        g, e = got_d[name].cpu(), exp[name]
        assert g.shape == e.shape, f"{name}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        if name in BOOL_FIELDS:
            assert g.dtype == torch.bool, f"{name}: dtype {g.dtype}"
            bad = g != e
        else:
            assert g.dtype.is_floating_point, f"{name}: dtype {g.dtype}"
            g = g.to(torch.float64)
            ok = torch.isclose(g, e, rtol=rtol, atol=atol[name], equal_nan=True)
            bad = ~(ok | (g == e))  # g == e: inf == inf
        if bool(bad.any()):
            where = torch.nonzero(bad).tolist()[:8]
            pairs = ", ".join(
                f"{tuple(i)}: got {g[tuple(i)].item()!r} exp {e[tuple(i)].item()!r}" for i in where
            )
            errors.append(f"{name}: {int(bad.sum())}/{bad.numel()} differ: {pairs}")
    if errors:
        raise AssertionError("\n".join(errors))


def run_and_check(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None,
    backend: str,
    *,
    top_k: int = 5,
    ignore_index: int = -100,
    **tol,
) -> TokenMetrics:
    ref_before, quant_before = ref.clone(), quant.clone()
    got = compare_logits(
        ref, quant, labels, top_k=top_k, ignore_index=ignore_index, backend=backend
    )
    exp = reference_compare(ref, quant, labels, top_k=top_k, ignore_index=ignore_index)
    assert_matches_reference(got, exp, **tol)
    assert got.top_k == top_k
    # inputs are left untouched
    assert torch.equal(ref.isnan(), ref_before.isnan())
    assert torch.equal(ref.nan_to_num(0.0), ref_before.nan_to_num(0.0))
    assert torch.equal(quant.nan_to_num(0.0), quant_before.nan_to_num(0.0))
    return got


# --- random inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("seed", "rows", "V"),
    [(0, 4, 128), (1, 3, 1000), (2, 4, 4099), (3, 2, 32000)],
)
def test_random_fp32(backend: str, seed: int, rows: int, V: int) -> None:
    ref, quant = make_pair((rows,), V, seed)
    labels = make_labels((rows,), V, seed)
    labels[0] = int(ref[0].argmax())  # one label at the argmax (nll ~ small)
    run_and_check(ref, quant, labels, backend)
    run_and_check(ref, quant, None, backend)


@pytest.mark.parametrize(("seed", "rows", "V"), [(10, 64, 1000), (11, 16, 32000)])
def test_random_fp32_many_rows_torch(seed: int, rows: int, V: int) -> None:
    ref, quant = make_pair((rows,), V, seed, drift=1.0)
    run_and_check(ref, quant, make_labels((rows,), V, seed), "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("seed", "V"), [(20, 1000), (21, 4096)])
def test_low_precision_inputs(backend: str, dtype: torch.dtype, seed: int, V: int) -> None:
    # the reference sees the same rounded fp16/bf16 values, upcast: tolerances stay fp32-tight
    ref, quant = make_pair((3,), V, seed, dtype=dtype)
    assert ref.dtype == dtype
    run_and_check(ref, quant, make_labels((3,), V, seed), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend: str) -> None:
    ref, quant = make_pair((3,), 777, 22)
    run_and_check(ref, quant.to(torch.bfloat16), make_labels((3,), 777, 22), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [50257, 151936])
def test_large_odd_vocab(backend: str, V: int) -> None:
    ref, quant = make_pair((2,), V, 30 + V % 7)
    labels = torch.tensor([int(quant[0].argmax()), 12345])
    run_and_check(ref, quant, labels, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 2, 3, 7])
def test_small_vocab(backend: str, V: int) -> None:
    ref, quant = make_pair((5,), V, 40 + V)
    labels = make_labels((5,), V, 40 + V)
    for top_k in sorted({1, min(2, V), V}):
        got = run_and_check(ref, quant, labels, backend, top_k=top_k)
        if top_k == V:  # every token is in the reference top-V
            assert bool(got.topk_match.all())
    if V == 1:  # one token: P = Q = 1
        got = compare_logits(ref, quant, labels, top_k=1, backend=backend)
        assert torch.equal(got.kl, torch.zeros_like(got.kl))
        assert torch.equal(got.reverse_kl, torch.zeros_like(got.kl))
        assert torch.equal(got.entropy_ref, torch.zeros_like(got.kl))
        assert bool(got.top1_match.all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_input(backend: str) -> None:
    ref, quant = make_pair((2, 3), 500, 50)
    labels = make_labels((2, 3), 500, 50)
    got = run_and_check(ref, quant, labels, backend)
    assert got.shape == (2, 3)
    assert got.flatten().shape == (6,)
    assert got.nll_ref is not None and got.nll_ref.shape == (2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_1d_input_gives_scalars(backend: str) -> None:
    ref, quant = make_pair((), 300, 51)
    got = run_and_check(ref, quant, torch.tensor(17), backend)
    assert got.shape == ()
    got = run_and_check(ref, quant, torch.tensor(-100), backend)
    assert not bool(got.scored) and math.isnan(float(got.nll_ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_and_custom_ignore_index(backend: str) -> None:
    ref, quant = make_pair((4,), 100, 52)
    labels = torch.tensor([3, -1, 99, 0], dtype=torch.int32)
    got = run_and_check(ref, quant, labels, backend, ignore_index=-1)
    assert got.scored.tolist() == [True, False, True, True]
    # ignore_index may also be a valid token id: then that token is never scored
    labels = torch.tensor([3, 7, 99, 7])
    got = run_and_check(ref, quant, labels, backend, ignore_index=7)
    assert got.scored.tolist() == [True, False, True, False]
    for name in LABEL_FIELDS:
        values = getattr(got, name)
        assert values[1].isnan() and values[3].isnan() and not values[0].isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_labels(backend: str) -> None:
    ref, quant = make_pair((3,), 64, 53)
    got = run_and_check(ref, quant, None, backend)
    assert not got.has_labels
    assert all(getattr(got, name) is None for name in LABEL_FIELDS)
    assert bool(got.scored.all())


# --- memory layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_leading_dims(backend: str) -> None:
    big_ref, big_quant = make_pair((3, 4), 257, 60)
    ref, quant = big_ref[:, ::2], big_quant[:, 1::2]  # [3, 2, 257], no [N, V] view exists
    assert not ref.is_contiguous()
    labels = make_labels((3, 2), 257, 60)
    got = run_and_check(ref, quant, labels, backend)
    assert got.shape == (3, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_rows(backend: str) -> None:
    # rows that are contiguous but further apart than V: a row stride of V + 37
    big_ref, big_quant = make_pair((4,), 300 + 37, 61)
    ref, quant = big_ref[:, :300], big_quant[:, 37:]
    assert ref.stride() == (337, 1) and quant.stride() == (337, 1)
    run_and_check(ref, quant, make_labels((4,), 300, 61), backend)
    # and only one of the two padded
    run_and_check(ref, quant.contiguous(), None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_input(backend: str) -> None:
    # a [V, N].t() view has a non-unit vocab stride: it must be copied, not misread
    g = gen(62)
    ref_t = 3 * torch.randn(500, 3, generator=g)
    quant_t = ref_t + torch.randn(500, 3, generator=g)
    ref, quant = ref_t.t(), quant_t.t()
    assert ref.stride(-1) != 1
    run_and_check(ref, quant, make_labels((3,), 500, 62), backend)
    run_and_check(ref.contiguous(), quant, None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_rows(backend: str) -> None:
    # an expanded row: stride 0 over the leading dim
    ref, quant = make_pair((3,), 200, 63)
    ref_b = ref[0].expand(3, 200)
    assert ref_b.stride() == (0, 1)
    run_and_check(ref_b, quant, make_labels((3,), 200, 63), backend)


# --- masked vocabularies and non-finite rows -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_masks(backend: str) -> None:
    V = 300
    ref, quant = make_pair((7,), V, 70)
    inf = math.inf
    ref[0, 10:50] = -inf  # row 0: same mask in both
    quant[0, 10:50] = -inf
    ref[1, 100:] = -inf  # row 1: mask in ref only -> KL finite, reverse KL inf
    quant[2, ::3] = -inf  # row 2: mask in quant only -> KL inf, reverse KL finite
    quant[2, int(ref[2].argmax())] = -inf
    ref[3, 5] = -inf  # row 3: disjoint masks -> both KLs inf
    quant[3, 6] = -inf
    ref[4, 1:] = -inf  # row 4: one-hot P and Q on the same token
    quant[4, 1:] = -inf
    ref[5, :-1] = -inf  # row 5: a single finite ref logit, at the end
    quant[6, :] = ref[6, :]  # row 6: identical rows with identical masks
    ref[6, ::2] = -inf
    quant[6, ::2] = -inf
    labels = torch.tensor([20, 150, 0, 5, 0, V - 1, 1])  # rows 0, 1, 3: labels on masked tokens
    got = run_and_check(ref, quant, labels, backend)

    assert bool(got.finite.all())
    assert got.kl[[2, 3]].tolist() == [inf, inf]
    assert got.reverse_kl[[1, 3]].tolist() == [inf, inf]
    assert math.isfinite(got.kl[1]) and math.isfinite(got.reverse_kl[2])
    assert float(got.kl[4]) == 0.0 and float(got.entropy_ref[4]) == 0.0
    assert bool(got.top1_match[4])
    assert float(got.entropy_ref[5]) == 0.0 and float(got.prob_ref[5]) == 1.0
    assert abs(float(got.kl[6])) < 1e-7 and abs(float(got.reverse_kl[6])) < 1e-7
    # a label on a masked token has probability 0 and NLL +inf
    assert got.prob_ref[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    assert got.nll_ref[[0, 1, 3]].tolist() == [inf, inf, inf]
    assert float(got.prob_quant[0]) == 0.0 and float(got.nll_quant[0]) == inf
    # cosine / MSE skip the masked positions, so they stay finite
    assert bool(torch.isfinite(got.cosine).all()) and bool(torch.isfinite(got.mse).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_in_low_precision(backend: str) -> None:
    ref, quant = make_pair((2,), 100, 71, dtype=torch.bfloat16)
    ref[0, :50] = -math.inf
    quant[1, 3] = -math.inf
    run_and_check(ref, quant, torch.tensor([60, 3]), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_common_finite_position(backend: str) -> None:
    # each row has a finite entry, but never at the same position: the row is finite, both
    # KLs are inf. (cosine/MSE over an empty set are not pinned down by the spec: not checked)
    ref = torch.tensor([[0.0, -math.inf, 1.0, -math.inf]])
    quant = torch.tensor([[-math.inf, 2.0, -math.inf, 0.5]])
    got = compare_logits(ref, quant, torch.tensor([2]), top_k=1, backend=backend)
    exp = reference_compare(ref, quant, torch.tensor([2]), top_k=1)
    fields = tuple(k for k in exp if k not in ("cosine", "mse"))
    assert_matches_reference(got, exp, fields=fields)
    assert bool(got.finite[0]) and got.kl.tolist() == [math.inf]
    assert got.reverse_kl.tolist() == [math.inf]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows(backend: str) -> None:
    V = 64
    ref, quant = make_pair((9,), V, 72)
    ref[0, 3] = math.nan
    quant[1, 60] = math.nan
    ref[2, 0] = math.inf
    quant[3, 63] = math.inf
    ref[4, :] = -math.inf
    quant[5, :] = -math.inf
    ref[6, 7] = math.inf  # +inf next to -inf entries and a NaN
    ref[6, 8] = -math.inf
    quant[6, 9] = math.nan
    quant[7, :10] = -math.inf  # row 7 is fine (masked only); row 8 untouched
    labels = torch.tensor([1, 2, 3, 4, -100, 6, 7, 8, 9])
    got = run_and_check(ref, quant, labels, backend)

    bad = torch.arange(7)
    assert got.finite.tolist() == [False] * 7 + [True, True]
    for name in (*FLOAT_FIELDS, *LABEL_FIELDS):
        values = getattr(got, name)
        assert bool(values[bad].isnan().all()), name
        assert not bool(values[7:].isnan().any()), name
    assert not bool(got.top1_match[bad].any()) and not bool(got.topk_match[bad].any())
    # "scored" reflects the labels only
    assert got.scored.tolist() == [True] * 4 + [False] + [True] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_row_with_nan_in_a_masked_row_low_precision(backend: str) -> None:
    ref, quant = make_pair((3,), 40, 73, dtype=torch.float16)
    ref[0, 5] = math.nan
    quant[2, :] = -math.inf
    got = run_and_check(ref, quant, None, backend)
    assert got.finite.tolist() == [False, True, False]


# --- argmax ties and top-k -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_ties(backend: str) -> None:
    V = 20
    ref = torch.zeros(6, V)
    quant = torch.zeros(6, V)
    # row 0: two constant rows -> both argmax 0 -> match
    quant[0] = 5.0
    # row 1: ref maxima at 3 and 7 (first: 3), quant max at 7 only -> top1 False, but 7 is tied
    # for the top in ref: top-1 counts ties in its favour -> topk(k=1) True
    ref[1, 3] = ref[1, 7] = 2.0
    quant[1, 7] = 1.0
    # row 2: ref max at 3 and 7, quant maxima at 3 and 7 too -> both first index 3 -> match
    ref[2, 3] = ref[2, 7] = 2.0
    quant[2, 3] = quant[2, 7] = 9.0
    # row 3: ref max at 7 only, quant maxima at 3 and 7 -> quant argmax 3 -> no match;
    # ref has one logit (at 7) above ref[3] -> topk(k=1) False, topk(k=2) True
    ref[3, 7] = 2.0
    ref[3, 3] = 1.0
    quant[3, 3] = quant[3, 7] = 9.0
    # row 4: maxima tied at the very end / start of the vocabulary
    ref[4, V - 1] = ref[4, 0] = 1.0
    quant[4, V - 1] = 1.0
    # row 5: ties between -inf-masked rows: all masked but two equal logits
    ref[5, :] = -math.inf
    ref[5, 11] = ref[5, 12] = 0.0
    quant[5, 12] = 3.0
    for top_k in (1, 2, 5):
        got = run_and_check(ref, quant, None, backend, top_k=top_k)
        assert got.top1_match.tolist() == [True, False, True, False, False, False]
    got = compare_logits(ref, quant, top_k=1, backend=backend)
    assert got.topk_match.tolist() == [True, True, True, False, True, True]
    got = compare_logits(ref, quant, top_k=2, backend=backend)
    assert got.topk_match.tolist() == [True, True, True, True, True, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_counts_ties_in_favour(backend: str) -> None:
    # ref = [0, 1, 1, 1, 2, 3, ...]: the quant argmax lands on one of the tied 1s; three logits
    # (2, 3, 4) are strictly above it -> inside the top-k for k >= 4 only
    V = 8
    ref = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0, -1.0]]).repeat(3, 1)
    quant = torch.zeros(3, V)
    quant[0, 1] = 1.0
    quant[1, 3] = 1.0
    quant[2, 6] = 1.0
    for top_k, expected in [
        (1, [False, False, True]),
        (3, [False, False, True]),
        (4, [True, True, True]),
        (8, [True, True, True]),
    ]:
        got = run_and_check(ref, quant, None, backend, top_k=top_k)
        assert got.topk_match.tolist() == expected, top_k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 5, 64])
def test_top_k_values(backend: str, top_k: int) -> None:
    # big drift so that the quant argmax lands at all sorts of reference ranks
    rows = 4 if backend == "triton" else 64
    ref, quant = make_pair((rows,), 300, 80 + top_k, drift=1.5, scale=1.0)
    got = run_and_check(ref, quant, None, backend, top_k=top_k)
    if backend == "torch":  # enough rows for both outcomes to show up
        assert 0 < int(got.topk_match.sum()) < rows or top_k == 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_64_rank_boundary(backend: str) -> None:
    # quant argmax at reference rank 63 (0-based) -> in the top-64; rank 64 -> not
    V = 128
    ref = torch.arange(V, 0, -1, dtype=torch.float32).repeat(2, 1) / 8  # rank i at index i
    quant = torch.zeros(2, V)
    quant[0, 63] = 1.0
    quant[1, 64] = 1.0
    got = run_and_check(ref, quant, None, backend, top_k=64)
    assert got.topk_match.tolist() == [True, False]


# --- special relationships between ref and quant ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_inputs(backend: str, dtype: torch.dtype) -> None:
    ref, _ = make_pair((4,), 1000, 90, dtype=dtype)
    labels = make_labels((4,), 1000, 90)
    got = run_and_check(ref, ref.clone(), labels, backend)
    assert float(got.kl.abs().max()) < 1e-7
    assert float(got.reverse_kl.abs().max()) < 1e-7
    torch.testing.assert_close(
        got.cosine.double(), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6
    )
    assert bool((got.mse == 0).all())
    assert bool(got.top1_match.all()) and bool(got.topk_match.all())
    assert torch.equal(got.entropy_ref, got.entropy_quant)
    torch.testing.assert_close(got.nll_ref, got.nll_quant, rtol=0, atol=0, equal_nan=True)
    # the very same tensor object twice
    got = run_and_check(ref, ref, labels, backend)
    assert float(got.kl.abs().max()) < 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_copy(backend: str) -> None:
    # softmax is shift-invariant: quant = ref + 7 gives P = Q (up to the fp32 rounding of
    # ref + 7, which the reference sees too)
    ref, _ = make_pair((4,), 2000, 91)
    quant = ref + 7.0
    got = run_and_check(ref, quant, make_labels((4,), 2000, 91), backend)
    assert float(got.kl.abs().max()) < 1e-6
    assert float(got.reverse_kl.abs().max()) < 1e-6
    torch.testing.assert_close(got.entropy_ref, got.entropy_quant, rtol=1e-5, atol=1e-6)
    assert bool(got.top1_match.all())
    torch.testing.assert_close(
        got.mse.double(), torch.full((4,), 49.0, dtype=torch.float64), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("scale", "V"),
    [(0.01, 32000), (1.0, 32000), (8.0, 32000), (1.0, 151936)],
    ids=["flat", "medium", "peaked", "medium-151936"],
)
def test_small_kl_is_precise(backend: str, scale: float, V: int) -> None:
    # fp32 logits whose KL is ~1e-6: the result must be within 1% of the float64 reference
    # (this rules out cancellation-prone forms such as sum(P·(x - y)) - (lse(x) - lse(y)))
    rows = 2 if backend == "triton" else 4
    ref, quant = make_pair_with_kl(1e-6, rows, V, scale=scale, generator=gen(100 + int(scale)))
    got = compare_logits(ref, quant, backend=backend)
    exp = reference_compare(ref, quant)
    assert bool(((exp["kl"] > 0.9e-6) & (exp["kl"] < 1.1e-6)).all()), exp["kl"]
    for name in ("kl", "reverse_kl"):
        torch.testing.assert_close(
            getattr(got, name).double(),
            exp[name],
            rtol=1e-2,
            atol=0,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    assert_matches_reference(
        got,
        exp,
        fields=(
            "entropy_ref",
            "entropy_quant",
            "cosine",
            "mse",
            "top1_match",
            "topk_match",
            "finite",
            "scored",
        ),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_differences(backend: str) -> None:
    # quant one or a few fp32 ulps away from ref: KL ~ 1e-12, cosine 1 - tiny, MSE tiny
    ref, _ = make_pair((3,), 4096, 110)
    quant = ref.clone()
    quant[:, ::3] = torch.nextafter(ref[:, ::3], torch.tensor(math.inf))
    quant[:, 1::5] += 1e-3
    got = run_and_check(ref, quant, make_labels((3,), 4096, 110), backend)
    assert float(got.kl.abs().max()) < 1e-6
    assert bool((got.mse > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["offset", "scale"])
def test_large_logits(backend: str, kind: str) -> None:
    # |x| ~ 1e4: exp overflows without the max shift; the fp32 inputs are exact, so the
    # metrics are still resolved to fp32 precision by a max-shifted computation
    g = gen(120)
    V, rows = 1000, 3
    if kind == "offset":  # moderate differences on top of a big offset
        ref = 1e4 + 3 * torch.randn(rows, V, generator=g)
        quant = ref + torch.randn(rows, V, generator=g) - 2e4
    else:  # logits of size 1e4: P, Q nearly one-hot
        ref = 1e4 * torch.randn(rows, V, generator=g)
        quant = ref + 30 * torch.randn(rows, V, generator=g)
    labels = torch.tensor([int(ref[0].argmax()), int(quant[1].argmax()), 7])
    run_and_check(ref, quant, labels, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_logit_spread(backend: str) -> None:
    # tokens ~90+ nats apart: exp(-90) underflows fp32 and exp(+90) overflows it. The metrics
    # are still finite and well defined (e.g. ref [0, 89], quant [0, 0]: KL = log 2, reverse
    # KL = 89/2 - log 2 + log(1 + e^-89)); a finite row must never give NaN.
    ref = torch.tensor([[0.0, 89.0], [0.0, 100.0], [0.0, 0.0], [-50.0, 50.0], [0.0, 80.0]])
    quant = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 100.0], [50.0, -50.0], [0.0, 0.0]])
    got = run_and_check(ref, quant, torch.tensor([0, 0, 1, 0, 1]), backend, top_k=1)
    torch.testing.assert_close(got.kl[0].double(), torch.tensor(math.log(2), dtype=torch.float64))
    torch.testing.assert_close(
        got.reverse_kl[0].double(), torch.tensor(89 / 2 - math.log(2), dtype=torch.float64)
    )
    # wider rows: the same gaps inside a vocabulary of 1000
    g = gen(125)
    ref = 40 * torch.randn(2, 1000, generator=g)
    quant = 40 * torch.randn(2, 1000, generator=g)
    run_and_check(ref, quant, torch.tensor([3, 4]), backend)


# --- the API around the kernels --------------------------------------------------------------


def test_auto_backend_on_cpu_is_torch() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    ref, quant = make_pair((2,), 50, 130)
    got = qmetrics.compare_logits(ref, quant)
    assert_matches_reference(got, reference_compare(ref, quant))


def test_backends_agree() -> None:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    ref, quant = make_pair((2, 2), 3000, 131)
    labels = make_labels((2, 2), 3000, 131)
    a = compare_logits(ref, quant, labels, top_k=7, backend="torch").to_dict()
    b = compare_logits(ref, quant, labels, top_k=7, backend="triton").to_dict()
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        torch.testing.assert_close(
            a[name],
            b[name],
            rtol=RTOL,
            atol=ATOL.get(name, 0),
            equal_nan=True,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def test_field_dtypes_and_shapes() -> None:
    ref, quant = make_pair((2, 5), 40, 132)
    got = compare_logits(ref, quant, make_labels((2, 5), 40, 132), backend="torch")
    for name, t in got.to_dict().items():
        assert t.shape == (2, 5), name
        assert t.device == ref.device, name
        if name in BOOL_FIELDS:
            assert t.dtype == torch.bool, name
        else:
            assert t.dtype.is_floating_point, name


# --- input validation ------------------------------------------------------------------------

X = torch.zeros(2, 5)


@pytest.mark.parametrize(
    ("ref", "quant", "match"),
    [
        (X, torch.zeros(3, 5), r"shape mismatch: ref \(2, 5\) vs quant \(3, 5\)"),
        (X, torch.zeros(2, 5, 1), r"vocab size mismatch: ref has V=5, quant has V=1"),
        (X, torch.zeros(2, 6), r"vocab size mismatch: ref has V=5, quant has V=6"),
        (torch.zeros(2, 7), X, r"ref has V=7, quant has V=5"),
        (torch.zeros(2, 5, dtype=torch.int64), X, r"ref logits must be float32"),
        (X, torch.zeros(2, 5, dtype=torch.int32), r"quant logits must be float32"),
        (X, torch.zeros(2, 5, dtype=torch.float64), r"quant logits must be float32.*float64"),
        (torch.zeros(2, 5, dtype=torch.bool), X, r"ref logits must be float32"),
        (torch.tensor(1.0), torch.tensor(1.0), r"vocabulary dimension"),
        (torch.zeros(0, 5), torch.zeros(0, 5), r"empty input"),
        (torch.zeros(2, 0, 5), torch.zeros(2, 0, 5), r"empty input"),
        (torch.zeros(2, 0), torch.zeros(2, 0), r"empty vocabulary"),
        (X, torch.zeros(2, 5, device="meta"), r"device mismatch"),
        ([[0.0]], X, r"ref logits must be a torch.Tensor"),
    ],
)
def test_bad_logits(ref, quant, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compare_logits(ref, quant, backend="torch")


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.zeros(3, dtype=torch.int64), r"labels shape \(3,\) does not match.*\(2,\)"),
        (torch.zeros(2, 1, dtype=torch.int64), r"labels shape"),
        (torch.zeros(2), r"labels must be an integer tensor"),
        (torch.zeros(2, dtype=torch.bool), r"labels must be an integer tensor"),
        (torch.tensor([0, 5]), r"labels out of range.*V=5"),
        (torch.tensor([-1, 0]), r"labels out of range"),
        (torch.tensor([-100, 9]), r"labels out of range.*e\.g\. 9"),
        ([0, 1], r"labels must be a torch.Tensor"),
    ],
)
def test_bad_labels(labels, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compare_logits(X, X, labels, top_k=1, backend="torch", validate=True)


def test_ignore_index_is_allowed_out_of_range() -> None:
    got = compare_logits(X, X, torch.tensor([-7, 2]), top_k=1, ignore_index=-7, backend="torch")
    assert got.scored.tolist() == [False, True]
    with pytest.raises(ValueError, match="1 label.*e\\.g\\. -100"):
        compare_logits(
            X, X, torch.tensor([-100, 2]), top_k=1, ignore_index=-7, backend="torch", validate=True
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_give_nan_without_validate(backend: str) -> None:
    """Default (validate=False): no error, no out-of-bounds read; the bad tokens get NaN label
    fields, stay scored, and every other field and token equals the in-range result."""
    ref, quant = make_pair((4,), 300, 70)
    good = torch.tensor([3, 299, -100, 0])
    labels = torch.tensor([300, 299, -100, -5])  # rows 0 and 3 out of range
    got = compare_logits(ref, quant, labels, top_k=2, backend=backend)
    exp = compare_logits(ref, quant, good, top_k=2, backend=backend)
    assert got.scored.tolist() == [True, True, False, True]
    for name in LABEL_FIELDS:
        values = getattr(got, name)
        assert values[[0, 3]].isnan().all(), name
        torch.testing.assert_close(values[1:3], getattr(exp, name)[1:3], equal_nan=True)
    for name in (*FLOAT_FIELDS, "top1_match", "topk_match", "finite"):
        torch.testing.assert_close(getattr(got, name), getattr(exp, name), equal_nan=True)


@pytest.mark.parametrize(
    ("top_k", "V", "match"),
    [
        (0, 5, r"top_k must be in \[1, V=5\], got 0"),
        (-1, 5, r"top_k must be in \[1, V=5\]"),
        (6, 5, r"top_k must be in \[1, V=5\], got 6"),
        (65, 100, r"top_k must be at most 64, got 65"),
        (2.0, 5, r"top_k must be an int"),
        (True, 5, r"top_k must be an int"),
    ],
)
def test_bad_top_k(top_k, V: int, match: str) -> None:
    x = torch.zeros(2, V)
    with pytest.raises(ValueError, match=match):
        compare_logits(x, x, top_k=top_k, backend="torch")


def test_default_top_k_needs_five_tokens() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, V=3\], got 5"):
        compare_logits(x, x)


@pytest.mark.parametrize("backend", ["cuda", "Torch", "", None])
def test_bad_backend(backend) -> None:
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch'"):
        compare_logits(X, X, top_k=1, backend=backend)


def test_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs CUDA tensors \(got cpu\).*TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        compare_logits(X, X, top_k=1, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    # the explicit torch backend and auto are unaffected
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
