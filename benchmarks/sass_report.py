"""Compile qmetrics' Triton kernels for an NVIDIA GPU without one, and read the machine code.

Triton compiles ahead of time for any target with the ``ptxas`` it ships, so a CPU-only machine
can check what the interpreter cannot: that every kernel compiles (constexpr globals, loop
constructs, inline PTX), how many registers it takes, whether it spills to local memory, and how
many SASS instructions the fast kernel's main loop spends per logit — the number that decides
whether it can run at memory bandwidth. Usage::

    python benchmarks/sass_report.py            # table for sm_90 (H100/H200)
    python benchmarks/sass_report.py --check    # exit 1 on a compile failure, a hot-loop spill
                                                # or > --max-per-logit SASS per logit (dynamic)
    python benchmarks/sass_report.py --quick    # a representative subset (the CI test)
    python benchmarks/sass_report.py --dump DIR # also write .ptx/.sass per kernel
    /tmp/venv36/bin/python benchmarks/sass_report.py   # the same under another Triton

The fast kernel is compiled for bf16/fp16/fp32, top_k ∈ {1, 5, 16} and two layouts: aligned
(V % 16 = 0, aligned base: the JIT's divisibility specialization) and unaligned (V = 50257 or
``x[..., 1:]``: no specialization; the kernel peels a head to keep 16-byte loads). Columns:
registers per thread, spill bytes, spill instructions in the hot loop, resident blocks per SM
(registers, warps, shared memory), SASS per logit on the hot path, and the dynamic cost of the
rare top-k branch per logit: each part of its code (``_rare_branch``: the entry, the anchor
move, a reread sub-tile, a trip of the insertion loop, a count of a value's copies, one
insertion) × how often it runs per tile, replayed on iid N(0, 2²) logits at V = 128256 (the
issue's "realistic logits": the rates depend only on where new top-k values appear) by
``simulate_topk_branch``, which follows the kernel's logic step by step.

Run it without ``TRITON_INTERPRET=1`` (kernels must be real ``JITFunction`` objects).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import qmetrics.kernels.hidden_compare as hc
import qmetrics.kernels.logit_compare as lc
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Arguments that the JIT specializes as 16-divisible for aligned inputs with V % 16 == 0.
_ALIGNED = {
    "ref_ptr", "quant_ptr", "cand_ptr", "label_ptr", "out_ptr", "state_ptr", "index_ptr",
    "top_ptr", "flag_ptr", "ref_sb", "ref_st", "quant_sb", "quant_st", "ref_stride",
    "cand_stride", "V", "v_per_split", "H", "base_mis",
}  # fmt: skip
# With V = 50257 or x[..., 1:] only the buffers qmetrics allocates and v_per_split (a multiple
# of the tile) stay 16-divisible.
_UNALIGNED_KEEP = {"label_ptr", "out_ptr", "state_ptr", "index_ptr", "top_ptr", "flag_ptr",
                   "v_per_split"}  # fmt: skip
MAX_PER_LOGIT = 40.0  # hot path + dynamic top-k cost at top_k = 5 (issue 10)


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
    aligned: bool = True  # divisibility specialization of pointers, strides and V
    maxnreg: int | None = None
    top_k: int = 0  # > 0: simulate the rare top-k branch at this k
    tile: tuple[int, int] = (0, 0)  # (G, ROWS·VEC): the fast kernel's tile shape


def _logit_types(dtype: str) -> dict[str, str]:
    ptrs = {"ref_ptr": f"*{dtype}", "quant_ptr": f"*{dtype}", "label_ptr": "*i64",
            "out_ptr": "*fp32", "state_ptr": "*fp32", "index_ptr": "*i32", "top_ptr": "*fp32",
            "flag_ptr": "*i32"}  # fmt: skip
    ints = dict.fromkeys(("ref_sb", "ref_st", "quant_sb", "quant_st"), "i64") | dict.fromkeys(
        ("N", "T", "V", "v_per_split", "ignore_index", "top_k", "SPLITS", "base_mis"), "i32"
    )
    return ptrs | ints


def variants(num_warps: int = 4, sub_tiles: int = 4, maxnreg: int | None = lc.DEFAULT_MAXNREG,
             quick: bool = False) -> list[Variant]:  # fmt: skip
    """The specializations that ``logit_compare_triton`` and ``hidden_compare_triton`` launch on
    a GPU for the given tile shape (``quick``: bf16 and fp32 at top_k = 5 only)."""
    out = []
    dtypes = (("bf16", 2), ("fp32", 4)) if quick else (("bf16", 2), ("fp16", 2), ("fp32", 4))
    for dtype, esize in dtypes:
        vec = 16 // esize
        for top_k in (5,) if quick else (1, 5, 16):
            for aligned in (True, False):
                kp = max(2, 1 << (top_k - 1).bit_length())
                const = {"HAS_LABELS": True, "WRITE_PARTIAL": False,
                         "NUM_STATE_": lc.NUM_STATE, "KP": kp, "G": sub_tiles,
                         "ROWS": 32 * num_warps, "VEC": vec, "PTX": True,
                         "ALIGN_X": 16, "ALIGN_Y": 16}  # fmt: skip
                tag = f"fast {dtype} k={top_k} {'aligned' if aligned else 'unaligned'}"
                out.append(Variant(tag, lc._fast_kernel, _logit_types(dtype), const, num_warps,
                                   elements_per_iteration=sub_tiles * vec, aligned=aligned,
                                   maxnreg=maxnreg, top_k=top_k,
                                   tile=(sub_tiles, 32 * num_warps * vec)))  # fmt: skip
    const = {"HAS_LABELS": True, "WRITE_PARTIAL": True, "NUM_STATE_": lc.NUM_STATE, "KP": 8,
             "G": sub_tiles, "ROWS": 32 * num_warps, "VEC": 8, "PTX": True, "ALIGN_X": 16,
             "ALIGN_Y": 16}  # fmt: skip
    out.append(Variant("fast bf16 k=5 split", lc._fast_kernel, _logit_types("bf16"), const,
                       num_warps, elements_per_iteration=sub_tiles * 8, maxnreg=maxnreg,
                       top_k=5, tile=(sub_tiles, 32 * num_warps * 8)))  # fmt: skip
    if quick:
        return out
    types = {k: v for k, v in _logit_types("bf16").items()
             if k not in ("v_per_split", "SPLITS", "base_mis", "state_ptr", "index_ptr",
                          "top_ptr")}  # fmt: skip
    out.append(Variant("general bf16 labels", lc._general_kernel, types,
                       {"HAS_LABELS": True, "KP": 8, "BLOCK_V": 1024}, num_warps,
                       must_not_spill=False))  # fmt: skip
    merge = {k: v for k, v in _logit_types("bf16").items() if k not in ("v_per_split", "base_mis")}
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
    divisible = _ALIGNED if v.aligned else _UNALIGNED_KEEP
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in divisible}
    src = ASTSource(v.fn, signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": v.num_warps, "enable_fp_fusion": True}
    if v.maxnreg:
        options["maxnreg"] = v.maxnreg
    return triton.compile(src, target=target, options=options)


def simulate_topk_branch(top_k: int, sub_tiles: int, sub: int, vocab: int = 128256,
                         rows: int = 16, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Per-tile counts of the fast kernel's rare-branch events, replaying its logic on iid
    N(0, 2²) rows (the quant row taken equal to the reference, so one anchor stands for
    both): ``taken`` (tiles entering the branch: a sub-tile's maximum above the k-th largest
    value so far, or the tile's maximum above the exp anchor + 4), ``anchor`` (tiles moving
    the anchor), ``flagged`` (sub-tiles reread), ``trips`` (trips of the insertion loop: one
    per distinct candidate value taken in turn, the last possibly not inserted), ``counts``
    (trips counting the copies of their value: more than one candidate left) and
    ``inserts`` (values inserted, one per copy)."""
    rng = np.random.default_rng(seed)
    n = collections.Counter()
    for _ in range(rows):
        x = (2 * rng.standard_normal(vocab)).astype(np.float32)
        top = [-np.inf] * top_k  # ascending: top[0] is the k-th largest so far
        anchor = float(x[:sub].max())
        for start in range(0, vocab, sub_tiles * sub):
            parts = [x[start + g * sub : start + (g + 1) * sub] for g in range(sub_tiles)]
            parts = [p for p in parts if p.size]
            flags = [float(p.max()) > top[0] for p in parts]
            tile_max = max(float(p.max()) for p in parts)
            n["tiles"] += 1
            if not (any(flags) or tile_max > anchor + 4):
                continue
            n["taken"] += 1
            if tile_max > anchor + 4:
                n["anchor"] += 1
                anchor = tile_max
            for p, flag in zip(parts, flags, strict=True):
                if not flag:
                    continue
                n["flagged"] += 1
                cand = np.sort(p[p > top[0]])[::-1]
                n_left = cand.size
                while n_left > 0:
                    n["trips"] += 1
                    cv = float(cand[cand.size - n_left])
                    n_eq = 1
                    if n_left > 1:
                        n["counts"] += 1
                        n_eq = int((cand == cv).sum())
                    n_left -= n_eq
                    while n_eq > 0 and cv > top[0]:
                        n["inserts"] += 1
                        top = sorted([*top[1:], cv])
                        n_eq -= 1
                    if not cv > top[0]:
                        n_left = 0
    return {key: n[key] / n["tiles"]
            for key in ("taken", "anchor", "flagged", "trips", "counts", "inserts")}  # fmt: skip


