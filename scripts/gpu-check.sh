#!/usr/bin/env bash
# The checks that need a CUDA device, on a machine that has one: the GPU
# tests (pinned staging, the CUDA generator, NCCL and gloo jobs on the GPU)
# and the saver benchmark with the state on the GPU. Usage:
#   bash scripts/gpu-check.sh [OUT_DIR] [STATE_GIB]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
size=${2:-4}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>&1 | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_staging.py tests/test_progress.py tests/test_cuda.py 2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}
python3 benchmarks/bench_saver.py --size-gb "$size" --rounds 3 --loop-windows 6 \
    2>&1 | tee "$out/saver.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
