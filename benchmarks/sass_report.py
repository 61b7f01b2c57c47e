"""Compile qmetrics' Triton kernels for an NVIDIA GPU without one, and read the machine code.

Triton compiles ahead of time for any target with the ``ptxas`` it ships, so a CPU-only machine
can check what the interpreter cannot: that every kernel compiles (constexpr globals, loop
constructs, inline PTX), how many registers it takes, whether it spills to local memory, and how
many SASS instructions the fast kernel's main loop spends per logit — the number that decides
whether it can run at memory bandwidth. Usage::

    python benchmarks/sass_report.py            # table for sm_90 (H100/H200)
    python benchmarks/sass_report.py --check    # exit 1 on a compile failure or a hot-loop spill
    python benchmarks/sass_report.py --dump DIR # also write .ptx/.sass per kernel

Run it without ``TRITON_INTERPRET=1`` (kernels must be real ``JITFunction`` objects).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import qmetrics.kernels.hidden_compare as hc
import qmetrics.kernels.logit_compare as lc
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Arguments that the JIT specializes as 16-divisible for aligned inputs with V % 16 == 0.
_ALIGNED = {
    "ref_ptr", "quant_ptr", "cand_ptr", "label_ptr", "out_ptr", "state_ptr", "index_ptr",
    "top_ptr", "flag_ptr", "ref_stride", "quant_stride", "cand_stride", "V", "v_per_split", "H",
}  # fmt: skip


@dataclass
class Variant:
    """One specialization of a kernel: argument types, constexpr values, launch options."""

    name: str
    fn: object
    types: dict[str, str]  # argument name -> Triton type ("*bf16", "i32", ...); rest constexpr
    constants: dict[str, object]
    num_warps: int
    elements_per_iteration: int = 0  # logits per thread per main-loop trip (fast kernel only)
    must_not_spill: bool = True


def _logit_types(dtype: str) -> dict[str, str]:
    ptrs = {"ref_ptr": f"*{dtype}", "quant_ptr": f"*{dtype}", "label_ptr": "*i64",
            "out_ptr": "*fp32", "state_ptr": "*fp32", "index_ptr": "*i32", "top_ptr": "*fp32",
            "flag_ptr": "*i32"}  # fmt: skip
    ints = dict.fromkeys(("ref_stride", "quant_stride"), "i64") | dict.fromkeys(
        ("N", "V", "v_per_split", "ignore_index", "top_k", "SPLITS"), "i32"
    )
    return ptrs | ints


def variants(num_warps: int = 4, sub_tiles: int = 4) -> list[Variant]:
    """The specializations that ``logit_compare_triton`` and ``hidden_compare_triton`` launch on
    a GPU for the given tile shape."""
    out = []
    for dtype, esize in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        vec = 16 // esize
        for labels, partial in ((False, False), (True, False), (True, True)):
            if dtype != "bf16" and (labels, partial) != (True, False):
                continue
            const = {"HAS_LABELS": labels, "WRITE_PARTIAL": partial, "NUM_STATE_": lc.NUM_STATE,
                     "KP": 8, "G": sub_tiles, "ROWS": 32 * num_warps, "VEC": vec,
                     "PTX": True}  # fmt: skip
            tag = f"fast {dtype}{' labels' if labels else ''}{' split' if partial else ''}"
            out.append(Variant(tag, lc._fast_kernel, _logit_types(dtype), const, num_warps,
                               elements_per_iteration=sub_tiles * vec))  # fmt: skip
    types = {k: v for k, v in _logit_types("bf16").items() if k not in ("v_per_split", "SPLITS")}
    for k in ("state_ptr", "index_ptr", "top_ptr"):
        types.pop(k)
    out.append(Variant("general bf16 labels", lc._general_kernel,
                       {k: v for k, v in types.items()},
                       {"HAS_LABELS": True, "KP": 8, "BLOCK_V": 2048}, num_warps,
                       must_not_spill=False))  # fmt: skip
    merge = _logit_types("bf16")
    merge.pop("V")
    merge.pop("v_per_split")
    out.append(Variant("merge labels", lc._merge_splits_kernel, merge,
                       {"HAS_LABELS": True, "NUM_STATE_": lc.NUM_STATE, "KP": 8, "SPLITS_P2": 8},
                       4, must_not_spill=False))  # fmt: skip
    hidden = {"ref_ptr": "*bf16", "ref_stride": "i64", "cand_ptr": "*bf16", "cand_stride": "i64",
              "out_ptr": "*fp32", "N": "i32", "H": "i32"}  # fmt: skip
    out.append(Variant("hidden bf16", hc._hidden_compare_kernel, hidden, {"BLOCK_H": 4096}, 8))
    return out


def compile_variant(v: Variant, arch: int = 90):
    """Compile one variant for ``sm_<arch>``; returns Triton's compiled kernel."""
    names = v.fn.arg_names
    signature = {n: v.types.get(n, "constexpr") for n in names}
    missing = [n for n in names if signature[n] == "constexpr" and n not in v.constants]
    if missing:
        raise ValueError(f"{v.name}: no type or value for {missing}")
    constexprs = {(names.index(k),): val for k, val in v.constants.items()}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in _ALIGNED}
    src = ASTSource(v.fn, signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": v.num_warps})


def _instructions(sass: str) -> list[tuple[int, str]]:
    return [(int(m.group(1), 16), m.group(2))
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]  # fmt: skip


def main_loop_per_element(sass: str, elements: int) -> tuple[float, collections.Counter]:
    """SASS instructions per logit on the main loop's hot path: the loop with the most
    exponentials, minus the code of the rare branch that updates the top-k buffer (the first
    forward branch after the loop's cross-thread max)."""
    ins = _instructions(sass)
    at = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, text) in enumerate(ins):
        # a loop's back edge is a conditional branch backwards (unconditional ones jump back
        # from out-of-line blocks)
        m = re.search(r"^@!?P\d BRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            loops.append((i - at[int(m.group(1), 16)], at[int(m.group(1), 16)], i))

    # the main loop: the one holding the most exponentials (MUFU.EX2), innermost on a tie
    def ex2(lp: tuple[int, int, int]) -> tuple[int, int]:
        return sum("MUFU.EX2" in t for _, t in ins[lp[1] : lp[2]]), -lp[0]

    _, lo, hi = max(loops, key=ex2)
    hot, skip_to, seen_shfl = [], None, False
    for a, text in ins[lo : hi + 1]:
        if skip_to is not None and a < skip_to:
            continue
        hot.append(text)
        seen_shfl |= "SHFL" in text
        m = re.search(r"@!?P\d BRA\b.*?0x([0-9a-f]+)", text)
        if m and skip_to is None and seen_shfl and int(m.group(1), 16) > a:
            skip_to = int(m.group(1), 16)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in hot)
    return len(hot) / elements, ops


