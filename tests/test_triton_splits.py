"""The Triton kernel's multi-tile and split-V paths (merge kernel) against the float64
reference: small tiles and forced splits exercise on small inputs what large vocabularies and
few rows do on a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import HAS_TRITON, TEST_DEVICE
from tests.float64_reference import reference_compare

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

TOL = {"kl": 1e-7, "reverse_kl": 1e-7, "entropy_ref": 1e-6, "entropy_quant": 1e-6,
       "cosine": 1e-6, "mse": 1e-9, "nll_ref": 1e-6, "nll_quant": 1e-6, "prob_ref": 1e-7,
       "prob_quant": 1e-7}  # fmt: skip


def inputs(seed: int, rows: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    ref = 3 * torch.randn(rows, vocab, generator=g)
    quant = ref + 0.3 * torch.randn(rows, vocab, generator=g) + 1.5
    quant[1, vocab // 3 :] = ref[1, vocab // 3 :] + 1e-3 * torch.randn(vocab - vocab // 3,
                                                                       generator=g)  # fmt: skip
    ref[2, : vocab // 2] = -torch.inf  # masked head: splits holding only -inf for ref
    quant[3, 5] = -torch.inf  # KL(P‖Q) = inf in one split only
    ref[4] = ref[4].max()  # all ties: first index wins across splits
    quant[4, -1] = quant[4].max() + 1
    quant[5, 7] = torch.nan  # non-finite row
    # a maximum in the last tile 70 nats above the first tile's: past what the fast kernel's
    # fixed anchor allows (60), so the general kernel takes the row; 50 nats stays fast
    ref[6, -2] = ref[6, : vocab // 4].max() + 70
    quant[7, -3] = quant[7, : vocab // 4].max() + 50
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[0] = -100
    return ref, quant, labels


# (tile width, splits, dtype, top_k): one split and several, uneven splits, many small tiles,
# 16-bit inputs; top_k = 16 where the streaming top-k buffer crosses tiles and splits
CASES = [
    (64, 1, torch.float32, 1), (64, 1, torch.float32, 16), (64, 2, torch.float32, 16),
    (64, 3, torch.float32, 1), (32, 7, torch.float32, 16), (128, 2, torch.float32, 1),
    (64, 2, torch.bfloat16, 16), (64, 2, torch.bfloat16, 1), (128, 1, torch.float16, 16),
]  # fmt: skip


@pytest.mark.parametrize(("block_v", "splits", "dtype", "top_k"), CASES)
def test_tiles_and_splits_match_reference(block_v, splits, dtype, top_k):
    from qmetrics.kernels.logit_compare import logit_compare_triton

    ref, quant, labels = inputs(block_v + splits, rows=8, vocab=301)
    ref, quant = ref.to(dtype), quant.to(dtype)
    got = logit_compare_triton(ref.to(TEST_DEVICE), quant.to(TEST_DEVICE),
                               labels.to(TEST_DEVICE), top_k=top_k, ignore_index=-100,
                               block_v=block_v, splits=splits)  # fmt: skip
    exp = reference_compare(ref, quant, labels, top_k=top_k)
    for name, e in exp.items():
        g = got[name].cpu()
        if e.dtype == torch.bool:
            assert torch.equal(g, e), name
        else:
            ok = torch.isclose(g.double(), e, rtol=1e-5, atol=TOL[name], equal_nan=True)
            assert bool((ok | (g.double() == e)).all()), f"{name}: {g} vs {e}"


@pytest.mark.parametrize("block_v", [64, 8192])
def test_small_kl_under_a_large_offset_with_a_masked_tail(block_v):
    # quant = ref − 200 + tiny noise: KL ~ 1e-6 must keep its precision when the last tile is
    # partly masked (the masked lanes must not turn the small-term sums into NaN)
    from qmetrics.kernels.logit_compare import logit_compare_triton

    g = torch.Generator().manual_seed(11)
    ref = 3 * torch.randn(4, 301, generator=g, dtype=torch.float64)
    quant = ref - 200 + 1.4e-3 * torch.randn(4, 301, generator=g, dtype=torch.float64)
    ref, quant = ref.float(), quant.float()
    got = logit_compare_triton(ref.to(TEST_DEVICE), quant.to(TEST_DEVICE), None, top_k=5,
                               ignore_index=-100, block_v=block_v, splits=1)  # fmt: skip
    exp = reference_compare(ref, quant, None, top_k=5)
    for name in ("kl", "reverse_kl"):
        assert exp[name].max() < 1e-5
        torch.testing.assert_close(got[name].cpu().double(), exp[name], rtol=1e-2, atol=0)
