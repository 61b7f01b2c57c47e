"""``qmetrics`` command line: ``compare`` (reference vs candidates over a corpus), ``demo``
(the offline demo), ``layers`` (per-layer error and sensitivity ablation) and ``tasks``
(lm-evaluation-harness tasks, compared item by item), ``bench`` (kernel throughput) and
``reference save`` (a reference model's outputs kept for later compares).

This module builds the root parser and dispatches; each command lives in its own module
(:mod:`.compare`, :mod:`.demo`, :mod:`.layers`, :mod:`.tasks`) and what they share in
:mod:`.common`, which is the only ``cli`` module they import.

Exit codes: 0 success, 1 a ``--fail-if`` rule was broken, 2 bad input (a one-line error,
never a traceback).
"""

from __future__ import annotations

import argparse
import sys

from qmetrics.cli import bench, compare, demo, layers, monitor, reference, tasks
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
    bench.add_bench_parser(sub)
    reference.add_reference_parser(sub)
    monitor.add_monitor_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "layers":
        return layers.run_layers(args)
    if args.command == "tasks":
        return tasks.run_tasks(args)
    if args.command == "bench":
        return bench.run_bench_command(args)
    if args.command == "reference":
        return reference.run_reference(args)
    if args.command == "monitor":
        return monitor.run_monitor(args)
    if args.command == "demo" or not (args.reference or args.reference_store):
        # compare without --reference (or --reference-store): the demo
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