def _instructions(sass: str) -> list[tuple[int, str]]:
    return [(int(m.group(1), 16), m.group(2))
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]  # fmt: skip


def _loops(ins: list[tuple[int, str]], lo: int, hi: int) -> list[tuple[int, int]]:
    """(first, last) instruction indices of the loops in ins[lo:hi]: a loop's back edge is a
    conditional branch backwards (unconditional ones jump back from out-of-line blocks)."""
    at = {a: i for i, (a, _) in enumerate(ins)}
    out = []
    for i in range(lo, hi):
        a, text = ins[i]
        m = re.search(r"^@!?P\d BRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and lo <= at.get(int(m.group(1), 16), -1):
            out.append((at[int(m.group(1), 16)], i))
    return out


def _forward_branches(ins: list[tuple[int, str]], lo: int, hi: int) -> list[tuple[int, int]]:
    """(index, target index) of the conditional forward branches in ins[lo:hi]."""
    at = {a: i for i, (a, _) in enumerate(ins)}
    out = []
    for i in range(lo, hi):
        m = re.search(r"@!?P\d BRA\b.*?0x([0-9a-f]+)", ins[i][1])
        j = at.get(int(m.group(1), 16), -1) if m else -1
        if j > i:
            out.append((i, j))
    return out


def _rare_branch(ins: list[tuple[int, str]], lo: int, hi: int,
                 strict: bool = False) -> dict[str, float]:  # fmt: skip
    """Lengths of the parts of the rare top-k branch ins[lo:hi], each run at its own rate:

    ``fixed`` (every entry: what is outside the blocks below), ``anchor`` (the block moving
    the exp anchors, skipped by the first forward branch), per reread sub-tile ``sub`` (the
    block behind its "flagged" test, less its insertion loop), and inside the insertion loop:
    ``trip`` (one trip, less the blocks below), ``count`` (the block counting the copies of a
    value, skipped by a forward branch) and ``insert`` (the inner loop: one insertion).
    A branch without per-sub-tile blocks, each holding one insertion loop with one inner loop
    (commit 754ea16: every sub-tile reread, one loop trip per insertion) is all ``fixed`` but
    its loops, one ``trip`` per insertion; ``strict`` makes that an error instead."""
    loops = _loops(ins, lo, hi)

    def nested(lp: tuple[int, int]) -> bool:
        return any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in loops)

    outer = sorted(lp for lp in loops if not nested(lp))
    fwd = _forward_branches(ins, lo, hi)
    blocks, prev = [], lo
    for b, e in outer:  # each sub-tile's "flagged" test jumps past its insertion loop
        test = next(((i, j) for i, j in fwd if prev <= i < b and e < j <= hi), None)
        if test is None:
            break
        blocks.append(test)
        prev = test[1]
    r = dict.fromkeys(("fixed", "anchor", "sub", "trip", "count", "insert"), 0.0)
    inner = [[lp for lp in loops if b < lp[0] and lp[1] < e] for b, e in outer]
    if len(blocks) != len(outer) or not outer or any(len(lps) != 1 for lps in inner):
        if strict:
            raise ValueError("rare branch: no per-sub-tile blocks with one insertion loop each")
        in_loops = sum(e - b + 1 for b, e in outer)
        r["trip"] = in_loops / len(outer) if outer else 0.0
        r["fixed"] = hi - lo - in_loops
        return r
    first = blocks[0][0]
    anchor = next(((i, j) for i, j in fwd if lo <= i < first and j <= first), None)
    r["anchor"] = anchor[1] - anchor[0] - 1 if anchor else 0
    subs, trips, counts, inserts = [], [], [], []
    for (i, j), (b, e), [(ib, ie)] in zip(blocks, outer, inner, strict=True):
        count = [(p, q) for p, q in fwd if b <= p < ib and q <= ib]
        c = count[0][1] - count[0][0] - 1 if count else 0
        subs.append(j - i - 1 - (e - b + 1))
        inserts.append(ie - ib + 1)
        counts.append(c)
        trips.append(e - b + 1 - (ie - ib + 1) - c)
    r["sub"] = sum(subs) / len(subs)
    r["trip"] = sum(trips) / len(trips)
    r["count"] = sum(counts) / len(counts)
    r["insert"] = sum(inserts) / len(inserts)
    r["fixed"] = hi - lo - r["anchor"] - sum(j - i - 1 for i, j in blocks)
    return r


