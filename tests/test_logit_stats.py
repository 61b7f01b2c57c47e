"""Tests of :class:`qmetrics.LogitStats` against numpy/scipy on the per-token outputs.

The reference statistics are computed directly (numpy / scipy, float64) on the per-token
metrics that :func:`qmetrics.compare_logits` returns for the same batches, concatenated; the
accumulator must agree to float64 rounding. All inputs come from seeded generators; everything
runs on the torch backend with small vocabularies so the file stays fast.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import tempfile

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qmetrics
from qmetrics import LogitStats, compare_logits
from qmetrics.metrics.logit_stats import PERCENTILES, LogitStatsResult
from qmetrics.metrics.token_metrics import FLOAT_FIELDS, TokenMetrics

V = 48
SIZES = (37, 120, 1, 64, 9)  # rows per update: deliberately uneven, one of a single row
RTOL = 1e-11  # float64 rounding of sums over a few hundred terms, merged in a different order


# --- helpers ---------------------------------------------------------------------------------


def make_batch(
    n: int, seed: int, *, labels: bool = True, ignore_index: int = -100, p_ignore: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reference logits 3·N(0,1), quant = ref + N(0,1), labels drawn from the reference."""
    g = torch.Generator().manual_seed(seed)
    ref = 3.0 * torch.randn(n, V, generator=g)
    quant = ref + torch.randn(n, V, generator=g)
    if not labels:
        return ref, quant, None
    lab = torch.multinomial(torch.softmax(ref, -1), 1, generator=g).squeeze(-1)
    ignored = torch.rand(n, generator=g) < p_ignore
    return ref, quant, torch.where(ignored, torch.full_like(lab, ignore_index), lab)


def make_batches(sizes=SIZES, seed: int = 0, **kw) -> list[tuple]:
    return [make_batch(n, seed + i, **kw) for i, n in enumerate(sizes)]


def run(batches: list[tuple], **kw) -> LogitStats:
    stats = LogitStats(backend="torch", **kw)
    for ref, quant, labels in batches:
        stats.update(ref, quant, labels)
    return stats


def per_token(batches: list[tuple], *, top_k: int = 5, ignore_index: int = -100) -> dict:
    """The concatenated per-token outputs of compare_logits, as float64 / bool numpy arrays."""
    tms = [
        compare_logits(r, q, lab, top_k=top_k, ignore_index=ignore_index, backend="torch")
        for r, q, lab in batches
    ]
    out = {}
    for name in tms[0].to_dict():
        arr = torch.cat([getattr(tm, name).reshape(-1) for tm in tms]).numpy()
        out[name] = arr if arr.dtype == bool else arr.astype(np.float64)
    return out


def reference(tok: dict) -> dict:
    """Every statistic of LogitStats.compute(), straight from the per-token arrays."""
    labels = "nll_ref" in tok
    cols = {name: tok[name] for name in FLOAT_FIELDS}
    if labels:
        cols["nll_ref"], cols["nll_quant"] = tok["nll_ref"], tok["nll_quant"]
        cols["nll_diff"] = tok["nll_quant"] - tok["nll_ref"]
        cols["delta_p"] = tok["prob_quant"] - tok["prob_ref"]
    valid = tok["scored"] & tok["finite"]
    for name in FLOAT_FIELDS + (("nll_ref", "nll_quant", "prob_ref", "prob_quant") * labels):
        valid &= np.isfinite(tok[name])
    v = {name: c[valid] for name, c in cols.items()}
    n = int(valid.sum())
    ref = {
        "seen": len(valid),
        "scored": n,
        "ignored": int((~tok["scored"]).sum()),
        "nonfinite": int((tok["scored"] & ~valid).sum()),
        "means": {k: (x.mean(), scipy.stats.sem(x, ddof=1)) for k, x in v.items()},
        "kl_pct": np.percentile(v["kl"], PERCENTILES),
        "kl_max": v["kl"].max(),
        "kl_min": v["kl"].min(),
    }
    for key, flag in (("top1", "top1_match"), ("topk", "topk_match")):
        p = tok[flag][valid].mean()
        ref[key] = (p, math.sqrt(p * (1 - p) / (n - 1)))
    if labels:
        dp, nr, nq = v["delta_p"], v["nll_ref"], v["nll_quant"]
        rms = math.sqrt(np.mean(dp**2))
        ref["rms"] = (rms, scipy.stats.sem(dp**2) / (2 * rms))
        ppl_r, ppl_q = math.exp(nr.mean()), math.exp(nq.mean())
        se_r, se_q = scipy.stats.sem(nr), scipy.stats.sem(nq)
        cov = np.cov(nr, nq, ddof=1)[0, 1] / n  # covariance of the two means
        ref["ppl_ref"] = (ppl_r, ppl_r * se_r)
        ref["ppl_quant"] = (ppl_q, ppl_q * se_q)
        d = nq - nr
        ref["ln_ratio"] = (d.mean(), scipy.stats.sem(d))
        # equivalently sqrt(se_q² + se_r² − 2 cov): the correlation is what shrinks it
        assert math.isclose(
            scipy.stats.sem(d), math.sqrt(se_q**2 + se_r**2 - 2 * cov), rel_tol=1e-9
        )
        ref["ratio"] = (math.exp(d.mean()), math.exp(d.mean()) * scipy.stats.sem(d))
        var = (ppl_q * se_q) ** 2 + (ppl_r * se_r) ** 2 - 2 * ppl_q * ppl_r * cov
        ref["diff"] = (ppl_q - ppl_r, math.sqrt(var))
        ref["corr"] = scipy.stats.pearsonr(nr, nq)[0]
        ref["dp_pct"] = np.percentile(dp, PERCENTILES)
        ref["dp_max"], ref["dp_min"] = dp.max(), dp.min()
    return ref


