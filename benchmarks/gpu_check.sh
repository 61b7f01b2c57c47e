#!/usr/bin/env bash
# On a CUDA machine: the benchmark table (`qmetrics bench --device cuda`, the command users
# run), the kernel's launch-shape sweep and the test suite on the GPU (compiled Triton kernels,
# not the interpreter), writing everything to OUT_DIR. At most about 8 minutes (each step has a
# timeout: 180 + 80 + 40 + 170 s, plus the install).
#   bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# Install (no network, no build isolation: the box's own setuptools builds it). A failure stops
# the run loudly, with pip's whole output kept in OUT_DIR/install.txt.
if ! python3 -m pip install --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1; then
  cat "$out/install.txt"
  echo "gpu_check: pip install -e . FAILED (full log above and in $out/install.txt)" >&2
  exit 3
fi
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/device.txt"
# 1. The acceptance table: every op (compare, stats, distill) against the eager, seed and
# torch.compile baselines at N=4096, V in {32000, 128256}, bf16, with GB/s and % of the copy_
# bandwidth. $out/bench.json is rewritten after every case, so a run cut short keeps them;
# bench.md is the same table as Markdown.
timeout 180 python3 -m qmetrics bench --device cuda --dtype bf16 --json "$out/bench.json" \
  2>&1 | tee "$out/bench.txt"
bench_rc=${PIPESTATUS[0]}
python3 -c "import json, sys; from qmetrics.reports.bench import render_markdown as md
print(md(json.load(open(sys.argv[1]))))" "$out/bench.json" >"$out/bench.md" 2>&1
# 2. The launch-shape sweep of the fused kernel (tile width x warps), to pick the defaults.
timeout 80 python3 -m benchmarks.tune_logit_kernel --out "$out" 2>&1 | tee "$out/tune.txt"
tune_rc=${PIPESTATUS[0]}
# 3. The output monitor's cost beside the forward on the GPU (issue 13: < 2% of the forward).
timeout 40 python3 -m benchmarks.monitor_overhead --device cuda --repeats 11 2>&1 \
  | tee "$out/monitor_overhead.txt"
monitor_rc=${PIPESTATUS[0]}
# 4. The test suite on the GPU; tests whose extras are missing there (lm-eval, datasets) skip
# themselves. Last, because compiling every kernel specialization takes most of its time.
# Every kernel specialization compiles once per process: spread them over 8 workers when
# pytest-xdist is there (it is on the lent machines' image).
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
# --continue-on-collection-errors: a module that fails to import is reported, the rest run.
QMETRICS_TEST_DEVICE=cuda timeout 170 python3 -m pytest tests -q -p no:cacheprovider $parallel \
  --continue-on-collection-errors --ignore=tests/test_sm90_compile.py 2>&1 | tee "$out/tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "benchmark exit $bench_rc, tuning exit $tune_rc, monitor exit $monitor_rc," \
  "tests exit $tests_rc" | tee -a "$out/device.txt"
exit $(( bench_rc || tune_rc || monitor_rc || tests_rc ))