def report(v: Variant, dump: Path | None) -> dict[str, object]:
    k = compile_variant(v)
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"qmetrics_{os.getpid()}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    try:
        usage = subprocess.run([_BIN / "cuobjdump", "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([_BIN / "cuobjdump", "--dump-sass", cubin],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    finally:
        cubin.unlink()
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, _, local = (int(g) for g in m.groups())
    row = {"kernel": v.name, "warps": v.num_warps, "registers": regs,
           "spill_bytes": stack + local, "per_element": None, "top_ops": "",
           "hot_spill_ops": 0}  # fmt: skip
    if v.elements_per_iteration:
        per, ops = main_loop_per_element(sass, v.elements_per_iteration)
        row["per_element"] = per
        row["hot_spill_ops"] = ops["LDL"] + ops["STL"]
        row["top_ops"] = " ".join(f"{op}:{n / v.elements_per_iteration:.1f}"
                                  for op, n in ops.most_common(8))  # fmt: skip
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        stem = v.name.replace(" ", "_")
        (dump / f"{stem}.ptx").write_text(k.asm["ptx"])
        (dump / f"{stem}.sass").write_text(sass)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 on failure or hot-loop spill")
    ap.add_argument("--dump", type=Path, help="write .ptx and .sass files here")
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--sub-tiles", type=int, default=4)
    ap.add_argument("--only", help="compile only variants whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    failed = False
    print(f"{'kernel':24} {'warps':>5} {'regs':>5} {'spill B':>8} {'hot LDL/STL':>11} "
          f"{'SASS/logit':>10}  hot-loop mix")  # fmt: skip
    for v in variants(args.num_warps, args.sub_tiles):
        if args.only and args.only not in v.name:
            continue
        try:
            r = report(v, args.dump)
        except Exception as exc:  # a compile error is the finding: report it and go on
            print(f"{v.name:24} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            failed = True
            continue
        per = "" if r["per_element"] is None else f"{r['per_element']:.1f}"
        print(f"{r['kernel']:24} {r['warps']:>5} {r['registers']:>5} {r['spill_bytes']:>8} "
              f"{r['hot_spill_ops']:>11} {per:>10}  {r['top_ops']}")  # fmt: skip
        # a spill on the main loop's hot path costs every tile; elsewhere it is harmless
        failed |= v.must_not_spill and r["hot_spill_ops"] > 0
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
