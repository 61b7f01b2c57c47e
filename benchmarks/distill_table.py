"""Benchmark table of the distillation losses: forward + backward time and peak extra memory.

    python -m benchmarks.distill_table                 # CPU: N=4096, V=32000, fp32
    python -m benchmarks.distill_table --out DIR       # also DIR/distill_loss.{json,md}

Providers, each a full forward + backward of a KL(P‖Q) distillation loss (T = 1, mean over
tokens) and returning the loss:

* from logits [N, V] (student requires grad): ``eager`` — ``F.kl_div(F.log_softmax(s/T),
  F.softmax(t/T), reduction="batchmean")``, the way training scripts write it;
  ``eager_compile`` — its ``torch.compile``; ``qmetrics`` — :func:`qmetrics.losses.distill_loss`.
* from final hidden states [N, H] and heads [V, H] (student hidden, weight require grad):
  ``eager_linear`` — materialise both logits, then ``eager``; ``qmetrics_linear`` —
  :func:`qmetrics.losses.linear_distill_loss`, which never holds more than a chunk of logits.

Peak extra memory is measured as in :mod:`benchmarks.harness`: the CUDA allocator's peak above
the inputs, or on the CPU the peak-RSS growth of a fresh subprocess running the provider once.
On CUDA (bf16, V = 128256 too) GB/s counts the logit bytes the op must move (both logit tensors
read, the gradient written) against the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    Row,
    copy_bandwidth_gbs,
    cuda_peak_extra_mb,
    peak_rss_growth_mb,
    subprocess_peak_extra_mb,
    time_fn,
)
from qmetrics.losses import distill_loss, linear_distill_loss

LOGIT_PROVIDERS = ("eager", "eager_compile", "qmetrics")
LINEAR_PROVIDERS = ("eager_linear", "qmetrics_linear")
PROVIDERS = LOGIT_PROVIDERS + LINEAR_PROVIDERS
CPU_SHAPES = [(4096, 32000)]
CUDA_SHAPES = [(4096, 32000), (4096, 128256)]
HIDDEN = 256  # hidden size of the linear providers (student and teacher)


def eager_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0):
    """The hand-written loss: KL(P‖Q) via F.kl_div on fp32 log-softmax / softmax copies."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    p = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean")


_COMPILED: dict[str, Callable] = {}


def make_inputs(provider: str, n: int, vocab: int, dtype: torch.dtype, device: str, seed=0):
    """Inputs of one provider: (student, teacher) logits, or (h_s, W_s, h_t, W_t)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if provider in LOGIT_PROVIDERS:
        teacher = torch.empty(n, vocab, device=device, dtype=dtype).normal_(0, 3, generator=gen)
        student = torch.empty_like(teacher).normal_(0, 0.3, generator=gen).add_(teacher)
        return (student.requires_grad_(), teacher)
    shape_w = (vocab, HIDDEN)
    w_t = torch.empty(shape_w, device=device, dtype=dtype).normal_(0, 0.1, generator=gen)
    w_s = torch.empty_like(w_t).normal_(0, 0.01, generator=gen).add_(w_t)
    h_t = torch.empty(n, HIDDEN, device=device, dtype=dtype).normal_(0, 1, generator=gen)
    h_s = torch.empty_like(h_t).normal_(0, 0.1, generator=gen).add_(h_t)
    return (h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t)


def provider_step(provider: str) -> Callable:
    """``f(*inputs)``: forward + backward of the provider's loss; clears the input grads."""

    def finish(loss, *inputs):
        loss.backward()
        for t in inputs:
            t.grad = None
        return loss.detach()

    if provider == "eager":
        return lambda s, t: finish(eager_kl(s, t), s)
    if provider == "eager_compile":
        if "eager" not in _COMPILED:
            _COMPILED["eager"] = torch.compile(eager_kl)
        return lambda s, t: finish(_COMPILED["eager"](s, t), s)
    if provider == "qmetrics":
        return lambda s, t: finish(distill_loss(s, t), s)
    if provider == "eager_linear":
        return lambda hs, ws, ht, wt: finish(eager_kl(hs @ ws.T, ht @ wt.T), hs, ws)
    if provider == "qmetrics_linear":
        return lambda hs, ws, ht, wt: finish(linear_distill_loss(hs, ws, ht, wt), hs, ws)
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def cpu_peak_extra_mb(provider: str, n: int, vocab: int, dtype: str = "float32") -> float:
    """Peak RSS growth of one forward + backward, measured in a fresh subprocess, in MiB."""
    return subprocess_peak_extra_mb(
        "benchmarks.distill_table:cpu_memory_child", provider, n, vocab, dtype
    )


