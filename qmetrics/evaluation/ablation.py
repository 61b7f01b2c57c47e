"""Which layers hurt: one-unit-at-a-time sensitivity ablation (:func:`run_ablation`).

Each *unit* (one selected module, or one module type: the selected modules whose names agree up
to their layer index, :func:`ablation_units`) is quantized alone in an otherwise reference
model — built-in RTN on the unit's Linears, or the candidate's module swapped in — and the
output logits are compared with the reference's (:meth:`qmetrics.LogitStats.update`): mean
KL(P_ref ‖ P_abl) and top-1 agreement on a bounded token budget. Units are ranked by KL, and
all units ablated together (*joint*) give the KL that the sum of the single-unit KLs is compared
with (additivity = Σ KL_unit / KL_joint). The output head is never ablated; the reference's
final hidden states are stored per batch (tokens × H) so that the reference runs once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qmetrics.evaluation.logit_source import LogitSource
from qmetrics.evaluation.models import ModelEntry, as_entry, module_device, output_head, to_device
from qmetrics.evaluation.module_selection import match_modules
from qmetrics.evaluation.progress import progress_bar
from qmetrics.evaluation.rtn_quantize import QuantSpec, quantize_module
from qmetrics.metrics.estimate import Estimate
from qmetrics.metrics.json_values import json_float
from qmetrics.metrics.logit_stats import LogitStats

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")
#: Name of the run with every unit ablated at once.
JOINT = "joint"


def ablation_units(names: Sequence[str], by: str = "module") -> dict[str, list[str]]:
    """Units to ablate: one per module (``by="module"``), or one per module type
    (``by="type"``: modules whose names agree once layer indices are replaced by ``*``, e.g.
    ``model.layers.*.mlp``). Maps unit name → module names, in first-appearance order."""
    if by not in ("module", "type"):
        raise ValueError(f"ablation units are by 'module' or 'type', got {by!r}")
    units: dict[str, list[str]] = {}
    for n in names:
        key = n if by == "module" else _LAYER_INDEX.sub("*", n)
        units.setdefault(key, []).append(n)
    return units


@dataclass(frozen=True)
class UnitResult:
    """Output drift with one unit ablated: mean KL(P_ref ‖ P_abl) and top-1 agreement."""

    name: str
    modules: tuple[str, ...]
    kl: Estimate
    top1: Estimate

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modules": list(self.modules),
            "kl": self.kl.to_dict(),
            "top1": self.top1.to_dict(),
        }


@dataclass
class AblationResult:
    """Ranked single-unit ablations and the joint one. ``additivity`` = Σ unit KL / joint KL
    (1: the single-unit KLs add up to the joint drift; < 1: the units interact super-additively,
    > 1: sub-additively)."""

    mode: str
    tokens: int
    units: list[UnitResult]  # ranked, highest KL first
    joint: UnitResult
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def sum_kl(self) -> float:
        return sum(u.kl.value for u in self.units)

    @property
    def additivity(self) -> float:
        j = self.joint.kl.value
        return self.sum_kl / j if j > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tokens": self.tokens,
            "units": [dict(u.to_dict(), rank=i + 1) for i, u in enumerate(self.units)],
            "joint": self.joint.to_dict(),
            "sum_single_kl": json_float(self.sum_kl),
            "additivity": json_float(self.additivity),
            "skipped": self.skipped,
        }


class _Bridge(nn.Module):
    """A candidate module standing in for a reference one: inputs go to its device, outputs
    come back to the reference's."""

    def __init__(self, inner: nn.Module, out_device: torch.device):
        super().__init__()
        self.inner = inner
        self.out_device = out_device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dev = module_device(self.inner, self.out_device)
        out = self.inner(*to_device(args, dev), **to_device(kwargs, dev))
        return to_device(out, self.out_device)


def _outermost(names: Sequence[str]) -> list[str]:
    """``names`` without those inside another listed module."""
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


@contextmanager
def _rtn_applied(model: nn.Module, names: Sequence[str], spec: QuantSpec) -> Iterator[None]:
    """Fake-quantize every Linear inside the named modules; restore the weights afterwards
    (originals kept on the CPU)."""
    linears: dict[int, nn.Linear] = {}
    for n in names:
        for m in model.get_submodule(n).modules():
            if isinstance(m, nn.Linear):
                linears.setdefault(id(m.weight), m)
    saved = [(m, m.weight.detach().to("cpu", copy=True)) for m in linears.values()]
    try:
        for m, _ in saved:
            quantize_module(m, spec)
        yield
    finally:
        with torch.no_grad():
            for m, w in saved:
                m.weight.copy_(w)


