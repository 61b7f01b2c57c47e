"""The distillation kernel compiles for sm_90 (H100/H200) without a GPU and without spills, for
every divergence in bf16 and fp32 (ahead-of-time compile, as in ``tests/test_sm90_compile.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_sm90_compile import _ptxas_available

ROOT = Path(__file__).resolve().parents[1]
_CHILD = """
from benchmarks.sass_report import Variant, report
import qmetrics.kernels.distill_loss as dl
for dt in ("bf16", "fp32"):
    for div in range(3):
        types = {"s_ptr": f"*{dt}", "s_stride": "i64", "t_ptr": f"*{dt}", "t_stride": "i64",
                 "g_ptr": f"*{dt}", "g_stride": "i64", "loss_ptr": "*fp32", "label_ptr": "*i64",
                 "ignore_index": "i64", "V": "i32", "inv_t": "fp32", "beta": "fp32",
                 "log_beta": "fp32", "log_1m_beta": "fp32", "scale_ptr": "*fp32"}
        consts = {"DIVERGENCE": div, "HAS_LABELS": True, "WRITE_GRAD": True, "BLOCK_V": 4096}
        r = report(Variant(f"distill-{dt}-{div}", dl._distill_loss_kernel, types, consts, 8), None)
        print(r["kernel"], r["registers"], r["spill_bytes"])
"""


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="triton with its bundled ptxas is needed")
def test_distill_kernel_compiles_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 6, proc.stdout
    for name, registers, spill_bytes in rows:
        assert int(spill_bytes) == 0, f"{name} spills {spill_bytes} bytes ({registers} registers)"
