"""pytest-benchmark cases of ``compare_logits`` and ``LogitStats.update``:
``pytest benchmarks/ --benchmark-only``.

The providers of ``qmetrics bench`` (:func:`qmetrics.evaluation.bench.make_providers`) at its
default shapes — CPU N=192, V=32000, fp32; CUDA N=4096, V ∈ {32000, 128256}, bf16 — grouped
per case, so that pytest-benchmark's comparison table shows the ratios. The ``compile``
baseline is left to ``qmetrics bench`` (which reports its compile time apart). CUDA cases run
only on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from qmetrics.evaluation.bench import CPU_DEFAULTS, CUDA_DEFAULTS, CaseSpec, make_providers

OPS = ("compare", "stats")
PROVIDERS = ("qmetrics", "eager", "seed")


def cases(ops: tuple[str, ...]) -> list[tuple[str, CaseSpec]]:
    """(device, case) for every op at the default shapes of ``qmetrics bench`` (CUDA: bf16)."""
    out = []
    for device, defaults, dtypes in (("cpu", CPU_DEFAULTS, CPU_DEFAULTS["dtypes"]),
                                     ("cuda", CUDA_DEFAULTS, ("bf16",))):  # fmt: skip
        out += [(device, CaseSpec(op, n, v, d)) for op in ops for d in dtypes
                for v in defaults["vocabs"] for n in defaults["tokens"]]  # fmt: skip
    return out


def run_case(benchmark, device: str, spec: CaseSpec, provider: str, rounds: int) -> None:
    """Benchmark one provider of one case (skips: no CUDA, or no such baseline for the op)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    calls = make_providers(spec, device, baselines=("eager", "seed")).calls
    if provider not in calls:
        pytest.skip(f"no {provider} baseline for {spec.op}")
    call = calls[provider]

    def run():
        call()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{device}-{spec.label()}"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


CASES = cases(OPS)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("device", "spec"),
    CASES,
    ids=[f"{d}-{s.op}-N{s.tokens}-V{s.vocab}-{s.dtype}" for d, s in CASES],
)
def test_compare_and_stats(benchmark, provider, device, spec):
    run_case(benchmark, device, spec, provider, rounds=5)
