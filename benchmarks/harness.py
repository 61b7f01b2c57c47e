"""Adapters over the benchmark core (:mod:`qmetrics.evaluation.bench`) for the scripts of this
folder: ``qmetrics bench`` writing result files (:func:`bench_to_folder`), and for scripts that
time one callable at a time (``tune_logit_kernel.py``) the same inputs, timer and copy
measurement as ``qmetrics bench`` — no second copy of them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from qmetrics.evaluation.bench import make_logit_inputs, time_calls

__all__ = ["bench_to_folder", "copy_bandwidth_gbs", "make_inputs", "time_fn"]

make_inputs = make_logit_inputs


def time_fn(fn: Callable[[], object], device: str, reps: int = 10) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``fn()``'s time in ms, after one warm-up call
    (:func:`qmetrics.evaluation.bench.time_calls`: CUDA events with the L2 cache flushed)."""
    fn()
    t = time_calls({"fn": fn}, device, reps)["fn"]
    return t.median_ms, t.p20_ms, t.p80_ms


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """``copy_`` bandwidth of the device (bytes read + written per second) in GB/s, for a
    source of ``nbytes`` bytes."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    med, _, _ = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (med * 1e-3) / 1e9


def bench_to_folder(op: str, stem: str, argv: list[str]) -> int:
    """``qmetrics bench --ops OP ARGV``; with ``--out DIR`` in ARGV also DIR/STEM.{json,md}."""
    from qmetrics.cli import main as qmetrics_main
    from qmetrics.reports.bench import render_markdown

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", type=Path)
    args, rest = parser.parse_known_args(argv)
    extra = ["--json", str(args.out / f"{stem}.json")] if args.out else []
    code = qmetrics_main(["bench", "--ops", op, *rest, *extra])
    if code == 0 and args.out:
        report = json.loads((args.out / f"{stem}.json").read_text())
        (args.out / f"{stem}.md").write_text(render_markdown(report))
    return code
