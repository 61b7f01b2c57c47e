"""``compare_logits(..., labels)`` and ``LogitStats.update`` make no host synchronisation.

On the CPU a sync has no cost, so the tests stand in for one by what would cause it: every
``torch.Tensor`` method that hands a value to the host (``item``, ``__bool__``, ``__int__``,
``__float__``, ``__index__``, ``tolist``, ``cpu``, ``numpy``) raises while the call runs.

The guard covers the whole call on the torch backend. With the Triton backend under the
interpreter it is lifted inside the launcher ``logit_compare_triton``: the interpreter itself
copies the arguments' storages to the host and back, and the launcher decides on the host
whether the masked kernel is needed (a read it skips on CUDA). There the test covers
everything around the launch (validation, views, labels, accumulation); the ``cuda`` test runs
the whole call under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import pytest
import torch

import qmetrics.metrics.functional
import qmetrics.metrics.logit_stats
from qmetrics.metrics.logit_stats import LogitStats
from tests.conftest import HAS_TRITON, TEST_DEVICE

HOST_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy")
# the functions themselves, not the conftest wrapper that moves results to the CPU on a GPU run
compare_logits = inspect.unwrap(qmetrics.metrics.functional.compare_logits)


class HostSyncError(AssertionError):
    """A tensor value was read on the host during a guarded call."""


@contextlib.contextmanager
def no_host_reads() -> Iterator[list[int]]:
    """Make every :data:`HOST_READS` method raise :class:`HostSyncError` while active. The yielded
    counter, when > 0, lifts the guard (see :func:`unguarded`)."""
    lifted = [0]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guard(name: str, original):
        def method(self, *args, **kwargs):
            if lifted[0] == 0:
                raise HostSyncError(f"Tensor.{name}() read a value on the host")
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, guard(name, original))
    try:
        yield lifted
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def unguarded(fn, lifted: list[int]):
    """``fn`` with the guard lifted while it runs."""

    def call(*args, **kwargs):
        lifted[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            lifted[0] -= 1

    return call


def make_inputs(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[2, 4, 50] logits and labels with an ignored and an out-of-range entry."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 4, 50, generator=g)
    quant = ref + 0.3 * torch.randn(2, 4, 50, generator=g)
    labels = torch.randint(0, 50, (2, 4), generator=g)
    labels[0, 1], labels[1, 2] = -100, 77
    return ref.to(device), quant.to(device), labels.to(device)


def _cpu_backends() -> list[str]:
    if TEST_DEVICE != "cpu":  # no interpreter on a GPU run
        return ["torch"]
    return ["torch", "triton"]


@pytest.fixture
def guarded(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The guard, lifted inside the Triton launcher for ``backend="triton"``."""
    backend = request.node.callspec.params["backend"]
    monkeypatch.setattr(qmetrics.metrics.logit_stats, "compare_logits", compare_logits)
    if backend == "triton":  # imported outside the guard: its import-time constants are host math
        import qmetrics.kernels.logit_compare as triton_module
    with no_host_reads() as lifted:
        if backend == "triton":
            launcher = unguarded(triton_module.logit_compare_triton, lifted)
            monkeypatch.setattr(triton_module, "logit_compare_triton", launcher)
        yield lifted


def test_guard_catches_host_reads() -> None:
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: bool(t.any()), lambda: int(t[0]),
                 lambda: float(t[0]), lambda: t.tolist(), lambda: t.cpu(),
                 lambda: t.numpy(), lambda: [0, 1][t.long()[0]]):  # fmt: skip
        with no_host_reads(), pytest.raises(HostSyncError):
            read()
    assert t.sum().item() == 3.0  # restored


@pytest.mark.parametrize("backend", _cpu_backends())
def test_compare_logits_reads_nothing_on_the_host(backend: str, guarded) -> None:
    ref, quant, labels = make_inputs()
    sliced = ref[:, :-1], quant[:, :-1], labels[:, :-1]
    for args in ((ref, quant, labels), sliced, (ref[0, 1], quant[0, 1], labels[0, 1])):
        compare_logits(*args, top_k=3, backend=backend)
    guarded[0] += 1  # results are read outside the guard
    tm = compare_logits(ref, quant, labels, top_k=3, backend=backend)
    assert tm.nll_ref[1, 2].isnan() and tm.scored[1, 2]


@pytest.mark.parametrize("backend", _cpu_backends())
def test_logit_stats_update_reads_nothing_on_the_host(
    backend: str, guarded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # compact after a few updates, so that path runs under the guard too
    monkeypatch.setattr(qmetrics.metrics.logit_stats, "_MAX_CHUNKS", 2)
    ref, quant, labels = make_inputs()
    stats = LogitStats(top_k=3, backend=backend)
    for _ in range(2):
        stats.update(ref, quant, labels)
        stats.update(ref[:, 1:], quant[:, 1:], labels[:, 1:])
    guarded[0] += 1
    assert stats.tokens_seen == 2 * (8 + 6)
    with pytest.raises(ValueError, match=r"4 label\(s\) outside \[0, V=50\).*e\.g\. 77"):
        stats.compute()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA")
def test_no_sync_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qmetrics.metrics.logit_stats, "compare_logits", compare_logits)
    monkeypatch.setattr(qmetrics.metrics.logit_stats, "_MAX_CHUNKS", 2)
    ref, quant, labels = make_inputs("cuda")
    ids = torch.arange(2, device="cuda")
    stats = LogitStats(top_k=3)
    stats.update(ref, quant, labels)  # compiles the kernels (may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compare_logits(ref, quant, labels, top_k=3)
        compare_logits(ref[:, :-1], quant[:, :-1], labels[:, :-1], top_k=3)
        for _ in range(4):
            stats.update(ref, quant, labels, sequence_ids=ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(ValueError, match=r"5 label\(s\) outside.*e\.g\. 77"):
        stats.compute()


def test_validate_true_reads_on_the_host() -> None:
    """The opt-in eager label check is a host read (the guard sees it), and raises."""
    ref, quant, labels = make_inputs()
    with no_host_reads(), pytest.raises(HostSyncError):
        compare_logits(ref, quant, labels, top_k=3, backend="torch", validate=True)
    with pytest.raises(ValueError, match=r"1 label\(s\) outside \[0, V=50\).*e\.g\. 77"):
        compare_logits(ref, quant, labels, top_k=3, backend="torch", validate=True)