@contextmanager
def _swapped(
    model: nn.Module, names: Sequence[str], candidate: nn.Module, cand_names: dict[str, str]
) -> Iterator[None]:
    """Put the candidate's modules in place of the named reference modules; put them back."""
    originals = []
    try:
        for n in _outermost(names):
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            dev = module_device(original)
            originals.append((parent, child, original))
            setattr(parent, child, _Bridge(candidate.get_submodule(cand_names[n]), dev))
        yield
    finally:
        for parent, child, original in reversed(originals):
            setattr(parent, child, original)


@torch.no_grad()
def run_ablation(
    reference: ModelEntry | nn.Module,
    batches: Sequence[torch.Tensor],
    units: dict[str, list[str]],
    *,
    spec: QuantSpec | str | None = None,
    candidate: ModelEntry | nn.Module | None = None,
    top_k: int = 5,
    logit_chunk_tokens: int | None = 256,
    progress: bool = False,
) -> AblationResult:
    """Ablate each unit alone, then all together, and measure the output drift (module
    docstring). Exactly one of ``spec`` (built-in RTN of the unit's Linears) and ``candidate``
    (swap in its modules, matched by :func:`match_modules`) is given. Units holding the output
    head, or nothing to quantize or swap, are skipped and listed in ``skipped``."""
    if (spec is None) == (candidate is None):
        raise ValueError("give exactly one of spec (RTN) and candidate (module swap)")
    ref = as_entry(reference, "reference")
    model = ref.model
    head = output_head(model)
    skipped: dict[str, str] = {}
    cand_model = None if candidate is None else as_entry(candidate, "candidate").model
    names: dict[str, str] = {}
    if cand_model is not None:
        every = [n for mods in units.values() for n in mods]
        names, _ = match_modules(cand_model, every)
    quant = spec if spec is None or isinstance(spec, QuantSpec) else QuantSpec.parse(spec)

    def has_linear(n: str) -> bool:
        return any(isinstance(m, nn.Linear) for m in model.get_submodule(n).modules())

    kept: dict[str, list[str]] = {}
    for unit, mods in units.items():
        if head is not None and any(model.get_submodule(n) is head for n in mods):
            skipped[unit] = "holds the output head"
        elif cand_model is not None and any(n not in names for n in mods):
            skipped[unit] = "no matching candidate module"
        elif quant is not None and not any(has_linear(n) for n in mods):
            skipped[unit] = "no nn.Linear to quantize"
        else:
            kept[unit] = mods
    if not kept:
        raise ValueError(f"no unit can be ablated: {skipped}")

    def ablated(mods: Sequence[str]):
        if quant is not None:
            return _rtn_applied(model, mods, quant)
        assert cand_model is not None
        return _swapped(model, mods, cand_model, names)

    source = LogitSource(model, logit_chunk_tokens)
    ref_hidden = [source.hidden(ids) for ids in batches]
    runs = [*kept.items(), (JOINT, list(dict.fromkeys(n for m in kept.values() for n in m)))]
    bar = progress_bar(progress, total=len(runs) * len(batches), initial=0)
    if bar is not None:
        bar.set_description("ablation")
    results: list[UnitResult] = []
    try:
        for unit, mods in runs:
            stats = LogitStats(top_k=top_k)
            with ablated(mods):
                for ids, hidden in zip(batches, ref_hidden, strict=True):
                    chunks = source.chunks(source.hidden(ids))
                    for (_, ref_logits), (_, logits) in zip(
                        source.chunks(hidden), chunks, strict=True
                    ):
                        stats.update(ref_logits, logits)
                    if bar is not None:
                        bar.update(1)
            res = stats.compute()
            results.append(UnitResult(unit, tuple(mods), res.means["kl"], res.top1_agreement))
    finally:
        if bar is not None:
            bar.close()
    joint = results.pop()
    results.sort(key=lambda u: u.kl.value, reverse=True)
    mode = f"rtn {quant}" if quant is not None else "candidate modules"
    return AblationResult(
        mode=mode,
        tokens=sum(ids.numel() for ids in batches),
        units=results,
        joint=joint,
        skipped=skipped,
    )
