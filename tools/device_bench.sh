#!/usr/bin/env bash
# The benchmark grids of docs/BENCHMARKS.md, one stage per device-machine call (each fits the
# 10-minute limit on an H100; call with timeout_s=600). Results land in $OUT/STAGE.tgz: the
# bench's CSV, JSON and PNGs, and its log. The bench is stopped at 570 s so the packing still
# happens; a stopped bench writes no CSV/JSON, but its log's progress lines hold every point
# that finished.
#
#   run(command="tools/device_bench.sh prefill-short")      # L 512..2048, eager and compiled
#   run(command="tools/device_bench.sh prefill-long")       # L 4096..16384
#   run(command="tools/device_bench.sh decode")             # graph-captured, 64 steps per point
#   run(command="tools/device_bench.sh generate")           # generate(), 8B geometry, 4 layers
#   run(command="tools/device_bench.sh prefill-model")      # 8-layer model, host-bound prefills
#   run(command="tools/device_bench.sh prefill-host")       # B=1,4 at 512-2048 tokens, timed --paired
#   run(command="tools/device_bench.sh prefill-steady")     # the same grid, timed --steady (back to back)
#
# Extra arguments go to `skipgpt bench` (e.g. --sparsity 0.25).
set -uo pipefail
export PYTHONUNBUFFERED=1
stage=${1:?usage: tools/device_bench.sh prefill-short|prefill-long|prefill-model|prefill-host|prefill-steady|decode|generate [bench args...]}
shift
OUT=${OUT:-/tmp/out}
# The device machine's copy of the working tree carries stale git metadata, so the results would
# name a wrong commit: start the call's command with SKIPGPT_SOURCE_COMMIT=<local HEAD's sha>.
work=/tmp/device-bench/$stage
mkdir -p "$OUT" "$work"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$work/install.log" 2>&1 || { cat "$work/install.log"; exit 1; }
all=hf,dense,triton-sparse,compiled-dense,compiled-sparse
case "$stage" in
prefill-short) args=(--mode prefill --batch-size 1,4,8 --seqlens 512,1024,2048 --sparsity 0,0.25,0.5 --providers $all) ;;
prefill-long)  args=(--mode prefill --batch-size 1,4,8 --seqlens 4096,8192,16384 --sparsity 0,0.25,0.5 --providers $all) ;;
decode)        args=(--mode decode --cuda-graph --decode-steps 64 --batch-size 1,8,64 --seqlens 2048,16384 --sparsity 0,0.25,0.5 --providers $all) ;;
prefill-model) args=(--scope model --mode prefill --layers 8 --batch-size 1,4 --seqlens 512,1024 --sparsity 0,0.25 --providers $all) ;;
prefill-host)  args=(--mode prefill --batch-size 1,4 --seqlens 512,1024,2048 --sparsity 0,0.25,0.5 --rounds 5 --paired --providers $all) ;;
prefill-steady) args=(--mode prefill --batch-size 1,4 --seqlens 512,1024,2048 --sparsity 0,0.25,0.5 --rounds 5 --steady --providers $all) ;;
generate)      args=(--mode generate --layers 4 --batch-size 1,8 --prompt-len 128 --new-tokens 128 --sparsity 0.25 --warmup 1500 --providers $all) ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$work/gpu.txt"
timeout 570 skipgpt bench "${args[@]}" "$@" --output "$work/out" 2>&1 | tee "$work/bench.log" | grep -v "^\[" 
rc=${PIPESTATUS[0]}
tar czf "$OUT/$stage.tgz" -C "$work" .
exit "$rc"
