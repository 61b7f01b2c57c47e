"""Shared benchmark harness: providers, timing, peak extra memory and bandwidth.

Timing on CUDA uses ``triton.testing.do_bench`` (median with 20th/80th percentiles); on the
CPU, repeated ``time.perf_counter`` runs summarised the same way. Peak extra memory is the
CUDA allocator's peak above what the inputs hold, or on the CPU the growth of the peak RSS
(VmHWM, reset after the inputs are built) of a fresh subprocess running the provider once.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from benchmarks.naive_baseline import naive_compare
from qmetrics import compare_logits

PROVIDERS = ("naive", "naive_compile", "qmetrics", "qmetrics_torch")


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


def cuda_peak_extra_mb(fn: Callable[[], object]) -> float:
    """CUDA allocator peak above the memory held before the call, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_peak_extra_mb(provider: str, n: int, vocab: int, dtype: str) -> float:
    """Peak RSS growth of one call, measured in a fresh subprocess, in MiB."""
    code = (
        "import sys, json; from benchmarks.harness import _cpu_memory_child; "
        f"print(json.dumps(_cpu_memory_child({provider!r}, {n}, {vocab}, {dtype!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1]))


def _cpu_memory_child(provider: str, n: int, vocab: int, dtype: str) -> float:
    ref, quant, labels = make_inputs(n, vocab, getattr(torch, dtype), "cpu")
    fn = provider_fn(provider, "cpu")
    if provider == "naive_compile":
        small = make_inputs(8, vocab, getattr(torch, dtype), "cpu")
        fn(*small)  # compile outside the measured peak
    before = _reset_peak_rss_kib()
    fn(ref, quant, labels)
    return (_peak_rss_kib() - before) / 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss_kib() -> int:
    """Reset the peak-RSS mark (Linux /proc/self/clear_refs) and return the current RSS in KiB.

    ``ru_maxrss`` cannot be used: a child started by a large parent inherits its mark."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kib("VmRSS") or 0
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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
    peak_extra_mb: float | None = None
    gbs: float | None = None
    pct_copy_bw: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