def main_loop(sass: str, elements: int, strict: bool = False) -> dict[str, object]:
    """The fast kernel's main loop: SASS per logit on the hot path (the loop with the most
    exponentials, minus the rare branch: the first forward branch after the loop's first
    cross-thread reduction), its op mix, and the rare branch's parts (``_rare_branch``) as
    ``rare_<part>`` (``strict``: the branch must have the current kernel's structure)."""
    ins = _instructions(sass)
    loops = _loops(ins, 0, len(ins))

    # the main loop: the one holding the most exponentials (MUFU.EX2), innermost on a tie
    def ex2(lp: tuple[int, int]) -> tuple[int, int]:
        return sum("MUFU.EX2" in t for _, t in ins[lp[0] : lp[1]]), lp[0] - lp[1]

    lo, hi = max(loops, key=ex2)
    hot, skip_to, seen_reduce, rare = [], None, False, None
    for i in range(lo, hi + 1):
        a, text = ins[i]
        if skip_to is not None and a < skip_to:
            continue
        hot.append(text)
        seen_reduce |= any(op in text for op in ("SHFL", "REDUX", "BAR"))
        m = re.search(r"@!?P\d BRA\b.*?0x([0-9a-f]+)", text)
        if m and skip_to is None and seen_reduce and int(m.group(1), 16) > a:
            skip_to = int(m.group(1), 16)
            end = next(j for j in range(i, len(ins)) if ins[j][0] >= skip_to)
            rare = (i + 1, end)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in hot)
    parts = _rare_branch(ins, *rare, strict=strict) if rare is not None else {}
    out = {"per_element": len(hot) / elements, "ops": ops}
    out.update({f"rare_{k}": v for k, v in parts.items()})
    return out


