"""Does a step run slower right after another provider's block? (device machine)

Blocks of back-to-back steps, as `skipgpt bench --steady` times them, in two fixed orders that
differ only in what runs right before compiled-sparse: compiled-dense, or triton-sparse. Per
provider and order: ms per call over the block, the first call's host time, the median of the
middle calls, the drain (the final synchronize), and over the timed blocks the host's time in
Python's garbage collector and the allocator's cudaMalloc calls and retries, with the collector
on and off. A provider slower after some other one in every call of its block, with no
collections and no allocations, points at the GPU's state (clocks under a power limit), not
at the host.

    python tools/block_order_ab.py --points 8:1024:0.25,8:1024:0.5,4:2048:0.25
"""
import argparse
import gc
import statistics
import time

import torch

from skipgpt.benchmark import LayerBench

ORDERS = (["hf", "triton-sparse", "compiled-dense", "compiled-sparse"],
          ["hf", "triton-sparse", "compiled-sparse", "compiled-dense"])


class CollectorClock:
    """Milliseconds the host spent in Python's garbage collector since it was installed."""

    def __init__(self):
        self.ms, self._start = 0.0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._start) * 1e3


def block(fn, calls: int, collector: CollectorClock) -> dict:
    torch.cuda.synchronize()
    gc_before, mem_before = collector.ms, torch.cuda.memory_stats()
    stamps = [time.perf_counter()]
    for _ in range(calls):
        fn()
        stamps.append(time.perf_counter())
    torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    mem_after = torch.cuda.memory_stats()
    per = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return dict(ms=(stamps[-1] - stamps[0]) * 1e3 / calls, first=per[0], middle=statistics.median(per[1:-1]),
                drain=per[-1], gc=collector.ms - gc_before,
                mallocs=mem_after["num_device_alloc"] - mem_before["num_device_alloc"],
                retries=mem_after["num_alloc_retries"] - mem_before["num_alloc_retries"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="8:1024:0.25,8:1024:0.5,4:2048:0.25",
                        help="comma-separated B:L:skip prefill points")
    parser.add_argument("--calls", type=int, default=8, help="back-to-back steps per block")
    parser.add_argument("--reps", type=int, default=12, help="repetitions per order (the first 2 are warm-up)")
    args = parser.parse_args()
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    collector = CollectorClock()
    for point in args.points.split(","):
        batch, seqlen, skip = point.split(":")
        batch, seqlen, skip = int(batch), int(seqlen), float(skip)
        # bench.step forces the routes of the shared state: build one point's steps at a time.
        steps = {name: bench.step(name, "prefill", batch, seqlen, skip) for name in ORDERS[0]}
        for step in steps.values():
            for _ in range(3):
                step()
        for collecting in (True, False):
            if not collecting:
                gc.collect()
                gc.disable()
            for order in ORDERS:
                blocks = {name: [] for name in order}
                for _ in range(args.reps):
                    for name in order:
                        blocks[name].append(block(steps[name], args.calls, collector))
                print(f"B={batch} L={seqlen} skip={skip} gc {'on' if collecting else 'off'} order={','.join(order)}")
                for name in order:
                    timed = blocks[name][2:]

                    def med(key):
                        return statistics.median(b[key] for b in timed)

                    print(f"   {name:16s} ms/call {med('ms'):7.3f}  first {med('first'):7.3f} middle "
                          f"{med('middle'):7.3f} drain {med('drain'):6.3f}  gc {sum(b['gc'] for b in timed):6.1f} ms  "
                          f"mallocs {sum(b['mallocs'] for b in timed)} retries {sum(b['retries'] for b in timed)}",
                          flush=True)
            gc.enable()
        del steps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
