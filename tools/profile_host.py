"""Where the host time of a layer step goes (device machine): the per-call CPU cost of a Triton
launch, of the same op through the dispatcher and of compiled code calling it; host time per step
of each provider; and a torch.profiler table (self CPU time) of one provider's step.

    python tools/profile_host.py --providers dense,triton-sparse,compiled-sparse --profile compiled-sparse
"""
import argparse
import cProfile
import pstats
import time

import torch

from skipgpt import ops
from skipgpt.benchmark import LayerBench
from skipgpt.ops.norm import kernels as norm_kernels


def host_and_wall_us(fn, n=300, warmup=20):
    """(host, wall) microseconds per call of fn: host until the last launch returns, wall until
    the GPU is done."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def per_call_us(fn, n=300):
    return host_and_wall_us(fn, n)[0]


def print_cprofile(fn, steps: int) -> None:
    """cProfile over `steps` calls of fn, started after a synchronize: the functions with the
    most own time, then the most cumulative time (per step: divide by `steps`). A step that
    syncs (the exact form's counts) or fills the launch queue shows its waits under the call
    that waited."""
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.runcall(lambda: [fn() for _ in range(steps)])
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)


def launch_costs():
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    w_q = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda x, w: ops.rms_norm(x, w, 1e-5), fullgraph=True)
    print(f"torch (x*x).mean            {per_call_us(lambda: (x * x).mean(-1)):7.1f} us")
    print(f"F.linear 8x4096x4096        {per_call_us(lambda: torch.nn.functional.linear(x, w_q)):7.1f} us")
    print(f"rms_norm, Triton launcher   {per_call_us(lambda: norm_kernels.rms_norm(x, w, 1e-5)):7.1f} us")
    print(f"rms_norm, eager entry       {per_call_us(lambda: ops.rms_norm(x, w, 1e-5)):7.1f} us")
    print(f"rms_norm, through the op    {per_call_us(lambda: ops.rms_norm.op(x, w, 1e-5)):7.1f} us")
    print(f"rms_norm, compiled          {per_call_us(lambda: compiled(x, w)):7.1f} us")
    # The Triton launch itself, split: JITFunction.run (binder, cache key, launch) against
    # launching the already compiled kernel, and the binder alone.
    jit = norm_kernels._rms_norm_kernel
    out = torch.empty_like(x)
    args = (x, w, out, w, w, w, w, 8, 8, 0, 1e-5, 4096, 4096, False, False, False)
    compiled_kernel = jit[(8,)](*args, num_warps=16)
    binder = jit.device_caches[torch.cuda.current_device()][-1]
    runner = compiled_kernel[(8, 1, 1)]
    print(f"rms_norm kernel, JIT launch {per_call_us(lambda: jit[(8,)](*args, num_warps=16)):7.1f} us")
    print(f"  its binder alone          {per_call_us(lambda: binder(*args, num_warps=16)):7.1f} us")
    print(f"  compiled kernel launch    {per_call_us(lambda: runner(*args)):7.1f} us")
    stream = torch.cuda.current_stream().cuda_stream
    print(f"  the same, stream given    {per_call_us(lambda: runner(*args, stream=stream)):7.1f} us")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", default="dense,triton-sparse", help="comma-separated providers to time")
    parser.add_argument("--profile", default="triton-sparse", help="provider whose step is profiled")
    parser.add_argument("--points", default="decode:1:2048,prefill:1:512,prefill:1:2048,prefill:4:512",
                        help="comma-separated MODE:B:L points")
    parser.add_argument("--skip", type=float, default=0.25)
    parser.add_argument("--cprofile", action="store_true", help="also a Python profile (cProfile) of the profiled step")
    args = parser.parse_args()
    launch_costs()
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    for point in args.points.split(","):
        mode, batch, seqlen = point.split(":")
        batch, seqlen = int(batch), int(seqlen)
        for provider in args.providers.split(","):
            host = per_call_us(bench.step(provider, mode, batch, seqlen, args.skip), n=50)
            print(f"{provider:16s} {mode} B={batch} L={seqlen}: host {host:8.1f} us per step")
        fn = bench.step(args.profile, mode, batch, seqlen, args.skip)
        for _ in range(5):
            fn()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        print(f"{args.profile} {mode} B={batch} L={seqlen}, 10 steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        if args.cprofile:
            print(f"{args.profile} {mode} B={batch} L={seqlen}, 50 steps, Python profile:")
            print_cprofile(fn, 50)


if __name__ == "__main__":
    main()
