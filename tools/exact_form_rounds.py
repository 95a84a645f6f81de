"""Eager against compiled triton-sparse at large (exact-form) prefill steps, in interleaved rounds
(device machine): per round and provider the do_bench wall time, the GPU time per step (profiler,
kernels summed), the pinned host allocator's counters and the host syncs per step. A grid times
each provider once per point, in a fixed order; rounds show what is order and clock.

    python tools/exact_form_rounds.py 8:2048,4:2048
"""
import sys
import torch
from skipgpt.benchmark import LayerBench, cuda_timer

points = [tuple(int(v) for v in p.split(":")) for p in sys.argv[1].split(",")]
bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
def host_allocs():
    try:
        s = torch.cuda.host_memory_stats()
        return s.get("num_host_alloc", s.get("host_alloc_time.count")), s.get("num_sync_all_streams")
    except Exception as e:
        return repr(e)[:40], None
for B, L in points:
    fns = {p: bench.step(p, "prefill", B, L, 0.25) for p in ("hf", "triton-sparse", "compiled-sparse")}
    for f in fns.values():
        f()
    for rnd in range(3):
        for p, f in fns.items():
            before = host_allocs()
            med, q20, q80 = cuda_timer(f)
            after = host_allocs()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    f()
                torch.cuda.synchronize()
            gpu = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / 5
            syncs = {e.key: e.count // 5 for e in prof.key_averages() if "ynchronize" in e.key or "HostAlloc" in e.key or "cudaMalloc" in e.key}
            print(f"B={B} L={L} round {rnd} {p:16s} wall {med:.3f} ({q20:.3f}-{q80:.3f}) GPU {gpu/1000:.3f} ms  host allocs {before}->{after} {syncs}", flush=True)
