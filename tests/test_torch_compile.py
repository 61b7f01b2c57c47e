"""``CompiledCPU`` and ``want_compile``: when the torch twins run compiled, and how they fall back
to the eager path (no compiler, a failing compile, too many input signatures) without
breaking a call. ``torch.compile`` itself is replaced here: these are the rules, not inductor."""

from __future__ import annotations

import warnings

import pytest
import qmetrics.kernels.torch_compile as tc
import torch


def test_want_compile_argument_then_environment_then_size(monkeypatch) -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.delenv(tc.ENV, raising=False)
    assert tc.want_compile(None, cpu, large=True) and not tc.want_compile(None, cpu, large=False)
    assert not tc.want_compile(True, meta, large=True)  # never off the CPU
    monkeypatch.setenv(tc.ENV, "0")
    assert not tc.want_compile(None, cpu, large=True) and tc.want_compile(True, cpu, large=False)
    monkeypatch.setenv(tc.ENV, "on")
    assert tc.want_compile(None, cpu, large=False) and not tc.want_compile(False, cpu, True)


def test_runs_compiled_within_the_signature_budget(monkeypatch) -> None:
    monkeypatch.setattr(tc, "compiler_available", lambda: True)
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: lambda *a: ("compiled", fn(*a)))
    f = tc.CompiledCPU(lambda x: x + 1, name="f", max_signatures=2)
    assert f("a", 1) == ("compiled", 2) and f("b", 2) == ("compiled", 3)
    assert f("a", 3) == ("compiled", 4)  # a known signature
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f("c", 1) is None  # over budget: the eager path, silently
    assert not f.failed


def test_no_compiler_warns_once_and_stays_eager(monkeypatch) -> None:
    monkeypatch.setattr(tc, "compiler_available", lambda: False)
    f = tc.CompiledCPU(lambda x: x, name="f")
    with pytest.warns(RuntimeWarning, match="compiled CPU path of f is off.*C\\+\\+ compiler"):
        assert f("a", 1) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f("b", 1) is None and f.failed


def test_a_failing_compile_disables_it_for_the_process(monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("inductor: compilation failed")

    monkeypatch.setattr(tc, "compiler_available", lambda: True)
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: broken)
    f = tc.CompiledCPU(lambda x: x, name="f")
    with pytest.warns(RuntimeWarning, match="RuntimeError: inductor: compilation failed"):
        assert f("a", 1) is None
    assert f.failed and f("a", 1) is None
