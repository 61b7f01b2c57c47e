"""``OutputMonitor``: its moments and clustered errors against numpy on the same tokens, rolling
windows, open requests, non-finite tokens, the drift tests (PSI, KS against scipy, z), the
profile's JSON round trip, the Hugging Face hook, and the JSON lines / Prometheus exports."""

from __future__ import annotations

import copy
import json
import math
import pickle
import threading

import numpy as np
import pytest
import torch
from qmetrics.kernels.torch_compile import compiler_available

from qmetrics.metrics import output_monitor
from qmetrics.metrics.drift import (
    GRIDS,
    MonitorProfile,
    Thresholds,
    check_window,
    drift_values,
    ks_statistic,
    population_stability,
    psi_bins,
)
from qmetrics.metrics.output_monitor import OutputMonitor
from qmetrics.metrics.output_stats import output_stats
from qmetrics.reports.monitor import monitor_records, prometheus_text, read_jsonl, write_jsonl
from tests.conftest import HAS_TRITON, TEST_DEVICE
from tests.test_no_sync import no_host_reads


def _logits(b: int, t: int, v: int = 64, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a per-request offset in sharpness makes tokens of one request correlated
    sharp = 1.0 + torch.rand(b, 1, 1, generator=g) * 2
    return scale * sharp * torch.randn(b, t, v, generator=g)


def _clustered(values: np.ndarray) -> tuple[float, float]:
    """(mean, clustered se) of [R, T] values, one request per row (float64, by hand)."""
    n = values.size
    mean = values.mean()
    s_c, n_c = values.sum(1), np.full(values.shape[0], values.shape[1])
    c = values.shape[0]
    se = math.sqrt(c / (c - 1) * np.sum((s_c - mean * n_c) ** 2)) / n
    return float(mean), se


def test_moments_and_clustered_se_match_numpy() -> None:
    x = _logits(6, 20)
    labels = torch.randint(0, 64, (6, 20))
    mon = OutputMonitor()
    mon.observe(x[:3], labels[:3])
    mon.observe(x[3:], labels[3:])
    summary = mon.summary()
    ref = output_stats(x, labels)
    for name in ("entropy", "max_prob", "margin", "nll"):
        values = getattr(ref, name).double().numpy()
        mean, se = _clustered(values)
        st = summary.stats[name]
        assert st.count == 120 and st.clusters == 6
        assert st.mean == pytest.approx(mean, rel=1e-6)
        assert st.se == pytest.approx(se, rel=1e-5)
        assert st.sd == pytest.approx(values.std(ddof=1), rel=1e-5)
        assert sum(st.hist) == 120


def test_open_requests_are_one_cluster_each() -> None:
    """Chunks of one request (``continues=True``) form one cluster: the same se as the whole.
    A read while the requests are open counts them as clusters of their tokens so far (not the
    iid se of a window without closed requests) and leaves them open."""
    x = _logits(4, 30)
    whole, chunked = OutputMonitor(), OutputMonitor()
    whole.observe(x)
    for sl in (slice(0, 7), slice(7, 19)):
        chunked.observe(x[:, sl], continues=True)
    so_far, first = chunked.summary().stats["entropy"], OutputMonitor()
    first.observe(x[:, :19])
    want = first.summary().stats["entropy"]
    assert (so_far.count, so_far.clusters) == (want.count, want.clusters) == (76, 4)
    assert so_far.se == pytest.approx(want.se, rel=1e-9)
    assert so_far.design_effect == pytest.approx(want.design_effect, rel=1e-9)
    chunked.observe(x[:, 19:], continues=True)
    chunked.end_requests()
    a, b = whole.summary().stats["entropy"], chunked.summary().stats["entropy"]
    assert (a.count, a.clusters) == (b.count, b.clusters) == (120, 4)
    assert a.se == pytest.approx(b.se, rel=1e-9) and a.mean == pytest.approx(b.mean, rel=1e-12)


def test_rolling_window_keeps_the_last_tokens() -> None:
    mon = OutputMonitor(window_tokens=40, buckets=4)
    for k in range(10):  # 10 requests of 10 tokens, each bucket holds one
        mon.observe(_logits(1, 10, seed=k))
    s = mon.summary()
    assert mon.tokens_total == 100
    # a full bucket is cleared by the next call, not before: the window is the last 4
    assert (s.first_token, s.tokens) == (60, 40)
    assert s.stats["entropy"].count == 40 and s.stats["entropy"].clusters == 4
    direct = torch.cat([output_stats(_logits(1, 10, seed=k)).entropy for k in range(6, 10)], 1)
    assert s.stats["entropy"].mean == pytest.approx(direct.double().mean().item(), rel=1e-6)
    mon.observe(_logits(1, 3, seed=10))  # clears the oldest bucket (tokens 60-69)
    assert (mon.summary().first_token, mon.summary().tokens) == (70, 33)


def test_requests_closing_as_their_bucket_fills_stay_in_the_window() -> None:
    """A continuing request's clusters go to the bucket holding its last tokens, also when
    those tokens fill it: the window's requests are those of its tokens (as when the
    requests are observed whole)."""
    chunked, whole = OutputMonitor(window_tokens=20, buckets=2), OutputMonitor(20, buckets=2)
    for k in range(3):  # requests of 10 tokens, in chunks of 4 + 6: each fills a bucket
        x = _logits(1, 10, seed=k)
        chunked.observe(x[:, :4], continues=True)
        chunked.observe(x[:, 4:], continues=True)
        chunked.end_requests()
        whole.observe(x)
    a, b = chunked.summary().stats["entropy"], whole.summary().stats["entropy"]
    assert (a.count, a.clusters) == (b.count, b.clusters) == (20, 2)
    assert a.se == pytest.approx(b.se, rel=1e-9)


def test_nonfinite_fraction_counts_scored_tokens_only() -> None:
    """Masked tokens (padding) are neither non-finite nor finite: the fraction is over the
    tokens scored."""
    x = _logits(2, 10)
    x[0, 3, :] = float("nan")
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 5:] = False
    mon = OutputMonitor()
    mon.observe(x, mask=mask)
    s = mon.summary()
    assert (s.tokens, s.nonfinite, s.stats["max_prob"].count) == (20, 1, 14)
    assert s.nonfinite_fraction == pytest.approx(1 / 15)
    profile = OutputMonitor()
    profile.observe(_logits(2, 10, seed=5))
    alarms = check_window(profile.fit_profile(), s)
    assert alarms[0].name == "nonfinite_frac" and alarms[0].value == pytest.approx(1 / 15)


