"""The bounded-memory percentile sketch and ``LogitStats(percentiles=...)``.

The sketch is checked against ``numpy.quantile`` of the same float32 values: within 1 % relative
on 10⁶ tokens of realistic KL and Δp (the construction bounds it by γ − 1 = 0.8 %), exact where
its tails are kept; its merge and state dict are exact; its update reads nothing on the host.
Through ``LogitStats``: the sketch state has a fixed size whatever the token count, ``auto``
switches at ``exact_limit`` and says so, and merge / state_dict work across the modes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from qmetrics.metrics.logit_stats import EXACT_LIMIT, PERCENTILES, LogitStats
from qmetrics.metrics.quantile_sketch import QuantileSketch
from qmetrics.metrics.token_metrics import FLOAT_FIELDS, TokenMetrics
from qmetrics.reports.compare import markdown_summary
from tests.test_no_sync import no_host_reads

LEVELS = np.array([0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0])


def realistic_kl(n: int, seed: int = 0) -> np.ndarray:
    """Log-normal KL (median ~1e-3 nats) with a heavy tail (1 % ×100) and 5 % exact zeros."""
    rng = np.random.default_rng(seed)
    kl = np.exp(rng.normal(-7.0, 2.5, n))
    kl[rng.random(n) < 0.01] *= 100.0
    kl[rng.random(n) < 0.05] = 0.0
    return kl.astype(np.float32)


def realistic_delta_p(n: int, seed: int = 1) -> np.ndarray:
    """Δp: a narrow mixture around 0 (±1e-3), wider shoulders (±3 %), rare large tails, zeros."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([1e-3, 3e-2, 0.3], size=n, p=[0.8, 0.19, 0.01])
    dp = np.clip(rng.normal(-1e-4, 1.0, n) * scale, -1.0, 1.0)
    dp[rng.random(n) < 0.02] = 0.0
    return dp.astype(np.float32)


def assert_close(got: np.ndarray, exact: np.ndarray, rel: float = 0.01, atol: float = 1e-10):
    err = np.abs(np.asarray(got) - np.asarray(exact))
    bad = err > rel * np.abs(exact) + atol
    assert not bad.any(), list(zip(np.asarray(got)[bad], np.asarray(exact)[bad], strict=True))


def metrics(kl: np.ndarray, delta_p: np.ndarray | None = None, rows: int = 0) -> TokenMetrics:
    """TokenMetrics of all-scored, finite tokens with the given kl (and Δp as prob_quant −
    prob_ref, prob_ref = 1/2); 1-D, or [rows, n / rows] when ``rows``."""
    n = len(kl)
    zeros = torch.zeros(n)
    ones = torch.ones(n, dtype=torch.bool)
    fields = {name: zeros for name in FLOAT_FIELDS} | {"kl": torch.from_numpy(kl)}
    labels = {}
    if delta_p is not None:
        prob_ref = torch.full((n,), 0.5, dtype=torch.float64)
        prob_quant = prob_ref + torch.from_numpy(delta_p.astype(np.float64))
        nll_quant = -prob_quant.clamp_min(1e-30).log()
        labels = {"prob_ref": prob_ref, "prob_quant": prob_quant,
                  "nll_ref": -prob_ref.log(), "nll_quant": nll_quant}  # fmt: skip
    tm = TokenMetrics(
        top1_match=ones, topk_match=ones, finite=ones, scored=ones, top_k=5, **fields, **labels
    )
    if not rows:
        return tm
    return TokenMetrics(top_k=5, **{k: v.reshape(rows, -1) for k, v in tm.to_dict().items()})


def state_bytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def roundtrip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return load(save({k: v.contiguous() for k, v in sd.items()}))


# --- the sketch itself ------------------------------------------------------------------------