def cpu_memory_child(provider: str, n: int, vocab: int, dtype: str) -> float:
    """In the subprocess: build the inputs (compile first for ``eager_compile``), then
    measure one forward + backward."""
    inputs = make_inputs(provider, n, vocab, getattr(torch, dtype), "cpu")
    step = provider_step(provider)
    if provider == "eager_compile":
        step(*make_inputs(provider, 8, vocab, getattr(torch, dtype), "cpu"))  # compile first
    return peak_rss_growth_mb(lambda: step(*inputs))


def run(device: str, shapes, dtype: torch.dtype, providers=PROVIDERS) -> list[Row]:
    """Measure every provider on every shape; speedups are against ``eager`` / ``eager_linear``."""
    rows: list[Row] = []
    copy_bw = copy_bandwidth_gbs(device) if device == "cuda" else None
    dname = str(dtype).removeprefix("torch.")
    for n, vocab in shapes:
        base: dict[str, float] = {}
        for provider in providers:
            inputs = make_inputs(provider, n, vocab, dtype, device)
            call = functools.partial(provider_step(provider), *inputs)
            try:
                med, p20, p80 = time_fn(call, device, reps=3)
                if device == "cuda":
                    peak = cuda_peak_extra_mb(call)
                else:
                    peak = cpu_peak_extra_mb(provider, n, vocab, dname)
            except Exception as exc:  # a provider that cannot run here is reported, not fatal
                rows.append(Row(device, provider, n, vocab, dname, 0, 0, 0, error=repr(exc)))
                continue
            family = "linear" if provider in LINEAR_PROVIDERS else "logits"
            if provider.startswith("eager") and family not in base:
                base[family] = med
            # logits read twice (sweeps) and the gradient written: the floor is 3·N·V elements
            gbs = 3 * n * vocab * dtype.itemsize / (med * 1e-3) / 1e9
            rows.append(
                Row(
                    device,
                    provider,
                    n,
                    vocab,
                    dname,
                    med,
                    p20,
                    p80,
                    speedup=base[family] / med if family in base else None,
                    peak_extra_mb=peak,
                    gbs=gbs if device == "cuda" else None,
                    pct_copy_bw=100 * gbs / copy_bw if copy_bw and provider == "qmetrics" else None,
                )  # fmt: skip
            )
            del inputs, call
    return rows


def markdown(rows: list[Row]) -> str:
    """The table as Markdown."""
    lines = [
        "| provider | N | V | dtype | median ms (p20–p80) | speedup vs eager | peak extra MiB "
        "| GB/s | % copy BW |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.provider} | {r.n} | {r.vocab} | {r.dtype} | error: {r.error} "
                         "| | | | |")  # fmt: skip
            continue
        sp = f"{r.speedup:.2f}×" if r.speedup else ""
        gbs = f"{r.gbs:.0f}" if r.gbs else ""
        pct = f"{r.pct_copy_bw:.0f}%" if r.pct_copy_bw else ""
        lines.append(
            f"| {r.provider} | {r.n} | {r.vocab} | {r.dtype} | {r.ms:.1f} ({r.ms_p20:.1f}–"
            f"{r.ms_p80:.1f}) | {sp} | {r.peak_extra_mb:.1f} | {gbs} | {pct} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write distill_loss.{json,md} here")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes, dtype = (
        (CUDA_SHAPES, torch.bfloat16) if device == "cuda" else (CPU_SHAPES, torch.float32)
    )
    rows = run(device, shapes, dtype, tuple(args.providers.split(",")))
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "hidden": HIDDEN,
        }
        (args.out / "distill_loss.md").write_text(table + "\n")
        (args.out / "distill_loss.json").write_text(
            json.dumps({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=2)
        )


if __name__ == "__main__":
    main()
