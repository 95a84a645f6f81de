"""Where an exact-form layer step spends its time, on the host and on the GPU (device machine).

The exact form reads the executing counts on the host once per step (ops.exact_rows, which waits
for ops.counts_to_host's copy). For each of a run of back-to-back steps this records host
timestamps (step start, entering and leaving the wait for the copy, exact_rows returning, step
end) and CUDA events queued at step start, after counts_to_host, after exact_rows and at step end,
on one clock: the events' times are taken relative to an event recorded right after a
synchronize, the host's to that moment, so the two line up to within a launch's latency (a few
us). The marks themselves cost the host ~4 event records a step. From them: how long the host
works before and after the sync and waits in it, and whether the GPU then waits for the host.

Compiled providers (`--providers ...,compiled-sparse`) call the two ops through the dispatcher:
the tool wraps the functions the ops dispatch to (a private table of torch's CustomOpDef) for the
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
    """One dict per step: 'host NAME' and 'gpu NAME' -> ms on the shared clock."""
    marks = []  # (name, host seconds, event or None) in order

    def mark(name, event=True):
        recorded = None
        if event:
            recorded = torch.cuda.Event(enable_timing=True)
            recorded.record()
        marks.append((name, time.perf_counter(), recorded))

    def marked(name, original):
        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            mark(name)
            return out
        return call

    wait = torch.cuda.Event.synchronize  # exact_rows waits for the copy's event through this

    def wait_marked(event):
        mark("wait entered", event=False)
        wait(event)
        mark("wait left", event=False)

    # Eager code calls the ops' public entries. Compiled code traced those entries (Dynamo would
    # trace marking functions put in their place) and reaches the ops' implementations through
    # the dispatcher, which looks them up in CustomOpDef._backend_fns at each call
    # (counts_to_host's CUDA one, exact_rows' default).
    if compiled:
        targets = [(ops.counts_to_host.op._backend_fns, "cuda", "after copy"),
                   (ops.exact_rows.op._backend_fns, None, "exact_rows returned")]
    else:
        targets = [(vars(ops), "counts_to_host", "after copy"), (vars(ops), "exact_rows", "exact_rows returned")]
    saved = [(table, key, table[key]) for table, key, _ in targets]
    try:
        for table, key, name in targets:
            table[key] = marked(name, table[key])
        torch.cuda.Event.synchronize = wait_marked
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
        torch.cuda.Event.synchronize = wait
        for table, key, original in saved:
            table[key] = original
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
        if "host exact_rows returned" not in rows[0]:
            print(f"B={batch} L={seqlen} {provider}: the step calls no exact_rows (capacity form or dense); nothing to show")
            continue

        def median_gap(a, b):
            # The first step is left out: it starts on an idle GPU, the others behind a busy one.
            return statistics.median(r[b] - r[a] for r in rows[1:])

        periods = [b["gpu step start"] - a["gpu step start"] for a, b in zip(rows, rows[1:])]
        lines = [
            ("step period on the GPU", statistics.median(periods)),
            ("host: step start -> waiting for the copy", median_gap("host step start", "host wait entered")),
            ("host: waiting for the copy", median_gap("host wait entered", "host wait left")),
            ("host: the rest of exact_rows", median_gap("host wait left", "host exact_rows returned")),
            ("host: exact_rows returned -> step end", median_gap("host exact_rows returned", "host step end")),
            ("GPU behind the host at the step's start", median_gap("host step start", "gpu step start")),
            ("GPU: step start -> copy done", median_gap("gpu step start", "gpu after copy")),
            ("host leaves the wait, after the copy is done", median_gap("gpu after copy", "host wait left")),
            ("GPU: copy done -> passes the exact_rows mark", median_gap("gpu after copy", "gpu exact_rows returned")),
            ("GPU passes that mark, after the host queued it (~0: it waited)",
             median_gap("host exact_rows returned", "gpu exact_rows returned")),
            ("GPU: that mark -> step end", median_gap("gpu exact_rows returned", "gpu step end")),
            ("GPU still works after the step's last launch", median_gap("host step end", "gpu step end")),
        ]
        print(f"B={batch} L={seqlen} {provider} skip {args.skip}, {len(rows)} steps"
              f"{', events polled' if args.spin else ''}, medians in ms:")
        for label, value in lines:
            print(f"  {label:64s} {value:+.3f}")
        print(flush=True)


if __name__ == "__main__":
    main()