def test_within_one_percent_of_exact_on_a_million_tokens() -> None:
    kl, dp = realistic_kl(10**6), realistic_delta_p(10**6)
    for values, hi in ((kl, 1e3), (dp, 1.0)):
        sketch = QuantileSketch(hi=hi)
        for chunk in np.array_split(values, 7):
            sketch.update(torch.from_numpy(chunk))
        exact = np.quantile(values.astype(np.float64), LEVELS)
        assert_close(sketch.quantiles(LEVELS), exact)
        assert sketch.count == len(values)
        assert sketch.min == values.min() and sketch.max == values.max()
    # the quantiles that fall among the kept tails (p99.9 of 10⁶ = the 1000th largest) are exact
    exact = np.quantile(kl.astype(np.float64), [0.999, 1.0])
    sketch = QuantileSketch()
    sketch.update(torch.from_numpy(kl))
    np.testing.assert_allclose(sketch.quantiles([0.999, 1.0]), exact, rtol=1e-12)


def test_exact_for_few_values_and_for_zeros() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1e-3, 500), np.zeros(20), -np.zeros(3), [1e-12]])
    sketch = QuantileSketch(hi=1.0, tail=1024)
    sketch.update(torch.from_numpy(values))
    np.testing.assert_allclose(sketch.quantiles(LEVELS), np.quantile(values, LEVELS), rtol=1e-12)
    # past the tails: a block of exact zeros stays exactly 0, not smeared over (−lo, lo)
    many = np.concatenate([np.zeros(5000), np.exp(rng.normal(-5, 1, 5000))])
    sketch = QuantileSketch(tail=16)
    sketch.update(torch.from_numpy(many))
    assert (sketch.quantiles([0.1, 0.3, 0.49]) == 0.0).all()
    assert_close(sketch.quantiles([0.6, 0.9]), np.quantile(many, [0.6, 0.9]))


def test_values_beyond_the_range_and_masks() -> None:
    sketch = QuantileSketch(lo=1e-3, hi=10.0, tail=2)
    values = torch.tensor(
        [5e3, -7e3, 1e-6, -1e-6, 2.0, math.nan, math.inf, 3.0], dtype=torch.float64
    )
    sketch.update(values, valid=torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool))
    sketch.update(torch.tensor([math.nan, -math.inf, 4.0]))  # non-finite values are skipped
    assert sketch.count == 6 and (sketch.min, sketch.max) == (-7e3, 5e3)
    # sorted: −7e3, −1e-6, 1e-6, 2, 4, 5e3; tails keep the 2 largest and the 2 smallest
    got = sketch.quantiles([0.0, 0.2, 0.4, 0.6, 1.0])
    assert (got[0], got[1], got[4]) == (-7e3, -1e-6, 5e3)  # exact
    assert 0.0 <= got[2] <= 1e-3  # in the (0, lo) bin
    assert got[3] == pytest.approx(2.0, rel=0.008)  # in a log bin
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sketch.quantiles([1.5])
    with pytest.raises(ValueError, match="no values"):
        QuantileSketch().quantiles([0.5])
    with pytest.raises(ValueError, match="lo < hi"):
        QuantileSketch(lo=1.0, hi=0.5)


def test_merge_and_state_dict_are_exact() -> None:
    kl = realistic_kl(30_000, seed=5)
    whole, a, b = QuantileSketch(tail=64), QuantileSketch(tail=64), QuantileSketch(tail=64)
    whole.update(torch.from_numpy(kl))
    a.update(torch.from_numpy(kl[:12_345]))
    b.update(torch.from_numpy(kl[12_345:]))
    merged = QuantileSketch.from_state_dict(roundtrip(a.state_dict())).merge(b)
    for key, value in whole.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    assert merged.nbytes == whole.nbytes == QuantileSketch(tail=64).nbytes
    with pytest.raises(ValueError, match="layouts"):
        a.merge(QuantileSketch(tail=32))
    with pytest.raises(ValueError, match="counts"):
        QuantileSketch.from_state_dict({**a.state_dict(), "counts": torch.zeros(3)})


def test_update_reads_nothing_on_the_host() -> None:
    sketch = QuantileSketch()
    values = torch.from_numpy(realistic_delta_p(1000))
    with no_host_reads():
        sketch.update(values, valid=values > -0.5)
        sketch.merge(QuantileSketch())
    assert sketch.count == int((values > -0.5).sum())


# --- LogitStats(percentiles=...) ----------------------------------------------------------------


