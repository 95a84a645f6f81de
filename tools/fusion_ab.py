"""triton-sparse's capacity form with its attention input fused (rms_norm, then qkv_rope_write)
against the form before it (rms_norm_split, cuBLAS K/V, rope_kv_write, Q GEMM, rope), one
Llama-3.1-8B layer at prefill, or at decode (`--mode decode`: 64 one-token steps over a cached
context of L tokens, timed as a replayed CUDA graph, as generate() runs them) on the device
machine. Per variant and point: time per step (skipgpt.benchmark.cuda_timer, median; at decode
cuda_graph_timer), GPU busy time per step and GPU operations per step of eager steps run back
to back (tools/gpu_busy.py's profile_steps), and the biggest kernels. Where wall time exceeds GPU time, the host bounds the step.

Variants: hf (baseline), exact (triton-sparse in the exact form), unfused and fused (the capacity
form's attention input; fused at any token count, past skipgpt.layer.FUSED_QKV_MAX_TOKENS too),
and at the default form switch eager (triton-sparse) and compiled (compiled-sparse as
compile_model builds it).

    python tools/fusion_ab.py --points 1:512,1:1024,4:512 --skip 0.25 --rounds 2
    python tools/fusion_ab.py --mode decode --points 1:2048,8:2048,64:2048 --variants hf,unfused,fused
    python tools/fusion_ab.py --points 8:2048,4:2048,8:512 --variants hf,eager,compiled --rounds 3
    python tools/fusion_ab.py --steady --points 1:2048,4:512 --variants hf,exact,unfused,fused,compiled

--steady (prefill): each round times the variants together, back to back in interleaved blocks
(skipgpt.benchmark.steady_timer, as `skipgpt bench --steady` does), each step switching to its
variant as it runs; --block-ms sets the blocks' length, whose start and drain each block pays once.
"""
import argparse
import contextlib

import torch

from skipgpt import layer as layer_module
from gpu_busy import profile_steps  # tools/ is on the path of a script run from it
from skipgpt.benchmark import (STEADY_BLOCK_MS, STEADY_MIN_CALLS, LayerBench, cuda_graph_timer, cuda_timer,
                               steady_timer)

VARIANTS = ("hf", "exact", "unfused", "fused", "eager", "compiled")
PROVIDERS = {"hf": "hf", "compiled": "compiled-sparse"}  # the others: triton-sparse


@contextlib.contextmanager
def variant(bench, name):
    layer, state = bench.routed, bench.state
    saved = (layer.fuses_qkv, state.capacity_max_tokens, layer_module.FUSED_QKV_MAX_TOKENS)
    try:
        if name not in ("eager", "compiled"):
            state.use_form("exact" if name == "exact" else "capacity")
            layer.fuses_qkv = name == "fused"
            if name == "fused":
                layer_module.FUSED_QKV_MAX_TOKENS = 1 << 62
        yield
    finally:
        layer.fuses_qkv, state.capacity_max_tokens, layer_module.FUSED_QKV_MAX_TOKENS = saved


def in_variant(bench, name, fn):
    """fn, run in variant `name` at every call: steady rounds interleave the variants' steps."""
    def run():
        with variant(bench, name):
            return fn()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    parser.add_argument("--points", default="1:512,1:1024,4:512", help="comma-separated B:L points")
    parser.add_argument("--skip", type=float, default=0.25, help="skip rate of the forced routes (default 0.25)")
    parser.add_argument("--variants", default="hf,exact,unfused,fused",
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: the first four)")
    parser.add_argument("--rounds", type=int, default=2, help="wall-time rounds over the variants (default 2)")
    parser.add_argument("--top", type=int, default=6, help="kernels listed per variant, biggest first (default 6)")
    parser.add_argument("--steady", action="store_true",
                        help="prefill: time the variants together, back to back in interleaved blocks")
    parser.add_argument("--block-ms", type=float, default=STEADY_BLOCK_MS,
                        help=f"--steady: each block's length (default {STEADY_BLOCK_MS:g} ms, steady_timer's; "
                             f"at least {STEADY_MIN_CALLS} calls)")
    args = parser.parse_args()
    if args.steady and args.mode != "prefill":
        parser.error("--steady times prefill steps (decode steps are timed as replayed CUDA graphs)")
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    bench.decode_steps = 64
    timer = cuda_graph_timer if args.mode == "decode" else cuda_timer
    names = args.variants.split(",")
    for point in args.points.split(","):
        B, L = (int(v) for v in point.split(":"))
        walls = {name: [] for name in names}
        for _ in range(args.rounds):  # interleaved: the host's speed drifts within a call
            if args.steady:
                steps = [in_variant(bench, name, bench.step(PROVIDERS.get(name, "triton-sparse"), args.mode, B, L,
                                                            args.skip)) for name in names]
                for name, t in zip(names, steady_timer(steps, block_ms=args.block_ms)):
                    walls[name].append(t[0] * 1e3)
            else:
                for name in names:
                    with variant(bench, name):
                        provider = PROVIDERS.get(name, "triton-sparse")
                        walls[name].append(timer(bench.step(provider, args.mode, B, L, args.skip))[0] * 1e3)
        for name in names:
            with variant(bench, name):
                provider = PROVIDERS.get(name, "triton-sparse")
                gpu = profile_steps(bench.step(provider, args.mode, B, L, args.skip), steps=10)
            wall = " ".join(f"{w:7.1f}" for w in walls[name])
            print(f"{args.mode} B={B} L={L} skip={args.skip} {name:8s} wall us {wall}  gpu busy us "
                  f"{gpu['busy_us']:7.1f}  GPU ops {gpu['gpu_ops']:4.1f}")
            for kernel, us in list(gpu["kernels_us"].items())[:args.top]:
                print(f"      {us:7.1f} us  {kernel[:60]}")


if __name__ == "__main__":
    main()
