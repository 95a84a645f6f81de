"""Host time of an eager layer step, call by call (device machine).

Records the top-level skipgpt ops and F.linear calls one step of an eager routed provider makes
(a cuBLAS call an op makes inside is part of that op's time, not a call of its own), replays each
call alone (host microseconds per call, no profiler), and sets their sum against the whole step's
host time. The rest is the layer's own Python and the small ATen ops between the calls and, in the
exact form, the host's wait in exact_rows' sync (a replayed exact_rows never waits: its copy is
done). Then probes: a few of the layer's small operations alone, and the step once more, to show
how far the host drifted meanwhile. Host time of back-to-back steps is measured while the GPU's
launch queue has room, so a GPU-bound step's host time is a lower bound.

    python3 tools/host_breakdown.py --points 1:512,1:2048 --skip 0.25
"""
import argparse

import torch
import torch.nn.functional as F
from profile_host import per_call_us, print_cprofile  # tools/ is on the path of a script run from it

from skipgpt import ops
from skipgpt.benchmark import LayerBench
from skipgpt.commands import positive_int


def record_calls(fn) -> list:
    """(name, original function, args, kwargs, result) of every top-level ops.* and F.linear
    call one fn() makes."""
    calls, originals = [], {}
    depth = 0

    def recorder(name, original):
        def call(*args, **kwargs):
            nonlocal depth
            depth += 1
            try:
                out = original(*args, **kwargs)
            finally:
                depth -= 1
            if depth == 0:
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
    parser.add_argument("--provider", default="triton-sparse", choices=("triton-sparse",),
                        help="the eager routed provider whose calls are recorded (compiled code would trace "
                             "the recording functions)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps / replays per call")
    parser.add_argument("--cprofile", type=positive_int, metavar="N",
                        help="also profile N steps with cProfile and print the functions with the most own and "
                             "cumulative time (the profiler's own cost inflates Python-heavy code: compare shares, not us)")
    args = parser.parse_args()
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    for point in args.points.split(","):
        batch, seqlen = (int(v) for v in point.split(":"))
        fn = bench.step(args.provider, "prefill", batch, seqlen, args.skip)
        hf = bench.step("hf", "prefill", batch, seqlen, args.skip)
        calls = record_calls(fn)
        step = per_call_us(fn, args.steps)
        hf_step = per_call_us(hf, args.steps)
        print(f"B={batch} L={seqlen} skip {args.skip}: {args.provider} step {step:.1f} us of host time "
              f"(hf {hf_step:.1f}); its {len(calls)} top-level calls alone:")
        total = 0.0
        for name, original, call_args, kwargs, _ in calls:
            us = per_call_us(lambda: original(*call_args, **kwargs), args.steps)
            total += us
            print(f"  {name:18s} {us:7.1f} us")
        print(f"  {'sum of the calls':18s} {total:7.1f} us; the rest of the step (Python, small ops and, in the "
              f"exact form, the sync's wait) {step - total:7.1f} us", flush=True)
        rows, _, seq_offsets = next(out for name, *_, out in calls if name == "compact")
        layer, T = bench.routed, batch * seqlen
        # The layer's small operations between the calls, alone.
        probes = {
            "route-count update (_count; adds to the layer's counters)": lambda: layer._count(None, T, seq_offsets[:, -1]),
            "the counts' select seq_offsets[:, -1]": lambda: seq_offsets[:, -1],
            "a route set's rows, rows[0]": lambda: rows[0],
            "the cache's start slot, torch.full [1]": lambda: torch.full((1,), 7, dtype=torch.int64, device="cuda"),
        }
        for name, probe in probes.items():
            print(f"  probe: {name:58s} {per_call_us(probe, args.steps):7.1f} us")
        print(f"  step again {per_call_us(fn, args.steps):.1f} us, hf again {per_call_us(hf, args.steps):.1f} us")
        if args.cprofile:
            print(f"  cProfile of {args.cprofile} steps:")
            print_cprofile(fn, args.cprofile)


if __name__ == "__main__":
    main()
