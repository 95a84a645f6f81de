"""Where back-to-back layer steps leave the GPU idle (device machine). For each point and
provider: steps run back to back (as a model's layers run them, as `skipgpt bench --steady`
times them) under torch.profiler, and the trace gives per step the span from the GPU's first
operation to its last, the GPU's busy time within it (the union of its kernel, copy and fill
intervals), the idle rest, and each kernel's time, so two providers' steps can be compared
kernel by kernel. The providers run one after another: a host whose speed drifts can favour one.

    python tools/gpu_busy.py --points 1:512,1:2048,4:512,4:2048 --skip 0.25 \
        --providers hf,triton-sparse,compiled-sparse --json $OUT/gpu-busy.json
"""
import argparse
import collections
import json
import os
import tempfile
import time
from typing import Optional

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
    """The length of the union of the sorted intervals `spans`: overlapping work (kernels on
    several streams, a copy beside a kernel) counts once."""
    total, end = 0.0, float("-inf")
    for s, e, _ in spans:
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def profile_steps(fn, steps: int, trace: Optional[str] = None) -> dict:
    """Run `steps` calls back to back under the profiler; per step: span_us (the GPU's first to
    last operation, so the profiler's own start and stop are not in it), busy_us, idle_us,
    gpu_ops (kernels, copies and fills), host_ms (the host's clock over the calls and the final
    synchronize), and kernels_us, each GPU operation's time by name. trace: also record the
    host's ops (which slows the host) and keep the Chrome trace at this path."""
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
    if trace:
        prof.export_chrome_trace(trace)
        spans = gpu_intervals(trace)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
            spans = gpu_intervals(os.path.join(tmp, "trace.json"))
    if not spans:
        raise RuntimeError("the profiler recorded no GPU work: is CUPTI available?")
    span = spans[-1][1] - spans[0][0]
    busy = busy_us(spans)
    by_name = collections.Counter()
    for s, e, name in spans:
        by_name[name] += (e - s) / steps
    return {"span_us": span / steps, "busy_us": busy / steps, "idle_us": (span - busy) / steps,
            "gpu_ops": len(spans) / steps, "host_ms": host_ms / steps, "kernels_us": dict(by_name.most_common())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="1:512,1:2048,4:512,4:2048", help="comma-separated B:L prefill points")
    parser.add_argument("--skip", type=float, default=0.25, help="forced skip rate of both modules")
    parser.add_argument("--providers", default="hf,triton-sparse,compiled-sparse",
                        help="comma-separated providers, as `skipgpt bench --providers` names them")
    parser.add_argument("--steps", type=int, default=30, help="back-to-back steps profiled per provider")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per provider")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--traces", help="a folder: also record host ops and keep each Chrome trace there")
    args = parser.parse_args()
    if args.traces:
        os.makedirs(args.traces, exist_ok=True)
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    results = []
    for point in args.points.split(","):
        batch, seqlen = map(int, point.split(":"))
        for provider in args.providers.split(","):
            trace = None
            if args.traces:
                trace = os.path.join(args.traces, f"{provider}-b{batch}-l{seqlen}-skip{args.skip:g}.json")
            r = profile_steps(bench.step(provider, "prefill", batch, seqlen, args.skip), args.steps, trace)
            r.update(provider=provider, batch=batch, seqlen=seqlen, skip=args.skip)
            results.append(r)
            print(f"B={batch} L={seqlen} skip={args.skip} {provider:16s} span {r['span_us']:8.1f} us  busy "
                  f"{r['busy_us']:8.1f}  idle {r['idle_us']:7.1f}  GPU ops {r['gpu_ops']:5.1f}", flush=True)
            for name, us in list(r["kernels_us"].items())[:args.top]:
                print(f"    {us:8.1f} us  {name[:100]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
