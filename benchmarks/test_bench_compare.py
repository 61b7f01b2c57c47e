"""pytest-benchmark cases: ``pytest benchmarks/ --benchmark-only``.

Each shape runs the seed-style and naive baselines and qmetrics side by side (same process,
same inputs), so pytest-benchmark's comparison table shows the ratio. CUDA shapes run only on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.compare_table import CPU_SHAPES, CUDA_SHAPES
from benchmarks.harness import make_inputs, provider_fn

CASES = [("cpu", n, v, torch.float32) for n, v in CPU_SHAPES] + [
    ("cuda", n, v, torch.bfloat16) for n, v in CUDA_SHAPES
]


@pytest.mark.parametrize("provider", ["seed", "naive", "qmetrics"])
@pytest.mark.parametrize(
    ("device", "n", "vocab", "dtype"), CASES, ids=[f"{c[0]}-N{c[1]}-V{c[2]}" for c in CASES]
)
def test_compare_logits(benchmark, provider, device, n, vocab, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ref, quant, labels = make_inputs(n, vocab, dtype, device)
    fn = provider_fn(provider, device)
    if device == "cuda":

        def run():
            fn(ref, quant, labels)
            torch.cuda.synchronize()
    else:

        def run():
            fn(ref, quant, labels)

    benchmark.group = f"{device}-N{n}-V{vocab}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