def close(got: float, exp: float, rtol: float = RTOL, atol: float = 1e-15) -> None:
    assert math.isclose(got, float(exp), rel_tol=rtol, abs_tol=atol), (got, float(exp))


def check_estimate(est, exp: tuple[float, float], rtol: float = RTOL) -> None:
    close(est.value, exp[0], rtol)
    close(est.stderr, exp[1], rtol)


def check_against_reference(res: LogitStatsResult, ref: dict) -> None:
    assert res.tokens_seen == ref["seen"]
    assert res.tokens_scored == ref["scored"]
    assert res.tokens_ignored == ref["ignored"]
    assert res.tokens_nonfinite == ref["nonfinite"]
    assert res.tokens_seen == res.tokens_scored + res.tokens_ignored + res.tokens_nonfinite
    assert set(res.means) == set(ref["means"])
    for name, exp in ref["means"].items():
        check_estimate(res.means[name], exp)
    np.testing.assert_allclose(list(res.kl_distribution.percentiles.values()), ref["kl_pct"])
    assert list(res.kl_distribution.percentiles) == list(PERCENTILES)
    assert res.kl_distribution.max == ref["kl_max"]
    assert res.kl_distribution.min == ref["kl_min"]
    check_estimate(res.top1_agreement, ref["top1"])
    check_estimate(res.topk_agreement, ref["topk"])
    if "rms" not in ref:
        assert not res.has_labels and res.ppl_ref is None and res.delta_p_distribution is None
        return
    assert res.has_labels
    check_estimate(res.rms_delta_p, ref["rms"])
    check_estimate(res.ppl_ref, ref["ppl_ref"])
    check_estimate(res.ppl_quant, ref["ppl_quant"])
    check_estimate(res.ln_ppl_ratio, ref["ln_ratio"])
    check_estimate(res.ppl_ratio, ref["ratio"])
    check_estimate(res.ppl_diff, ref["diff"], rtol=1e-9)  # a difference of large terms
    close(res.nll_correlation, ref["corr"], rtol=1e-9)
    np.testing.assert_allclose(list(res.delta_p_distribution.percentiles.values()), ref["dp_pct"])
    assert res.delta_p_distribution.max == ref["dp_max"]
    assert res.delta_p_distribution.min == ref["dp_min"]


def assert_same_result(a: LogitStatsResult, b: LogitStatsResult, rtol: float = RTOL) -> None:
    """Two results equal up to float64 rounding (the merge order differs)."""
    da, db = a.to_dict(), b.to_dict()

    def walk(x, y, path):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), path
            for k in x:
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, float) and isinstance(y, float):
            assert math.isclose(x, y, rel_tol=rtol, abs_tol=1e-15), (path, x, y)
        else:
            assert x == y, (path, x, y)

    walk(da, db, "")


