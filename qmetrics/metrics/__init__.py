"""Metrics: tensors in, numbers out. No models, no files.

The functional API (:func:`compare_logits`), per-token metrics (:class:`TokenMetrics`), input
validation, estimates with error bars and the streaming accumulators (:class:`LogitStats`,
:class:`LayerStats`). Imports only :mod:`qmetrics.kernels`.
"""
