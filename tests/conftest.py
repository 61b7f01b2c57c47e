"""Test configuration shared by the whole suite.

By default the Triton backend is tested on CPU tensors through the Triton interpreter, which
must be switched on before anything imports ``triton`` (Triton reads ``TRITON_INTERPRET`` at
import and at kernel launch); conftest.py is imported before any test module.

With ``QMETRICS_TEST_DEVICE=cuda`` (``benchmarks/gpu_check.sh``) the same suite runs the compiled
kernels on the GPU instead: every call of ``compare_logits`` moves its tensor arguments to CUDA
and its results back to the CPU, so the tests themselves stay device-agnostic.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

TEST_DEVICE = os.environ.get("QMETRICS_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _on_test_device(fn):
    """Wrap ``compare_logits`` so that it runs on TEST_DEVICE and returns CPU tensors."""
    import torch

    from qmetrics.metrics.token_metrics import TokenMetrics

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        def move(x):
            return x.to(TEST_DEVICE) if isinstance(x, torch.Tensor) else x

        out = fn(*(move(a) for a in args), **{k: move(v) for k, v in kwargs.items()})
        return TokenMetrics(top_k=out.top_k, **{k: v.cpu() for k, v in out.to_dict().items()})

    return wrapper


if TEST_DEVICE != "cpu":
    import qmetrics
    import qmetrics.evaluation.compare
    import qmetrics.metrics.functional
    import qmetrics.metrics.logit_stats

    _wrapped = _on_test_device(qmetrics.metrics.functional.compare_logits)
    _modules = (
        qmetrics,
        qmetrics.metrics.functional,
        qmetrics.metrics.logit_stats,
        qmetrics.evaluation.compare,
    )
    for _module in _modules:
        _module.compare_logits = _wrapped


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip every test parametrized with ``backend="triton"`` when triton is not installed."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
