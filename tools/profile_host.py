"""Where the host time of a layer step goes (device machine): per-call CPU cost of each layer of
the op stack, and a torch.profiler table of one triton-sparse step."""
import time

import torch

from skipgpt import ops
from skipgpt.benchmark import LayerBench
from skipgpt.ops.norm import kernels as norm_kernels


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
print(f"torch rms-like (x*x).mean  {per_call_us(lambda: (x * x).mean(-1)):7.1f} us")
w_q = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
print(f"F.linear 8x4096x4096       {per_call_us(lambda: torch.nn.functional.linear(x, w_q)):7.1f} us")
print(f"triton launcher directly   {per_call_us(lambda: norm_kernels.rms_norm(x, w, 1e-5)):7.1f} us")
print(f"custom op (dispatcher)     {per_call_us(lambda: ops.rms_norm(x, w, 1e-5)):7.1f} us")

bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
for mode, batch, seqlen in (("decode", 1, 2048), ("prefill", 1, 512), ("prefill", 1, 2048), ("prefill", 4, 512)):
    for provider in ("dense", "triton-sparse"):
        fn = bench.step(provider, mode, batch, seqlen, 0.25)
        host = per_call_us(fn, n=50)
        print(f"{provider:14s} {mode} B={batch} L={seqlen}: host {host:8.1f} us per step")
    fn = bench.step("triton-sparse", mode, batch, seqlen, 0.25)
    for _ in range(5):
        fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
