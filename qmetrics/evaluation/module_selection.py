"""Choosing the modules of a model to compare or ablate: selection by preset, class or name
(:func:`select_modules`) and pairing with another model's modules by name (:func:`match_modules`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

from torch import nn

from qmetrics.evaluation.models import output_head

#: Selection presets: decoder blocks, attention modules, MLPs, every Linear but the output head.
PRESETS = ("blocks", "attention", "mlp", "linear")
_ATTENTION_CLASS = re.compile(r"(Attention|Attn)$")
_MLP_CLASS = re.compile(r"(MLP|Mlp|FeedForward|FFN)$")


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
    head = output_head(model)
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
