"""``qmetrics bench``: kernel throughput of qmetrics' ops against the eager, seed-document and
``torch.compile`` baselines on this machine's device (core: :mod:`qmetrics.evaluation.bench`,
report: :mod:`qmetrics.reports.bench`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qmetrics.cli.common import EXIT_OK, UsageError

CPU_NOTE = (
    "CPU run: small defaults N={tokens}, V={vocab}, {dtype}, baselines {baselines}, "
    "{repeat} rounds (about a minute on 2 quiet cores); --tokens/--vocab/--dtype/--repeat "
    "choose others, "
    "--baselines eager,seed,compile adds torch.compile (10-30 s of compiling per case)."
)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "bench",
        help="kernel throughput: qmetrics vs eager / seed / torch.compile on this device",
        description="Time qmetrics' fused ops against the baselines on the same tensors "
        "(interleaved rounds), with GB/s, %% of copy bandwidth, speed-ups and peak memory.",
    )
    p.add_argument(
        "--tokens",
        metavar="N[,N...]",
        help="tokens per call (default 4096 on CUDA, 160 on the CPU)",
    )
    p.add_argument(
        "--vocab",
        metavar="V[,V...]",
        help="vocabulary sizes (default 32000,128256 on CUDA, 32000 on the CPU)",
    )
    p.add_argument(
        "--dtype",
        metavar="D[,D...]",
        help="bf16, fp16, fp32 (default bf16,fp32 on CUDA, fp32 on the CPU)",
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--labels", action="store_true", help="pass next-token labels (NLL fields)")
    p.add_argument("--ops", default="compare,stats,distill", help="compare, stats, distill")
    p.add_argument(
        "--baselines",
        help="eager, seed, compile, or 'none' (default eager,seed,compile on CUDA; eager,seed "
        "on the CPU, where compiling the baseline takes longer than the whole default run)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--repeat", type=int, help="timed rounds per case (default 20 on CUDA, 10 on the CPU)"
    )
    p.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")  # fmt: skip
    return p


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip() and x.strip() != "none")


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x.replace("_", "")) for x in _names(text))
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None


def run_bench_command(args: argparse.Namespace) -> int:
    """Measure, print the table (and the CPU-defaults line), write ``--json``; exit 0.
    Bad input raises ``ValueError`` (one line, exit 2 in :func:`qmetrics.cli.main`)."""
    import torch

    from qmetrics.evaluation.bench import (
        CPU_DEFAULTS,
        CUDA_DEFAULTS,
        BenchResult,
        BenchSettings,
        parse_dtype,
        run_bench,
    )
    from qmetrics.reports.bench import render_terminal_table, write_json
    from qmetrics.reports.format import print_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = device == "cpu"
    defaults = CPU_DEFAULTS if on_cpu else CUDA_DEFAULTS
    tokens = _ints("--tokens", args.tokens) if args.tokens else defaults["tokens"]
    vocabs = _ints("--vocab", args.vocab) if args.vocab else defaults["vocabs"]
    dtypes = tuple(parse_dtype(d) for d in _names(args.dtype)) if args.dtype else defaults["dtypes"]
    settings = BenchSettings(
        tokens=tokens,
        vocabs=vocabs,
        dtypes=dtypes,
        ops=_names(args.ops),
        baselines=_names(args.baselines) if args.baselines else defaults["baselines"],
        device=device,
        top_k=args.top_k,
        labels=args.labels,
        repeat=args.repeat if args.repeat is not None else defaults["repeat"],
    )
    settings.check()
    if args.json and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json} is a folder; give a file name such as OUT.json")
    if on_cpu and not (args.tokens or args.vocab or args.dtype):
        shape = {
            "tokens": tokens,
            "vocab": vocabs,
            "dtype": dtypes,
            "baselines": settings.baselines,
            "repeat": (settings.repeat,),
        }
        print(CPU_NOTE.format(**{k: ",".join(map(str, v)) for k, v in shape.items()}))

    def save(result: BenchResult) -> None:  # after every case: a run cut short keeps them
        if args.json:
            write_json(result.to_dict(), args.json)

    result = run_bench(settings, progress=sys.stderr.isatty(), on_case=save)
    print_table(render_terminal_table(result.to_dict()))
    if args.json:
        print(f"report: {args.json}")
    return EXIT_OK
