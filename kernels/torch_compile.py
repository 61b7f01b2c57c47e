"""The ``torch.compile``d CPU paths of the torch twins: when to use them, and falling back to
the eager path when compiling is not possible.

Inductor turns a plain function of tensor ops (max, exp, sums over the last dim) into fused,
vectorised C++ loops over the rows, with no [N, V] temporaries; on the CPU that is 4-10× faster
than the same ops run eagerly. Costs: the first call per input signature compiles (5-30 s on 2
cores; inductor caches the code on disk, so later processes pay a few seconds), and it needs a
C++ compiler. :class:`CompiledCPU` holds one compiled function, warns once and returns None
(the caller runs its eager path) when there is no compiler, when compiling failed, or when it
has compiled too many input signatures already (torch.compile would then run the function
uncompiled, op by op, far slower than the eager path written for it).

Whether to compile (:func:`want_compile`): the caller's ``compile`` argument when given, else
``$QMETRICS_TORCH_COMPILE`` (``0``/``1``), else whether the call is large enough to be worth
a compile.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Hashable

import torch

ENV = "QMETRICS_TORCH_COMPILE"
#: Calls of at least this many logits are large enough to be worth a compile (the twins'
#: ``large`` unless told otherwise).
COMPILE_MIN_ELEMENTS = 1 << 22


def compiler_available() -> bool:
    """Whether a C++ compiler for inductor's CPU code is on the PATH."""
    names = (os.environ.get("CXX", ""), "c++", "g++", "clang++")
    return any(name and shutil.which(name) for name in names)


def want_compile(compile: bool | None, device: torch.device, large: bool) -> bool:
    """The ``compile`` argument, else $QMETRICS_TORCH_COMPILE (0/1), else ``large``; never off
    the CPU (other devices have their own kernels)."""
    if device.type != "cpu":
        return False
    if compile is not None:
        return compile
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return large


def compiled_view(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` for the compiled function with its token dims marked dynamic (a new row
    count does not recompile): all dims of labels and masks, all but the last (the
    vocabulary) of logits. A new tensor object: ``t`` itself is not marked."""
    view = t.view(t.shape)
    token_dims = t.dim() - 1 if t.is_floating_point() else t.dim()
    for dim in range(token_dims):
        torch._dynamo.maybe_mark_dynamic(view, dim)
    return view


class CompiledCPU:
    """``fn`` under ``torch.compile`` (``dynamic`` as torch.compile takes it), compiled lazily
    for at most ``max_signatures`` input signatures; ``name`` appears in the fallback warning."""

    def __init__(
        self, fn: Callable, *, name: str, dynamic: bool | None = False, max_signatures: int = 6
    ):
        self.fn, self.name, self.dynamic = fn, name, dynamic
        self.max_signatures = max_signatures
        self.signatures: set[Hashable] = set()
        self.failed = False
        self._compiled: Callable | None = None

    def get(self, signature: Hashable) -> Callable | None:
        """The compiled function for inputs of ``signature``, or None: use the eager path."""
        if self.failed:
            return None
        if signature not in self.signatures:
            if len(self.signatures) >= self.max_signatures:
                return None
            self.signatures.add(signature)
        if self._compiled is None:
            if not compiler_available():
                self.disable("no C++ compiler (c++, g++, clang++ or $CXX) on the PATH")
                return None
            self._compiled = torch.compile(self.fn, dynamic=self.dynamic)
        return self._compiled

    def __call__(self, signature: Hashable, *args: object) -> object | None:
        """``fn(*args)`` compiled, or None when it cannot be (then the caller runs eagerly); a
        failure while compiling or running disables this function for the process, warning."""
        fn = self.get(signature)
        if fn is None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # a broken toolchain must not break the metrics
            self.disable(f"{type(exc).__name__}: {exc}"[:300])
            return None

    def disable(self, reason: str) -> None:
        """Use the eager path from now on, and say so once."""
        self._compiled, self.failed = None, True
        warnings.warn(
            f"qmetrics: the compiled CPU path of {self.name} is off ({reason}); "
            "using the eager path (several times slower)",
            RuntimeWarning,
            stacklevel=3,
        )
