"""Overhead of ``OutputMonitor.observe`` against the model's own forward, measured side by side.

Each case is timed round-robin in one run, median of ``--repeats`` rounds after a warm-up
(which also compiles): the forward alone; ``observe`` alone on that forward's logits, with the
compiled CPU step (``OutputMonitor(compile=True)``), eagerly (``compile=False``), and compiled
observing one position in ``--sample-every`` (``sample_every``; a decode step: one call in
k); forward + compiled observe end to end; and a floor: ``torch.logsumexp`` alone over the
same logits, one call each time (compiled on the CPU). Every statistic of an exact monitor of
the output distribution needs that pass of max and exp; on the CPU it bounds the monitor's
cost from below, except on decode steps, which the monitor gathers into one pass per
``decode_batch`` calls. A monitor whose cost differs from call to call is timed by its mean
over whole cycles (the median would hide the calls that do the work): the sampling one, and
on decode steps every one (steps are gathered and observed ``decode_batch`` at a time,
``OutputMonitor``'s default). The overhead is observe / forward (the end-to-end difference
says the same within the forward's own noise, which on a shared CPU is a few %).

- the bundled demo model (V = 4096, hidden 192, 4 layers) on a scoring call [4, 128] with
  labels, and on a decode step (one position, the request continuing, with the mask of
  unfinished rows that ``attach`` computes during ``generate()``: gathered, a full batch
  observed in one pass every ``decode_batch`` steps);
- a V = 128,256 output head (hidden 4096, Llama-3-8B's shapes; fp32 on the CPU): the head's
  matmul is the "forward" — a lower bound of a real model's forward, so the ratio is an upper
  bound of the monitor's share.

Usage: ``python -m benchmarks.monitor_overhead [--threads 1] [--repeats 21] [--device cuda]``.
On CUDA (``benchmarks/gpu_check.sh``) every call is followed by a synchronize, the op is the
Triton kernel and the epilogue runs eagerly ("compiled" = "eager" there: ``compile`` is a CPU
option). The monitor's
cost is one pass over the logits (exp-bound: ~1 ns per logit on one core, compiled) plus a
small fused epilogue and ~0.1 ms of per-call overhead; eagerly, ~10 passes per chunk and a
few dozen small ops. A gathered decode step costs a copy of its logits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qmetrics.metrics.output_monitor import OutputMonitor, UnfinishedRows

DEMO = Path(__file__).resolve().parents[1] / "qmetrics" / "demo_model"
# a case: the forward, the view of its logits that is observed, how that view is observed
# (view, monitor) -> None, and how many calls make one pass of a monitor that gathers decode
# steps (1: every call is a pass)
Case = tuple[
    Callable[[], torch.Tensor],
    Callable[[torch.Tensor], torch.Tensor],
    Callable[[torch.Tensor, OutputMonitor], None],
    int,
]


def side_by_side(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    mean: tuple[str, ...] = (),
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds of each callable (the mean for those named in ``mean``: a sampling
    monitor's cost differs from call to call), timed round-robin (one of each per round);
    ``sync`` waits for the device after each call."""
    for fn in cases.values():  # warm-up (and compile)
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {
        name: (statistics.fmean if name in mean else statistics.median)(ts)
        for name, ts in times.items()
    }


def demo_case(batch: int, length: int, device: str = "cpu") -> Case:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval().to(device)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device=device)
    stop = torch.tensor([model.generation_config.eos_token_id, 0], device=device)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return model(input_ids=ids).logits

    def view(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, :-1] if length > 1 else logits

    def observe(logits: torch.Tensor, monitor: OutputMonitor) -> None:
        if length > 1:  # scoring: every position but the last, next tokens as labels
            monitor.observe(logits, ids[:, 1:])
        else:  # a decode step ([4, 1, V]), its requests continuing, finished rows masked:
            # as attach() observes it during generate()
            monitor.observe(logits, continues=True, mask=UnfinishedRows(ids, stop))

    return forward, view, observe, (1 if length > 1 else OutputMonitor().decode_batch)


def head_case(tokens: int, device: str = "cpu", hidden: int = 4096, vocab: int = 128256) -> Case:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device)
    head = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device)
    labels = torch.randint(0, vocab, (1, tokens), generator=g).to(device)

    def forward() -> torch.Tensor:
        return (h @ head.T)[None]

    def observe(logits: torch.Tensor, monitor: OutputMonitor) -> None:
        monitor.observe(logits, labels)

    return forward, (lambda logits: logits), observe, 1


def measure(
    case: Case, repeats: int, sample_every: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Seconds of: forward, observe (compiled / eager / compiled sampling one position in
    ``sample_every``) on one forward's logits, forward + compiled observe, and the
    ``logsumexp`` floor (medians; means over whole cycles where the cost differs from call to
    call)."""
    forward, view, observe, gathered = case
    logits = view(forward())
    lse = torch.logsumexp
    floor = torch.compile(lse) if logits.device.type == "cpu" else lse
    compiled = OutputMonitor(window_tokens=65536, compile=True)
    eager = OutputMonitor(window_tokens=65536, compile=False)
    sampled = OutputMonitor(window_tokens=65536, compile=True, sample_every=sample_every)
    cycle = sample_every * gathered
    for _ in range(2 * cycle):  # compiles each view pattern the sampling offsets make
        observe(logits, sampled)
    for _ in range(gathered + 1):  # a full pass of gathered steps compiles
        observe(logits, compiled)
    varies = ("forward", "compiled", "eager", "forward+compiled") if gathered > 1 else ()
    return side_by_side(
        {
            "forward": forward,
            "compiled": lambda: observe(logits, compiled),
            "eager": lambda: observe(logits, eager),
            "sampled": lambda: observe(logits, sampled),
            "forward+compiled": lambda: observe(view(forward()), compiled),
            "floor": lambda: floor(logits, -1),
        },
        -(-repeats // cycle) * cycle,  # whole cycles of the sampling monitor
        mean=("sampled", *varies),
        sync=sync,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--sample-every", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    where = torch.cuda.get_device_name() if dev.startswith("cuda") else f"{args.threads} thread(s)"
    print(f"torch {torch.__version__}, {dev}: {where}, median of {args.repeats}")
    k = args.sample_every
    print(
        "| case | forward ms | observe, compiled ms | overhead | end to end |"
        f" observe, eager ms | overhead | compiled, 1 position in {k} ms | overhead |"
        " floor: logsumexp alone ms | floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cases = {
        "demo model, scoring [4, 128], V=4096": lambda: demo_case(4, 128, dev),
        "demo model, decode step [4, 1], V=4096": lambda: demo_case(4, 1, dev),
        "V=128256 head (hidden 4096), 64 tokens": lambda: head_case(64, dev),
        "V=128256 head (hidden 4096), 1 token": lambda: head_case(1, dev),
    }
    for name, make in cases.items():
        t = measure(make(), args.repeats, k, sync)
        base = t["forward"]
        both = (t["forward+compiled"] - base) / base
        print(
            f"| {name} | {base * 1e3:.2f} | {t['compiled'] * 1e3:.3f} | "
            f"{t['compiled'] / base:.1%} | {both:+.1%} | {t['eager'] * 1e3:.3f} | "
            f"{t['eager'] / base:.1%} | {t['sampled'] * 1e3:.3f} | {t['sampled'] / base:.1%} | "
            f"{t['floor'] * 1e3:.3f} | {t['floor'] / base:.1%} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
