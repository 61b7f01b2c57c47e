"""Where quantization hurts: the per-layer activation error of a candidate against the reference.

**Streamed per-layer error** (:func:`analyze_layers`). Modules of the reference are selected by
preset, class or name (:func:`select_modules`) and paired with the candidate's modules by name
(:func:`match_modules`). For every batch the reference runs first; forward hooks keep each selected
module's output. The candidate then runs on the same input ids; its hooks compare each output with
the reference's for the same call and drop the reference's at once, so at most one batch of
activations per selected module is alive. The comparison
(:func:`qmetrics.metrics.layer_stats.hidden_row_sums`) feeds one
:class:`~qmetrics.metrics.layer_stats.LayerStats` per module: MSE, ‖Δ‖/‖ref‖, mean per-token cosine,
SNR = 10·log10(‖ref‖²/‖Δ‖²) dB, max |Δ| and non-finite counts over all batches and tokens.

**Input-matched (local) error.** With ``input_matched=True`` each reference hook also calls the
candidate's module on the reference module's own inputs (positional and keyword) and compares
the two outputs. That error is the module's own; the propagated error above also carries what
earlier layers did wrong.

**Sensitivity ablation** lives in :mod:`qmetrics.evaluation.ablation`; its public names, the
module selection (:mod:`qmetrics.evaluation.module_selection`) and :func:`token_batches` are
re-exported here so the old path ``qmetrics.layer_analysis`` keeps working.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qmetrics.evaluation.ablation import (  # re-exported: the old qmetrics.layer_analysis path
    JOINT,
    AblationResult,
    UnitResult,
    ablation_units,
    run_ablation,
)
from qmetrics.evaluation.corpus import token_batches  # re-exported, as above
from qmetrics.evaluation.models import ModelEntry, as_entry, module_device, to_device
from qmetrics.evaluation.module_selection import (  # re-exported, as above
    PRESETS,
    match_modules,
    select_modules,
)
from qmetrics.evaluation.progress import progress_bar
from qmetrics.metrics.functional import Backend
from qmetrics.metrics.layer_stats import LayerErrors, LayerStats

__all__ = [
    "JOINT",
    "PRESETS",
    "AblationResult",
    "LayerAnalysis",
    "UnitResult",
    "ablation_units",
    "analyze_layers",
    "match_modules",
    "run_ablation",
    "select_modules",
    "token_batches",
]


def _first_tensor(output: Any, name: str) -> torch.Tensor:
    """The activation a module returns: a tensor, or the first tensor of a tuple/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, tuple | list):
        for x in output:
            if isinstance(x, torch.Tensor):
                return x
    raise ValueError(f"module {name} returns {type(output).__name__}, which holds no tensor")


# --- streamed per-layer error -----------------------------------------------------------------


