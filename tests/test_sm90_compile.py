"""Every Triton kernel compiles for sm_90 (H100/H200) on this CPU-only machine, and the fast
logit kernel neither spills registers nor exceeds its instruction budget per logit.

The interpreter runs kernels as Python and so misses what only the compiler sees (a
non-constexpr global, a construct the GPU backend rejects, register spills). Triton compiles
ahead of time for any target with the ptxas its wheel ships, so ``benchmarks/sass_report.py``
does that in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]
# SASS instructions per logit on the fast kernel's hot path (34–35 on sm_90 with Triton 3.6 and
# 3.9 at maxnreg 168) and including the simulated dynamic cost of the top-k branch at
# top_k = 5: issue 10's target for the latter is 40 (37–39 measured;
# benchmarks/results/2026-12-03-sass/).
MAX_HOT_PER_LOGIT = 35.5
MAX_TOTAL_PER_LOGIT = 40.0


def _ptxas_available() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton with its bundled ptxas is needed")
def test_kernels_compile_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the installed Triton, bf16 and fp32 at top_k = 5, aligned and unaligned V, one split;
    # the full matrix (fp16, top_k 1 and 16, Triton 3.6) is the script's job
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sass_report.py"), "--quick", "--check",
         "--max-per-logit", str(MAX_TOTAL_PER_LOGIT)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "FAILED" not in out, out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| fast")]
    assert len(rows) == 5, out
    for cells in rows:
        name, regs, spill_b, hot_spill, blocks, hot = (c.strip() for c in cells[:6])
        total = float(cells[9])
        assert int(hot_spill) == 0, f"{name}: spill in the hot loop\n{out}"
        assert int(regs) <= 168 and int(blocks) >= 3, f"{name}: occupancy\n{out}"
        assert float(hot) <= MAX_HOT_PER_LOGIT, f"{name}: hot path\n{out}"
        assert float(hot) < total <= MAX_TOTAL_PER_LOGIT, f"{name}: with the top-k branch\n{out}"
    assert re.search(r"fast bf16 k=5 unaligned \|", out), out
