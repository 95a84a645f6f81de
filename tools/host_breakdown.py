"""Host time of an eager layer step, call by call (device machine).

Records the skipgpt ops and F.linear calls one step of a provider makes, replays each call alone
(host microseconds per call, no profiler), and sets their sum against the whole step's host time:
the rest is the layer's own Python and the small ATen ops between the calls.

    python3 tools/host_breakdown.py --points 1:512,1:2048 --skip 0.25
"""
import argparse
import time

import torch
import torch.nn.functional as F

from skipgpt import ops
from skipgpt.benchmark import LayerBench


def host_us(fn, n: int) -> float:
    """Host microseconds per call of fn, the GPU drained before and after."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def record_calls(fn) -> list:
    """(name, original function, args, kwargs, result) of every ops.* and F.linear call one fn() makes."""
    calls, originals = [], {}

    def recorder(name, original):
        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            calls.append((name, original, args, kwargs, out))
            return out
        return call

    for name in ops.__all__:
        originals[(ops, name)] = getattr(ops, name)
    originals[(F, "linear")] = F.linear
    try:
        for (module, name), original in originals.items():
            setattr(module, name, recorder(name, original))
        fn()
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)
    torch.cuda.synchronize()
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="1:512,1:2048", help="comma-separated B:L prefill points")
    parser.add_argument("--skip", type=float, default=0.25)
    parser.add_argument("--provider", default="triton-sparse")
    parser.add_argument("--steps", type=int, default=50, help="timed steps / replays per call")
    args = parser.parse_args()
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    for point in args.points.split(","):
        batch, seqlen = (int(v) for v in point.split(":"))
        fn = bench.step(args.provider, "prefill", batch, seqlen, args.skip)
        hf = bench.step("hf", "prefill", batch, seqlen, args.skip)
        for _ in range(3):
            fn(), hf()
        calls = record_calls(fn)
        step = host_us(fn, args.steps)
        hf_step = host_us(hf, args.steps)
        print(f"B={batch} L={seqlen} skip {args.skip}: {args.provider} step {step:.1f} us of host time "
              f"(hf {hf_step:.1f}); its {len(calls)} calls alone:")
        total = 0.0
        for name, original, call_args, kwargs, _ in calls:
            us = host_us(lambda: original(*call_args, **kwargs), args.steps)
            total += us
            print(f"  {name:18s} {us:7.1f} us")
        print(f"  {'sum of the calls':18s} {total:7.1f} us; the rest of the step {step - total:7.1f} us", flush=True)
        rows, slot, seq_offsets = next(out for name, *_, out in calls if name == "compact")
        layer, T = bench.routed, batch * seqlen
        probes = {
            "_count": lambda: layer._count(None, T, seq_offsets[:, -1]),
            "seq_offsets[:, -1]": lambda: seq_offsets[:, -1],
            "rows[0]": lambda: rows[0],
            "rows.unbind(0)": lambda: rows.unbind(0),
            "torch.full [1]": lambda: torch.full((1,), 7, dtype=torch.int64, device="cuda"),
            "torch.empty [T]": lambda: torch.empty(T, dtype=torch.int32, device="cuda"),
        }
        for name, probe in probes.items():
            print(f"  probe {name:18s} {host_us(probe, args.steps):7.1f} us")
        # The step again, to see how far the host drifted during the replays.
        print(f"  step again {host_us(fn, args.steps):.1f} us, hf again {host_us(hf, args.steps):.1f} us")


if __name__ == "__main__":
    main()
