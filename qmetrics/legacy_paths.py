"""Old import paths of the flat 0.1 layout, kept working after the move into packages.

``import qmetrics.logit_stats`` (or ``qmetrics.evaluator``, ``qmetrics.gate``, ...) returns the
module at its new home, the very same module object: one copy of each concept, reachable under
both names. :data:`MOVED` is the whole table; nothing else imports through it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old module name → new module name
MOVED: dict[str, str] = {
    "qmetrics.functional": "qmetrics.metrics.functional",
    "qmetrics.token_metrics": "qmetrics.metrics.token_metrics",
    "qmetrics.validation": "qmetrics.metrics.validation",
    "qmetrics.logit_stats": "qmetrics.metrics.logit_stats",
    "qmetrics.layer_stats": "qmetrics.metrics.layer_stats",
    "qmetrics.json_values": "qmetrics.metrics.json_values",
    "qmetrics.logit_compare_torch": "qmetrics.kernels.logit_compare_torch",
    "qmetrics.hidden_compare_torch": "qmetrics.kernels.hidden_compare_torch",
    "qmetrics.models": "qmetrics.evaluation.models",
    "qmetrics.rtn_quantize": "qmetrics.evaluation.rtn_quantize",
    "qmetrics.corpus": "qmetrics.evaluation.corpus",
    "qmetrics.logit_source": "qmetrics.evaluation.logit_source",
    "qmetrics.evaluator": "qmetrics.evaluation.compare",
    "qmetrics.layer_analysis": "qmetrics.evaluation.layers",
    "qmetrics.progress": "qmetrics.evaluation.progress",
    "qmetrics.tasks": "qmetrics.evaluation.tasks",
    "qmetrics.task_runner": "qmetrics.evaluation.tasks.runner",
    "qmetrics.task_comparison": "qmetrics.evaluation.tasks.comparison",
    "qmetrics.report": "qmetrics.reports.compare",
    "qmetrics.layers_report": "qmetrics.reports.layers",
    "qmetrics.tasks_report": "qmetrics.reports.tasks",
    "qmetrics.gate": "qmetrics.reports.gate",
    "qmetrics.task_gate": "qmetrics.reports.gate",
    "qmetrics.layers_cli": "qmetrics.cli.layers",
    "qmetrics.tasks_cli": "qmetrics.cli.tasks",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name by importing the new one and handing back that module."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was executed under its new name. Only its own
        ``__spec__``, which the import system overwrote with the alias's, is put back (a
        package's spec carries the search path that ``importlib.resources`` reads)."""
        module.__spec__ = self.spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Register the finder once (``qmetrics/__init__`` calls this)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
