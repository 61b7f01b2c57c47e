"""Print (and optionally save) the benchmark table of compare_logits against the naive baseline.

    python -m benchmarks.compare_table                 # CPU shape, or CUDA shapes on a GPU
    python -m benchmarks.compare_table --out DIR       # also DIR/compare_logits.{json,md}

Shapes: CUDA N=4096, V in {32000, 128256, 151936, 256000}, bf16; CPU N=1024, V=32000, fp32.
Columns: median time (20th-80th pct), speedup over the naive and the seed-style baselines
(:mod:`benchmarks.naive_baseline`) measured in the same run, peak extra memory (also as % of
the seed-style baseline's), and on CUDA GB/s (both logit tensors read once) and % of the
measured device-to-device copy bandwidth. With ``--out`` each row is appended to
DIR/compare_logits.md and DIR/compare_logits.rows.jsonl as soon as it is measured.
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

from benchmarks.harness import (
    Row,
    copy_bandwidth_gbs,
    cpu_peak_extra_mb,
    cuda_peak_extra_mb,
    make_inputs,
    provider_fn,
    time_fn,
    time_interleaved,
)

CUDA_SHAPES = [(4096, 32000), (4096, 128256), (4096, 151936), (4096, 256000)]
CPU_SHAPES = [(1024, 32000)]


def device_name(device: str) -> str:
    """Human-readable name of the device."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(
    device: str,
    shapes,
    dtype: torch.dtype,
    compile_shapes,
    providers,
    on_row: Callable[[Row], None] = lambda row: None,
) -> list[Row]:
    """Measure every provider on every shape (on the CPU interleaved, round by round), calling
    ``on_row`` with each row as soon as it is measured. Speedups are against ``naive`` and
    ``seed`` of the same shape, memory also as % of the seed's."""
    rows: list[Row] = []
    copy_bw = copy_bandwidth_gbs(device) if device == "cuda" else None
    dname = str(dtype).removeprefix("torch.")

    def emit(row: Row) -> None:
        rows.append(row)
        on_row(row)

    for n, vocab in shapes:
        ref, quant, labels = make_inputs(n, vocab, dtype, device)
        names = [p for p in providers if p != "naive_compile" or (n, vocab) in compile_shapes]
        calls = {p: functools.partial(provider_fn(p, device), ref, quant, labels) for p in names}
        timed: dict[str, tuple[float, float, float]] = {}
        errors: dict[str, str] = {}
        if device == "cpu":
            timed = time_interleaved(calls)
        base: dict[str, Row] = {}
        for provider in names:
            call = calls[provider]
            try:
                if device == "cuda":
                    timed[provider] = time_fn(call, device)
                    peak = cuda_peak_extra_mb(call)
                elif provider in timed:
                    peak = cpu_peak_extra_mb(provider, n, vocab, dname)
                else:
                    call()  # raises the error that left it out of the timing
                med, p20, p80 = timed[provider]
            except Exception as exc:  # a provider that cannot run here is reported, not fatal
                errors[provider] = repr(exc)
                emit(Row(device, provider, n, vocab, dname, 0, 0, 0, error=errors[provider]))
                continue
            gbs = (ref.nbytes + quant.nbytes) / (med * 1e-3) / 1e9
            row = Row(
                device, provider, n, vocab, dname, med, p20, p80,
                speedup=base["naive"].ms / med if "naive" in base else None,
                speedup_seed=base["seed"].ms / med if "seed" in base else None,
                peak_extra_mb=peak,
                pct_seed_mem=(100 * peak / base["seed"].peak_extra_mb
                              if "seed" in base and base["seed"].peak_extra_mb else None),
                gbs=gbs if device == "cuda" else None,
                pct_copy_bw=100 * gbs / copy_bw if copy_bw else None,
            )  # fmt: skip
            if provider in ("naive", "seed"):
                base[provider] = row
            emit(row)
        if device == "cuda":
            del ref, quant, labels, calls
            torch.cuda.empty_cache()
    return rows


HEADER_ROWS = (
    "| provider | N | V | dtype | median ms (p20–p80) | speedup vs naive | speedup vs seed "
    "| peak extra MiB | % of seed's memory | GB/s | % copy BW |",
    "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
)


def markdown_row(r: Row) -> str:
    """One Markdown table row."""
    if r.error:
        return f"| {r.provider} | {r.n} | {r.vocab} | {r.dtype} | failed: {r.error} |||||||"

    def fmt(value: float | None, spec: str, suffix: str = "") -> str:
        return "" if value is None else f"{value:{spec}}{suffix}"

    return (
        f"| {r.provider} | {r.n} | {r.vocab} | {r.dtype} | {r.ms:.2f} ({r.ms_p20:.2f}–"
        f"{r.ms_p80:.2f}) | {fmt(r.speedup, '.2f', '×')} | {fmt(r.speedup_seed, '.2f', '×')} "
        f"| {fmt(r.peak_extra_mb, '.1f')} | {fmt(r.pct_seed_mem, '.1f', '%')} "
        f"| {fmt(r.gbs, '.0f')} | {fmt(r.pct_copy_bw, '.0f', '%')} |"
    )


def markdown(rows: list[Row], header: str) -> str:
    """The table as Markdown."""
    return "\n".join([header, "", *HEADER_ROWS, *(markdown_row(r) for r in rows)])


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
        providers = ["seed", "naive", "naive_compile", "qmetrics", "qmetrics_torch"]
    else:
        shapes, dtype, compile_shapes = CPU_SHAPES, torch.float32, CPU_SHAPES
        providers = ["seed", "naive", "naive_compile", "qmetrics"]
    if args.no_compile:
        providers.remove("naive_compile")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"compare_logits on {device_name(device)}, {stamp}; torch {torch.__version__}" + (
        f", triton {__import__('triton').__version__}" if device == "cuda" else ""
    )
    md = json_rows = None
    if args.out:  # written row by row, so that a run cut short keeps what it measured
        args.out.mkdir(parents=True, exist_ok=True)
        md, json_rows = args.out / "compare_logits.md", args.out / "compare_logits.rows.jsonl"
        md.write_text("\n".join([header, "", *HEADER_ROWS]) + "\n")
        json_rows.write_text("")
    print("\n".join([header, "", *HEADER_ROWS]), flush=True)

    def on_row(row: Row) -> None:
        print(markdown_row(row), flush=True)
        if md is not None and json_rows is not None:
            with md.open("a") as fh:
                fh.write(markdown_row(row) + "\n")
            with json_rows.open("a") as fh:
                fh.write(json.dumps(row.to_dict()) + "\n")

    rows = run(device, shapes, dtype, compile_shapes, providers, on_row)
    if args.out:
        payload = {"header": header, "rows": [r.to_dict() for r in rows]}
        (args.out / "compare_logits.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