def main_loop_per_element(sass: str, elements: int) -> tuple[float, collections.Counter]:
    """SASS instructions per logit on the main loop's hot path and its op mix."""
    r = main_loop(sass, elements)
    return r["per_element"], r["ops"]


@functools.cache
def _branch_rates(top_k: int, sub_tiles: int, sub: int) -> dict[str, float]:
    return simulate_topk_branch(top_k, sub_tiles, sub)


# (simulated event per tile, part of the rare branch it runs), in the table's order
_EVENTS = (("taken", "fixed"), ("anchor", "anchor"), ("flagged", "sub"), ("trips", "trip"),
           ("counts", "count"), ("inserts", "insert"))  # fmt: skip


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
    regs, stack, shared, local = (int(g) for g in m.groups())
    shared = max(shared, int(getattr(k.metadata, "shared", 0) or 0))
    row = {"kernel": v.name, "warps": v.num_warps, "maxnreg": v.maxnreg, "registers": regs,
           "spill_bytes": stack + local, "blocks_per_sm": lc.blocks_per_sm(regs, v.num_warps,
                                                                          shared),
           "per_element": None, "dynamic": None, "total": None, "rate": None, "top_ops": "",
           "hot_spill_ops": 0}  # fmt: skip
    if v.elements_per_iteration:
        r = main_loop(sass, v.elements_per_iteration, strict=v.top_k > 0)
        ops = r["ops"]
        row["per_element"] = r["per_element"]
        row["hot_spill_ops"] = ops["LDL"] + ops["STL"]
        row["top_ops"] = " ".join(f"{op}:{n / v.elements_per_iteration:.1f}"
                                  for op, n in ops.most_common(6))  # fmt: skip
        if v.top_k:
            n = _branch_rates(v.top_k, *v.tile)
            dyn = sum(n[e] * r[f"rare_{part}"] for e, part in _EVENTS)
            row["rate"] = n["taken"]
            row["dynamic"] = dyn / v.elements_per_iteration
            row["total"] = row["per_element"] + row["dynamic"]
            row["rare"] = " + ".join(f"{n[e]:.2f}×{r[f'rare_{part}']:.0f}" for e, part in _EVENTS)
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        stem = v.name.replace(" ", "_")
        (dump / f"{stem}.ptx").write_text(k.asm["ptx"])
        (dump / f"{stem}.sass").write_text(sass)
    return row


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 1 on a compile failure, a hot-loop spill or a fast kernel past "
        "--max-per-logit (hot path + dynamic top-k cost) at top_k = 5",
    )
    ap.add_argument("--max-per-logit", type=float, default=MAX_PER_LOGIT)
    ap.add_argument("--dump", type=Path, help="write .ptx and .sass files here")
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--sub-tiles", type=int, default=4)
    ap.add_argument("--maxnreg", type=int, default=lc.DEFAULT_MAXNREG, help="0: uncapped")
    ap.add_argument("--quick", action="store_true", help="bf16 and fp32 at top_k = 5 only")
    ap.add_argument("--only", help="compile only variants whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    failed = False
    print(
        f"sm_90, Triton {triton.__version__}, num_warps {args.num_warps}, "
        f"maxnreg {args.maxnreg or 'none'}, enable_fp_fusion=True"
    )
    print(
        "| kernel | regs | spill B | hot LDL/STL | blocks/SM | SASS/logit hot | "
        "top-k branch rate | rare branch per tile: entries×fixed + anchor moves×len + "
        "sub-tiles×len + trips×len + copy counts×len + inserts×len | "
        "dynamic/logit | "
        "total/logit | hot-loop mix |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for v in variants(args.num_warps, args.sub_tiles, args.maxnreg or None, args.quick):
        if args.only and args.only not in v.name:
            continue
        try:
            r = report(v, args.dump)
        except Exception as exc:  # a compile error is the finding: report it and go on
            print(f"| {v.name} | FAILED: {type(exc).__name__}: {str(exc)[:300]} |")
            failed = True
            continue
        print(f"| {r['kernel']} | {r['registers']} | {r['spill_bytes']} | {r['hot_spill_ops']} | "
              f"{r['blocks_per_sm']} | {_fmt(r['per_element'], '.1f')} | "
              f"{_fmt(r['rate'], '.0%')} | {r.get('rare', '')} | {_fmt(r['dynamic'], '.1f')} | "
              f"{_fmt(r['total'], '.1f')} | {r['top_ops']} |")  # fmt: skip
        # a spill on the main loop's hot path costs every tile; elsewhere it is harmless
        failed |= v.must_not_spill and r["hot_spill_ops"] > 0
        failed |= v.top_k == 5 and r["total"] is not None and r["total"] > args.max_per_logit
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
