"""The public API after the move into packages: exports of ``qmetrics`` and the old flat import
paths, which must resolve to the very module at its new home (one copy of each concept)."""

from __future__ import annotations

import importlib

import pytest

import qmetrics
from qmetrics.legacy_paths import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_path_is_the_new_module(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_old_from_imports_of_public_names() -> None:
    from qmetrics.evaluator import QuantizationEvaluator
    from qmetrics.functional import compare_logits
    from qmetrics.logit_stats import Estimate, LogitStats, LogitStatsResult
    from qmetrics.token_metrics import TokenMetrics

    assert compare_logits is qmetrics.compare_logits
    assert LogitStats is qmetrics.LogitStats and TokenMetrics is qmetrics.TokenMetrics
    assert Estimate is qmetrics.Estimate and LogitStatsResult is qmetrics.LogitStatsResult
    assert QuantizationEvaluator is qmetrics.QuantizationEvaluator


@pytest.mark.parametrize("name", qmetrics.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(qmetrics, name) is not None


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        qmetrics.no_such_name  # noqa: B018


def test_unmoved_name_is_not_aliased() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("qmetrics.no_such_module")


def test_old_path_keeps_the_package_usable() -> None:
    """Importing an alias must not replace the real module's spec (importlib.resources and
    submodule imports read it)."""
    import qmetrics.tasks  # noqa: F401

    from qmetrics.evaluation.tasks import offline_task_dir

    real = importlib.import_module("qmetrics.evaluation.tasks")
    assert real.__spec__.name == "qmetrics.evaluation.tasks"
    assert real.__spec__.submodule_search_locations
    assert offline_task_dir().is_dir()
