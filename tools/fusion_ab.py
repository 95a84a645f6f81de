"""The fused RMSNorm ops (norm_qkv, norm_gated_mlp) against the capacity form they replaced, one
Llama-3.1-8B layer at prefill (device machine). Per variant and point: wall time per step
(skipgpt.benchmark.cuda_timer, median), GPU time per step (torch.profiler: the step's kernels
summed), kernels per step, and the biggest kernels. Where wall time exceeds GPU time, the host
bounds the step.

Variants: hf (baseline); exact (triton-sparse, exact form); unfused (capacity form as before
norm_qkv: rms_norm_split, cuBLAS K/V, rope_kv_write, Q GEMM, rope, rms_norm, gated GEMM);
fused-qkv (norm_qkv, unfused MLP norm); prenorm-qkv (rms_norm, then norm_qkv without its norm;
unfused MLP norm); fused (norm_qkv and norm_gated_mlp).

    python tools/fusion_ab.py --points 1:512,1:1024,4:512 --skip 0.25 --rounds 2
"""
import argparse
import contextlib

import torch

import skipgpt.ops
from skipgpt import ops
from skipgpt.benchmark import LayerBench, cuda_timer

VARIANTS = ("hf", "exact", "unfused", "fused-qkv", "prenorm-qkv", "fused")
FUSED_QKV = skipgpt.ops.norm_qkv


def _unfused_mlp(x, norm_weight, eps, w_gate, w_up, activation, rows, count=None):
    return ops.gated_mlp(ops.rms_norm(x, norm_weight, eps, rows, count), w_gate, w_up, activation, count)


def _prenorm_qkv(x, norm_weight, eps, *rest):
    return FUSED_QKV(ops.rms_norm(x, norm_weight, eps), None, eps, *rest)


@contextlib.contextmanager
def variant(bench, name):
    layer, state = bench.routed, bench.state
    saved = (layer.fuses_qkv, skipgpt.ops.norm_gated_mlp, skipgpt.ops.norm_qkv, state.capacity_max_tokens)
    try:
        state.use_form("exact" if name == "exact" else "capacity")
        layer.fuses_qkv = name in ("fused-qkv", "prenorm-qkv", "fused")
        if name in ("unfused", "fused-qkv", "prenorm-qkv"):
            skipgpt.ops.norm_gated_mlp = _unfused_mlp
        if name == "prenorm-qkv":
            skipgpt.ops.norm_qkv = _prenorm_qkv
        yield
    finally:
        layer.fuses_qkv, skipgpt.ops.norm_gated_mlp, skipgpt.ops.norm_qkv, state.capacity_max_tokens = saved


def gpu_time(fn, steps=10):
    """(GPU us per step, kernels per step, [(kernel, us per step)] biggest first)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels_ = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels_) / steps
    launches = sum(e.count for e in kernels_) / steps
    top = sorted(kernels_, key=lambda e: -e.self_device_time_total)[:6]
    return total, launches, [(e.key[:60], e.self_device_time_total / steps) for e in top]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="1:512,1:1024,4:512", help="comma-separated B:L prefill points")
    parser.add_argument("--skip", type=float, default=0.25, help="skip rate of the forced routes (default 0.25)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=2, help="wall-time rounds over the variants (default 2)")
    args = parser.parse_args()
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    names = args.variants.split(",")
    for point in args.points.split(","):
        B, L = (int(v) for v in point.split(":"))
        walls = {name: [] for name in names}
        for _ in range(args.rounds):  # interleaved: the host's speed drifts within a call
            for name in names:
                with variant(bench, name):
                    provider = "hf" if name == "hf" else "triton-sparse"
                    walls[name].append(cuda_timer(bench.step(provider, "prefill", B, L, args.skip))[0] * 1e3)
        for name in names:
            with variant(bench, name):
                provider = "hf" if name == "hf" else "triton-sparse"
                gpu, launches, top = gpu_time(bench.step(provider, "prefill", B, L, args.skip))
            wall = " ".join(f"{w:7.1f}" for w in walls[name])
            print(f"B={B} L={L} skip={args.skip} {name:12s} wall us {wall}  gpu us {gpu:7.1f}  kernels {launches:4.1f}")
            for kernel, us in top:
                print(f"      {us:7.1f} us  {kernel}")


if __name__ == "__main__":
    main()
