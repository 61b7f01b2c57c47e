"""qmetrics: how far a quantized LLM has drifted from its reference model.

The public API. Tensor-level names (``compare_logits``, ``LogitStats``, ``TokenMetrics`` and
the statistics' result types) import eagerly and pull in nothing but torch; the model-level
names (``QuantizationEvaluator`` and its results) load on first use.
"""

from qmetrics import legacy_paths
from qmetrics.metrics.functional import compare_logits
from qmetrics.metrics.logit_stats import Estimate, LogitStats, LogitStatsResult
from qmetrics.metrics.token_metrics import TokenMetrics

legacy_paths.install()

_EVALUATION = {
    "QuantizationEvaluator": "qmetrics.evaluation.compare",
    "EvaluationResult": "qmetrics.evaluation.compare",
    "ModelFigures": "qmetrics.evaluation.compare",
    "ModelEntry": "qmetrics.evaluation.models",
    "LayerAnalysis": "qmetrics.evaluation.layers",
    "AblationResult": "qmetrics.evaluation.layers",
}


def __getattr__(name: str):
    module = _EVALUATION.get(name)
    if module is None:
        raise AttributeError(f"module 'qmetrics' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AblationResult",
    "Estimate",
    "EvaluationResult",
    "LayerAnalysis",
    "LogitStats",
    "LogitStatsResult",
    "ModelEntry",
    "ModelFigures",
    "QuantizationEvaluator",
    "TokenMetrics",
    "compare_logits",
]
__version__ = "0.1.0"
