"""Print (and optionally save) the benchmark table of compare_logits against the naive baseline.

    python -m benchmarks.compare_table                 # CPU shape, or CUDA shapes on a GPU
    python -m benchmarks.compare_table --out DIR       # also DIR/compare_logits.{json,md}

Shapes: CUDA N=4096, V in {32000, 128256, 151936, 256000}, bf16; CPU N=1024, V=32000, fp32.
Columns: median time (20th-80th pct), speedup over the naive baseline measured in the same run,
peak extra memory, and on CUDA GB/s (both logit tensors read once) and % of the measured
device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
from pathlib import Path

import torch

from benchmarks.harness import (
    Row,
    copy_bandwidth_gbs,
    cpu_peak_extra_mb,
    cuda_peak_extra_mb,
    make_inputs,
    provider_fn,
    time_fn,
)

CUDA_SHAPES = [(4096, 32000), (4096, 128256), (4096, 151936), (4096, 256000)]
CPU_SHAPES = [(1024, 32000)]


def device_name(device: str) -> str:
    """Human-readable name of the device."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(device: str, shapes, dtype: torch.dtype, compile_shapes, providers) -> list[Row]:
    """Measure every provider on every shape; the naive provider goes first."""
    rows: list[Row] = []
    copy_bw = copy_bandwidth_gbs(device) if device == "cuda" else None
    dname = str(dtype).removeprefix("torch.")
    for n, vocab in shapes:
        ref, quant, labels = make_inputs(n, vocab, dtype, device)
        base_ms = None
        for provider in providers:
            if provider == "naive_compile" and (n, vocab) not in compile_shapes:
                continue
            call = functools.partial(provider_fn(provider, device), ref, quant, labels)
            try:
                med, p20, p80 = time_fn(call, device)
                if device == "cuda":
                    peak = cuda_peak_extra_mb(call)
                else:
                    peak = cpu_peak_extra_mb(provider, n, vocab, dname)
            except Exception as exc:  # a provider that cannot run here is reported, not fatal
                rows.append(Row(device, provider, n, vocab, dname, 0, 0, 0, error=repr(exc)))
                continue
            if provider == "naive":
                base_ms = med
            gbs = (ref.nbytes + quant.nbytes) / (med * 1e-3) / 1e9
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
                    speedup=base_ms / med if base_ms else None,
                    peak_extra_mb=peak,
                    gbs=gbs if device == "cuda" else None,
                    pct_copy_bw=100 * gbs / copy_bw if copy_bw else None,
                )  # fmt: skip
            )
        if device == "cuda":
            del ref, quant, labels, call
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[Row], header: str) -> str:
    """The table as Markdown."""
    lines = [
        header,
        "",
        "| provider | N | V | dtype | median ms (p20–p80) | speedup vs naive | peak extra MiB "
        "| GB/s | % copy BW |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.provider} | {r.n} | {r.vocab} | {r.dtype} | failed: {r.error} "
                         "| | | | |")  # fmt: skip
            continue
        sp = f"{r.speedup:.2f}×" if r.speedup else ""
        gbs = f"{r.gbs:.0f}" if r.gbs else ""
        pct = f"{r.pct_copy_bw:.0f}%" if r.pct_copy_bw else ""
        lines.append(
            f"| {r.provider} | {r.n} | {r.vocab} | {r.dtype} | {r.ms:.2f} ({r.ms_p20:.2f}–"
            f"{r.ms_p80:.2f}) | {sp} | {r.peak_extra_mb:.1f} | {gbs} | {pct} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, help="folder for compare_logits.{json,md}")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baseline")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        shapes, dtype, compile_shapes = CUDA_SHAPES, torch.bfloat16, [(4096, 128256)]
        providers = ["naive", "naive_compile", "qmetrics", "qmetrics_torch"]
    else:
        shapes, dtype, compile_shapes = CPU_SHAPES, torch.float32, CPU_SHAPES
        providers = ["naive", "naive_compile", "qmetrics"]
    if args.no_compile:
        providers.remove("naive_compile")
    rows = run(device, shapes, dtype, compile_shapes, providers)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"compare_logits on {device_name(device)}, {stamp}; torch {torch.__version__}" + (
        f", triton {__import__('triton').__version__}" if device == "cuda" else ""
    )
    table = markdown(rows, header)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare_logits.md").write_text(table + "\n")
        payload = {"header": header, "rows": [r.to_dict() for r in rows]}
        (args.out / "compare_logits.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
