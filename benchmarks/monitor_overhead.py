"""Overhead of ``OutputMonitor.observe`` against the model's own forward, measured side by side.

Two cases, each timed round-robin in one run (forward alone, forward + observe), median of
``--repeats`` rounds after a warm-up:

- the bundled demo model (V = 4096) on a scoring call [B, T] with labels, and on a decode step
  (one position);
- a V = 128,256 output head (hidden 4096, Llama-3-8B's shapes; fp32 on the CPU): the head's
  matmul is the "forward" — a lower bound of a real model's forward, so the ratio is an upper
  bound of the monitor's share.

Usage: ``python -m benchmarks.monitor_overhead [--threads 1] [--repeats 15]``. The monitor's
cost is one pass over the logits (:func:`qmetrics.metrics.output_stats.output_stats`, torch path
on the CPU) plus a few dozen small ops.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qmetrics.metrics.output_monitor import OutputMonitor

DEMO = Path(__file__).resolve().parents[1] / "qmetrics" / "demo_model"


def side_by_side(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin (one of each per round)."""
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def demo_cases(batch: int, length: int) -> dict[str, Callable[[], object]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (batch, length))
    monitor = OutputMonitor(window_tokens=65536)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return model(input_ids=ids).logits

    @torch.no_grad()
    def monitored() -> None:
        logits = model(input_ids=ids).logits
        if length > 1:  # scoring: every position, next tokens as labels
            monitor.observe(logits[:, :-1], ids[:, 1:])
        else:  # a decode step: the last position, its request continuing
            monitor.observe(logits[:, -1:], continues=True)

    return {"forward": forward, "forward+observe": monitored}


def head_cases(tokens: int, hidden: int = 4096, vocab: int = 128256) -> dict[str, Callable]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g)
    head = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    monitor = OutputMonitor(window_tokens=65536)

    def forward() -> torch.Tensor:
        return h @ head.T

    def monitored() -> None:
        monitor.observe((h @ head.T)[None], labels[None])

    return {"forward": forward, "forward+observe": monitored}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print("| case | forward ms | forward + observe ms | overhead |")
    print("|---|---:|---:|---:|")
    cases = {
        "demo model, scoring [4, 128], V=4096": lambda: demo_cases(4, 128),
        "demo model, decode step [4, 1], V=4096": lambda: demo_cases(4, 1),
        "V=128256 head (hidden 4096), 64 tokens": lambda: head_cases(64),
        "V=128256 head (hidden 4096), 1 token": lambda: head_cases(1),
    }
    for name, make in cases.items():
        t = side_by_side(make(), args.repeats)
        base, mon = t["forward"], t["forward+observe"]
        print(f"| {name} | {base * 1e3:.2f} | {mon * 1e3:.2f} | {(mon - base) / base:+.1%} |",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
