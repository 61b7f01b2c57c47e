"""qmetrics: how far a quantized LLM has drifted from its reference model."""

from qmetrics.functional import compare_logits
from qmetrics.logit_stats import LogitStats
from qmetrics.token_metrics import TokenMetrics

__all__ = ["LogitStats", "TokenMetrics", "compare_logits"]
__version__ = "0.1.0"
