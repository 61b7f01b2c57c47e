"""``qmetrics compare``: a reference against candidates over a corpus.

    qmetrics compare --reference M [--candidate M2]... [--quantize SPEC]... [--dataset D]
                     [--context-length N] [--stride S] [--batch-size B] [--max-tokens T]
                     [--output DIR] [--fail-if EXPR] [--resume] ...

Writes ``report.json``, ``report.md`` and ``kl_cdf.png`` into ``--output``, prints one row per
candidate and checks the gate (each candidate is a subject of :mod:`qmetrics.reports.gate`).
Bad input raises :class:`qmetrics.cli.common.UsageError` (or ``ValueError``) for
``qmetrics.cli.main`` to print on one line with exit code 2.
"""

from __future__ import annotations

import argparse
from typing import Any

from qmetrics.cli.common import (
    DEFAULT_DATASET,
    UsageError,
    add_loading_args,
    add_run_args,
    finish_run,
    load_models,
    open_corpus,
)


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("compare", help="compare models over a corpus")
    p.add_argument("--reference", help="HF model id or local path (omit to run the demo)")
    p.add_argument("--candidate", action="append", default=[], metavar="M",
                   help="quantized model to compare (repeatable)")  # fmt: skip
    p.add_argument("--quantize", action="append", default=[], metavar="SPEC",
                   help="make a round-to-nearest candidate from the reference, e.g. int8, "
                   "int4-g128, int3-g64-asym (repeatable)")  # fmt: skip
    p.add_argument("--dataset", default=None,
                   help="'demo', a .txt/.jsonl/.parquet file, or a HF dataset "
                   f"NAME[:CONFIG[:SPLIT]] (default {DEFAULT_DATASET})")  # fmt: skip
    p.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet/HF")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=None,
                   help="window stride (default: context length, non-overlapping)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=None, help="bound on corpus tokens")
    add_loading_args(p)
    p.add_argument("--gguf-file", default=None, help="GGUF file inside the candidate repo")
    add_run_args(p)
    return p


def run_compare(args: argparse.Namespace) -> int:
    """Load, evaluate, report, gate. Returns the exit code; bad input raises (see the module
    docstring)."""
    from qmetrics.evaluation.rtn_quantize import QuantSpec
    from qmetrics.reports.gate import check_gate, parse_gate

    if not args.reference:
        raise UsageError("--reference is required (or run `qmetrics demo`)")
    rules = parse_gate(args.fail_if) if args.fail_if else []
    specs = [QuantSpec.parse(s) for s in args.quantize]
    if args.context_length < 2:
        raise UsageError(f"--context-length must be ≥ 2, got {args.context_length}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if not args.candidate and not specs:
        raise UsageError("nothing to compare: give --candidate M and/or --quantize SPEC")

    dataset = args.dataset or DEFAULT_DATASET
    texts = open_corpus(dataset, args.text_field)

    from qmetrics.evaluation.compare import QuantizationEvaluator
    from qmetrics.reports.compare import render_terminal_table, write_reports

    reference, candidates = load_models(args, args.candidate, specs, gguf_file=args.gguf_file)
    evaluator = QuantizationEvaluator(
        reference,
        candidates,
        context_length=args.context_length,
        stride=args.stride,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        top_k=args.top_k,
        logit_chunk_tokens=args.logit_chunk,
        checkpoint_dir=args.output / "checkpoint",
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    result = evaluator.evaluate(texts, resume=args.resume)
    report = result.to_dict()
    report["settings"]["dataset"] = dataset
    paths = write_reports(report, args.output)
    return finish_run(render_terminal_table(report), paths, check_gate(rules, report))