def token_metrics(values: dict[str, np.ndarray], top_k: int = 5) -> TokenMetrics:
    """A hand-built float64 TokenMetrics (all rows finite and scored) from given fields."""
    n = len(values["kl"])
    fields = {
        name: torch.from_numpy(np.asarray(values.get(name, np.zeros(n)), np.float64))
        for name in FLOAT_FIELDS
    }
    extra = {}
    if "nll_ref" in values:
        for name in ("nll_ref", "nll_quant"):
            extra[name] = torch.from_numpy(np.asarray(values[name], np.float64))
        extra["prob_ref"] = torch.exp(-extra["nll_ref"])
        extra["prob_quant"] = torch.exp(-extra["nll_quant"])
    ones = torch.ones(n, dtype=torch.bool)
    return TokenMetrics(
        top1_match=ones, topk_match=ones, finite=ones, scored=ones, top_k=top_k, **fields, **extra
    )


# --- statistics ------------------------------------------------------------------------------


def test_exported() -> None:
    assert qmetrics.LogitStats is LogitStats
    assert "LogitStats" in qmetrics.__all__


@pytest.mark.parametrize("labels", [True, False])
def test_statistics_match_numpy(labels: bool) -> None:
    batches = make_batches(labels=labels)
    res = run(batches).compute()
    check_against_reference(res, reference(per_token(batches)))
    assert res.tokens_seen == sum(SIZES)
    if labels:
        assert res.tokens_ignored > 0
        # the NLLs of the two models are strongly correlated, so the ratio is far sharper than
        # the uncorrelated combination of the two PPL errors would suggest
        assert res.nll_correlation > 0.5
        assert res.ln_ppl_ratio.stderr < math.hypot(
            res.means["nll_ref"].stderr, res.means["nll_quant"].stderr
        )


def test_top_k_setting_is_used() -> None:
    batches = make_batches(labels=False)
    res = run(batches, top_k=2).compute()
    check_against_reference(res, reference(per_token(batches, top_k=2)))
    assert res.top_k == 2


def test_update_equals_update_metrics() -> None:
    batches = make_batches()
    a = run(batches)
    b = LogitStats(backend="torch")
    for r, q, lab in batches:
        b.update_metrics(compare_logits(r, q, lab, backend="torch"))
    assert a.compute() == b.compute()


def _without_sequence_stats(d):
    """A result dict without the fields that depend on how tokens group into sequences."""
    if isinstance(d, dict):
        return {k: _without_sequence_stats(v) for k, v in d.items()
                if k not in ("stderr_seq", "sequences")}  # fmt: skip
    return d


def test_leading_dims_are_flattened() -> None:
    # the same tokens give the same statistics flat or as [sequences, T]; only the
    # per-sequence standard errors and the sequence count depend on the grouping
    ref, quant, labels = make_batch(24, 5)
    flat = run([(ref, quant, labels)]).compute()
    shaped = run([(ref.view(4, 6, V), quant.view(4, 6, V), labels.view(4, 6))]).compute()
    assert _without_sequence_stats(flat.to_dict()) == _without_sequence_stats(shaped.to_dict())
    assert (flat.sequences, shaped.sequences) == (1, 4)
    assert math.isnan(flat.means["kl"].stderr_seq)
    assert math.isfinite(shaped.means["kl"].stderr_seq)


