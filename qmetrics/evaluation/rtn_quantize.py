"""Round-to-nearest (RTN) weight fake-quantization: build quantized candidates from a reference.

A weight ``W`` of shape ``[out, in]`` is split, row by row, into groups of ``g`` consecutive
input columns (``g = in`` per output channel; the last group is shorter when ``g`` does not
divide ``in``). Each (row, group) gets its own scale, and every weight is quantized to a ``b``-bit
integer and dequantized back ("fake quantization"), so the model runs unchanged with the rounding
error of a real ``b``-bit format. ``round`` is ``torch.round`` (half to even).

Symmetric (absmax, narrow range), ``Q = 2^(b-1) - 1``::

    s = max|w| / Q,   q = clamp(round(w / s), -Q, Q),   w' = q * s

  The integer range is ``[-Q, Q]`` (e.g. [-7, 7] for int4): ``-2^(b-1)`` is never used, so the
  grid is symmetric about 0 and ``±max|w|`` are exact.

Asymmetric (min/max with an integer zero point), ``Q = 2^b - 1``::

    lo = min(min w, 0),  hi = max(max w, 0),  s = (hi - lo) / Q,
    z = round(-lo / s) in [0, Q],  q = clamp(round(w / s) + z, 0, Q),  w' = (q - z) * s

  The range is widened to contain 0 (as GPTQ does), so the zero point fits in ``b`` unsigned
  bits and 0 is exactly representable.

In both cases no weight is clipped, so ``|w - w'| <= s / 2`` for every (row, group), up to
floating-point rounding. A group with ``s = 0`` (all zeros) uses ``s = 1``, giving ``w' = 0``
and no NaN. Arithmetic is in float32 (float64 for float64 weights); the result is cast back to
the weight's dtype.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "REPORT_ATTR",
    "QuantReport",
    "QuantSpec",
    "RTNQuantized",
    "quantize_model",
    "quantize_module",
    "quantize_weight",
    "rtn_quantize",
]

MIN_BITS, MAX_BITS = 2, 8
ACCEPTED_FORMS = (
    "'int<b>[-g<N>][-sym|-asym]' with b in 2..8 and N >= 1, e.g. 'int8', 'int4', "
    "'int4-g128', 'int3-g64', 'int4-g128-asym', 'int8-sym' (symmetric and per output "
    "channel unless told otherwise)"
)
REPORT_ATTR = "qmetrics_rtn_report"
"""Name of the attribute :func:`quantize_model` sets on the model it returns."""

Patterns = str | Sequence[str] | None


@dataclass(frozen=True)
class QuantSpec:
    """An RTN format: ``bits`` in 2..8, ``group_size`` (None = one group per output channel,
    else groups of that many input columns, the last one possibly shorter) and ``symmetric``."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be an int, got {type(self.bits).__name__}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise ValueError(
                    f"group_size must be None or an int, got {type(self.group_size).__name__}"
                )
            if self.group_size < 1:
                raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {type(self.symmetric).__name__}")

    @property
    def qmin(self) -> int:
        """Smallest integer code: ``-(2^(b-1) - 1)`` symmetric, 0 asymmetric."""
        return -self.qmax if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code: ``2^(b-1) - 1`` symmetric, ``2^b - 1`` asymmetric."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def __str__(self) -> str:
        """Canonical text, ``int<b>[-g<N>][-asym]``; :meth:`parse` reads it back."""
        text = f"int{self.bits}"
        if self.group_size is not None:
            text += f"-g{self.group_size}"
        if not self.symmetric:
            text += "-asym"
        return text

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """Read ``int<b>[-g<N>][-sym|-asym]`` (case-insensitive; the optional parts in any order,
        each at most once). Raises ``ValueError`` naming the bad part and the accepted forms."""
        if not isinstance(text, str):
            raise TypeError(f"quantization spec must be a str, got {type(text).__name__}")
        parts = text.strip().lower().split("-")
        if parts == [""]:
            raise ValueError(f"empty quantization spec; accepted forms: {ACCEPTED_FORMS}")
        head, rest = parts[0], parts[1:]
        m = re.fullmatch(r"int(\d+)", head)
        if m is None:
            raise ValueError(
                f"bad quantization spec {text!r}: unknown format {head!r}; "
                f"accepted forms: {ACCEPTED_FORMS}"
            )
        bits = int(m.group(1))
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"bad quantization spec {text!r}: bits {bits} in {head!r} not in "
                f"{MIN_BITS}..{MAX_BITS}; accepted forms: {ACCEPTED_FORMS}"
            )
        group_size: int | None = None
        symmetric: bool | None = None
        seen_group = False
        for part in rest:
            if part in ("sym", "asym"):
                if symmetric is not None:
                    raise ValueError(
                        f"bad quantization spec {text!r}: symmetry given twice ({part!r}); "
                        f"accepted forms: {ACCEPTED_FORMS}"
                    )
                symmetric = part == "sym"
            elif part.startswith("g"):
                if seen_group:
                    raise ValueError(
                        f"bad quantization spec {text!r}: group size given twice ({part!r}); "
                        f"accepted forms: {ACCEPTED_FORMS}"
                    )
                seen_group = True
                if re.fullmatch(r"g\d+", part) is None:
                    raise ValueError(
                        f"bad quantization spec {text!r}: group size {part!r} is not "
                        f"'g' followed by a positive integer; accepted forms: {ACCEPTED_FORMS}"
                    )
                group_size = int(part[1:])
                if group_size < 1:
                    raise ValueError(
                        f"bad quantization spec {text!r}: group size {part!r} must be >= 1; "
                        f"accepted forms: {ACCEPTED_FORMS}"
                    )
            else:
                raise ValueError(
                    f"bad quantization spec {text!r}: unknown part {part!r}; "
                    f"accepted forms: {ACCEPTED_FORMS}"
                )
        return cls(bits=bits, group_size=group_size, symmetric=symmetric is not False)


