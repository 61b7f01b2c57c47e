"""What the ``qmetrics`` commands share: flags, loading models and corpora, errors and the end
of a run (:func:`finish_run`). Every command module imports this and nothing else of ``cli``.

Exit codes: :data:`EXIT_OK` 0, :data:`EXIT_GATE` 1 (a ``--fail-if`` rule was broken),
:data:`EXIT_USAGE` 2 (bad input: a one-line error, never a traceback).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qmetrics.evaluation.corpus import CorpusError, iter_texts
from qmetrics.reports.format import print_table

EXIT_OK, EXIT_GATE, EXIT_USAGE = 0, 1, 2
DEFAULT_DATASET = "wikitext:wikitext-2-raw-v1:test"
FAIL_IF_HELP = (
    "fail (exit 1) if any rule is broken; rules are separated by ',' or ';', and clauses "
    "joined by '&' (or 'and') must all hold, e.g. {example}"
)


class UsageError(ValueError):
    """Bad command-line input."""


def error_message(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- flags ----------------------------------------------------------------------------------------


def add_loading_args(p: argparse.ArgumentParser) -> None:
    """How models are loaded: ``--device``, ``--dtype`` and ``--trust-remote-code``."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--dtype", default="auto", help="auto, float16, bfloat16, float32")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model repositories to run their own code (off by default)",
    )


def add_model_pair_args(p: argparse.ArgumentParser, candidate_help: str) -> None:
    """``--reference`` and exactly one of ``--candidate`` / ``--quantize``, plus how to load."""
    p.add_argument("--reference", required=True, help="HF model id or local path")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--candidate", metavar="M", help=candidate_help)
    which.add_argument(
        "--quantize", metavar="SPEC", help="round-to-nearest candidate, e.g. int4-g128"
    )
    add_loading_args(p)


def add_fail_if_arg(p: argparse.ArgumentParser, example: str) -> None:
    """``--fail-if EXPR``: the one gate grammar (:mod:`qmetrics.reports.gate`)."""
    p.add_argument("--fail-if", default=None, metavar="EXPR",
                   help=FAIL_IF_HELP.format(example=example))  # fmt: skip


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of a compare run that the demo has too: top-k, logit chunk, output folder,
    gate, resume and checkpointing, progress."""
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument(
        "--logit-chunk",
        type=int,
        default=256,
        help="positions per logit chunk (bounds peak memory)",
    )
    p.add_argument("--output", type=Path, default=Path("qmetrics-report"), metavar="DIR")
    add_fail_if_arg(p, '"kl_mean>0.05&top1<0.90, ppl_ratio>1.05"')
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DIR")
    p.add_argument("--checkpoint-every", type=int, default=8, metavar="BATCHES")
    p.add_argument("--no-progress", action="store_true")


# --- loading --------------------------------------------------------------------------------------


def open_corpus(dataset: str, text_field: str) -> Iterator[str]:
    """The corpus's documents, with the first one already read: a missing, unreadable or empty
    corpus fails here, before any model is loaded."""
    texts = iter_texts(dataset, text_field=text_field)
    first = next(texts, None)
    if first is None:
        raise CorpusError(f"the corpus is empty: {dataset} holds no documents")
    return itertools.chain([first], texts)


def quiet_transformers() -> None:
    """No weight-loading progress bars or advisory warnings from transformers on the terminal."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_models(
    args: argparse.Namespace,
    candidates: Sequence[str] = (),
    specs: Sequence[Any] = (),
    gguf_file: str | None = None,
) -> tuple[Any, list[Any]]:
    """Load ``args.reference`` and the candidates: checkpoints ``candidates`` (``gguf_file``
    inside them), then a round-to-nearest copy of the reference per parsed ``--quantize`` spec.
    Loading follows ``args.device``, ``args.dtype``, ``args.trust_remote_code``. Names are
    made unique in that order: a candidate whose name is taken (two checkpoints in folders of
    one name, or a candidate named like the reference) becomes ``NAME-2``, ``NAME-3``, ..."""
    from qmetrics.evaluation.models import load_pretrained, rtn_candidate

    quiet_transformers()
    load = dict(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    reference = load_pretrained(args.reference, **load)
    loaded = [load_pretrained(m, gguf_file=gguf_file, **load) for m in candidates]
    loaded += [rtn_candidate(reference, spec) for spec in specs]
    seen = {reference.name}
    for cand in loaded:
        base, n = cand.name, 2
        while cand.name in seen:
            cand.name, n = f"{base}-{n}", n + 1
        seen.add(cand.name)
    return reference, loaded


def load_model_pair(args: argparse.Namespace, spec: Any = None) -> tuple[Any, Any]:
    """The reference and the one candidate of ``layers`` / ``tasks``: ``spec`` a parsed
    ``--quantize``, or None for ``--candidate`` (names as :func:`load_models`)."""
    if spec is not None:
        reference, (candidate,) = load_models(args, specs=[spec])
    else:
        reference, (candidate,) = load_models(args, candidates=[args.candidate])
    return reference, candidate


# --- the end of a run -----------------------------------------------------------------------------


def finish_run(tables: Any, paths: Mapping[str, Path], violations: Sequence[str]) -> int:
    """Print the table(s) (one, or a list), where the reports went and each broken gate rule
    (``FAIL ...``); the exit code: :data:`EXIT_GATE` when a rule was broken, else 0."""
    for table in tables if isinstance(tables, list) else [tables]:
        print_table(table)
    print(f"reports: {', '.join(str(p) for p in paths.values())}")
    for v in violations:
        print(f"FAIL {v}")
    return EXIT_GATE if violations else EXIT_OK
