"""Accumulator state that survives ``torch.inference_mode``.

Tensors created inside ``torch.inference_mode()`` are inference tensors: updating one in place
outside inference mode raises. An accumulator whose state is first allocated (or replaced)
during a call under inference mode — an evaluation loop, a serving stack — would then fail on
its next call outside it. :func:`outside_inference_mode` runs a state-changing method with
inference mode switched off (and gradients still off, as they were), so the state it creates
is made of normal tensors; inference tensors passed in are only read, which is allowed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def outside_inference_mode(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with inference mode off when it is on (one check per call otherwise)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