def _clustered_batches(seed: int = 3, sequences: int = 6, length: int = 40):
    """[B, T, V] logits whose quantization noise differs by sequence (0.2 to 2.0): the
    tokens of a sequence share their KL level, as passages of real text do."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 2.0, sequences)[:, None, None]
    ref = 3.0 * torch.randn(sequences, length, V, generator=g)
    quant = ref + scale * torch.randn(sequences, length, V, generator=g)
    lab = torch.multinomial(torch.softmax(ref, -1).view(-1, V), 1, generator=g)
    lab = lab.view(sequences, length)
    lab[0, :5] = -100  # some ignored rows: sequences have different counts
    return ref, quant, lab


def test_sequence_stderr_is_the_cluster_robust_formula() -> None:
    ref, quant, lab = _clustered_batches()
    stats = LogitStats(backend="torch")
    stats.update(ref[:4], quant[:4], lab[:4])  # two updates: sequences from both count
    stats.update(ref[4:], quant[4:], lab[4:])
    res = stats.compute()
    tm = compare_logits(ref, quant, lab, backend="torch")
    keep = tm.scored & tm.finite
    x = {"kl": tm.kl, "nll_diff": tm.nll_quant.double() - tm.nll_ref.double(),
         "top1": tm.top1_match.double()}  # fmt: skip
    n = int(keep.sum())
    g = ref.shape[0]
    for name, values in x.items():
        v = values.double()
        mean = float(v[keep].sum()) / n
        resid = [float(v[b][keep[b]].sum()) - int(keep[b].sum()) * mean for b in range(g)]
        expected = math.sqrt(g / (g - 1) * sum(r * r for r in resid) / n**2)
        got = {"kl": res.means["kl"], "nll_diff": res.ln_ppl_ratio,
               "top1": res.top1_agreement}[name]  # fmt: skip
        assert got.stderr_seq == pytest.approx(expected, rel=1e-9), name
    assert res.sequences == g
    # the point of it: with KL levels that differ by sequence, the iid error is far too small
    assert res.means["kl"].stderr_seq > 3 * res.means["kl"].stderr
    assert res.ppl_ratio.stderr_seq == pytest.approx(
        res.ppl_ratio.value * res.ln_ppl_ratio.stderr_seq
    )


def test_sequence_stats_survive_merge_and_state_dict() -> None:
    ref, quant, lab = _clustered_batches(seed=4)
    whole = LogitStats(backend="torch")
    whole.update(ref, quant, lab)
    a, b = LogitStats(backend="torch"), LogitStats(backend="torch")
    a.update(ref[:2], quant[:2], lab[:2])
    b.update(ref[2:], quant[2:], lab[2:])
    merged = LogitStats.from_state_dict(a.merge(b).state_dict())
    want, got = whole.compute(), merged.compute()
    assert got.sequences == want.sequences == ref.shape[0]
    for name in ("kl", "cosine", "nll_diff"):
        assert got.means[name].stderr_seq == pytest.approx(want.means[name].stderr_seq, rel=1e-9)
    assert got.ppl_diff.stderr_seq == pytest.approx(want.ppl_diff.stderr_seq, rel=1e-9)


def test_sequence_ids_join_chunks_of_one_sequence() -> None:
    # a window fed in two chunks with its id counts once: the same as feeding it whole
    ref, quant, lab = _clustered_batches(seed=6)
    whole = LogitStats(backend="torch")
    whole.update(ref, quant, lab)
    chunked = LogitStats(backend="torch")
    ids = torch.arange(ref.shape[0]) + 100
    for sl in (slice(0, 15), slice(15, None)):
        chunked.update(ref[:, sl], quant[:, sl], lab[:, sl], sequence_ids=ids)
    want, got = whole.compute(), chunked.compute()
    assert got.sequences == want.sequences == ref.shape[0]
    assert got.means["kl"].stderr_seq == pytest.approx(want.means["kl"].stderr_seq, rel=1e-9)
    unnamed = LogitStats(backend="torch")
    for sl in (slice(0, 15), slice(15, None)):
        unnamed.update(ref[:, sl], quant[:, sl], lab[:, sl])
    assert unnamed.compute().sequences == 2 * ref.shape[0]
    with pytest.raises(ValueError, match="sequence_ids has 2 entries for 6 sequences"):
        chunked.update(ref, quant, lab, sequence_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="≥ 0"):
        chunked.update(ref, quant, lab, sequence_ids=-ids)


def test_version_1_state_dict_loads_without_sequence_stats() -> None:
    ref, quant, lab = _clustered_batches(seed=5)
    stats = LogitStats(backend="torch")
    stats.update(ref, quant, lab)
    sd = stats.state_dict()
    old = {k: v for k, v in sd.items() if k not in ("seq_id", "seq_n", "seq_sums")}
    old["version"] = torch.tensor(1)
    res = LogitStats.from_state_dict(old).compute()
    assert math.isnan(res.means["kl"].stderr_seq)
    assert res.means["kl"].value == stats.compute().means["kl"].value


def test_ignored_rows_are_excluded() -> None:
    batches = make_batches(labels=True, ignore_index=7, p_ignore=0.5)
    stats = run(batches, ignore_index=7)
    res = stats.compute()
    tok = per_token(batches, ignore_index=7)
    n_ignored = int((~tok["scored"]).sum())
    assert res.tokens_ignored == n_ignored > 0
    assert res.tokens_nonfinite == 0
    # the same statistics as from the non-ignored rows alone
    kept = []
    for r, q, lab in batches:
        keep = lab != 7
        if bool(keep.any()):
            kept.append((r[keep], q[keep], lab[keep]))
    only = run(kept, ignore_index=7).compute()
    assert only.tokens_ignored == 0
    assert only.tokens_scored == res.tokens_scored
    assert_same_result(
        LogitStatsResult(**{**only.__dict__, "tokens_seen": 0, "tokens_ignored": 0}),
        LogitStatsResult(**{**res.__dict__, "tokens_seen": 0, "tokens_ignored": 0}),
    )


def _poisoned_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch whose rows 0-5 are non-finite in different ways and row 6 is ignored + NaN."""
    ref, quant, labels = make_batch(20, seed, p_ignore=0.0)
    ref[0, 3] = math.nan  # NaN logit: finite flag False
    quant[1, 5] = math.inf  # +inf logit: finite flag False
    quant[2, 0] = -math.inf  # quant gives probability 0 where ref does not: kl = +inf
    ref[3, 1] = -math.inf  # the reverse: reverse_kl = +inf
    ref[4, :] = -math.inf  # no finite entry: finite flag False
    quant[5, labels[5]] = -math.inf  # label impossible under quant: nll_quant = kl = +inf
    ref[6, 2] = math.nan
    labels[6] = -100  # ignored takes precedence over non-finite
    return ref, quant, labels


