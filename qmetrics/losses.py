"""Public facade of the training losses: re-exports :mod:`qmetrics.metrics.losses`, where they
are defined (``distill_loss``, ``DistillLoss``, ``linear_distill_loss``, ``LinearDistillLoss``).
"""

from qmetrics.metrics.losses import (
    DistillLoss,
    LinearDistillLoss,
    distill_loss,
    linear_distill_loss,
)

__all__ = ["DistillLoss", "LinearDistillLoss", "distill_loss", "linear_distill_loss"]
