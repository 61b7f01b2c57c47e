#!/usr/bin/env bash
# On a CUDA machine: the test suite on the GPU (compiled Triton kernels, not the interpreter)
# and the benchmark table, writing everything to OUT_DIR. Well under 8 minutes on an H100.
#   bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -n 2
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/device.txt"
# Tests whose extras are missing there (lm-eval, datasets) skip themselves.
QMETRICS_TEST_DEVICE=cuda timeout 270 python3 -m pytest tests -q -p no:cacheprovider \
  2>&1 | tee "$out/tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 180 python3 -m benchmarks.compare_table --out "$out" 2>&1 | tee "$out/bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, benchmark exit $bench_rc" | tee -a "$out/device.txt"
exit $(( tests_rc || bench_rc ))
