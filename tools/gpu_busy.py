"""Where back-to-back layer steps leave the GPU idle (device machine). For each point and
provider: steps run back to back (as a model's layers run them, as `skipgpt bench --steady`
times them) under torch.profiler, and the trace gives per step the wall time, the GPU's busy
time (the union of its kernel, copy and fill intervals), the idle rest, and the kernels' total
time by name, so two providers' steps can be compared kernel by kernel.

    python tools/gpu_busy.py --points 1:512,1:2048,4:512,4:2048 --skip 0.25 \
        --providers hf,triton-sparse,compiled-sparse --json $OUT/gpu-busy.json
"""
import argparse
import collections
import json
import os
import tempfile
import time

import torch

from skipgpt.benchmark import LayerBench

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def gpu_intervals(trace_path: str) -> list:
    """[(start_us, end_us, name)] of the GPU's work in a Chrome trace, by start."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    spans = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
             if e.get("cat") in GPU_CATEGORIES and e.get("ph") == "X"]
    return sorted(spans)


def busy_us(spans: list) -> float:
    total, end = 0.0, float("-inf")
    for s, e, _ in spans:
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def profile_steps(fn, steps: int, trace: str = None) -> dict:
    """Run `steps` calls back to back under the profiler; per-step wall, busy and idle us and the
    kernels' per-step time by name. The wall clock spans the GPU's first to last interval, so
    the profiler's own start and stop are not in it. trace: also record the host's ops (which
    slows the host) and keep the Chrome trace at this path."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    # GPU activity only unless a trace is asked for: recording every CPU op slows the host, and
    # with it the host-bound steps.
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if trace else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        host_ms = (time.perf_counter() - t0) * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        path = trace or os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        spans = gpu_intervals(path)
    if not spans:
        raise RuntimeError("the profiler recorded no GPU work: is CUPTI available?")
    span = spans[-1][1] - spans[0][0]
    busy = busy_us(spans)
    by_name = collections.Counter()
    for s, e, name in spans:
        by_name[name[:90]] += (e - s) / steps
    return {"wall_us": span / steps, "busy_us": busy / steps, "idle_us": (span - busy) / steps,
            "launches": len(spans) / steps, "profiled_wall_ms": host_ms / steps,
            "kernels_us": dict(by_name.most_common())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="1:512,1:2048,4:512,4:2048", help="comma-separated B:L prefill points")
    parser.add_argument("--skip", type=float, default=0.25, help="forced skip rate of both modules")
    parser.add_argument("--providers", default="hf,triton-sparse,compiled-sparse")
    parser.add_argument("--steps", type=int, default=30, help="back-to-back steps profiled per provider")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per provider")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--traces", help="a folder: also record host ops and keep each Chrome trace there")
    args = parser.parse_args()
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    results = []
    for point in args.points.split(","):
        batch, seqlen = map(int, point.split(":"))
        for provider in args.providers.split(","):
            trace = None
            if args.traces:
                os.makedirs(args.traces, exist_ok=True)
                trace = os.path.join(args.traces, f"{provider}-b{batch}-l{seqlen}-skip{args.skip:g}.json")
            r = profile_steps(bench.step(provider, "prefill", batch, seqlen, args.skip), args.steps, trace)
            r.update(provider=provider, batch=batch, seqlen=seqlen, skip=args.skip)
            results.append(r)
            print(f"B={batch} L={seqlen} skip={args.skip} {provider:16s} wall {r['wall_us']:8.1f} us  busy "
                  f"{r['busy_us']:8.1f}  idle {r['idle_us']:7.1f}  GPU ops {r['launches']:5.1f}", flush=True)
            for name, us in list(r["kernels_us"].items())[:args.top]:
                print(f"    {us:8.1f} us  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
