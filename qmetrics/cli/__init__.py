"""``qmetrics`` command line: ``compare`` (reference vs candidates over a corpus), ``demo``
(the offline demo), ``layers`` (per-layer error and sensitivity ablation) and ``tasks``
(lm-evaluation-harness tasks, compared item by item).

This module builds the root parser and dispatches; each command lives in its own module
(:mod:`.compare`, :mod:`.demo`, :mod:`.layers`, :mod:`.tasks`) and what they share in
:mod:`.common`, which is the only ``cli`` module they import.

Exit codes: 0 success, 1 a ``--fail-if`` rule was broken, 2 bad input (a one-line error,
never a traceback).
"""

from __future__ import annotations

import argparse
import sys

from qmetrics.cli import compare, demo, layers, tasks
from qmetrics.cli.common import EXIT_USAGE, UsageError, error_message
from qmetrics.evaluation.corpus import CorpusError

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qmetrics``."""
    parser = argparse.ArgumentParser(
        prog="qmetrics", description="Measure how far a quantized LLM drifts from its reference."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    compare.add_compare_parser(sub)
    demo.add_demo_parser(sub)
    layers.add_layers_parser(sub)
    tasks.add_tasks_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "layers":
        return layers.run_layers(args)
    if args.command == "tasks":
        return tasks.run_tasks(args)
    if args.command == "demo" or not args.reference:  # compare without --reference: the demo
        args = demo.demo_args(args)
    return compare.run_compare(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmetrics`` script."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (UsageError, CorpusError, ValueError, OSError) as exc:
        print(f"qmetrics: error: {error_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qmetrics: interrupted (use --resume to continue)", file=sys.stderr)
        return 130
