"""``qmetrics compare``: a reference against candidates over a corpus.

    qmetrics compare --reference M [--candidate M2]... [--quantize SPEC]... [--dataset D]
                     [--context-length N] [--stride S] [--batch-size B] [--max-tokens T]
                     [--output DIR] [--fail-if EXPR] [--resume] ...

Writes ``report.json``, ``report.md`` and ``kl_cdf.png`` into ``--output``, prints one row per
candidate and checks the gate (each candidate is a subject of :mod:`qmetrics.reports.gate`).
Under ``torchrun --nproc_per_node N -m qmetrics compare ...`` each rank runs its share of the
windows on its own device, rank 0 writes the reports and every rank exits with rank 0's code.
Bad input raises :class:`qmetrics.cli.common.UsageError` (or ``ValueError``) for
``qmetrics.cli.main`` to print on one line with exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qmetrics.cli.common import (
    CANDIDATE_SYNTAX,
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_DATASET,
    REFERENCE_HELP,
    UsageError,
    add_loading_args,
    add_run_args,
    add_window_args,
    candidate_specs,
    finish_run,
    load_models,
    open_corpus,
    rank0_exit_code,
    torchrun_ranks,
)


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("compare", help="compare models over a corpus")
    p.add_argument("--reference", help=f"{REFERENCE_HELP} (omit to run the demo)")
    p.add_argument("--candidate", action="append", default=[], metavar="M",
                   help=f"model to compare (repeatable): {CANDIDATE_SYNTAX}")  # fmt: skip
    p.add_argument("--quantize", action="append", default=[], metavar="SPEC",
                   help="make a round-to-nearest candidate from the reference, e.g. int8, "
                   "int4-g128, int3-g64-asym, q4=int4-g32 (repeatable)")  # fmt: skip
    p.add_argument("--reference-store", type=Path, default=None, metavar="REF",
                   help="compare against a store of `qmetrics reference save` instead of "
                   "running --reference (windowing, dataset default to the store's)")  # fmt: skip
    add_window_args(p)
    add_loading_args(p)
    p.add_argument("--gguf-file", default=None,
                   help="deprecated: write --candidate DIR_OR_REPO::FILE.gguf")  # fmt: skip
    add_run_args(p)
    return p


def run_compare(args: argparse.Namespace) -> int:
    """Load, evaluate, report, gate. Returns the exit code; bad input raises (see the module
    docstring)."""
    from qmetrics.reports.gate import parse_gate

    store = _open_store(args) if getattr(args, "reference_store", None) else None
    if not args.reference and store is None:
        raise UsageError("--reference is required (or run `qmetrics demo`)")
    rules = parse_gate(args.fail_if) if args.fail_if else []
    specs = candidate_specs(args.candidate, args.quantize, args.gguf_file)
    if args.context_length is None and store is None:
        args.context_length = DEFAULT_CONTEXT_LENGTH
    if args.context_length is not None and args.context_length < 2:
        raise UsageError(f"--context-length must be ≥ 2, got {args.context_length}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if not specs:
        raise UsageError("nothing to compare: give --candidate M and/or --quantize SPEC")
    if args.scoring == "llama.cpp" and args.stride not in (None, args.context_length):
        raise UsageError("--stride does not apply to --scoring llama.cpp (non-overlapping chunks)")

    dataset = args.dataset or (store.dataset if store else None) or DEFAULT_DATASET
    texts = open_corpus(dataset, args.text_field)
    with torchrun_ranks(args) as rank:
        code = _evaluate_and_report(args, texts, dataset, specs, rules, rank, store)
        return rank0_exit_code(code)


def _open_store(args: argparse.Namespace) -> Any:
    """The ``--reference-store`` (validated). ``--quantize`` then needs the stored model's
    weights: ``--reference`` names it, else the path or id the store recorded."""
    from qmetrics.evaluation.reference_store import ReferenceStore

    store = ReferenceStore.open(args.reference_store)
    if args.quantize and not args.reference:
        args.reference = store.manifest["model"].get("origin", {}).get("name_or_path")
        if not args.reference:
            raise UsageError("--quantize with --reference-store needs --reference M (its weights)")
    return store


def _evaluate_and_report(args: argparse.Namespace, texts: Any, dataset: str, specs: list,
                         rules: list, rank: int, store: Any = None) -> int:  # fmt: skip
    """Load, evaluate (this rank's windows), and on rank 0 report and gate; the exit code
    (0 on other ranks)."""
    from qmetrics.evaluation.compare import ChunkProgress, QuantizationEvaluator
    from qmetrics.reports.compare import (
        CHUNK_HEADER,
        chunk_lines,
        render_terminal_table,
        write_reports,
    )
    from qmetrics.reports.gate import check_gate

    header_shown = False

    def print_chunk(progress: ChunkProgress) -> None:
        nonlocal header_shown
        if not header_shown:
            print(CHUNK_HEADER, flush=True)
            header_shown = True
        for line in chunk_lines(progress.windows_done, progress.results):
            print(line, flush=True)

    reference, candidates = load_models(args, specs)
    evaluator = QuantizationEvaluator(
        store if store is not None else reference,  # a store: the reference model never runs
        candidates,
        None if reference is None else reference.tokenizer,
        context_length=args.context_length,
        stride=args.stride,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        top_k=args.top_k,
        logit_chunk_tokens=args.logit_chunk,
        checkpoint_dir=args.output / "checkpoint",
        checkpoint_every=args.checkpoint_every,
        progress=not (args.no_progress or args.per_chunk),
        scoring=args.scoring,
    )
    result = evaluator.evaluate(
        texts, resume=args.resume, on_chunk=print_chunk if args.per_chunk else None
    )
    if rank != 0:
        return 0
    report = result.to_dict()
    report["settings"]["dataset"] = dataset
    paths = write_reports(report, args.output)
    return finish_run(render_terminal_table(report), paths, check_gate(rules, report))