def test_nonfinite_tokens_are_counted_never_averaged() -> None:
    x = _logits(2, 10)
    x[0, 3, 5] = float("nan")
    x[1, 4, :] = float("inf")
    mon = OutputMonitor()
    mon.observe(x)
    s = mon.summary()
    assert s.nonfinite == 2 and s.tokens == 20
    assert s.stats["entropy"].count == 18 and math.isfinite(s.stats["entropy"].mean)
    assert mon.snapshot()["nonfinite_total"] == 2
    profile = OutputMonitor()
    profile.observe(_logits(2, 10, seed=5))
    alarms = check_window(profile.fit_profile(), s)
    assert alarms[0].name == "nonfinite_frac" and alarms[0].value == pytest.approx(0.1)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.skipif(
    not compiler_available(), reason="torch.compile needs a C++ compiler"))])  # fmt: skip
def test_masked_logits_are_scored_and_masked_labels_counted(compile: bool) -> None:
    """Logits after a top-k mask (−inf outside the top 8) are ordinary tokens of the
    statistics; a label on a masked entry (probability 0, NLL +inf) makes its token non-finite:
    counted, in no statistic."""
    x = _logits(2, 10)
    kth = x.topk(8, dim=-1).values[..., -1:]
    x = x.masked_fill(x < kth, float("-inf"))
    labels = x.argmax(-1)
    labels[1, 3] = int(torch.nonzero(x[1, 3] == float("-inf"))[0])
    mon = OutputMonitor(compile=compile)
    mon.observe(x, labels)
    s = mon.summary()
    assert (s.tokens, s.nonfinite) == (20, 1)
    want = output_stats(x, labels)
    assert want.finite.all() and want.nll[1, 3] == float("inf")
    scored = torch.ones(2, 10, dtype=torch.bool)
    scored[1, 3] = False
    for name in ("entropy", "max_prob", "margin", "nll"):
        values = getattr(want, name)[scored].double()
        assert s.stats[name].count == 19, name
        assert s.stats[name].mean == pytest.approx(float(values.mean()), rel=1e-5), name
    assert s.nonfinite_fraction == pytest.approx(1 / 20)


def _assert_same_window(got, want, mean_rel: float) -> None:
    """Two :class:`WindowSummary` of the same tokens: span, counts, requests, histograms,
    means (to ``mean_rel``) and clustered errors."""
    assert (got.first_token, got.tokens) == (want.first_token, want.tokens)
    for name, st in want.stats.items():
        other = got.stats[name]
        assert (other.count, other.clusters, other.hist) == (st.count, st.clusters, st.hist)
        assert other.mean == pytest.approx(st.mean, rel=mean_rel), name
        assert other.se == pytest.approx(st.se, rel=1e-9), name