def test_nonfinite_rows_are_counted_and_excluded() -> None:
    batches = [_poisoned_batch(11), make_batch(30, 12), _poisoned_batch(13)]
    tok = per_token(batches)
    assert np.isinf(tok["kl"]).sum() >= 4  # rows 2 and 5 of both poisoned batches
    assert np.isinf(tok["nll_quant"]).sum() == 2
    stats = run(batches)
    res = stats.compute()
    check_against_reference(res, reference(tok))
    assert res.tokens_nonfinite == 12
    assert res.tokens_ignored == 2 + int((batches[1][2] == -100).sum())
    assert math.isfinite(res.means["kl"].value) and math.isfinite(res.kl_distribution.max)
    # identical to the run without those rows
    clean = []
    for r, q, lab in batches:
        keep = torch.ones(len(lab), dtype=torch.bool)
        if len(lab) == 20:
            keep[:7] = False
        clean.append((r[keep], q[keep], lab[keep]))
    other = run(clean).compute()
    assert other.tokens_scored == res.tokens_scored
    for name, est in other.means.items():
        close(res.means[name].value, est.value)
        close(res.means[name].stderr, est.stderr)


def test_nonfinite_without_labels() -> None:
    ref, quant, _ = _poisoned_batch(3)
    stats = run([(ref, quant, None)])
    res = stats.compute()
    assert (res.tokens_nonfinite, res.tokens_ignored, res.tokens_scored) == (
        7,
        0,
        13,
    )  # row 6 (NaN) is not ignored without labels
    check_against_reference(res, reference(per_token([(ref, quant, None)])))


def test_chan_merge_is_stable_for_large_offsets() -> None:
    """Variance of 1e8 + U(0, 1) over many batches: Σx² − n·mean² would lose every digit."""
    rng = np.random.default_rng(0)
    x = 1e8 + rng.random(3000)
    stats = LogitStats()
    for part in np.array_split(x, 17):
        stats.update_metrics(token_metrics({"kl": part}))
    res = stats.compute()
    close(res.means["kl"].value, x.mean(), rtol=1e-15)
    close(res.means["kl"].stderr, scipy.stats.sem(x), rtol=1e-9)


_finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.tuples(_finite, _finite, _finite), min_size=2, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    offset=st.sampled_from([0.0, 1e6]),
)
def test_chan_merge_of_random_splits_equals_one_pass(data, cuts, offset) -> None:
    arr = np.array(data, dtype=np.float64)
    arr[:, 0] += offset
    # NLLs are ≥ 0 (so probabilities ≤ 1 and Δp² cannot overflow)
    values = {"kl": arr[:, 0], "nll_ref": np.abs(arr[:, 1]), "nll_quant": np.abs(arr[:, 2])}
    one = LogitStats()
    one.update_metrics(token_metrics(values))
    bounds = sorted({0, len(arr), *(c for c in cuts if c <= len(arr))})
    parts = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    # half the pieces go through update, the other half through merge of separate accumulators
    split = LogitStats()
    for i, sl in enumerate(parts):
        tm = token_metrics({k: v[sl] for k, v in values.items()})
        if i % 2:
            piece = LogitStats()
            piece.update_metrics(tm)
            split.merge(piece)
        else:
            split.update_metrics(tm)
    a, b = one.state_dict(), split.state_dict()
    assert int(a["n"]) == int(b["n"]) == len(arr)
    scale = 1.0 + np.abs(arr).max()
    n = len(arr)
    np.testing.assert_allclose(b["mean"].numpy(), a["mean"].numpy(), rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(
        b["m2"].numpy(), a["m2"].numpy(), rtol=1e-9, atol=1e-9 * n * scale**2
    )
    np.testing.assert_allclose(
        float(b["comoment"]), float(a["comoment"]), rtol=1e-9, atol=1e-9 * n * scale**2
    )
    # and the one-pass state is numpy's
    np.testing.assert_allclose(a["mean"][0].item(), arr[:, 0].mean(), rtol=1e-13)
    np.testing.assert_allclose(
        a["m2"][0].item(), ((arr[:, 0] - arr[:, 0].mean()) ** 2).sum(), rtol=1e-9, atol=1e-9
    )
    assert torch.equal(a["kl_values"], b["kl_values"])


# --- merge, state dict, reset ----------------------------------------------------------------


def test_merge_equals_one_accumulator() -> None:
    batches = make_batches()
    whole = run(batches).compute()
    a, b = run(batches[:2]), run(batches[2:])
    b_before = b.compute()
    assert a.merge(b) is a
    assert_same_result(a.compute(), whole)
    assert b.compute() == b_before  # the other side is untouched
    # merging with empty accumulators on either side changes nothing
    empty = LogitStats(backend="torch")
    empty.merge(a)
    assert_same_result(empty.compute(), whole)
    a.merge(LogitStats())
    assert_same_result(a.compute(), whole)


def test_merge_rejects_incompatible() -> None:
    a = run(make_batches(sizes=(10,)))
    with pytest.raises(ValueError, match="top_k mismatch"):
        a.merge(LogitStats(top_k=3))
    with pytest.raises(ValueError, match="ignore_index mismatch"):
        a.merge(LogitStats(ignore_index=-1))
    with pytest.raises(ValueError, match="labels on/off"):
        a.merge(run(make_batches(sizes=(10,), labels=False)))


def _roundtrip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        import safetensors.torch
    except ImportError:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)
    return safetensors.torch.load(safetensors.torch.save(sd))


def test_state_dict_round_trip_then_resume() -> None:
    batches = make_batches()
    whole = run(batches).compute()
    first = run(batches[:3])
    sd = first.state_dict()
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in sd.values())
    # plain torch.save with weights_only=True works as well
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    via_torch = torch.load(buf, weights_only=True)
    for loaded in (_roundtrip(sd), via_torch):
        resumed = LogitStats(backend="torch")
        resumed.load_state_dict(loaded)
        assert resumed.has_labels is True
        for r, q, lab in batches[3:]:
            resumed.update(r, q, lab)
        assert_same_result(resumed.compute(), whole)
    # from_state_dict takes the settings from the dict; the source stays usable
    other = LogitStats.from_state_dict(run(batches, top_k=3).state_dict())
    assert other.top_k == 3
    assert first.compute().tokens_seen == sum(SIZES[:3])


def test_state_dict_of_empty_accumulator() -> None:
    sd = LogitStats().state_dict()
    fresh = LogitStats.from_state_dict(_roundtrip(sd))
    assert fresh.has_labels is None and fresh.tokens_seen == 0
    fresh.update(*make_batch(5, 1, labels=False))
    assert fresh.has_labels is False


