"""GPU time per layer step, kernel by kernel, of eager and compiled triton-sparse, with hf's total
(device machine): does compiled code launch other or slower kernels than eager?

    python tools/gpu_time_by_kernel.py 8:512,4:2048,1:512 [skip, default 0.25]
"""
import sys
from collections import defaultdict
import torch
from skipgpt.benchmark import LayerBench, cuda_timer

points = [tuple(int(v) for v in p.split(":")) for p in sys.argv[1].split(",")]
skip = float(sys.argv[2]) if len(sys.argv) > 2 else 0.25
bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
for B, L in points:
    table = {}
    for provider in ("hf", "triton-sparse", "compiled-sparse"):
        fn = bench.step(provider, "prefill", B, L, skip)
        wall = [cuda_timer(fn)[0] for _ in range(3)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        per = defaultdict(float)
        n = defaultdict(int)
        for ev in prof.key_averages():
            if ev.device_type == torch.autograd.DeviceType.CUDA and ev.self_device_time_total > 0:
                per[ev.key] += ev.self_device_time_total / 10
                n[ev.key] += ev.count / 10
        table[provider] = per
        print(f"B={B} L={L} {provider:16s} wall ms {' / '.join(f'{w:.3f}' for w in wall)}  GPU us/step {sum(per.values()):8.1f}  kernels/step {sum(n.values()):.0f}", flush=True)
    for provider in ("triton-sparse", "compiled-sparse"):
        print(f"  {provider}:")
        for k, v in sorted(table[provider].items(), key=lambda kv: -kv[1])[:14]:
            print(f"    {v:8.1f}  {k[:90]}")