def test_a_read_from_another_thread_waits_for_the_monitor(monkeypatch) -> None:
    """A read (``summary``, as a Prometheus scrape from its server thread) that flushes the
    gathered decode steps while the serving thread observes the next step: the monitor's lock
    makes the step wait, and the window equals the one of a run without the read. Forced
    deterministically: the read pauses inside the flush until the step is added (or 0.5 s
    passed); without the lock the step overwrote a slot the flush was still reading."""
    steps = [_logits(4, 1, v=256, seed=k) for k in range(40)]
    alone = OutputMonitor(compile=False)
    for step in steps:
        alone.observe(step, continues=True)
    alone.end_requests()

    mon = OutputMonitor(compile=False)
    in_flush, added, go = threading.Event(), threading.Event(), threading.Event()
    gathered, add = output_monitor._DecodeBuffer.gathered, output_monitor._DecodeBuffer.add
    reader = {}

    def paused_gathered(self, n):
        out = gathered(self, n)
        if threading.current_thread() is reader.get("thread"):
            in_flush.set()
            added.wait(timeout=0.5)
        return out

    def signalling_add(self, step, mask):
        full = add(self, step, mask)
        if in_flush.is_set():
            added.set()
        return full

    monkeypatch.setattr(output_monitor._DecodeBuffer, "gathered", paused_gathered)
    monkeypatch.setattr(output_monitor._DecodeBuffer, "add", signalling_add)
    thread = threading.Thread(target=lambda: (go.wait(5), mon.summary()))
    reader["thread"] = thread
    thread.start()
    for k, step in enumerate(steps):
        if k == 10:
            go.set()
            assert in_flush.wait(timeout=5), "the read did not start"
        mon.observe(step, continues=True)
    thread.join()
    mon.end_requests()
    got, want = mon.summary(), alone.summary()
    assert got.tokens == 160
    _assert_same_window(got, want, mean_rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_observes_on_a_side_stream_and_reads_on_the_default_one() -> None:
    """A server observing on its own CUDA stream (kept busy, so that unordered work on
    another stream would run ahead of it) and a scrape reading on the default stream: each
    call is ordered after the last one's stream, so the window equals a one-stream run."""
    steps = [_logits(4, 1, v=4096, seed=k).cuda() for k in range(60)]
    alone = OutputMonitor(window_tokens=128, buckets=4)
    for step in steps:
        alone.observe(step, continues=True)
    alone.end_requests()
    mon = OutputMonitor(window_tokens=128, buckets=4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k, step in enumerate(steps):
            torch.cuda._sleep(200_000)  # ~0.1 ms of GPU time ahead of each step's work
            mon.observe(step, continues=True)
            if k % 7 == 3:
                with torch.cuda.stream(torch.cuda.default_stream()):
                    mon.summary()
    mon.end_requests()  # on the default stream again
    _assert_same_window(mon.summary(), alone.summary(), mean_rel=1e-9)


def test_observe_makes_no_host_sync() -> None:
    mon = OutputMonitor(window_tokens=16, buckets=2)
    x, labels = _logits(2, 5), torch.randint(0, 64, (2, 5))
    with no_host_reads():
        for _ in range(3):
            mon.observe(x, labels)
            mon.observe(x[:, :2], continues=True)
            for t in range(3):  # decode steps: gathered, then observed by end_requests
                mon.observe(x[:, t : t + 1], continues=True)
            mon.end_requests()
    assert mon.tokens_total == 3 * 20


def _mixed_traffic(mon: OutputMonitor, seed: int = 0) -> None:
    """Scoring calls of several lengths (strided views, labels with an ignored one, a padding
    mask, NaN and −inf entries), a generate-like run of continuing requests, a [T, V] call and
    a [V] one."""
    g = torch.Generator().manual_seed(seed)
    for t in (9, 5, 12):
        x = 3 * torch.randn(3, t + 1, 257, generator=g)
        x[0, 1, 7], x[1, 2, 3] = float("nan"), float("-inf")
        labels = torch.randint(0, 257, (3, t), generator=g)
        labels[0, 0] = -100
        mask = torch.rand(3, t, generator=g) > 0.2
        mon.observe(x[:, :-1], labels, mask=mask)
        mon.observe(x[:, 1:])
    for _ in range(4):
        mon.observe(torch.randn(3, 1, 257, generator=g), continues=True)
    mon.end_requests()
    mon.observe(torch.randn(11, 257, generator=g))
    mon.observe(torch.randn(257, generator=g), torch.tensor(5))  # one token


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C++ compiler")
@pytest.mark.slow
def test_compiled_step_matches_the_eager_one() -> None:
    """``compile=True`` (one inductor function per step) gives the eager step's window, counts
    and histograms, and makes no host sync once compiled."""
    compiled = OutputMonitor(window_tokens=100, buckets=4, compile=True, keep_requests=50)
    eager = OutputMonitor(window_tokens=100, buckets=4, compile=False, keep_requests=50)
    _mixed_traffic(compiled)
    _mixed_traffic(eager)
    assert not output_monitor._COMPILED.failed, "the compiled step fell back to eager"
    got, want = compiled.snapshot(), eager.snapshot()
    assert got["window"] == want["window"] and got["nonfinite_total"] == want["nonfinite_total"]
    assert got["window"]["nonfinite"] > 0
    for name, stat in want["stats"].items():
        for key, value in stat.items():
            assert got["stats"][name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
    np.testing.assert_allclose(compiled.request_sums(), eager.request_sums(), rtol=1e-5)
    for a, b in zip(compiled.summary().stats.values(), eager.summary().stats.values(), strict=True):
        assert np.abs(np.subtract(a.hist, b.hist)).sum() <= 2  # a value on a bin edge
    with no_host_reads():
        _mixed_traffic(compiled, seed=1)


def test_sampling_observes_every_kth_position_as_views() -> None:
    """``sample_every=3``: call c observes positions c % 3, c % 3 + 3, ... of each request (the
    same as observing those slices in full); decode steps: every 3rd call; bad input raises
    even on a call that is not sampled."""
    sampled = OutputMonitor(sample_every=3, compile=False)
    full = OutputMonitor(compile=False)
    for call in range(5):
        x, labels = _logits(2, 7, seed=call), torch.randint(0, 64, (2, 7))
        sampled.observe(x, labels)
        full.observe(x[:, call % 3 :: 3], labels[:, call % 3 :: 3])
    for call in range(5, 11):  # decode steps of two requests: calls 6 and 9 are observed
        sampled.observe(_logits(2, 1, seed=call), continues=True)
        if call % 3 == 0:
            full.observe(_logits(2, 1, seed=call), continues=True)
    sampled.end_requests()
    full.end_requests()
    got, want = sampled.snapshot(), full.snapshot()
    assert got.pop("sample_every") == 3 and want.pop("sample_every") == 1
    assert got == want
    assert got["tokens_total"] == 2 * (3 + 2 + 2 + 3 + 2) + 2 * 2
    with pytest.raises(ValueError, match="mask shape"):
        sampled.observe(_logits(2, 1), mask=torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="sample_every"):
        OutputMonitor(sample_every=0)


def _generation(mon: OutputMonitor, dtype: torch.dtype, device: str = "cpu") -> dict:
    """Decode steps as ``attach`` sees them (the last position of [R, T, V] logits, a view), a
    NaN step, a read in the middle of a request, a scoring call while steps are gathered, a
    batch of another size and one-request [V] steps; the snapshot and the request sums."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (3 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    for step in range(11):
        x = rand(3, 4, 257)
        if step == 5:
            x[1, -1, 9] = float("nan")
        mon.observe(x[:, -1:], continues=True)
        if step == 6:
            mon.snapshot()  # observes the gathered steps; the requests stay open
    mon.observe(rand(2, 6, 257), torch.randint(0, 257, (2, 6), generator=g).to(device))
    mon.observe(rand(3, 1, 257), continues=True)
    mon.end_requests()
    for _ in range(6):
        mon.observe(rand(2, 1, 257), continues=True)
    mon.end_requests()
    for _ in range(3):
        mon.observe(rand(257), continues=True)
    mon.end_requests()
    return {"snapshot": mon.snapshot(), "requests": mon.request_sums()}


_COMPILED_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(not compiler_available(), reason="needs a C++ compiler"),
]
_TRITON_MARKS = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.mark.parametrize(
    ("mode", "dtype"),
    [
        ("eager", torch.float32),
        ("eager", torch.bfloat16),
        # one dtype compiled: each compile costs 5-30 s, and the dtype is the op's concern
        pytest.param("compiled", torch.float32, marks=_COMPILED_MARKS),
        pytest.param("triton", torch.float32, marks=_TRITON_MARKS),
        pytest.param("triton", torch.bfloat16, marks=_TRITON_MARKS),
    ],
)
def test_gathered_decode_steps_equal_steps_observed_one_by_one(
    mode: str, dtype: torch.dtype
) -> None:
    """``decode_batch=4``: steps observed in batches of 4 (full, and the partial batches a read,
    another call or ``end_requests`` observe) give what observing each step does, in fp32 and
    bf16, eagerly, compiled (another count of steps does not compile again) and with the
    Triton kernel (on ``TEST_DEVICE``: the interpreter on the CPU)."""
    device = TEST_DEVICE if mode == "triton" else "cpu"
    backend = "triton" if mode == "triton" else "torch"
    kw = dict(keep_requests=20, compile=mode == "compiled", window_tokens=1000, buckets=2)
    gathered = OutputMonitor(decode_batch=4, backend=backend, **kw)
    one_by_one = OutputMonitor(decode_batch=1, backend=backend, **kw)
    got, want = _generation(gathered, dtype, device), _generation(one_by_one, dtype, device)
    assert gathered._decode is not None and one_by_one._decode is None
    assert not output_monitor._COMPILED.failed, "the compiled step fell back to eager"
    assert got["snapshot"]["tokens_total"] == 3 * 12 + 12 + 12 + 3
    assert got["snapshot"]["window"] == want["snapshot"]["window"]
    assert got["snapshot"]["window"]["nonfinite"] == 1
    for name, stat in want["snapshot"]["stats"].items():
        assert stat["requests"] == (3 + 2 + 2 + 1 if name != "nll" else 2)
        for key, value in stat.items():
            got_value = got["snapshot"]["stats"][name][key]
            assert got_value == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)
    np.testing.assert_allclose(got["requests"], want["requests"], rtol=1e-6)
    if mode == "compiled":
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for steps in (3, 2, 1, 4):  # 1, 2, 3 and 4 steps were observed as a batch above
            for _ in range(steps):
                gathered.observe(_logits(3, 1, v=257).to(dtype), continues=True)
            gathered.end_requests()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_gathered_decode_steps_roll_the_window_as_steps_one_by_one() -> None:
    """With window buckets smaller than a batch of gathered steps, the batch is observed when
    its steps fill the current bucket: every bucket holds the same tokens, sums and
    histograms as when each step is observed by its own call."""
    kw = dict(keep_requests=20, window_tokens=20, buckets=4)  # buckets of 5 tokens
    gathered, one_by_one = OutputMonitor(decode_batch=4, **kw), OutputMonitor(decode_batch=1, **kw)
    got, want = _generation(gathered, torch.float32), _generation(one_by_one, torch.float32)
    assert gathered._decode is not None and got["snapshot"]["tokens_total"] == 63
    assert got["snapshot"]["window"] == want["snapshot"]["window"]
    _assert_same_buckets(gathered, one_by_one)


def test_gathered_decode_steps_with_masks_equal_steps_one_by_one() -> None:
    """Masked decode steps (what ``attach`` passes for rows that finished) are gathered with
    their masks: the same buckets and request sums as observing each step; a step without a
    mask between masked ones starts another buffer."""
    g = torch.Generator().manual_seed(1)
    steps = [(3 * torch.randn(3, 1, 50, generator=g), torch.rand(3, 1, generator=g) > 0.3)
             for _ in range(11)]  # fmt: skip
    kw = dict(keep_requests=10, window_tokens=24, buckets=3)
    gathered, one_by_one = OutputMonitor(decode_batch=4, **kw), OutputMonitor(decode_batch=1, **kw)
    for mon in (gathered, one_by_one):
        for k, (x, keep) in enumerate(steps):
            mon.observe(x, continues=True, mask=None if k in (5, 6) else keep)
        mon.end_requests()
    assert gathered._decode is not None and gathered._decode.keep is not None
    assert gathered._decode.stop is None  # a buffer of bool masks, not deferred ones
    assert gathered.tokens_total == 33
    _assert_same_buckets(gathered, one_by_one)
    kept = sum(int(keep.sum()) for k, (x, keep) in enumerate(steps) if k not in (5, 6)) + 6
    assert gathered.request_sums()[:, 0, 1].sum() == kept
    np.testing.assert_allclose(gathered.request_sums(), one_by_one.request_sums(), rtol=1e-6)


def _assert_same_buckets(got: OutputMonitor, want: OutputMonitor) -> None:
    """Every window bucket holds the same tokens, moments, histogram and non-finite count."""
    assert got._current == want._current
    for a, b in zip(got._buckets, want._buckets, strict=True):
        assert (a.tokens, a.first_token) == (b.tokens, b.first_token)
        torch.testing.assert_close(a.moments, b.moments, rtol=1e-6, atol=1e-9)
        assert torch.equal(a.hist.counts, b.hist.counts) and torch.equal(a.nonfinite, b.nonfinite)


def test_gathered_decode_steps_are_copies_within_a_memory_bound(monkeypatch) -> None:
    """A gathered step is a copy (the caller may reuse its tensor); steps are gathered only
    while two fit in ``DECODE_BUFFER_BYTES``; a batch of another size is refused at once."""
    x = _logits(2, 3, v=64)
    want = OutputMonitor(decode_batch=1)
    for t in range(3):
        want.observe(x[:, t : t + 1], continues=True)
    mon = OutputMonitor()
    step = torch.empty(2, 1, 64)
    for t in range(3):
        mon.observe(step.copy_(x[:, t : t + 1]), continues=True)
    step.fill_(float("nan"))
    assert mon.tokens_total == 0  # gathered, not observed yet
    with pytest.raises(ValueError, match="3 continuing requests, but 2 are open"):
        mon.observe(_logits(3, 1, v=64), continues=True)
    assert mon.snapshot() == want.snapshot()
    mon.end_requests()
    mon.observe(_logits(3, 2, v=64), continues=True)  # 3 requests open; the buffer holds 2
    with pytest.raises(ValueError, match="2 continuing requests, but 3 are open"):
        mon.observe(x[:, :1], continues=True)
    monkeypatch.setattr(output_monitor, "DECODE_BUFFER_BYTES", 2 * 64 * 4 * 2 - 1)
    small = OutputMonitor()
    small.observe(x[:, :1], continues=True)
    assert small._decode is None and small.tokens_total == 2
    with pytest.raises(ValueError, match="decode_batch"):
        OutputMonitor(decode_batch=0)


def test_bad_input() -> None:
    mon = OutputMonitor()
    mon.observe(_logits(1, 5))
    with pytest.raises(ValueError, match="vocab mismatch"):
        mon.observe(_logits(1, 5, v=65))
    profile = mon.fit_profile()
    other = OutputMonitor()
    other.observe(_logits(1, 5, v=80))
    with pytest.raises(ValueError, match="vocab mismatch"):
        other.check(profile)
    with pytest.raises(ValueError, match="empty window"):
        OutputMonitor().check(profile)
    nan_only = OutputMonitor()
    nan_only.observe(torch.full((1, 3, 64), float("nan")))
    with pytest.raises(ValueError, match="empty window: 3 tokens observed, 3 of them non-finite"):
        nan_only.check(profile)
    with pytest.raises(ValueError, match="window_tokens"):
        OutputMonitor(window_tokens=0)


def test_psi_and_ks_against_direct_formulas() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(3.0, 1.0, 5000), rng.normal(3.3, 1.2, 4000)
    grid = GRIDS["entropy"]
    a, b = np.clip(a, grid.lo, grid.hi - 1e-9), np.clip(b, grid.lo, grid.hi - 1e-9)  # end bins
    ha, hb = np.histogram(a, grid.edges())[0], np.histogram(b, grid.edges())[0]
    from scipy.stats import ks_2samp

    exact = ks_2samp(a, b).statistic
    d = ks_statistic(ha, hb)
    assert d <= exact + 1e-12 and exact - d < 0.01  # exact at the edges, one bin's mass short
    bounds = psi_bins(ha)
    assert len(bounds) == 11 and bounds[0] == 0 and bounds[-1] == grid.bins
    cuts = grid.edges()[bounds]
    r = np.histogram(a, cuts)[0] / a.size
    w = np.histogram(b, cuts)[0] / b.size
    assert population_stability(ha, hb, bounds) == pytest.approx(np.sum((w - r) * np.log(w / r)))
    assert population_stability(ha, ha, bounds) == 0.0


def test_psi_groups_all_hold_reference_mass() -> None:
    """When the reference's highest occupied bin holds more than a group's share and is not
    the grid's last, the bins above it join its group instead of forming an empty one (whose
    floored proportion would turn any mass moving there into PSI)."""
    hist = np.zeros(GRIDS["entropy"].bins, dtype=np.int64)
    hist[100:110], hist[700] = 10, 50
    bounds = psi_bins(hist)
    assert bounds[0] == 0 and bounds[-1] == hist.size
    assert (np.add.reduceat(hist, bounds[:-1]) > 0).all()
    moved = hist.copy()
    moved[700], moved[701] = 45, 5  # 3 % of the mass one bin up, inside the top group
    assert population_stability(hist, moved, bounds) == 0.0


def test_a_reference_without_spread_alarms_on_any_shift() -> None:
    """A statistic constant in the reference (sd 0: the margin of uniform logits is 0) shifts
    by infinitely many sds when the window's mean differs: the mean shift and the paired
    shift alarm, and ``drift_values`` reads ±inf instead of dividing by zero."""
    flat, drifted = OutputMonitor(), OutputMonitor()
    for k in range(8):
        flat.observe(torch.zeros(1, 16, 64))
        drifted.observe(_logits(1, 16, seed=k))
    ref, win = flat.summary(), drifted.summary()
    assert ref.stats["margin"].sd == 0.0 and win.stats["margin"].mean > 0
    alarms = {a.name for a in check_window(MonitorProfile.from_window(ref), win)}
    assert "mean_shift_margin" in alarms
    # the same 8 requests in both: the paired test
    keys = [f"text {k}" for k in range(8)]
    ref.requests = {k: [[0.0, 16.0]] * 4 for k in keys}  # every statistic: sum 0 over 16
    win.requests = {
        key: [[0.0, 16.0], [0.0, 16.0], [0.5 + k, 16.0], [0.0, 16.0]] for k, key in enumerate(keys)
    }
    paired = MonitorProfile.from_window(ref)
    assert "paired_shift_margin" in {a.name for a in check_window(paired, win)}
    values = drift_values(paired, win)
    assert values["paired_shift_margin"] == math.inf and values["shift_margin"] == math.inf


def test_alarms_name_the_statistics_that_drifted() -> None:
    ref = OutputMonitor()
    for k in range(40):
        ref.observe(_logits(1, 32, seed=k))
    profile = ref.fit_profile()
    same = OutputMonitor()
    for k in range(40, 80):
        same.observe(_logits(1, 32, seed=k))
    assert same.check(profile) == []
    sharper = OutputMonitor()  # a sharper model: lower entropy, higher confidence
    for k in range(40, 80):
        sharper.observe(_logits(1, 32, seed=k, scale=3.0))
    alarms = sharper.check(profile)
    names = {a.name for a in alarms}
    assert {"mean_shift_entropy", "psi_entropy", "ks_entropy", "mean_shift_max_prob"} <= names
    entropy = next(a for a in alarms if a.name == "mean_shift_entropy")
    assert entropy.value < -profile.thresholds.z and entropy.threshold == profile.thresholds.z
    assert entropy.window == {"first_token": 0, "last_token": 40 * 32 - 1, "tokens": 40 * 32}
    assert "entropy" in str(entropy) and "tokens 0–1279" in str(entropy)
    # thresholds raised: no alarm
    assert sharper.check(profile, Thresholds(z=1e9, psi=1e9, ks=1.0)) == []


def test_profile_json_round_trip() -> None:
    mon = OutputMonitor()
    mon.observe(_logits(3, 20), torch.randint(0, 64, (3, 20)))
    profile = mon.fit_profile(tokenizer="sha256:abc", model="m")
    again = MonitorProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again == profile
    bad = profile.to_dict() | {"version": 99}
    with pytest.raises(ValueError, match="not a qmetrics monitor profile"):
        MonitorProfile.from_dict(bad)


def test_jsonl_round_trip_and_prometheus_parses(tmp_path) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from qmetrics.metrics.drift import Alarm, drift_values

    ref = OutputMonitor()
    ref.observe(_logits(8, 16), torch.randint(0, 64, (8, 16)))
    profile = ref.fit_profile()
    mon = OutputMonitor()
    mon.observe(_logits(8, 16, seed=3, scale=4.0), torch.randint(0, 64, (8, 16)))
    summary = mon.summary()
    alarms = check_window(profile, summary)
    values = drift_values(profile, summary)
    assert alarms
    records = monitor_records(mon.snapshot(), alarms, values)
    back = read_jsonl(write_jsonl(records, tmp_path / "m.jsonl"))
    assert back == json.loads(json.dumps(records))
    assert [Alarm.from_dict(r) for r in back[1:]] == alarms
    # non-finite numbers (a reference without spread makes shifts infinite) stay strict JSON,
    # written as in every report: inf as "inf", NaN as null
    odd = values | {"shift_margin": math.inf, "z_nll": math.nan}
    path = write_jsonl(monitor_records(mon.snapshot(), alarms, odd), tmp_path / "odd.jsonl")

    def strict(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    lines = [json.loads(line, parse_constant=strict) for line in path.read_text().splitlines()]
    assert lines[0]["drift"]["shift_margin"] == "inf" and lines[0]["drift"]["z_nll"] is None
    text = prometheus_text(summary, mon.snapshot(), values, alarms)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["qmetrics_monitor_tokens"].samples[0].value == 128
    means = {s.labels["statistic"]: s.value for s in families["qmetrics_monitor_mean"].samples}
    assert means["entropy"] == pytest.approx(summary.stats["entropy"].mean)
    hist = families["qmetrics_monitor_distribution"]
    count = [s for s in hist.samples if s.name.endswith("_count")]
    assert {s.labels["statistic"]: s.value for s in count}["entropy"] == 128
    fired = {
        (s.labels["statistic"], s.labels["test"])
        for s in families["qmetrics_monitor_alarm"].samples
    }
    assert fired == {(a.statistic, a.test) for a in alarms}


def test_collector_scrape_reads_the_live_monitor() -> None:
    """``MonitorCollector`` in a registry, scraped as ``start_http_server`` does
    (``generate_latest``): one reading per scrape, checked against the profile, with the
    decode steps still gathered flushed into it."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from qmetrics.reports.monitor import MonitorCollector

    ref = OutputMonitor()
    ref.observe(_logits(8, 16))
    mon = OutputMonitor()
    registry = CollectorRegistry()
    registry.register(MonitorCollector(mon, ref.fit_profile()))
    mon.observe(_logits(8, 16, seed=3, scale=4.0))
    for k in range(5):  # gathered, not yet observed
        mon.observe(_logits(8, 1, seed=10 + k), continues=True)
    assert mon._decode is not None and mon._decode.steps == 5
    text = generate_latest(registry).decode("utf-8")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["qmetrics_monitor_tokens"].samples[0].value == 128 + 40
    assert families["qmetrics_monitor_window_tokens"].samples[0].value == 168
    assert families["qmetrics_monitor_alarm"].samples  # sharper logits than the profile's
    mon.end_requests()
    assert mon.summary().tokens == 168


def test_reset_keeps_the_lock_and_a_copy_makes_its_own() -> None:
    """``reset`` never swaps the lock (a thread waiting on it would run beside the one
    holding the new one); ``copy.deepcopy`` and pickle (a model the monitor is attached to
    is deep-copied by ``rtn_quantize``) give a monitor with its own lock and the same state."""
    mon = OutputMonitor(window_tokens=64, buckets=2)
    mon.observe(_logits(2, 10))
    lock = mon._lock
    mon.reset()
    assert mon._lock is lock and mon.tokens_total == 0 and mon.vocab_size is None
    mon.observe(_logits(2, 10, seed=1))
    for other in (copy.deepcopy(mon), pickle.loads(pickle.dumps(mon))):
        assert other._lock is not mon._lock
        assert other.snapshot() == mon.snapshot()
        other.observe(_logits(2, 10, seed=2))
        assert other.tokens_total == 40 and mon.tokens_total == 20


def _prompts_whose_row_0_ends() -> torch.Tensor:
    """[2, 9] prompt ids (seed 0) that ``tiny_llama(96)`` continues greedily with
    [61, 64, 19, …] and [49, 12, 63, 16, 89, 83, 43, 88]."""
    return torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _generate_until_row_0_ends(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Greedy ``generate`` of 8 tokens with end-of-sequence id 19 (row 0 ends after 3
    tokens, then is fed pad id 0)."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=19,
                              pad_token_id=0)  # fmt: skip


@pytest.mark.slow
def test_reset_during_generate_keeps_observing_its_requests() -> None:
    """A ``reset`` (e.g. from another thread) while ``generate`` runs: the rest of its steps
    are still decode steps of its two requests, with finished rows masked (the greedy rows of
    ``test_attach_skips_rows_that_finished_during_generate``: row 0 ends with id 19 after 3
    tokens), not one-token scoring requests."""
    pytest.importorskip("transformers")
    from tests.tiny_models import tiny_llama

    model = tiny_llama(96)
    ids = _prompts_whose_row_0_ends()
    mon = OutputMonitor(keep_requests=4)
    calls = []

    def reset_at_third(module, args) -> None:
        calls.append(1)
        if len(calls) == 3:
            mon.reset()

    pre = model.register_forward_pre_hook(reset_at_third)
    handle = mon.attach(model)
    out = _generate_until_row_0_ends(model, ids)
    handle.remove()
    pre.remove()
    assert out[0, 9:].tolist()[:3] == [61, 64, 19] and len(calls) == 8
    # forwards 3-8 observed: row 0 fed 64 at forward 3, then 19 and pads; row 1 all six
    assert mon.request_sums()[:, 0, 1].tolist() == [1.0, 6.0]
    assert mon.summary().stats["entropy"].clusters == 2


@pytest.mark.slow
def test_attach_observes_generate_and_scoring_calls() -> None:
    pytest.importorskip("transformers")
    from tests.tiny_models import tiny_llama

    model = tiny_llama(96)
    mon = OutputMonitor()
    handle = mon.attach(model)
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    s = mon.summary()
    assert s.tokens == 2 * 8 and s.stats["nll"].count == 16 and s.stats["entropy"].clusters == 2
    direct = model(input_ids=ids).logits[:, :-1]
    want = output_stats(direct, ids[:, 1:]).nll.double().mean().item()
    assert s.stats["nll"].mean == pytest.approx(want, rel=1e-5)

    mon.reset()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=0)  # fmt: skip
    assert out.shape == (2, 14)
    s = mon.summary()
    # one last-position row per step and batch row; the two requests closed by generate()
    assert s.tokens == 2 * 5 and s.stats["entropy"].clusters == 2
    assert "nll" not in s.stats
    handle.remove()
    mon.reset()
    with torch.no_grad():
        model(input_ids=ids)
    assert mon.tokens_total == 0 and "generate" not in model.__dict__


@pytest.mark.slow
@pytest.mark.parametrize(("decode_batch", "ids_bytes"), [(64, None), (3, None), (1, None),
                                                         (64, 40)])  # fmt: skip
def test_attach_skips_rows_that_finished_during_generate(
    decode_batch: int, ids_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``generate`` runs a finished row on (feeding it pad tokens) until the whole batch is
    done: those steps are not the row's. With seed 0 the greedy rows are [61, 64, 19, …] and
    [49, 12, 63, 16, 89, 83, 43, 88]; with end-of-sequence id 19 the first row ends after 3
    tokens, and only those count (the statistics of its first 3 steps' logits): with the
    steps gathered (their masks evaluated when observed; every 3 steps, or all at the end)
    or observed one by one. ``ids_bytes``: the kept ``input_ids`` (here the prompt's [2, 9]
    int64, 144 bytes, then [2, 1] per step) bounded to 40 bytes: the masks are evaluated
    whenever the kept tensors hold more."""
    pytest.importorskip("transformers")
    from tests.tiny_models import tiny_llama

    resolves, resolve = [], output_monitor._DecodeBuffer._resolve
    if ids_bytes is not None:
        monkeypatch.setattr(output_monitor, "DEFERRED_IDS_BYTES", ids_bytes)

    def spy_resolve(buf, steps: int) -> None:
        newest = buf.deferred[-1].untyped_storage().nbytes() if buf.deferred else 0
        resolves.append((len(buf.deferred), buf.deferred_bytes, newest))
        resolve(buf, steps)

    monkeypatch.setattr(output_monitor._DecodeBuffer, "_resolve", spy_resolve)

    model = tiny_llama(96)
    ids = _prompts_whose_row_0_ends()
    steps: list[torch.Tensor] = []
    spy = model.register_forward_hook(lambda m, a, o: steps.append(o.logits[:, -1].clone()))
    mon = OutputMonitor(keep_requests=2, decode_batch=decode_batch)
    handle = mon.attach(model)
    out = _generate_until_row_0_ends(model, ids)
    handle.remove()
    spy.remove()
    assert out[0, 9:].tolist() == [61, 64, 19, 0, 0, 0, 0, 0]
    assert out[1, 9:].tolist() == [49, 12, 63, 16, 89, 83, 43, 88]
    sums = mon.request_sums()  # [request, statistic, (sum, count)]
    assert sums[:, 0, 1].tolist() == [3.0, 8.0]
    first_row = output_stats(torch.stack(steps[:3])[:, 0]).entropy.double().sum().item()
    assert sums[0, 0, 0] == pytest.approx(first_row, rel=1e-5)
    if decode_batch > 1:  # the 8 steps' masks (the prompt's last position too), evaluated
        counts = [n for n, _, _ in resolves]
        assert sum(counts) == 8
        if ids_bytes is None:
            assert counts == ([8] if decode_batch == 64 else [3, 3, 2])
        else:  # as soon as the kept tensors hold more than the bound (the last: at the end)
            assert len(resolves) > 2
            assert all(held > ids_bytes >= held - newest for _, held, newest in resolves[:-1])
