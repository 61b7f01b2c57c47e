"""The fused hidden-state row sums (Triton kernel and CPU path) against the float64 reference,
and the LayerStats accumulator: several batches, merge/state_dict, identical inputs, non-finite
rows."""

from __future__ import annotations

import math

import pytest
import torch

from qmetrics.metrics.layer_stats import LayerStats, hidden_row_sums
from tests.conftest import HAS_TRITON, TEST_DEVICE
from tests.float64_reference import (
    HIDDEN_SUM_KEYS,
    reference_hidden_sums,
    reference_layer_errors,
)

NO_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=NO_TRITON)]


def pair(seed: int, rows: int, hidden: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ref = 2 * torch.randn(rows, hidden, generator=g)
    cand = ref + 0.05 * torch.randn(rows, hidden, generator=g)
    cand[1] = ref[1]  # identical row
    cand[2] = ref[2] + 1e-6 * torch.randn(hidden, generator=g)  # nearly identical row
    ref[3] = 0.0  # zero reference row
    cand[4, hidden // 2] = torch.nan  # non-finite rows
    ref[5, 0] = -torch.inf
    cand[5, -1] = torch.inf
    return ref.to(dtype), cand.to(dtype)


def close(got: torch.Tensor, exp: torch.Tensor, scale: torch.Tensor) -> bool:
    """|got − exp| ≤ 1e-5·(|exp| + scale), elementwise."""
    return bool(((got.double() - exp).abs() <= 1e-5 * (exp.abs() + scale)).all())


def check_sums(got: dict[str, torch.Tensor], ref: torch.Tensor, cand: torch.Tensor) -> None:
    exp = reference_hidden_sums(ref, cand)
    got = {k: v.cpu() for k, v in got.items()}
    assert set(got) == set(HIDDEN_SUM_KEYS)
    assert torch.equal(got["nonfinite"].long(), exp["nonfinite"])
    norms = (exp["ref_sq"] * exp["cand_sq"]).sqrt()
    for key, scale in (("ref_sq", 0.0), ("cand_sq", 0.0), ("dot", norms), ("diff_sq", 0.0),
                       ("max_abs_diff", 0.0)):  # fmt: skip
        assert close(got[key], exp[key], scale), f"{key}: {got[key]} vs {exp[key]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [1, 48, 100])
def test_row_sums_match_float64(backend, dtype, hidden):
    ref, cand = pair(hidden, rows=7, hidden=max(hidden, 1))
    if hidden == 1:  # too short for the crafted rows: plain random pair
        ref, cand = ref[:, :1], cand[:, :1]
    ref, cand = ref.to(dtype), cand.to(dtype)
    got = hidden_row_sums(ref.to(TEST_DEVICE), cand.to(TEST_DEVICE), backend=backend)
    check_sums(got, ref, cand)


@NO_TRITON
@pytest.mark.parametrize("block_h", [16, 32, 128])
def test_kernel_tiles_and_strided_rows(block_h):
    from qmetrics.kernels.hidden_compare import hidden_compare_triton

    ref, cand = pair(block_h, rows=6, hidden=200)
    wide = torch.zeros(6, 256)
    wide[:, :200] = ref
    ref_view = wide[:, :200]  # row stride 256 ≠ H
    got = hidden_compare_triton(ref_view.to(TEST_DEVICE), cand.to(TEST_DEVICE), block_h=block_h)
    check_sums(got, ref, cand)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_rows_give_exact_zeros(backend):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 5, 96, generator=g)).to(TEST_DEVICE)
    sums = hidden_row_sums(x, x.clone(), backend=backend)
    assert bool((sums["diff_sq"] == 0).all()) and bool((sums["max_abs_diff"] == 0).all())
    stats = LayerStats(backend)
    stats.update(x, x.clone())
    res = stats.compute()
    assert res.mse == 0 and res.rel_error == 0 and res.max_abs_error == 0
    assert res.snr_db == math.inf and res.cosine.value == 1.0
    assert res.to_dict()["snr_db"] == "inf"


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulator_over_batches_matches_float64(backend):
    batches = [pair(s, rows=7, hidden=64) for s in range(4)]
    batches[2] = (batches[2][0] * 10, batches[2][1] * 10)  # batches on different scales
    stats = LayerStats(backend)
    for ref, cand in batches:
        stats.update(ref.to(TEST_DEVICE).reshape(1, 7, 64), cand.to(TEST_DEVICE).reshape(1, 7, 64))
    res = stats.compute()
    exp = reference_layer_errors(batches)
    assert res.tokens == exp["tokens"] == 4 * 5
    assert res.nonfinite_rows == exp["nonfinite_rows"] == 8
    assert res.nonfinite_values == exp["nonfinite_values"]
    assert res.elements == 20 * 64
    for key in ("mse", "rel_error", "snr_db", "max_abs_error"):
        assert getattr(res, key) == pytest.approx(exp[key], rel=1e-5), key
    assert res.cosine.value == pytest.approx(exp["cosine"], abs=1e-7)
    last_only = reference_layer_errors(batches[-1:])
    assert res.mse != pytest.approx(last_only["mse"], rel=1e-2)  # really all batches


def test_merge_and_state_dict_equal_one_pass():
    batches = [pair(s, rows=7, hidden=32) for s in range(5)]
    whole, a, b = LayerStats("torch"), LayerStats("torch"), LayerStats("torch")
    for i, (ref, cand) in enumerate(batches):
        whole.update(ref, cand)
        (a if i < 2 else b).update(ref, cand)
    restored = LayerStats("torch")
    restored.load_state_dict(a.state_dict())
    restored.merge(b)
    x, y = whole.compute(), restored.compute()
    assert x.tokens == y.tokens and x.max_abs_error == y.max_abs_error
    for key in ("mse", "rel_error", "snr_db"):
        assert getattr(x, key) == pytest.approx(getattr(y, key), rel=1e-12)
    assert x.cosine.value == pytest.approx(y.cosine.value, rel=1e-12)
    assert x.cosine.stderr == pytest.approx(y.cosine.stderr, rel=1e-9)
    bad = a.state_dict()
    bad["rows"] = bad["rows"].double()
    with pytest.raises(ValueError, match="rows"):
        restored.load_state_dict(bad)


def test_empty_and_invalid_inputs():
    res = LayerStats("torch").compute()
    assert res.tokens == 0 and math.isnan(res.mse)
    assert res.to_dict()["snr_db"] is None
    with pytest.raises(ValueError, match="shape mismatch"):
        hidden_row_sums(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="float32"):
        hidden_row_sums(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 4))
