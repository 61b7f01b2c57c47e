"""Reports: everything that reads a result dict — number formatting and tables, the compare,
layers and tasks reports (JSON, Markdown, PNG, terminal) and the one ``--fail-if`` gate.
Imports :mod:`qmetrics.evaluation` and :mod:`qmetrics.metrics` only.
"""