def _as_spec(spec: QuantSpec | str) -> QuantSpec:
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, str):
        return QuantSpec.parse(spec)
    raise TypeError(f"spec must be a QuantSpec or a str, got {type(spec).__name__}")


@dataclass(frozen=True)
class RTNQuantized:
    """Integer codes and per-(row, group) parameters of an RTN-quantized ``[out, in]`` weight.

    ``q``: int16 ``[out, in]`` codes in ``[spec.qmin, spec.qmax]``; ``scale``: ``[out, G]``
    (float32, or float64 for float64 weights); ``zero``: int16 ``[out, G]`` (all 0 when
    symmetric); ``group_size``: columns per group actually used (``in`` when per channel).
    Column ``j`` belongs to group ``j // group_size``.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    group_size: int

    def group_index(self) -> torch.Tensor:
        """The group of each input column, ``arange(in) // group_size``."""
        return torch.arange(self.q.shape[1], device=self.q.device) // self.group_size

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``w' = (q - z) * s`` per column's group, in ``dtype`` (default: the scale's)."""
        idx = self.group_index()
        w = (self.q.to(self.scale.dtype) - self.zero[:, idx].to(self.scale.dtype)) * self.scale[
            :, idx
        ]
        return w if dtype is None else w.to(dtype)


def _group_parts(x: torch.Tensor, g: int) -> list[torch.Tensor]:
    """Views ``[out, n, g]`` of the full groups and ``[out, 1, r]`` of a ragged last group."""
    out, n_in = x.shape
    n_full, rem = divmod(n_in, g)
    parts = []
    if n_full:
        parts.append(x[:, : n_full * g].reshape(out, n_full, g))
    if rem:
        parts.append(x[:, n_full * g :].reshape(out, 1, rem))
    return parts


def rtn_quantize(w: torch.Tensor, spec: QuantSpec | str) -> RTNQuantized:
    """Quantize a 2-D float weight ``[out, in]`` by RTN; formulas in the module docstring."""
    spec = _as_spec(spec)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating-point tensor, got {w.dtype}")
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        x = w.detach().to(compute)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("weight holds NaN or inf; RTN quantization needs finite weights")
        n_out, n_in = x.shape
        g = n_in if spec.group_size is None else min(spec.group_size, n_in)
        if x.numel() == 0:
            n_groups = 0 if n_in == 0 else (n_in + g - 1) // g
            empty = torch.zeros(n_out, n_groups, dtype=torch.int16, device=x.device)
            return RTNQuantized(
                q=torch.zeros(n_out, n_in, dtype=torch.int16, device=x.device),
                scale=torch.ones(n_out, n_groups, dtype=compute, device=x.device),
                zero=empty,
                spec=spec,
                group_size=max(g, 1),
            )
        parts = _group_parts(x, g)
        qmax = spec.qmax
        if spec.symmetric:
            scale = torch.cat([p.abs().amax(-1) for p in parts], dim=1) / qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.zeros_like(scale)
        else:
            lo = torch.cat([p.amin(-1) for p in parts], dim=1).clamp(max=0)
            hi = torch.cat([p.amax(-1) for p in parts], dim=1).clamp(min=0)
            scale = (hi - lo) / qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.round(-lo / scale).clamp(0, qmax)
        idx = torch.arange(n_in, device=x.device) // g
        q = torch.round(x / scale[:, idx]) + zero[:, idx]
        q = q.clamp(spec.qmin, qmax)
    return RTNQuantized(
        q=q.to(torch.int16),
        scale=scale,
        zero=zero.to(torch.int16),
        spec=spec,
        group_size=g,
    )


def quantize_weight(w: torch.Tensor, spec: QuantSpec | str) -> torch.Tensor:
    """Fake-quantize ``w`` ``[out, in]``: RTN quantize then dequantize, returned in ``w.dtype``.

    Symmetric: ``s = max|w| / (2^(b-1)-1)``,
    ``w' = clamp(round(w/s), -(2^(b-1)-1), 2^(b-1)-1) * s``.
    Asymmetric: ``s = (hi - lo) / (2^b-1)`` with ``lo = min(min w, 0)``, ``hi = max(max w, 0)``,
    ``z = round(-lo/s)``, ``w' = (clamp(round(w/s) + z, 0, 2^b-1) - z) * s``.
    Per (row, group); ``s = 0`` is replaced by 1. ``w`` itself is not modified.
    """
    return rtn_quantize(w, spec).dequantize(w.dtype)


def quantize_module(module: nn.Linear, spec: QuantSpec | str) -> nn.Linear:
    """Fake-quantize one ``nn.Linear``'s weight in place (bias untouched); returns the module."""
    if not isinstance(module, nn.Linear):
        raise ValueError(f"quantize_module needs an nn.Linear, got {type(module).__name__}")
    spec = _as_spec(spec)
    with torch.no_grad():
        module.weight.copy_(quantize_weight(module.weight, spec))
    return module


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_model` did: ``quantized`` lists the qualified names of the Linears
    whose weight was fake-quantized, ``skipped`` the Linears left in full precision (not
    included, excluded, or sharing a weight already quantized under another name)."""

    spec: QuantSpec
    quantized: tuple[str, ...]
    skipped: tuple[str, ...]


def _compile(patterns: Patterns, what: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{what} patterns must be str, got {type(p).__name__}")
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"bad {what} regex {p!r}: {e}") from e
    return compiled


def quantize_model(
    model: nn.Module,
    spec: QuantSpec | str,
    *,
    include: Patterns = None,
    exclude: Patterns = ("lm_head",),
    inplace: bool = False,
) -> nn.Module:
    """Fake-quantize the weight of every ``nn.Linear`` selected by name; returns the model.

    A Linear with qualified name ``n`` is selected when ``include`` is None or some include
    regex matches (``re.search``), and no ``exclude`` regex matches. The default exclude keeps
    ``lm_head`` in full precision (GPTQ/AWQ practice). Biases, embeddings, norms and other
    modules are untouched. Works on a ``copy.deepcopy`` unless ``inplace``. A weight shared by
    several Linears is quantized once. The returned model gets a :class:`QuantReport` as
    attribute ``REPORT_ATTR`` (``"qmetrics_rtn_report"``). Raises ``ValueError`` when no Linear
    is selected, so that a mistyped pattern cannot yield an unquantized "candidate".
    """
    spec = _as_spec(spec)
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    target = model if inplace else copy.deepcopy(model)

    param_names: dict[int, list[str]] = {}
    for name, p in target.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), []).append(name)

    quantized: list[str] = []
    skipped: list[str] = []
    done: set[int] = set()
    for name, module in target.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        selected = (not inc or any(r.search(name) for r in inc)) and not any(
            r.search(name) for r in exc
        )
        if not selected or id(module.weight) in done:
            skipped.append(name)
            continue
        done.add(id(module.weight))
        quantize_module(module, spec)
        quantized.append(name)
        own = f"{name}.weight" if name else "weight"
        others = [n for n in param_names.get(id(module.weight), []) if n != own]
        if others:
            warnings.warn(
                f"{name or 'model'}.weight is shared with {', '.join(others)}, "
                "which are quantized with it",
                stacklevel=2,
            )
    if not quantized:
        raise ValueError(
            f"no nn.Linear selected for quantization (include={include!r}, "
            f"exclude={exclude!r}; {len(skipped)} Linear(s) in the model)"
        )
    setattr(target, REPORT_ATTR, QuantReport(spec, tuple(quantized), tuple(skipped)))
    return target
