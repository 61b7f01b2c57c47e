"""Shared benchmark harness: providers, timing, peak extra memory and bandwidth.

Timing on CUDA uses ``triton.testing.do_bench`` (median with 20th/80th percentiles); on the
CPU, repeated ``time.perf_counter`` runs summarised the same way, the providers of one shape
interleaved round by round (``time_interleaved``) so that a busy machine slows them alike.
Peak extra memory is the CUDA allocator's peak above what the inputs hold, or on the CPU the
growth of the peak RSS (VmHWM, reset after the inputs are built) of a fresh subprocess running
the provider once.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.naive_baseline import naive_compare, seed_compare
from qmetrics import compare_logits
from qmetrics.evaluation.process_memory import peak_rss_mb, reset_peak_rss

PROVIDERS = ("seed", "naive", "naive_compile", "qmetrics", "qmetrics_torch")


def make_inputs(
    n: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference logits, a perturbed "quantized" copy (KL ~ 1e-2) and next-token labels."""
    gen = torch.Generator(device=device).manual_seed(seed)
    # built in place, so that no temporary raises the process's peak memory above the inputs
    ref = torch.empty(n, vocab, device=device, dtype=dtype).normal_(0.0, 3.0, generator=gen)
    quant = torch.empty_like(ref).normal_(0.0, 0.1, generator=gen).add_(ref)
    labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
    return ref, quant, labels


_COMPILED: dict[str, Callable] = {}


def provider_fn(name: str, device: str) -> Callable:
    """The callable ``f(ref, quant, labels)`` measured for a provider."""
    if name == "seed":
        return seed_compare
    if name == "naive":
        return naive_compare
    if name == "naive_compile":
        if device not in _COMPILED:
            _COMPILED[device] = torch.compile(naive_compare)
        return _COMPILED[device]
    if name == "qmetrics":
        return lambda r, q, lab: compare_logits(r, q, lab)
    if name == "qmetrics_torch":
        return lambda r, q, lab: compare_logits(r, q, lab, backend="torch")
    raise ValueError(f"unknown provider {name!r}; known: {PROVIDERS}")


def time_fn(fn: Callable[[], object], device: str, reps: int = 10) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of the run time in milliseconds."""
    if device == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=200)
        return med, p20, p80
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def time_interleaved(
    calls: dict[str, Callable[[], object]], reps: int = 10
) -> dict[str, tuple[float, float, float]]:
    """CPU timing of several providers round-robin (one warm-up call each, then ``reps``
    rounds), so that load from other processes hits them alike: median, p20, p80 in ms.
    A provider that raises is left out of the result."""
    live = {}
    for name, fn in calls.items():
        try:
            fn()
        except Exception:  # reported by the caller as missing
            continue
        live[name] = fn
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(reps):
        for name, fn in live.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        out[name] = (statistics.median(ts), q[1], q[7])
    return out


def cuda_peak_extra_mb(fn: Callable[[], object]) -> float:
    """CUDA allocator peak above the memory held before the call, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def subprocess_json(child: str, *args: object) -> Any:
    """Run ``module:function(*args)`` in a fresh Python process (so that its peak RSS is its
    own) and return what it returns, passed back as JSON."""
    module, function = child.split(":")
    code = f"import json; from {module} import {function}; print(json.dumps({function}(*{args!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def subprocess_peak_extra_mb(child: str, *args: object) -> float:
    """:func:`subprocess_json` for a child that returns a peak RSS growth in MiB."""
    return float(subprocess_json(child, *args))


def peak_rss_growth_mb(fn: Callable[[], object]) -> float:
    """Peak RSS growth of ``fn()`` above the RSS just before it, in MiB (Linux resets the mark;
    elsewhere the result is only an upper bound)."""
    before = reset_peak_rss()
    fn()
    return peak_rss_mb() - before


def cpu_peak_extra_mb(provider: str, n: int, vocab: int, dtype: str) -> float:
    """Peak RSS growth of one call, measured in a fresh subprocess, in MiB."""
    return subprocess_peak_extra_mb(
        "benchmarks.harness:cpu_memory_child", provider, n, vocab, dtype
    )


def cpu_memory_child(provider: str, n: int, vocab: int, dtype: str) -> float:
    """In the subprocess: build the inputs, call the provider once (compiling and one-time
    allocations stay outside the measured peak), then measure a steady-state call."""
    ref, quant, labels = make_inputs(n, vocab, getattr(torch, dtype), "cpu")
    fn = provider_fn(provider, "cpu")
    fn(ref, quant, labels)
    return peak_rss_growth_mb(lambda: fn(ref, quant, labels))


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    med, _, _ = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (med * 1e-3) / 1e9


@dataclass
class Row:
    """One benchmark measurement."""

    device: str
    provider: str
    n: int
    vocab: int
    dtype: str
    ms: float
    ms_p20: float
    ms_p80: float
    speedup: float | None = None
    speedup_seed: float | None = None
    peak_extra_mb: float | None = None
    pct_seed_mem: float | None = None
    gbs: float | None = None
    pct_copy_bw: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
