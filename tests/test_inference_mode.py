"""Accumulators used under ``torch.inference_mode()`` and then outside it (and back): their
state must stay normal tensors (an inference tensor updated in place outside inference mode
raises), and the numbers must equal those of the same calls made without inference mode."""

from __future__ import annotations

import pytest
import torch

import qmetrics
from qmetrics.metrics.layer_stats import LayerStats
from qmetrics.metrics.output_monitor import OutputMonitor


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            3 * torch.randn(2, 5, 67, generator=g),
            3 * torch.randn(2, 5, 67, generator=g),
            torch.randint(0, 67, (2, 5), generator=g),
        )
        for _ in range(n)
    ]


def _alternating(call, items) -> None:
    """``call(item)`` for each item, under inference mode for the even ones."""
    for k, item in enumerate(items):
        if k % 2 == 0:
            with torch.inference_mode():
                call(item)
        else:
            call(item)


def test_logit_stats() -> None:
    batches = _batches(4)
    mixed, plain = qmetrics.LogitStats(top_k=3), qmetrics.LogitStats(top_k=3)
    _alternating(lambda b: mixed.update(*b), batches)
    for b in batches:
        plain.update(*b)
    assert mixed.compute().to_dict() == plain.compute().to_dict()


def test_layer_stats() -> None:
    batches = _batches(4)
    mixed, plain = LayerStats(), LayerStats()
    _alternating(lambda b: mixed.update(b[0], b[1]), batches)
    for b in batches:
        plain.update(b[0], b[1])
    assert mixed.tokens_seen == plain.tokens_seen == 40
    assert mixed.compute() == plain.compute()


@pytest.mark.parametrize("decode_batch", [64, 1])
def test_output_monitor(decode_batch: int) -> None:
    """Scoring calls and decode steps (gathered, or one by one) in and out of inference mode;
    the requests opened under it are closed outside it."""
    batches = _batches(6)
    mixed = OutputMonitor(decode_batch=decode_batch, compile=False)
    plain = OutputMonitor(decode_batch=decode_batch, compile=False)

    def traffic(mon: OutputMonitor, call) -> None:
        call(lambda b: mon.observe(b[0], b[2]), batches[:2])
        call(lambda b: mon.observe(b[1][:, :1], continues=True), batches)
        mon.end_requests()
        call(lambda b: mon.observe(b[1][:, :1], continues=True), batches[:3])

    traffic(mixed, _alternating)
    traffic(plain, lambda call, items: [call(item) for item in items])
    with torch.inference_mode():
        mixed.end_requests()
        got = mixed.snapshot()
    plain.end_requests()
    assert got == plain.snapshot()
    mixed.observe(batches[0][0])  # state made under inference mode, updated outside it
