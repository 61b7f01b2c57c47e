"""Limits of the logit-comparison kernels, shared with their callers (no triton import here, so
:mod:`qmetrics.metrics.validation` can check inputs on machines without triton)."""

from __future__ import annotations

#: Largest ``top_k``: the Triton kernels keep the reference top-k in a register buffer of
#: next_power_of_2(top_k) entries. Every backend enforces it, so results never depend on which
#: backend ran.
MAX_TOP_K = 64
