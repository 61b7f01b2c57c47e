"""Sweep the fused logit kernel's launch shape on a CUDA device and print a markdown table.

For N = 4096 rows of bf16 logits (V = 128256 and 32000 by default) it times
``logit_compare_triton`` for each tile width ``block_v``, ``num_warps`` and register cap
``maxnreg`` (0: uncapped; 168 is the default chosen offline by ``sass_report.py``), and reports
milliseconds, GB/s (both logit tensors read once) and the percentage of the measured
device-to-device copy bandwidth. The default launch shape is marked; a better one found here
should become the launcher's default. Usage::

    python -m benchmarks.tune_logit_kernel [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from benchmarks.harness import copy_bandwidth_gbs, make_inputs, time_fn


def sweep(n: int, vocabs: list[int], block_vs: list[int], warps: list[int],
          maxnregs: list[int]) -> list[dict]:  # fmt: skip
    from qmetrics.kernels.logit_compare import DEFAULT_MAXNREG, logit_compare_triton

    copy_bw = copy_bandwidth_gbs("cuda")
    rows = []
    for vocab in vocabs:
        ref, quant, labels = make_inputs(n, vocab, torch.bfloat16, "cuda")
        nbytes = 2 * ref.numel() * ref.element_size()
        default = logit_compare_triton(ref, quant, labels, top_k=5, ignore_index=-100)
        shapes = itertools.product([None, *block_vs], warps, maxnregs)
        for block_v, num_warps, maxnreg in shapes:
            if block_v is None and (num_warps != 4 or maxnreg != DEFAULT_MAXNREG):
                continue

            def run(bv=block_v, nw=num_warps, mr=maxnreg, r=ref, q=quant, lab=labels):
                return logit_compare_triton(r, q, lab, top_k=5, ignore_index=-100, block_v=bv,
                                            num_warps=nw, maxnreg=mr or None)  # fmt: skip

            try:
                got = run()
            except Exception as exc:  # a shape that does not compile is a finding, not a stop
                rows.append({"vocab": vocab, "block_v": block_v, "num_warps": num_warps,
                             "maxnreg": maxnreg,
                             "error": f"{type(exc).__name__}: {str(exc)[:120]}"})  # fmt: skip
                continue
            same = all(torch.allclose(got[k].float(), default[k].float(), rtol=1e-5,
                                      atol=1e-6, equal_nan=True) for k in default)  # fmt: skip
            med, lo, hi = time_fn(run, "cuda", reps=20)
            gbs = nbytes / (med * 1e-3) / 1e9
            rows.append({"vocab": vocab, "block_v": block_v or "default", "num_warps": num_warps,
                         "maxnreg": maxnreg, "ms": med, "ms_p20": lo, "ms_p80": hi, "gb_s": gbs,
                         "pct_copy_bw": 100 * gbs / copy_bw, "copy_bw_gb_s": copy_bw,
                         "matches_default": same})  # fmt: skip
        ref = quant = labels = default = None  # free before the next vocabulary's inputs
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| V | block_v | warps | maxnreg | ms | GB/s | % copy BW | same outputs |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['vocab']} | {r['block_v']} | {r['num_warps']} | "
                         f"{r['maxnreg'] or 'none'} | failed: {r['error']} | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {r['vocab']} | {r['block_v']} | {r['num_warps']} | {r['maxnreg'] or 'none'} | "
            f"{r['ms']:.3f} | "
            f"{r['gb_s']:.0f} | {r['pct_copy_bw']:.0f}% | {r['matches_default']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 32000])
    ap.add_argument("--block-v", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--num-warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--maxnreg", type=int, nargs="+", default=[168, 128, 0],
                    help="register caps to try (0: uncapped)")  # fmt: skip
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_logit_kernel needs a CUDA device")
    rows = sweep(args.n, args.vocab, args.block_v, args.num_warps, args.maxnreg)
    header = f"{torch.cuda.get_device_name()}, N={args.n}, bf16"
    table = markdown(rows)
    print(header)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune.md").write_text(f"{header}\n\n{table}\n")
        (args.out / "tune.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