def test_logit_stats_sketch_matches_exact_within_one_percent() -> None:
    kl, dp = realistic_kl(200_000), realistic_delta_p(200_000)
    results = {}
    for mode in ("exact", "sketch"):
        stats = LogitStats(percentiles=mode)
        for part in np.array_split(np.arange(len(kl)), 4):
            stats.update_metrics(metrics(kl[part], dp[part]))
        results[mode] = stats.compute()
        assert results[mode].percentile_method == mode
        assert results[mode].to_dict()["percentile_method"] == mode
        quantiles = stats.kl_quantiles(LEVELS)
        assert_close(quantiles, np.quantile(kl.astype(np.float64), LEVELS))
    exact, sketch = results["exact"], results["sketch"]
    for name in ("kl_distribution", "delta_p_distribution"):
        e, s = getattr(exact, name), getattr(sketch, name)
        assert list(s.percentiles) == list(PERCENTILES)
        assert_close(list(s.percentiles.values()), list(e.percentiles.values()))
        assert (s.max, s.min) == (e.max, e.min)
    # Δp quartiles are reported (llama.cpp prints them), exact ones equal numpy's
    quartiles = np.percentile(dp.astype(np.float64), [25.0, 75.0])
    got = [exact.delta_p_distribution.percentiles[p] for p in (25.0, 75.0)]
    np.testing.assert_allclose(got, quartiles, rtol=1e-6)
    assert set(exact.to_dict()["delta_p_distribution"]["percentiles"]) >= {"25", "75"}
    assert exact.means["kl"].value == pytest.approx(sketch.means["kl"].value, rel=1e-12)


@pytest.mark.slow
def test_sketch_state_size_is_independent_of_token_count() -> None:
    # the cheapest path: no labels; 4 long sequences streamed in chunks (a sequence's rows
    # are summed into one, so the per-sequence state grows with sequences, not updates)
    batch = metrics(realistic_kl(250_000, seed=7), rows=4)
    ids = torch.arange(4)
    stats = LogitStats(percentiles="sketch")
    sizes = {}
    for i in range(40):  # 10⁷ tokens
        stats.update_metrics(batch, sequence_ids=ids)
        if i in (0, 39):
            sd = stats.state_dict()
            sizes[int(sd["n"])] = (state_bytes(sd), len(sd["kl_values"]))
    assert list(sizes) == [250_000, 10**7]
    assert sizes[250_000] == sizes[10**7] and sizes[10**7][1] == 0
    assert sizes[10**7][0] < 200_000  # bytes: the sketches, moments and 4 sequences' sums
    res = stats.compute()
    assert res.tokens_scored == 10**7 and res.percentile_method == "sketch" and res.sequences == 4
    assert_close(list(res.kl_distribution.percentiles.values()),
                 np.percentile(batch.kl.double().numpy(), PERCENTILES))  # fmt: skip


def test_auto_switches_at_exact_limit_and_says_so() -> None:
    assert LogitStats().percentiles == "auto" and LogitStats().exact_limit == EXACT_LIMIT == 10**7
    kl, dp = realistic_kl(2000, seed=9), realistic_delta_p(2000, seed=9)
    auto = LogitStats(exact_limit=1000)
    exact = LogitStats(percentiles="exact")
    for start in range(0, 2000, 100):
        tm = metrics(kl[start : start + 100], dp[start : start + 100])
        auto.update_metrics(tm)
        exact.update_metrics(tm)
        # known at update time, without a sync: more than 1000 tokens held → sketch
        assert auto.percentile_method == ("exact" if start + 100 <= 1000 else "sketch")
        if start + 100 == 1000:
            assert len(auto.state_dict()["kl_values"]) == 1000
    sd = auto.state_dict()
    assert int(sd["percentile_method"]) == 1 and len(sd["kl_values"]) == 0
    res = auto.compute()
    assert res.percentile_method == "sketch" and exact.compute().percentile_method == "exact"
    for name in ("kl_distribution", "delta_p_distribution"):
        got, want = getattr(res, name), getattr(exact.compute(), name)
        assert_close(list(got.percentiles.values()), list(want.percentiles.values()))
    assert "auto" in repr(auto) and "sketch" in repr(auto)
    # the report says so
    report = {
        "reference": "ref",
        "comparisons": {"q": res.to_dict(), "e": exact.compute().to_dict()},
    }
    md = markdown_summary(report)
    note = md.split("fixed-size sketch")[0].splitlines()[-1]
    assert "`q`" in note and "`e`" not in note
    assert "Per-token Δp percentiles" in md and "p25" in md and "p75" in md
    assert "fixed-size sketch" not in markdown_summary(
        {"comparisons": {"e": report["comparisons"]["e"]}}
    )


