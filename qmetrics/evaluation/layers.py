"""Where quantization hurts: per-layer activation error and one-unit-at-a-time sensitivity.

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

**Sensitivity ablation** (:func:`run_ablation`). Each *unit* (one selected module, or one module
type: the selected modules whose names agree up to their layer index) is quantized alone in an
otherwise reference model — built-in RTN on the unit's Linears, or the candidate's module
swapped in — and the output logits are compared with the reference's
(:func:`qmetrics.compare_logits` into :class:`qmetrics.LogitStats`): mean KL(P_ref ‖ P_abl)
and top-1 agreement on a bounded token budget. Units are ranked by KL, and all units ablated
together (*joint*) give the KL that the sum of the single-unit KLs is compared with
(additivity = Σ KL_unit / KL_joint). The output head is never ablated; the reference's final
hidden states are stored per batch (tokens × H) so that the reference runs once.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qmetrics.evaluation.corpus import make_windows
from qmetrics.evaluation.logit_source import LogitSource
from qmetrics.evaluation.models import ModelEntry
from qmetrics.evaluation.progress import progress_bar
from qmetrics.evaluation.rtn_quantize import QuantSpec, quantize_module
from qmetrics.metrics.functional import Backend, compare_logits
from qmetrics.metrics.json_values import json_float
from qmetrics.metrics.layer_stats import LayerErrors, LayerStats
from qmetrics.metrics.logit_stats import Estimate, LogitStats

#: Selection presets: decoder blocks, attention modules, MLPs, every Linear but the output head.
PRESETS = ("blocks", "attention", "mlp", "linear")
_ATTENTION_CLASS = re.compile(r"(Attention|Attn)$")
_MLP_CLASS = re.compile(r"(MLP|Mlp|FeedForward|FFN)$")
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")
JOINT = "joint"


# --- selecting and matching modules -----------------------------------------------------------


def _output_head(model: nn.Module) -> nn.Module | None:
    fn = getattr(model, "get_output_embeddings", None)
    try:
        return fn() if fn is not None else None
    except (NotImplementedError, AttributeError):
        return None


def _block_names(model: nn.Module) -> list[str]:
    """Children of the largest ModuleList whose entries share one class (the decoder blocks)."""
    best: tuple[int, str] = (0, "")
    for name, mod in model.named_modules():
        homogeneous = isinstance(mod, nn.ModuleList) and len({type(m) for m in mod}) == 1
        if homogeneous and len(mod) > best[0]:
            best = (len(mod), name)
    size, name = best
    return [f"{name}.{i}" if name else str(i) for i in range(size)]


def select_modules(model: nn.Module, patterns: str | Sequence[str] = ("blocks",)) -> list[str]:
    """Qualified names of the modules of ``model`` selected by ``patterns``, in model order.

    Each pattern is a preset — ``blocks`` (the decoder blocks: entries of the largest
    homogeneous ModuleList), ``attention`` / ``mlp`` (modules whose class name ends in
    Attention/Attn, or MLP/Mlp/FeedForward/FFN), ``linear`` (every ``nn.Linear`` but the output
    head) — or ``type:ClassName`` (modules of that class), or else a regex searched in the
    qualified names. Raises ``ValueError`` when nothing is selected or a regex is invalid.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    head = _output_head(model)
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == "blocks":
            chosen.update(_block_names(model))
        elif pattern == "attention":
            chosen.update(n for n, m in named if _ATTENTION_CLASS.search(type(m).__name__))
        elif pattern == "mlp":
            chosen.update(n for n, m in named if _MLP_CLASS.search(type(m).__name__))
        elif pattern == "linear":
            chosen.update(n for n, m in named if isinstance(m, nn.Linear) and m is not head)
        elif pattern.startswith("type:"):
            chosen.update(n for n, m in named if type(m).__name__ == pattern[5:])
        else:
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad module regex {pattern!r}: {exc}") from exc
            chosen.update(n for n, _ in named if regex.search(n))
    if not chosen:
        raise ValueError(
            f"no module selected by {list(patterns)} (presets: {', '.join(PRESETS)}, "
            "type:ClassName, or a regex on qualified names)"
        )
    return [n for n, _ in named if n in chosen]


def match_modules(candidate: nn.Module, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Pair the reference modules ``names`` with modules of ``candidate`` by qualified name.

    A name present in the candidate matches itself. Otherwise the longest dotted suffix of at
    least two components (e.g. ``layers.3.mlp``) that ends exactly one candidate module name,
    not already taken, matches that module — so wrappers that add or rename a prefix
    (``base_model.model.``) still pair up. Returns ({reference name: candidate name},
    [reference names without a match]).
    """
    cand_names = [n for n, _ in candidate.named_modules() if n]
    present = set(cand_names)
    by_suffix: dict[str, list[str]] = defaultdict(list)
    for n in cand_names:
        parts = n.split(".")
        for i in range(len(parts) - 1):
            by_suffix[".".join(parts[i:])].append(n)
    matched: dict[str, str] = {}
    taken: set[str] = set()
    unmatched: list[str] = []
    for name in names:
        if name in present:
            matched[name] = name
            taken.add(name)
    for name in names:
        if name in matched:
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1):
            hits = by_suffix.get(".".join(parts[i:]), [])
            if len(hits) == 1 and hits[0] not in taken:
                matched[name] = hits[0]
                taken.add(hits[0])
                break
        else:
            unmatched.append(name)
    return matched, unmatched


# --- batches ----------------------------------------------------------------------------------


def token_batches(
    ids: torch.Tensor, context_length: int, batch_size: int, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """Input-id batches [B, T] of non-overlapping windows of ``ids`` (corpus order, windows of
    one length per batch), using at most ``max_tokens`` tokens (at least one window)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    groups: list[list[torch.Tensor]] = []
    used = 0
    for w in make_windows(len(ids), context_length):
        if max_tokens is not None and groups and used + w.length > max_tokens:
            break
        used += w.length
        window = ids[w.begin : w.end]
        if groups and len(groups[-1]) < batch_size and len(groups[-1][0]) == w.length:
            groups[-1].append(window)
        else:
            groups.append([window])
    return [torch.stack(g) for g in groups]


# --- moving model inputs and outputs ----------------------------------------------------------


def _to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


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


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    p = next(module.parameters(), None)
    return default if p is None else p.device


def _as_entry(model: ModelEntry | nn.Module, name: str) -> ModelEntry:
    if isinstance(model, ModelEntry):
        return model
    model.eval()
    return ModelEntry(name, model)


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
        dev = _device_of(cand, ref_out.device)
        self.phase = "local"  # no hook records anything during this call
        try:
            out = cand(*_to_device(args, dev), **_to_device(kwargs, dev))
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
    ref = _as_entry(reference, "reference")
    cand = _as_entry(candidate, "candidate")
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


# --- sensitivity ablation ---------------------------------------------------------------------


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
        dev = _device_of(self.inner, self.out_device)
        out = self.inner(*_to_device(args, dev), **_to_device(kwargs, dev))
        return _to_device(out, self.out_device)


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
            dev = _device_of(original, torch.device("cpu"))
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
    ref = _as_entry(reference, "reference")
    model = ref.model
    head = _output_head(model)
    skipped: dict[str, str] = {}
    cand_model = None if candidate is None else _as_entry(candidate, "candidate").model
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
                        stats.update_metrics(compare_logits(ref_logits, logits, top_k=top_k))
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
