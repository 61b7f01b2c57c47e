"""What the ``qmetrics`` commands share: flags, loading models and corpora, errors and the end
of a run (:func:`finish_run`). Every command module imports this and nothing else of ``cli``.

Exit codes: :data:`EXIT_OK` 0, :data:`EXIT_GATE` 1 (a ``--fail-if`` rule was broken),
:data:`EXIT_USAGE` 2 (bad input: a one-line error, never a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qmetrics.evaluation.corpus import SCORING_MODES, CorpusError, iter_texts
from qmetrics.reports.format import print_table

EXIT_OK, EXIT_GATE, EXIT_USAGE = 0, 1, 2
DEFAULT_DATASET = "wikitext:wikitext-2-raw-v1:test"
DEFAULT_CONTEXT_LENGTH = 512
FAIL_IF_HELP = (
    "fail (exit 1) if any rule is broken; rules are separated by ',' or ';', and clauses "
    "joined by '&' (or 'and') must all hold, e.g. {example}"
)


CANDIDATE_SYNTAX = (
    "[NAME=]PATH.gguf, [NAME=]DIR_OR_REPO::FILE.gguf or [NAME=]DIR_OR_REPO (any checkpoint "
    "transformers loads); a GGUF row is named after the file's stem unless NAME= is given"
)
REFERENCE_HELP = "HF model id, local folder, PATH.gguf or DIR_OR_REPO::FILE.gguf"


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
    p.add_argument("--reference", required=True, help=REFERENCE_HELP)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--candidate", metavar="M", help=f"{candidate_help}: {CANDIDATE_SYNTAX}")
    which.add_argument(
        "--quantize", metavar="SPEC", help="round-to-nearest candidate ([NAME=]SPEC), e.g. int4"
    )
    add_loading_args(p)


def add_window_args(p: argparse.ArgumentParser) -> None:
    """The corpus and its windows: ``--dataset``, ``--text-field``, ``--context-length`` (None
    when not given: :data:`DEFAULT_CONTEXT_LENGTH`, or a reference store's), ``--stride``,
    ``--batch-size``, ``--max-tokens``."""
    p.add_argument("--dataset", default=None,
                   help="'demo', a .txt/.jsonl/.parquet file, or a HF dataset "
                   f"NAME[:CONFIG[:SPLIT]] (default {DEFAULT_DATASET})")  # fmt: skip
    p.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet/HF")
    p.add_argument("--context-length", type=int, default=None,
                   help=f"tokens per window (default {DEFAULT_CONTEXT_LENGTH})")  # fmt: skip
    p.add_argument("--stride", type=int, default=None,
                   help="window stride (default: context length, non-overlapping)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=None, help="bound on corpus tokens")


def add_fail_if_arg(p: argparse.ArgumentParser, example: str) -> None:
    """``--fail-if EXPR``: the one gate grammar (:mod:`qmetrics.reports.gate`)."""
    p.add_argument("--fail-if", default=None, metavar="EXPR",
                   help=FAIL_IF_HELP.format(example=example))  # fmt: skip


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of a compare run that the demo has too: top-k, logit chunk, output folder,
    gate, resume and checkpointing, progress, scoring and the per-chunk line."""
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
    p.add_argument("--scoring", choices=SCORING_MODES, default="transformers",
                   help="which tokens are fed and scored: 'transformers' (windows as in the "
                   "transformers perplexity guide) or 'llama.cpp' (llama-perplexity "
                   "--kl-divergence: chunks of --context-length, BOS first, second half "
                   "scored)")  # fmt: skip
    p.add_argument("--per-chunk", action="store_true",
                   help="print llama.cpp's running line (PPL, ln ratio, KL, RMS Δp, same top) "
                   "after each batch")  # fmt: skip


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


def candidate_specs(
    candidates: Sequence[Any] = (), quantize: Sequence[Any] = (), gguf_file: str | None = None
) -> list[Any]:
    """The one reading of ``--candidate`` (``candidates``) and ``--quantize`` (``quantize``) into
    :class:`~qmetrics.evaluation.models.CandidateSpec` s, in that order (text goes through
    ``CandidateSpec.parse``; parsed specs and ``QuantSpec`` s pass through). The deprecated
    ``--gguf-file F`` turns the one ``--candidate DIR`` into ``DIR::F``, with a note on stderr."""
    from qmetrics.evaluation.models import CandidateSpec
    from qmetrics.evaluation.rtn_quantize import QuantSpec

    parsed = [c if isinstance(c, CandidateSpec) else CandidateSpec.parse(c) for c in candidates]
    if gguf_file:
        if len(parsed) != 1 or parsed[0].gguf_file or parsed[0].quantize is not None:
            raise UsageError(
                "--gguf-file applies to exactly one --candidate DIR; "
                "name each GGUF file as --candidate DIR::FILE.gguf instead"
            )
        print("qmetrics: --gguf-file is deprecated: write --candidate DIR::FILE.gguf",
              file=sys.stderr)  # fmt: skip
        parsed = [dataclasses.replace(parsed[0], gguf_file=gguf_file)]
    for q in quantize:
        if isinstance(q, CandidateSpec):
            parsed.append(q)
        else:
            parsed.append(
                CandidateSpec(quantize=q) if isinstance(q, QuantSpec)
                else CandidateSpec.parse(q, quantize=True)
            )  # fmt: skip
    return parsed


def pair_spec(args: argparse.Namespace) -> Any:
    """The one candidate of ``layers`` / ``tasks`` (``--candidate`` or ``--quantize``), parsed
    by :func:`candidate_specs`."""
    (spec,) = candidate_specs([args.candidate] if args.candidate else [],
                              [args.quantize] if args.quantize else [])  # fmt: skip
    return spec


def load_models(
    args: argparse.Namespace,
    candidates: Sequence[Any] = (),
    specs: Sequence[Any] = (),
    gguf_file: str | None = None,
) -> tuple[Any, list[Any]]:
    """Load ``args.reference`` (same syntax as a candidate) and the candidates of
    :func:`candidate_specs` ``(candidates, specs, gguf_file)``: checkpoints and GGUF files,
    then round-to-nearest copies of the reference. Loading follows ``args.device``,
    ``args.dtype``, ``args.trust_remote_code``; ``args.no_progress`` (off a terminal when
    absent) silences every progress bar, transformers' GGUF one included. Names are made
    unique in that order: a candidate whose name is taken (two checkpoints in folders of one
    name, or a candidate named like the reference) becomes ``NAME-2``, ``NAME-3``, ..."""
    from qmetrics.evaluation.models import CandidateSpec, load_model
    from qmetrics.evaluation.tasks.runner import quiet_progress

    wanted = candidate_specs(candidates, specs, gguf_file)
    # no reference (None) with --reference-store: then only checkpoints can be candidates
    reference_spec = CandidateSpec.parse(args.reference) if args.reference else None
    quiet_transformers()
    load = dict(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    with quiet_progress(getattr(args, "no_progress", not sys.stderr.isatty())):
        reference = load_model(reference_spec, **load) if reference_spec else None
        loaded = [load_model(spec, reference, **load) for spec in wanted]
    seen = {reference.name} if reference is not None else set()
    for cand in loaded:
        base, n = cand.name, 2
        while cand.name in seen:
            cand.name, n = f"{base}-{n}", n + 1
        seen.add(cand.name)
    return reference, loaded


def load_model_pair(args: argparse.Namespace, spec: Any = None) -> tuple[Any, Any]:
    """The reference and the one candidate of ``layers`` / ``tasks``: ``spec`` (a
    ``CandidateSpec`` or a parsed ``--quantize``), or None for ``--candidate`` (names as
    :func:`load_models`)."""
    if spec is not None:
        reference, (candidate,) = load_models(args, specs=[spec])
    else:
        reference, (candidate,) = load_models(args, candidates=[args.candidate])
    return reference, candidate


# --- torchrun ----------------------------------------------------------------------------------


@contextlib.contextmanager
def torchrun_ranks(args: argparse.Namespace) -> Iterator[int]:
    """The body of a command that ``torchrun`` may start in several processes; yields this
    process's rank (0 in a plain run). Under torchrun (``WORLD_SIZE > 1``) ``args.device``
    becomes this rank's device (``cuda:LOCAL_RANK`` for auto/cuda on a CUDA machine) and the
    process group is joined for the block (NCCL on CUDA, gloo otherwise) and left after it."""
    from qmetrics.evaluation.distributed import init_from_env, rank_and_world, rank_device, shutdown

    args.device = rank_device(args.device)
    created = init_from_env(args.device)
    try:
        yield rank_and_world()[0]
    finally:
        if created:
            shutdown()


def rank0_exit_code(code: int) -> int:
    """Rank 0's exit code on every rank (``code`` itself in a plain run): the others then exit
    as rank 0, which wrote the reports and checked the gate. Collective under torchrun."""
    from qmetrics.evaluation.distributed import broadcast_int

    return broadcast_int(code)


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
