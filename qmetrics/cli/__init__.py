"""``qmetrics`` command line: ``compare`` (reference vs candidates over a corpus), ``demo``
(the offline demo), ``layers`` (per-layer error and sensitivity ablation) and ``tasks``
(lm-evaluation-harness tasks, compared item by item).

Exit codes: 0 success, 1 a ``--fail-if`` threshold was broken, 2 bad input (a one-line error,
never a traceback).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

from qmetrics.evaluation.corpus import DEMO_SOURCE, CorpusError, iter_texts

DEMO_QUANTIZE = ("int8", "int4-g32", "int3-g32")
DEMO_CONTEXT = 128
DEFAULT_DATASET = "wikitext:wikitext-2-raw-v1:test"


class UsageError(ValueError):
    """Bad command-line input."""


def _add_compare_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--reference", help="HF model id or local path (omit to run the demo)")
        p.add_argument(
            "--candidate",
            action="append",
            default=[],
            metavar="M",
            help="quantized model to compare (repeatable)",
        )
        p.add_argument(
            "--quantize",
            action="append",
            default=[],
            metavar="SPEC",
            help="make a round-to-nearest candidate from the reference, e.g. int8, "
            "int4-g128, int3-g64-asym (repeatable)",
        )
        p.add_argument(
            "--dataset",
            default=None,
            help="'demo', a .txt/.jsonl/.parquet file, or a HF dataset "
            "NAME[:CONFIG[:SPLIT]] (default wikitext:wikitext-2-raw-v1:test)",
        )
        p.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet/HF")
        p.add_argument("--context-length", type=int, default=512)
        p.add_argument(
            "--stride",
            type=int,
            default=None,
            help="window stride (default: context length, non-overlapping)",
        )
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--max-tokens", type=int, default=None, help="bound on corpus tokens")
        add_loading_args(p)
        p.add_argument("--gguf-file", default=None, help="GGUF file inside the candidate repo")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument(
        "--logit-chunk",
        type=int,
        default=256,
        help="positions per logit chunk (bounds peak memory)",
    )
    p.add_argument("--output", type=Path, default=Path("qmetrics-report"), metavar="DIR")
    p.add_argument(
        "--fail-if",
        default=None,
        metavar="EXPR",
        help='thresholds, e.g. "kl_mean>0.05,top1<0.90,ppl_ratio>1.05"',
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DIR")
    p.add_argument("--checkpoint-every", type=int, default=8, metavar="BATCHES")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qmetrics``."""
    parser = argparse.ArgumentParser(
        prog="qmetrics", description="Measure how far a quantized LLM drifts from its reference."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compare_args(sub.add_parser("compare", help="compare models over a corpus"))
    _add_compare_args(
        sub.add_parser("demo", help="offline demo: the bundled model vs its RTN versions"),
        demo=True,
    )
    from qmetrics.cli.layers import add_layers_parser
    from qmetrics.cli.tasks import add_tasks_parser

    add_layers_parser(sub)
    add_tasks_parser(sub)
    return parser


def _demo_args(args: argparse.Namespace) -> argparse.Namespace:
    from qmetrics.evaluation.corpus import demo_text_path

    args.reference = str(demo_text_path().parent)
    args.candidate = []
    args.quantize = list(DEMO_QUANTIZE)
    args.dataset = DEMO_SOURCE
    args.text_field = "text"
    args.context_length = DEMO_CONTEXT
    args.stride = None
    args.batch_size = 8
    args.max_tokens = None
    args.device = "cpu"
    args.dtype = "float32"
    args.trust_remote_code = False
    args.gguf_file = None
    return args


def run_compare(args: argparse.Namespace) -> int:
    """Load, evaluate, report, gate. Returns the exit code."""
    from qmetrics.evaluation.rtn_quantize import QuantSpec
    from qmetrics.reports.gate import check_gate, parse_gate

    if args.command == "demo" or not args.reference:
        args = _demo_args(args)
    thresholds = parse_gate(args.fail_if) if args.fail_if else []
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
    from qmetrics.evaluation.models import load_pretrained, rtn_candidate
    from qmetrics.reports.compare import render_terminal_table, write_reports

    _quiet_transformers()
    load = dict(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    reference = load_pretrained(args.reference, **load)
    candidates = [load_pretrained(m, gguf_file=args.gguf_file, **load) for m in args.candidate]
    candidates += [rtn_candidate(reference, spec) for spec in specs]
    seen = {reference.name}
    for cand in candidates:  # two checkpoints in folders of one name stay apart
        base, n = cand.name, 2
        while cand.name in seen:
            cand.name, n = f"{base}-{n}", n + 1
        seen.add(cand.name)
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
    return finish_run(render_terminal_table(report), paths, check_gate(thresholds, report))


def finish_run(table, paths: dict, violations: list[str]) -> int:
    """Print the table, where the reports went and each broken threshold; the exit code."""
    _print_table(table)
    print(f"reports: {', '.join(str(p) for p in paths.values())}")
    for v in violations:
        print(f"FAIL {v}")
    return 1 if violations else 0


def open_corpus(dataset: str, text_field: str) -> Iterator[str]:
    """The corpus's documents, with the first one already read: a missing, unreadable or empty
    corpus fails here, before any model is loaded."""
    texts = iter_texts(dataset, text_field=text_field)
    first = next(texts, None)
    if first is None:
        raise CorpusError(f"the corpus is empty: {dataset} holds no documents")
    return itertools.chain([first], texts)


def add_model_pair_args(p: argparse.ArgumentParser, candidate_help: str) -> None:
    """``--reference`` and exactly one of ``--candidate`` / ``--quantize``, plus how to load."""
    p.add_argument("--reference", required=True, help="HF model id or local path")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--candidate", metavar="M", help=candidate_help)
    which.add_argument(
        "--quantize", metavar="SPEC", help="round-to-nearest candidate, e.g. int4-g128"
    )
    add_loading_args(p)


def add_loading_args(p: argparse.ArgumentParser) -> None:
    """How models are loaded: ``--device``, ``--dtype`` and ``--trust-remote-code``."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--dtype", default="auto", help="auto, float16, bfloat16, float32")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model repositories to run their own code (off by default)",
    )


def load_model_pair(args: argparse.Namespace, spec) -> tuple:
    """Load the reference and the candidate (``spec``: a parsed ``--quantize``, or None for
    ``--candidate``); the candidate is renamed when both carry one name."""
    from qmetrics.evaluation.models import load_pretrained, rtn_candidate

    _quiet_transformers()
    load = dict(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    reference = load_pretrained(args.reference, **load)
    if spec is not None:
        candidate = rtn_candidate(reference, spec)
    else:
        candidate = load_pretrained(args.candidate, **load)
    if candidate.name == reference.name:
        candidate.name = f"{candidate.name}-candidate"
    return reference, candidate


def _quiet_transformers() -> None:
    """No weight-loading progress bars or advisory warnings from transformers on the terminal."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _print_table(table) -> None:
    try:
        from rich.console import Console
    except ImportError:
        print(table)
        return
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmetrics`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "layers":
            from qmetrics.cli.layers import run_layers

            return run_layers(args)
        if args.command == "tasks":
            from qmetrics.cli.tasks import run_tasks

            return run_tasks(args)
        return run_compare(args)
    except (UsageError, CorpusError, ValueError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"qmetrics: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qmetrics: interrupted (use --resume to continue)", file=sys.stderr)
        return 130