def test_load_state_dict_rejects_bad_input() -> None:
    sd = run(make_batches(sizes=(10,))).state_dict()
    with pytest.raises(ValueError, match="top_k mismatch"):
        LogitStats(top_k=4).load_state_dict(sd)
    with pytest.raises(ValueError, match="lacks"):
        LogitStats().load_state_dict({k: v for k, v in sd.items() if k != "m2"})
    with pytest.raises(ValueError, match="mean"):
        LogitStats().load_state_dict({**sd, "mean": sd["mean"].float()})
    with pytest.raises(ValueError, match="kl values"):
        LogitStats().load_state_dict({**sd, "kl_values": sd["kl_values"][:-1]})
    with pytest.raises(ValueError, match="delta_p values"):
        LogitStats().load_state_dict({**sd, "has_labels": torch.tensor(0)})
    # settings as plain ints are fine
    plain = {**sd, "top_k": 5, "ignore_index": -100, "has_labels": 1, "version": 1}
    LogitStats().load_state_dict(plain)


def test_reset() -> None:
    stats = run(make_batches(sizes=(10, 20)))
    stats.reset()
    assert stats.tokens_seen == 0 and stats.has_labels is None
    with pytest.raises(ValueError, match="no valid tokens"):
        stats.compute()
    batches = make_batches(sizes=(15, 4), labels=False)  # labels off is allowed after reset
    for r, q, lab in batches:
        stats.update(r, q, lab)
    assert stats.compute() == run(batches).compute()


# --- errors and output -----------------------------------------------------------------------


def test_compute_without_valid_tokens() -> None:
    with pytest.raises(ValueError, match="no valid tokens.*0 seen"):
        LogitStats().compute()
    ref, quant, labels = make_batch(6, 0)
    labels[:] = -100
    labels[0] = 1
    ref[0, 0] = math.nan
    stats = run([(ref, quant, labels)])
    with pytest.raises(ValueError, match=r"6 seen, 5 ignored .* 1 non-finite"):
        stats.compute()


def test_update_errors() -> None:
    stats = LogitStats(backend="torch")
    ref, quant, labels = make_batch(8, 0)
    stats.update(ref, quant, labels)
    with pytest.raises(ValueError, match="labels on/off"):
        stats.update(ref, quant)
    with pytest.raises(ValueError, match="top_k mismatch"):
        stats.update_metrics(compare_logits(ref, quant, labels, top_k=2, backend="torch"))
    no_labels = LogitStats(backend="torch")
    no_labels.update(ref, quant)
    with pytest.raises(ValueError, match="labels on/off"):
        no_labels.update(ref, quant, labels)
    assert stats.tokens_seen == 8 and no_labels.tokens_seen == 8  # failed updates add nothing
    with pytest.raises(ValueError, match="top_k"):
        LogitStats(top_k=0)
    with pytest.raises(ValueError, match="backend"):
        LogitStats(backend="cuda")  # type: ignore[arg-type]


def test_to_dict_is_json_and_maps_nan_to_none() -> None:
    res = run(make_batches()).compute()
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["counts"]["seen"] == sum(SIZES)
    assert d["means"]["kl"]["value"] == res.means["kl"].value
    assert set(d["kl_distribution"]["percentiles"]) == {f"{p:g}" for p in PERCENTILES}
    assert d["perplexity"]["ppl_ratio"]["stderr"] == res.ppl_ratio.stderr
    # one scored token: every standard error is undefined (ddof = 1) and becomes None
    ref, quant, labels = make_batch(1, 3, p_ignore=0.0)
    one = run([(ref, quant, labels)]).compute()
    d1 = json.loads(json.dumps(one.to_dict(), allow_nan=False))
    assert d1["means"]["kl"]["stderr"] is None and d1["agreement"]["top1"]["stderr"] is None
    assert d1["perplexity"]["nll_correlation"] is None
    assert d1["kl_distribution"]["max"] == d1["kl_distribution"]["min"] == one.means["kl"].value
    # without labels the label sections are None
    d2 = run(make_batches(sizes=(5,), labels=False)).compute().to_dict()
    assert d2["perplexity"] is None and d2["rms_delta_p"] is None
    assert d2["delta_p_distribution"] is None and "nll_ref" not in d2["means"]


def test_result_is_frozen() -> None:
    res = run(make_batches(sizes=(5,))).compute()
    with pytest.raises(AttributeError):
        res.tokens_seen = 3  # type: ignore[misc]


