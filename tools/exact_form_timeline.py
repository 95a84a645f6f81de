"""Where an eager exact-form layer step spends its time, on the host and on the GPU (device machine).

The exact form reads the executing counts on the host once per step (ops.exact_rows). This tool
records, for each of a run of back-to-back steps, host timestamps (step start, entering and
leaving that sync, step end) and CUDA events at the same points (queued at step start, after
ops.counts_to_host, after ops.exact_rows and at step end), on one clock (the events' times are
taken relative to an event recorded right after a synchronize, the host's to that moment). From
them: how long the host works before and after the sync and waits in it, and whether the GPU then
waits for the host.

Compiled providers (`--providers ...,compiled-sparse`) call the two ops through the dispatcher:
the tool swaps the functions the ops dispatch to (a private table of torch's CustomOpDef) for the
run, so the marks land where compiled code calls them.

    python3 tools/exact_form_timeline.py --points 1:2048,4:512 --skip 0.25
    python3 tools/exact_form_timeline.py --points 8:2048,4:4096 --skip 0.5 --providers triton-sparse,compiled-sparse
"""
import argparse
import itertools
import statistics
import time

import torch

from skipgpt import ops
from skipgpt.benchmark import LayerBench


def timeline(fn, steps: int, compiled: bool) -> list[dict]:
    marks = []  # (name, host seconds, event) in order

    def mark(name):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((name, time.perf_counter(), event))

    counts_to_host, exact_rows = ops.counts_to_host, ops.exact_rows

    def counts_to_host_marked(*args, **kwargs):
        out = counts_to_host(*args, **kwargs)
        mark("copy queued")
        return out

    def exact_rows_marked(*args, **kwargs):
        marks.append(("sync entered", time.perf_counter(), None))
        out = exact_rows(*args, **kwargs)
        mark("sync left")
        return out

    # Eager code calls the ops' public entries. Compiled code traced those entries (Dynamo would
    # trace the marking functions too, so they stay in place there) and reaches the ops'
    # implementations through the dispatcher, which looks them up in CustomOpDef._backend_fns at
    # each call (counts_to_host's CUDA one, exact_rows' default).
    dispatched = ((ops.counts_to_host.op, "cuda", counts_to_host_marked),
                  (ops.exact_rows.op, None, exact_rows_marked)) if compiled else ()
    saved = [(op, key, op._backend_fns[key]) for op, key, _ in dispatched]
    if not compiled:
        ops.counts_to_host, ops.exact_rows = counts_to_host_marked, exact_rows_marked
    for op, key, marked in dispatched:
        op._backend_fns[key] = marked
    try:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        marks.clear()
        mark("base")
        torch.cuda.synchronize()
        for _ in range(steps):
            mark("step start")
            fn()
            mark("step end")
        torch.cuda.synchronize()
    finally:
        ops.counts_to_host, ops.exact_rows = counts_to_host, exact_rows
        for op, key, original in saved:
            op._backend_fns[key] = original
    _, host0, event0 = marks[0]
    rows, current = [], None
    for name, host, event in marks[1:]:
        if name == "step start":
            current = {}
            rows.append(current)
        current[f"host {name}"] = (host - host0) * 1e3
        if event is not None:
            current[f"gpu {name}"] = event0.elapsed_time(event)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="1:2048,4:512", help="comma-separated B:L prefill points (exact form)")
    parser.add_argument("--skip", type=float, default=0.25)
    parser.add_argument("--providers", default="triton-sparse", help="comma-separated: triton-sparse, compiled-sparse")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--spin", action="store_true",
                        help="wait for CUDA events by polling them (Event.query) instead of Event.synchronize")
    args = parser.parse_args()
    if args.spin:
        def poll(event):
            while not event.query():
                pass
        torch.cuda.Event.synchronize = poll
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    for point, provider in itertools.product(args.points.split(","), args.providers.split(",")):
        batch, seqlen = (int(v) for v in point.split(":"))
        fn = bench.step(provider, "prefill", batch, seqlen, args.skip)
        rows = timeline(fn, args.steps, compiled=provider.startswith("compiled"))
        if "host sync entered" not in rows[0]:
            print(f"B={batch} L={seqlen} {provider}: this step runs the capacity form (no sync); nothing to show")
            continue
        ms = lambda a, b: statistics.median(r[b] - r[a] for r in rows[1:])  # noqa: E731
        periods = [b["gpu step start"] - a["gpu step start"] for a, b in zip(rows, rows[1:])]
        print(f"B={batch} L={seqlen} {provider} skip {args.skip}, {len(rows)} steps{', events polled' if args.spin else ''}, "
              "medians in ms:")
        print(f"  step period on the GPU           {statistics.median(periods):.3f}")
        print(f"  host: start -> sync entered      {ms('host step start', 'host sync entered'):.3f}")
        print(f"  host: waiting in the sync        {ms('host sync entered', 'host sync left'):.3f}")
        print(f"  host: sync left -> step end      {ms('host sync left', 'host step end'):.3f}")
        print(f"  GPU reaches the step's start, after the host queued it    "
              f"{ms('host step start', 'gpu step start'):+.3f}")
        print(f"  GPU: step start -> copy done     {ms('gpu step start', 'gpu copy queued'):.3f}")
        print(f"  host leaves the sync, after the copy is done               "
              f"{ms('gpu copy queued', 'host sync left'):+.3f}")
        print(f"  GPU: copy -> K/V work done       {ms('gpu copy queued', 'gpu sync left'):.3f}")
        print(f"  GPU passes the sync's mark, after the host queued it       "
              f"{ms('host sync left', 'gpu sync left'):+.3f}")
        print(f"  GPU: K/V done -> step end        {ms('gpu sync left', 'gpu step end'):.3f}")
        print(f"  host: step end queued, before the GPU gets there           "
              f"{ms('host step end', 'gpu step end'):+.3f}", flush=True)


if __name__ == "__main__":
    main()
