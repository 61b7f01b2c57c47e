"""Tests of :mod:`qmetrics.metrics.estimate`: the one Chan merge against a two-pass float64
computation on the concatenated data, the distribution summary, and the single backend check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qmetrics
from qmetrics.metrics import layer_stats, logit_stats
from qmetrics.metrics.estimate import Distribution, Estimate, chan_merge
from qmetrics.metrics.functional import check_backend


def _moments(x: np.ndarray) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, mean, M2, co-moment of columns 0 and 1) in float64, two-pass; zeros when empty."""
    if len(x) == 0:
        zeros = torch.zeros(x.shape[1], dtype=torch.float64)
        return 0, zeros, zeros, torch.zeros((), dtype=torch.float64)
    mean = x.mean(axis=0)
    dev = x - mean
    comoment = torch.tensor((dev[:, 0] * dev[:, 1]).sum(), dtype=torch.float64)
    return len(x), torch.from_numpy(mean), torch.from_numpy((dev**2).sum(axis=0)), comoment


@pytest.mark.parametrize("split", [0, 1, 17, 40])
def test_chan_merge_matches_two_pass(split: int) -> None:
    rng = np.random.default_rng(split)
    x = rng.normal(3.0, 2.0, size=(40, 3))
    x[:, 1] += 0.7 * x[:, 0]  # correlated columns: a non-zero co-moment
    na, mean_a, m2_a, c_a = _moments(x[:split])
    nb, mean_b, m2_b, c_b = _moments(x[split:])
    merged = chan_merge(na, mean_a, m2_a, nb, mean_b, m2_b)
    n, mean, m2, c = _moments(x)
    assert merged.n == n
    torch.testing.assert_close(merged.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.m2, m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.comoment(c_a, c_b, 0, 1), c, rtol=1e-12, atol=1e-12)


def test_chan_merge_copies_and_rejects_negative_counts() -> None:
    mean, m2 = torch.tensor([1.0]), torch.tensor([2.0])
    merged = chan_merge(3, mean, m2, 0, torch.zeros(1), torch.zeros(1))
    merged.mean.add_(5.0)
    assert float(mean) == 1.0  # the input was not aliased
    with pytest.raises(ValueError, match="counts must be ≥ 0"):
        chan_merge(-1, mean, m2, 2, mean, m2)


def test_distribution_of() -> None:
    values = torch.arange(101, dtype=torch.float32)
    d = Distribution.of(values, (50.0, 99.0))
    assert (d.max, d.min) == (100.0, 0.0)
    assert d.percentiles == {50.0: 50.0, 99.0: 99.0}
    assert d.to_dict()["percentiles"] == {"50": 50.0, "99": 99.0}
    with pytest.raises(ValueError, match="at least one value"):
        Distribution.of(torch.zeros(0), (50.0,))


def test_one_estimate_type_and_one_backend_check() -> None:
    assert qmetrics.Estimate is logit_stats.Estimate is Estimate
    assert layer_stats.Estimate is Estimate
    check_backend("torch")
    for make in (check_backend, logit_stats.LogitStats, layer_stats.LayerStats):
        with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch'"):
            make(backend="cuda")
