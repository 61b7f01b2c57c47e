"""pytest-benchmark cases of the distillation losses (forward + backward):
``pytest benchmarks/ --benchmark-only``.

``distill_loss`` and ``linear_distill_loss`` against the eager loss, the providers of
``qmetrics bench`` at its default shapes (see :mod:`benchmarks.test_bench_compare`), grouped
per case. CUDA cases run only on a GPU.
"""

from __future__ import annotations

import pytest

from benchmarks.test_bench_compare import cases, run_case

CASES = cases(("distill", "distill_linear"))


@pytest.mark.parametrize("provider", ("qmetrics", "eager"))
@pytest.mark.parametrize(
    ("device", "spec"),
    CASES,
    ids=[f"{d}-{s.op}-N{s.tokens}-V{s.vocab}-{s.dtype}" for d, s in CASES],
)
def test_distill_loss(benchmark, provider, device, spec):
    run_case(benchmark, device, spec, provider, rounds=3)
