"""pytest-benchmark cases of the distillation losses: ``pytest benchmarks/ --benchmark-only``.

Forward + backward of each provider of :mod:`benchmarks.distill_table` at the table's shapes
(CPU: N=4096, V=32000, fp32; CUDA: bf16, V ∈ {32000, 128256}), grouped per shape so that the
comparison table shows the ratios. CUDA shapes run only on a GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.distill_table import CPU_SHAPES, CUDA_SHAPES, PROVIDERS, make_inputs, provider_step

CASES = [("cpu", n, v, torch.float32) for n, v in CPU_SHAPES] + [
    ("cuda", n, v, torch.bfloat16) for n, v in CUDA_SHAPES
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("device", "n", "vocab", "dtype"), CASES, ids=[f"{c[0]}-N{c[1]}-V{c[2]}" for c in CASES]
)
def test_distill_loss(benchmark, provider, device, n, vocab, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    call = functools.partial(
        provider_step(provider), *make_inputs(provider, n, vocab, dtype, device)
    )

    def run():
        call()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"distill-{device}-N{n}-V{vocab}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