# --- distributed -----------------------------------------------------------------------------


def test_sync_is_a_noop_without_distributed() -> None:
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    stats = run(make_batches(sizes=(10, 3)))
    before = stats.state_dict()
    stats.sync()
    assert not stats.synced
    after = stats.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    stats.unsync()  # no-op as well
    stats.update(*make_batch(4, 9))  # still updatable


RANK_SIZES = {0: (30, 7), 1: (12, 50, 3)}


def _sync_worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),  # fail, don't hang, if the other rank dies
    )
    try:
        local_batches = make_batches(sizes=RANK_SIZES[rank], seed=100 * rank)
        stats = run(local_batches)
        local = stats.compute()
        stats.sync()
        assert stats.synced
        everything = run(make_batches(sizes=RANK_SIZES[0], seed=0))
        everything.merge(run(make_batches(sizes=RANK_SIZES[1], seed=100)))
        assert_same_result(stats.compute(), everything.compute())
        with pytest.raises(RuntimeError, match="unsync"):
            stats.update(*make_batch(3, 1))
        stats.unsync()
        assert stats.compute() == local
        # a rank with no data yet (labels undecided) takes the others' state
        if rank == 1:
            stats.reset()
        stats.sync()
        assert stats.compute().tokens_seen == sum(RANK_SIZES[0])
        # percentiles: an exact rank and a sketch rank sync to a sketch, the merge of both
        mixed = run(local_batches, percentiles="exact" if rank == 0 else "sketch")
        mixed.sync()
        both = run(make_batches(sizes=RANK_SIZES[0], seed=0), percentiles="exact")
        both.merge(run(make_batches(sizes=RANK_SIZES[1], seed=100), percentiles="sketch"))
        assert mixed.compute().percentile_method == "sketch"
        assert mixed.compute().kl_distribution == both.compute().kl_distribution
        # auto: each rank holds at most exact_limit values, together more → sketch everywhere
        auto = run(local_batches, exact_limit=max(sum(s) for s in RANK_SIZES.values()))
        assert auto.compute().percentile_method == "exact"
        auto.sync()
        assert auto.compute().percentile_method == "sketch"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters importing torch: a few seconds
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_sync_two_processes_gloo() -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_sync_worker, args=(init_file,), nprocs=2, join=True)


def test_out_of_range_labels_raise_at_compute_not_update() -> None:
    # update() does not read the labels on the host: the count and the first bad value come
    # back at compute() / state_dict(), and travel through merge
    (ref, quant, lab), (ref2, quant2, lab2) = make_batches(sizes=(6, 5), seed=11)
    lab = lab.clone()
    lab[[1, 4]] = torch.tensor([V + 3, -2])
    stats = LogitStats(backend="torch")
    stats.update(ref, quant, lab)
    stats.update(ref2, quant2, lab2)
    assert stats.tokens_seen == 11
    message = rf"2 label\(s\) outside \[0, V={V}\) and not ignore_index=-100 \(e\.g\. {V + 3}\)"
    with pytest.raises(ValueError, match=message):
        stats.compute()
    with pytest.raises(ValueError, match=message):
        stats.state_dict()
    clean = LogitStats(backend="torch")
    clean.update(ref2, quant2, lab2)
    with pytest.raises(ValueError, match=message):
        clean.merge(stats).compute()
    stats.reset()  # starts over: clean again
    stats.update(ref2, quant2, lab2)
    assert stats.compute().to_dict() == run([(ref2, quant2, lab2)]).compute().to_dict()


def test_many_updates_equal_few(monkeypatch: pytest.MonkeyPatch) -> None:
    # pending device chunks are joined every _MAX_CHUNKS updates: the state is unchanged
    batches = make_batches(sizes=(3, 1, 4, 2, 5, 1, 2), seed=21)
    want = run(batches).state_dict()
    monkeypatch.setattr(qmetrics.metrics.logit_stats, "_MAX_CHUNKS", 2)
    stats = LogitStats(backend="torch")
    for i, (ref, quant, lab) in enumerate(batches):
        stats.update(ref, quant, lab)
        if i == 3:
            assert stats.tokens_seen == 10
            stats.compute()  # settles midway; later updates continue the same state
    got = stats.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=RTOL, atol=0)
