"""Host time per call of the exact form's two host-side ops, counts_to_host and exact_rows, through
the eager entry and through torch.ops, and of their parts (device machine). A torch.profiler table
inflates these several times over; this times them with perf_counter.

    python tools/exact_form_host_cost.py
"""
import cProfile
import pstats

import torch
from profile_host import per_call_us  # tools/ is on the path of a script run from it

from skipgpt import ops

execute = torch.rand(2, 8, 512, device="cuda") < 0.75
rows, slot, seq_offsets = ops.compact(execute)
pinned = torch.empty(2, dtype=torch.int32, pin_memory=True)
event = torch.cuda.Event()
host_counts = ops.counts_to_host(seq_offsets)
torch.cuda.synchronize()
cases = {
    "counts_to_host, eager entry": lambda: ops.counts_to_host(seq_offsets),
    "counts_to_host, torch.ops": lambda: torch.ops.skipgpt.counts_to_host(seq_offsets),
    "  pinned empty": lambda: torch.empty(2, dtype=torch.int32, pin_memory=True),
    "  select seq_offsets[:, -1]": lambda: seq_offsets[:, -1],
    "  copy_ non_blocking": lambda: pinned.copy_(seq_offsets[:, -1], non_blocking=True),
    "  Event()": lambda: torch.cuda.Event(),
    "  Event.record": lambda: event.record(),
    "  is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
    "exact_rows, eager entry": lambda: ops.exact_rows(rows, seq_offsets, host_counts),
    "exact_rows, torch.ops": lambda: torch.ops.skipgpt.exact_rows(rows, seq_offsets, host_counts),
    "exact_rows without host counts": lambda: ops.exact_rows(rows, seq_offsets),
    "  host_counts.tolist": lambda: host_counts.tolist(),
    "  two clones": lambda: [rows[r, :100].clone() for r in range(2)],
    "  Event.synchronize (done)": lambda: event.synchronize(),
}
for name, fn in cases.items():
    print(f"{name:36s} {per_call_us(fn):8.1f} us", flush=True)
for name in ("counts_to_host, torch.ops", "exact_rows, torch.ops"):
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [cases[name]() for _ in range(300)])
    torch.cuda.synchronize()
    print("==", name)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
