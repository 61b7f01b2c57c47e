"""The fast kernel of commit 754ea16 (before issue 10) through this sass_report's hot-path and
top-k branch accounting. Run from the repository root without TRITON_INTERPRET."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

tmp = Path(tempfile.mkdtemp())
OLD = (("kernels/logit_compare.py", "lc_old.py"), ("benchmarks/sass_report.py", "sr_old.py"))
for src, dst in OLD:
    text = subprocess.run(["git", "show", f"754ea16:{src}"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    (tmp / dst).write_text(text.replace("import qmetrics.kernels.logit_compare as lc",
                                        "import lc_old as lc"))  # fmt: skip
sys.path[:0] = [str(tmp), "benchmarks", "."]
import sass_report as new  # noqa: E402
import sr_old  # noqa: E402
import triton  # noqa: E402
from qmetrics.kernels.logit_compare import blocks_per_sm  # noqa: E402

print(f"Triton {triton.__version__}, before (754ea16), no maxnreg, default enable_fp_fusion")
print("| kernel | regs | spill B | hot LDL/STL | blocks/SM | SASS/logit hot | top-k branch rate | "
      "rare branch per tile: rate×straight (all G sub-tiles) + inserts×trip | dynamic/logit | "
      "total/logit |")  # fmt: skip
print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
for kp, top_k in ((2, 1), (8, 5), (16, 16)):
    for v in sr_old.variants():
        if not v.name.startswith("fast") or "split" in v.name or "labels" not in v.name:
            continue
        v.constants["KP"] = kp
        k = sr_old.compile_variant(v)
        cubin = tmp / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        tool = sr_old._BIN / "cuobjdump"
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True,
                               text=True).stdout  # fmt: skip
        sass = subprocess.run([tool, "--dump-sass", cubin], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        regs, stack, shared, local = (int(g) for g in m.groups())
        r = new.main_loop(sass, v.elements_per_iteration)
        n = new._branch_rates(top_k, v.constants["G"], v.constants["ROWS"] * v.constants["VEC"])
        rate, ins = n["taken"], n["inserts"]
        dyn = (rate * r["rare_fixed"] + ins * r["rare_trip"]) / v.elements_per_iteration
        spill_ops = r["ops"]["LDL"] + r["ops"]["STL"]
        print(f"| {v.name} k={top_k} | {regs} | {stack + local} | {spill_ops} | "
              f"{blocks_per_sm(regs, 4, shared)} | {r['per_element']:.1f} | {rate:.0%} | "
              f"{rate:.2f}×{r['rare_fixed']:.0f} + {ins:.2f}×{r['rare_trip']:.0f} | {dyn:.1f} | "
              f"{r['per_element'] + dyn:.1f} |")  # fmt: skip
