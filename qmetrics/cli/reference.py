"""``qmetrics reference save``: run the reference model once over a corpus and keep what later
comparisons need in a store folder (:mod:`qmetrics.evaluation.reference_store`).

    qmetrics reference save --reference M --dataset D [--context-length N] [--stride S]
                            [--max-tokens T] [--batch-size B] --output REF/ [--store topk:K | full]

``qmetrics compare --reference-store REF/ --candidate M2`` then compares candidates against it
without loading M. Rerunning a killed save with the same arguments continues it. At the end the
store's size is printed: bytes per scored token and the ratio to llama.cpp's base-logits file
(2·V bytes per token) at V = 32,000 and 128,256. Bad input raises for ``qmetrics.cli.main``
(one line, exit code 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qmetrics.cli.common import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_DATASET,
    REFERENCE_HELP,
    UsageError,
    add_loading_args,
    add_window_args,
    load_models,
    open_corpus,
    torchrun_ranks,
)
from qmetrics.evaluation.corpus import SCORING_MODES

#: Vocabulary sizes the size line compares with llama.cpp's 2·V bytes per token at.
LLAMA_CPP_VOCABS = (32_000, 128_256)


def add_reference_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reference`` command (sub-command ``save``); returns the ``save`` parser."""
    p = subparsers.add_parser("reference", help="save a reference model's outputs for later")
    sub = p.add_subparsers(dest="reference_command", required=True)
    s = sub.add_parser("save", help="run the reference once and write a reference store")
    s.add_argument("--reference", required=True, help=REFERENCE_HELP)
    add_window_args(s)
    add_loading_args(s)
    s.add_argument("--output", type=Path, required=True, metavar="REF",
                   help="store folder (a killed save continues when rerun)")  # fmt: skip
    s.add_argument("--store", default="topk:64", metavar="MODE",
                   help="topk:K (default topk:64: label log-prob, entropy, top-K log-probs and "
                   "ids per token) or full[:DTYPE] (every logit, bf16 unless DTYPE says "
                   "float16/float32)")  # fmt: skip
    s.add_argument("--scoring", choices=SCORING_MODES, default="transformers",
                   help="which tokens are scored (as compare --scoring)")  # fmt: skip
    s.add_argument("--logit-chunk", type=int, default=256,
                   help="positions per logit chunk (bounds peak memory)")  # fmt: skip
    s.add_argument("--no-progress", action="store_true")
    return s


def run_reference(args: argparse.Namespace) -> int:
    """Save the store and print its size; returns the exit code (bad input raises)."""
    from qmetrics.evaluation.reference_store import StoreMode, save_reference_store

    mode = StoreMode.parse(args.store)
    context = DEFAULT_CONTEXT_LENGTH if args.context_length is None else args.context_length
    if context < 2:
        raise UsageError(f"--context-length must be ≥ 2, got {context}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    dataset = args.dataset or DEFAULT_DATASET
    texts = open_corpus(dataset, args.text_field)
    with torchrun_ranks(args) as rank:  # under torchrun each rank writes its own shards
        reference, _ = load_models(args)
        store = save_reference_store(
            reference,
            texts,
            args.output,
            mode=mode,
            context_length=context,
            stride=args.stride,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            scoring=args.scoring,
            logit_chunk_tokens=args.logit_chunk,
            dataset=dataset,
            progress=not args.no_progress,
        )
    if rank == 0:
        for line in size_lines(store):
            print(line)
    return 0


def size_lines(store: Any) -> list[str]:
    """What the store holds and its size: bytes per scored token, and the ratio to llama.cpp's
    2·V bytes per token at :data:`LLAMA_CPP_VOCABS`."""
    from qmetrics.reports.format import fmt_count, fmt_memory

    per_token = store.size_bytes / max(1, store.scored_tokens)
    ratios = ", ".join(
        f"{per_token / (2 * v):.2%} of 2·V at V = {v:,} ({2 * v / per_token:,.0f}× smaller)"
        for v in LLAMA_CPP_VOCABS
    )
    return [
        f"reference store: {store.path} ({store.mode}, {fmt_count(store.scored_tokens)} scored "
        f"tokens, V = {store.vocab_size:,}, run {store.run_id})",
        f"size: {fmt_memory(store.size_bytes / 2**20)}, {per_token:,.1f} bytes/token; "
        f"llama.cpp's base-logits file: {ratios}",
    ]
