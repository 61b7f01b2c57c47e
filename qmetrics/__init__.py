"""qmetrics: how far a quantized LLM has drifted from its reference model.

The public API. Tensor-level names (``compare_logits``, ``LogitStats``, ``TokenMetrics``, the
statistics' result types and the training losses of :mod:`qmetrics.losses`) import eagerly
and pull in nothing but torch; the model-level names (``QuantizationEvaluator`` and its
results) load on first use.
"""

from qmetrics import legacy_paths
from qmetrics.metrics.estimate import Estimate
from qmetrics.metrics.functional import compare_logits
from qmetrics.metrics.logit_stats import LogitStats, LogitStatsResult
from qmetrics.metrics.losses import (
    DistillLoss,
    LinearDistillLoss,
    distill_loss,
    linear_distill_loss,
)
from qmetrics.metrics.token_metrics import TokenMetrics

legacy_paths.install()

_EVALUATION = {
    "QuantizationEvaluator": "qmetrics.evaluation.compare",
    "EvaluationResult": "qmetrics.evaluation.compare",
    "ModelFigures": "qmetrics.evaluation.compare",
    "ModelEntry": "qmetrics.evaluation.models",
    "LayerAnalysis": "qmetrics.evaluation.layers",
    "AblationResult": "qmetrics.evaluation.ablation",
}


def __getattr__(name: str):
    module = _EVALUATION.get(name)
    if module is None:
        raise AttributeError(f"module 'qmetrics' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AblationResult",
    "DistillLoss",
    "Estimate",
    "EvaluationResult",
    "LayerAnalysis",
    "LinearDistillLoss",
    "LogitStats",
    "LogitStatsResult",
    "ModelEntry",
    "ModelFigures",
    "QuantizationEvaluator",
    "TokenMetrics",
    "compare_logits",
    "distill_loss",
    "linear_distill_loss",
]
__version__ = "0.1.0"