def test_merge_and_state_dict_across_modes() -> None:
    kl, dp = realistic_kl(3000, seed=11), realistic_delta_p(3000, seed=11)
    parts = [metrics(kl[i : i + 1000], dp[i : i + 1000]) for i in range(0, 3000, 1000)]

    def run(mode: str, batches) -> LogitStats:
        stats = LogitStats(percentiles=mode)
        for tm in batches:
            stats.update_metrics(tm)
        return stats

    whole_sketch = run("sketch", parts)
    # exact ⊕ sketch → sketch, equal to one sketch of everything (the merge is exact)
    merged = run("exact", parts[:1]).merge(run("sketch", parts[1:]))
    assert merged.percentile_method == "sketch"
    sd_merged, sd_whole = merged.state_dict(), whole_sketch.state_dict()
    for key in sd_whole:
        if "sketch." in key:
            assert torch.equal(sd_merged[key], sd_whole[key]), key
    assert merged.compute().kl_distribution == whole_sketch.compute().kl_distribution
    # sketch ⊕ exact, too
    assert run("sketch", parts[:1]).merge(run("exact", parts[1:])).percentile_method == "sketch"
    # state_dict round trips (safetensors) and resumes, for both modes
    for mode in ("exact", "sketch"):
        first = run(mode, parts[:2])
        resumed = LogitStats.from_state_dict(roundtrip(first.state_dict()), percentiles=mode)
        resumed.update_metrics(parts[2])
        whole = run(mode, parts)
        assert resumed.compute().to_dict() == whole.compute().to_dict()
    # a sketch state stays a sketch in an exact accumulator; an exact one becomes a sketch
    exact_state = run("exact", parts).state_dict()
    into_sketch = LogitStats(percentiles="sketch")
    into_sketch.load_state_dict(exact_state)
    assert into_sketch.percentile_method == "sketch"
    into_exact = LogitStats(percentiles="exact")
    into_exact.load_state_dict(sd_whole)
    assert into_exact.compute().percentile_method == "sketch"
    into_exact.update_metrics(parts[0])  # folded into the sketch, values not kept
    assert len(into_exact.state_dict()["kl_values"]) == 0
    # an exact state past the limit switches on load in auto mode
    small_limit = LogitStats(exact_limit=100)
    small_limit.load_state_dict(exact_state)
    assert small_limit.percentile_method == "sketch"
    # a version-2 state (no percentile_method) loads as exact
    old = {k: v for k, v in exact_state.items() if k != "percentile_method"}
    old["version"] = torch.tensor(2)
    assert (
        LogitStats.from_state_dict(old).compute().to_dict()
        == run("exact", parts).compute().to_dict()
    )
    with pytest.raises(ValueError, match="sketches hold"):
        bad = dict(sd_whole, n=torch.tensor(5))
        LogitStats().load_state_dict(bad)


def test_sketch_and_auto_updates_read_nothing_on_the_host() -> None:
    kl, dp = realistic_kl(600, seed=13), realistic_delta_p(600, seed=13)
    batches = [metrics(kl[i : i + 200], dp[i : i + 200]) for i in range(0, 600, 200)]
    sketch, auto = LogitStats(percentiles="sketch"), LogitStats(exact_limit=300)
    auto.update_metrics(batches[0])
    auto.state_dict()  # settled exact values, folded at the switch below
    with no_host_reads():
        for tm in batches:
            sketch.update_metrics(tm)
        for tm in batches[1:]:
            auto.update_metrics(tm)  # crosses the limit: the switch makes no sync either
        assert auto.percentile_method == "sketch"
    assert sketch.compute().tokens_scored == auto.compute().tokens_scored == 600
    assert sketch.compute().kl_distribution == auto.compute().kl_distribution
