"""``qmetrics layers``: per-layer error of a candidate, and one-unit-at-a-time sensitivity.

    qmetrics layers --reference M (--candidate M2 | --quantize SPEC) [--modules PATTERN]...
                    [--ablate [--ablate-by module|type] [--ablate-tokens N]] ...

Writes ``layers.json`` and ``layers.png`` into ``--output`` and prints ranked tables. Bad
input raises :class:`qmetrics.cli.common.UsageError` (or ``ValueError``), which
``qmetrics.cli.main`` turns into a one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qmetrics.cli.common import (
    DEFAULT_DATASET,
    UsageError,
    add_model_pair_args,
    load_model_pair,
    open_corpus,
    pair_spec,
    print_table,
)
from qmetrics.evaluation.corpus import token_batches, tokenize_checked


def add_layers_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``layers`` command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "layers", help="per-layer error and layer sensitivity of one quantized model"
    )
    add_model_pair_args(p, "quantized model to analyse")
    p.add_argument(
        "--modules",
        action="append",
        metavar="PATTERN",
        help="modules to compare (repeatable): blocks (default), attention, mlp, linear, "
        "type:ClassName, or a regex on qualified names",
    )
    p.add_argument(
        "--no-input-matched",
        action="store_true",
        help="skip the local error (candidate modules fed the reference's inputs)",
    )
    p.add_argument("--ablate", action="store_true", help="rank units by output KL when ablated")
    p.add_argument("--ablate-by", choices=("module", "type"), default="module",
                   help="one unit per module, or per module type across layers")  # fmt: skip
    p.add_argument("--ablate-tokens", type=int, default=2048, help="token budget of the ablation")
    p.add_argument("--dataset", default=None,
                   help=f"'demo', a .txt/.jsonl/.parquet file or a HF dataset "
                   f"(default {DEFAULT_DATASET})")  # fmt: skip
    p.add_argument("--text-field", default="text")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget of the error pass")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--output", type=Path, default=Path("qmetrics-layers"), metavar="DIR")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--context-length", args.context_length, 2),
                             ("--batch-size", args.batch_size, 1),
                             ("--max-tokens", args.max_tokens, 2),
                             ("--ablate-tokens", args.ablate_tokens, 2)):  # fmt: skip
        if value < low:
            raise UsageError(f"{flag} must be ≥ {low}, got {value}")


def run_layers(args: argparse.Namespace) -> int:
    """Load the models, run the layer analysis (and ablation), write and print the reports.
    Returns 0; bad input raises (see the module docstring)."""
    from qmetrics.evaluation.layers import (
        ablation_units,
        analyze_layers,
        run_ablation,
        select_modules,
    )
    from qmetrics.reports.layers import render_layer_tables, write_layer_reports

    _check_args(args)
    candidate_spec = pair_spec(args)
    spec = candidate_spec.quantize
    modules = args.modules or ["blocks"]
    dataset = args.dataset or DEFAULT_DATASET
    texts = list(open_corpus(dataset, args.text_field))
    reference, candidate = load_model_pair(args, candidate_spec)
    ids = tokenize_checked(texts, reference.tokenizer, [(candidate.name, candidate.tokenizer)],
                           max_tokens=args.max_tokens)  # fmt: skip
    batches = token_batches(ids, args.context_length, args.batch_size)
    progress = not args.no_progress

    errors = analyze_layers(reference, candidate, batches, modules=modules,
                            input_matched=not args.no_input_matched, progress=progress)  # fmt: skip
    ablation = None
    if args.ablate:
        names = select_modules(reference.model, modules)
        units = ablation_units(names, by=args.ablate_by)
        budget = token_batches(ids, args.context_length, args.batch_size, args.ablate_tokens)
        ablation = run_ablation(
            reference,
            budget,
            units,
            spec=spec,
            candidate=None if spec is not None else candidate,
            top_k=args.top_k,
            progress=progress,
        )
    report = {
        "settings": {
            "reference": reference.name,
            "candidate": candidate.name,
            "dataset": dataset,
            "modules": modules,
            "context_length": args.context_length,
            "batch_size": args.batch_size,
            "max_tokens": args.max_tokens,
            "input_matched": not args.no_input_matched,
            "ablate_by": args.ablate_by if args.ablate else None,
            "ablate_tokens": args.ablate_tokens if args.ablate else None,
        },
        "errors": errors.to_dict(),
        "ablation": None if ablation is None else ablation.to_dict(),
    }
    paths = write_layer_reports(report, args.output)
    for table in render_layer_tables(report):
        print_table(table)
    if errors.unmatched:
        print(f"not in the candidate: {', '.join(errors.unmatched)}")
    print(f"reports: {', '.join(str(p) for p in paths.values())}")
    return 0