@dataclass
class LayerAnalysis:
    """Per-module error of a candidate against the reference (see the module docstring).

    ``modules``: the compared reference modules in model order; ``names``: reference name →
    candidate name for the matches; ``unmatched``: selected reference modules the candidate
    lacks; ``propagated`` / ``local``: the errors (``local`` None unless input-matched);
    ``missing_calls``: per module, reference calls that had no candidate call to compare with;
    ``peak_activation_bytes``: the most reference activation bytes held at once.
    """

    reference: str
    candidate: str
    tokens: int
    batches: int
    modules: list[str]
    names: dict[str, str]
    unmatched: list[str]
    propagated: dict[str, LayerErrors]
    local: dict[str, LayerErrors] | None
    missing_calls: dict[str, int]
    peak_activation_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN → None, ±inf → "inf"/"-inf"); ``layers`` is a list in model
        order of {name, candidate_name, propagated, local}."""
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "tokens": self.tokens,
            "batches": self.batches,
            "unmatched": self.unmatched,
            "missing_calls": self.missing_calls,
            "peak_activation_bytes": self.peak_activation_bytes,
            "layers": [
                {
                    "name": m,
                    "candidate_name": self.names[m],
                    "propagated": self.propagated[m].to_dict(),
                    "local": None if self.local is None else self.local[m].to_dict(),
                }
                for m in self.modules
            ],
        }


class _LayerHooks:
    """Forward hooks on the matched module pairs; ``phase`` says which model is running."""

    def __init__(
        self,
        ref_modules: dict[str, nn.Module],
        cand_modules: dict[str, nn.Module],
        input_matched: bool,
        backend: Backend,
    ):
        self.phase: str | None = None
        self.stored: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.stored_bytes = 0
        self.peak_bytes = 0
        self.cand_modules = cand_modules
        self.input_matched = input_matched
        self.propagated = {n: LayerStats(backend) for n in ref_modules}
        self.local = {n: LayerStats(backend) for n in ref_modules} if input_matched else None
        self.missing = dict.fromkeys(ref_modules, 0)
        self.handles = [m.register_forward_hook(self._ref_hook(n), with_kwargs=True)
                        for n, m in ref_modules.items()]  # fmt: skip
        self.handles += [m.register_forward_hook(self._cand_hook(n))
                         for n, m in cand_modules.items()]  # fmt: skip

    def _ref_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.phase != "reference":
                return
            out = _first_tensor(output, name).detach()
            self.stored[name].append(out)
            self.stored_bytes += out.numel() * out.element_size()
            self.peak_bytes = max(self.peak_bytes, self.stored_bytes)
            if self.local is not None:
                self._local(name, args, kwargs, out)

        return hook

    def _local(self, name: str, args: tuple, kwargs: dict, ref_out: torch.Tensor) -> None:
        """Run the candidate's module on the reference module's inputs and compare."""
        assert self.local is not None
        cand = self.cand_modules[name]
        dev = module_device(cand, ref_out.device)
        self.phase = "local"  # no hook records anything during this call
        try:
            out = cand(*to_device(args, dev), **to_device(kwargs, dev))
        except Exception as exc:  # a module that cannot be called on its own
            raise ValueError(
                f"input-matched call of candidate module {name} failed ({type(exc).__name__}: "
                f"{exc}); run without input matching"
            ) from exc
        finally:
            self.phase = "reference"
        cand_out = _first_tensor(out, name)
        _update(self.local[name], ref_out.to(cand_out.device), cand_out, name)

    def _cand_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.phase != "candidate" or not self.stored.get(name):
                return
            ref_out = self.stored[name].pop(0)
            self.stored_bytes -= ref_out.numel() * ref_out.element_size()
            cand_out = _first_tensor(output, name)
            _update(self.propagated[name], ref_out.to(cand_out.device), cand_out, name)

        return hook

    def end_batch(self) -> None:
        """Count reference calls the candidate did not make, and drop what is left."""
        for name, left in self.stored.items():
            self.missing[name] += len(left)
        self.stored.clear()
        self.stored_bytes = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _update(stats: LayerStats, ref: torch.Tensor, cand: torch.Tensor, name: str) -> None:
    try:
        stats.update(ref, cand)
    except ValueError as exc:
        raise ValueError(f"module {name}: {exc}") from exc


@torch.no_grad()
def analyze_layers(
    reference: ModelEntry | nn.Module,
    candidate: ModelEntry | nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    modules: str | Sequence[str] = ("blocks",),
    input_matched: bool = True,
    backend: Backend = "auto",
    progress: bool = False,
) -> LayerAnalysis:
    """Per-module activation error of ``candidate`` against ``reference`` over input-id
    ``batches`` [B, T] (see the module docstring). ``modules``: patterns for
    :func:`select_modules`, applied to the reference. Raises ``ValueError`` when no selected
    module has a match in the candidate."""
    ref = as_entry(reference, "reference")
    cand = as_entry(candidate, "candidate")
    selected = select_modules(ref.model, modules)
    names, unmatched = match_modules(cand.model, selected)
    if not names:
        raise ValueError(f"none of the {len(selected)} selected modules exists in the candidate")
    compared = [n for n in selected if n in names]
    ref_mods = {n: ref.model.get_submodule(n) for n in compared}
    cand_mods = {n: cand.model.get_submodule(names[n]) for n in compared}
    hooks = _LayerHooks(ref_mods, cand_mods, input_matched, backend)
    bar = progress_bar(progress, total=len(batches), initial=0)
    if bar is not None:
        bar.set_description("layers")
    tokens = 0
    try:
        for ids in batches:
            hooks.phase = "reference"
            ref.model(input_ids=ids.to(ref.device), use_cache=False)
            hooks.phase = "candidate"
            cand.model(input_ids=ids.to(cand.device), use_cache=False)
            hooks.phase = None
            hooks.end_batch()
            tokens += ids.numel()
            if bar is not None:
                bar.update(1)
    finally:
        hooks.remove()
        if bar is not None:
            bar.close()
    return LayerAnalysis(
        reference=ref.name,
        candidate=cand.name,
        tokens=tokens,
        batches=len(batches),
        modules=compared,
        names={n: names[n] for n in compared},
        unmatched=unmatched,
        propagated={n: s.compute() for n, s in hooks.propagated.items()},
        local=None if hooks.local is None else {n: s.compute() for n, s in hooks.local.items()},
        missing_calls={n: c for n, c in hooks.missing.items() if c},
        peak_activation_bytes=hooks.peak_bytes,
    )
