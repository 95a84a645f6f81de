#!/usr/bin/env bash
# Device call: every Triton kernel under compute-sanitizer, on the op tests' small, odd shapes
# (N=0, L=1, odd sizes, padding, all/no tokens executing). The op tests run their kernels on
# CUDA when it is there (tests/helpers.py KERNEL_DEVICE), so the same cases the CPU suite runs
# in the Triton interpreter run here compiled.
# Usage (device machine, repo root): tools/device_memcheck.sh [pytest -k expression]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Without the caching allocator every tensor is its own cudaMalloc, so an access past a
# tensor's end is an error instead of a silent read of a neighbour in the same pool block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
K=${1:-}
compute-sanitizer --version | tail -1 | tee "$OUT/sanitizer.txt"
for tool in memcheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
    python3 -m pytest -q -p no:logging -p no:cacheprovider tests/ops -m "not gpu" ${K:+-k "$K"} \
    2>&1 | tee "$OUT/$tool.log" | tail -8
  echo "$tool exit: ${PIPESTATUS[0]}" | tee -a "$OUT/sanitizer.txt"
done
