"""Evaluation: models and corpora in, result objects out.

Model loading and the RTN quantizer, corpus tokenizing and windowing, the paired comparison
(:class:`QuantizationEvaluator`), layer analysis and ablation, lm-eval tasks. Imports
:mod:`qmetrics.metrics` (and through it the kernels), never reports or the CLI.
"""
