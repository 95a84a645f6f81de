"""rows_gemm's launch forms against each other where an eager step is host-bound (device machine):
the persistent grid with TMA loads (rows_gemm's choice above 64 rows before
PER_TILE_MAX_ROWS), the persistent grid with pointer loads, and one program per tile with
pointer loads (the decode form). First each form's host and GPU time per call for the layer's
three capacity GEMMs at 128-1024 rows (25% skip); then whole eager layer steps against hf (B=1,
L 512 and 1024), each step three ways: GPU time (CUDA-graph replay), and in short blocks
interleaved in a shuffled order per round, host time and steady time (back-to-back steps:
max(host, GPU), what a model's layers see), each set against hf's block of the same round.

    python tools/gemm_launch_ab.py      # writes $OUT/gemm-launch-ab.json (or /tmp)
"""
import argparse
import json
import os
import random
import statistics
import time

import torch

from form_sweep import gemm_inputs, gemm_weights  # this folder is on sys.path when run as a script
from profile_host import per_call_us
from skipgpt.benchmark import LayerBench, cuda_graph_timer, cuda_timer
from skipgpt.ops.linear import kernels

FORMS = ("persistent+tma", "persistent", "per-tile")
real_max_rows, real_tma_ready = kernels.PER_TILE_MAX_ROWS, kernels.tma_ready


def use_form(form: str) -> None:
    """Force a form above 64 rows ("auto": rows_gemm's own choice, by the row count)."""
    if form == "auto":
        return restore()
    kernels.PER_TILE_MAX_ROWS = 64 if form != "per-tile" else 1 << 62
    kernels.tma_ready = real_tma_ready if form == "persistent+tma" else (lambda *tensors: False)


def restore() -> None:
    kernels.PER_TILE_MAX_ROWS, kernels.tma_ready = real_max_rows, real_tma_ready


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rounds", type=int, default=40, help="timed blocks per form and layer point")
parser.add_argument("--no-gemm", action="store_true", help="skip the per-GEMM part")
parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated forms to time at each layer point")
parser.add_argument("--also", default="", help="comma-separated bench providers timed beside them (compiled-sparse)")
parser.add_argument("--points", default="1:512:0.25,1:1024:0.25,1:512:0,1:1024:0", help="B:L:skip layer points")
args = parser.parse_args()
dev, dt = torch.device("cuda"), torch.bfloat16
torch.manual_seed(0)
w_q, w_g, w_u, w_d = gemm_weights(dev, dt)
results = {"gemm": [], "layer": []}
for T in () if args.no_gemm else (128, 256, 512, 1024):
    M = int(T * 0.75)
    count, rows, slot, x, xi, res = gemm_inputs(T, M, dev, dt)
    cases = {
        "o+res": lambda: kernels.rows_gemm(x, w_q, count, residual=res, rows=rows, slot=slot),
        "gated": lambda: kernels.rows_gemm(x, w_g, count, w2=w_u, activation="silu"),
        "down+res": lambda: kernels.rows_gemm(xi, w_d, count, residual=res, rows=rows, slot=slot),
    }
    for name, fn in cases.items():
        for form in FORMS:
            use_form(form)
            row = dict(T=T, M=M, gemm=name, form=form, host_us=per_call_us(fn, 200), gpu_us=cuda_timer(fn)[0] * 1e3)
            results["gemm"].append(row)
            print(f"T={T:5d} {name:9s} {form:15s} host {row['host_us']:6.1f} us  gpu {row['gpu_us']:7.1f} us", flush=True)
restore()

bench = LayerBench("llama-3.1-8b", dt, dev)


def in_form(form, step):
    def run():
        use_form(form)
        return step()
    return run


def host_and_steady_us(fn, host_steps: int = 10, steady_steps: int = 40) -> tuple[float, float]:
    """(host, steady) microseconds per step: the host's time to launch `host_steps` steps (few
    enough that the launch queue never fills), then the wall time per step of `steady_steps` steps
    back to back, synchronized: max(host, GPU) per step, as a model's layers see it (no L2 flush)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(host_steps):
        fn()
    host = (time.perf_counter() - t0) / host_steps * 1e6
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steady_steps):
        fn()
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / steady_steps * 1e6


# The device machine's host speed drifts by up to 2x within seconds, so each form is timed in
# many short blocks, in a new shuffled order per round, and compared with hf's block of the same
# round: the ratio's median over rounds, not the times', is the result.
shuffle = random.Random(0)
for point in args.points.split(","):
    B, L, skip = point.split(":")
    B, L, skip = int(B), int(L), float(skip)
    hf = bench.step("hf", "prefill", B, L, skip)
    step = bench.step("triton-sparse", "prefill", B, L, skip)
    fns = {"hf": in_form("auto", hf), **{f: in_form(f, step) for f in args.forms.split(",")}}
    fns.update({p: in_form("auto", bench.step(p, "prefill", B, L, skip)) for p in args.also.split(",") if p})
    gpu = {}
    for name, fn in fns.items():
        gpu[name] = cuda_graph_timer(fn)[0] * 1e3  # replayed: the GPU's time alone, L2 flushed
        restore()
    blocks = {name: [] for name in fns}
    for r in range(args.rounds):
        names = list(fns)
        shuffle.shuffle(names)
        for name in names:
            blocks[name].append(host_and_steady_us(fns[name]))
        restore()
    for name in fns:
        host = [b[0] for b in blocks[name]]
        steady = [b[1] for b in blocks[name]]
        row = dict(B=B, L=L, skip=skip, provider=name, gpu_us=gpu[name], host_us=statistics.median(host),
                   steady_us=statistics.median(steady),
                   host_vs_hf=statistics.median([h / b[0] for h, b in zip(host, blocks["hf"])]),
                   steady_speedup_vs_hf=statistics.median([b[1] / s for s, b in zip(steady, blocks["hf"])]),
                   blocks=blocks[name])
        results["layer"].append(row)
        print(f"B={B} L={L} skip {skip} {name:15s} gpu {gpu[name]:6.1f}  host {row['host_us']:6.1f} "
              f"({row['host_vs_hf']:.3f} of hf's)  steady {row['steady_us']:6.1f} us "
              f"({row['steady_speedup_vs_hf']:.3f}x of hf)", flush=True)
restore()
out = os.path.join(os.environ.get("OUT", "/tmp"), "gemm-launch-ab.json")
with open(out, "w") as f:
    json.dump(results, f, indent=1)
print("wrote", out)
