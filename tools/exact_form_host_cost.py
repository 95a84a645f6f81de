"""Host time per call of the exact form's two host-side ops, counts_to_host and exact_rows, through
the eager entry and through torch.ops, and of their parts (device machine). A torch.profiler table
inflates these several times over; this times them with perf_counter.

    python tools/exact_form_host_cost.py
"""
import cProfile, pstats, time
import torch
from skipgpt import ops


def t(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


execute = torch.rand(2, 8, 512, device="cuda") < 0.75
rows, slot, off = ops.compact(execute)
h = torch.empty(2, dtype=torch.int32, pin_memory=True)
e = torch.cuda.Event()
host = ops.counts_to_host(off)
torch.cuda.synchronize()
cases = {
    "counts_to_host, eager entry": lambda: ops.counts_to_host(off),
    "counts_to_host, torch.ops": lambda: torch.ops.skipgpt.counts_to_host(off),
    "  pinned empty": lambda: torch.empty(2, dtype=torch.int32, pin_memory=True),
    "  select off[:, -1]": lambda: off[:, -1],
    "  copy_ non_blocking": lambda: h.copy_(off[:, -1], non_blocking=True),
    "  Event()": lambda: torch.cuda.Event(),
    "  Event.record": lambda: e.record(),
    "  is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
    "exact_rows, eager entry": lambda: ops.exact_rows(rows, off, host),
    "exact_rows, torch.ops": lambda: torch.ops.skipgpt.exact_rows(rows, off, host),
    "exact_rows without host counts": lambda: ops.exact_rows(rows, off),
    "  host.tolist": lambda: host.tolist(),
    "  two clones": lambda: [rows[r, :100].clone() for r in range(2)],
    "  Event.synchronize (done)": lambda: e.synchronize(),
    "rms_norm, eager entry": lambda: ops.rms_norm(torch.ones(8, 4096, device="cuda"), torch.ones(4096, device="cuda"), 1e-5),
}
for name, fn in cases.items():
    print(f"{name:36s} {t(fn):8.1f} us", flush=True)
for name in ("counts_to_host, torch.ops", "exact_rows, torch.ops"):
    p = cProfile.Profile()
    p.runcall(lambda: [cases[name]() for _ in range(300)])
    torch.cuda.synchronize()
    print("==", name)
    pstats.Stats(p).sort_stats("tottime").print_stats(14)
