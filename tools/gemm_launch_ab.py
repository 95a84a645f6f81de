"""rows_gemm's launch forms against each other where an eager step is host-bound (device machine):
the persistent grid with TMA loads (the default above 64 rows before EAGER_PER_TILE_MAX_ROWS), the persistent grid with
pointer loads, and one program per tile with pointer loads (the decode form). For each form:
the host time of one call and its GPU time, for the layer's three capacity GEMMs at 128-1024
rows (25% skip), then whole eager layer steps timed paired with hf (B=1, L 512 and 1024).

    python tools/gemm_launch_ab.py --rounds 3      # writes $OUT/gemm-launch-ab.json (or /tmp)
"""
import argparse
import json
import os

import torch

from form_sweep import gemm_inputs, gemm_weights  # this folder is on sys.path when run as a script
from profile_host import per_call_us
from skipgpt.benchmark import LayerBench, cuda_timer, paired_timer
from skipgpt.ops.linear import kernels

FORMS = ("persistent+tma", "persistent", "per-tile")
real_persistent, real_tma_ready = kernels._persistent, kernels.tma_ready


def use_form(form: str) -> None:
    """Force a form above 64 rows (rows_gemm's own choice also depends on the row count)."""
    kernels._persistent = (lambda tiled_as: tiled_as > 64) if form != "per-tile" else (lambda tiled_as: False)
    kernels.tma_ready = real_tma_ready if form == "persistent+tma" else (lambda *tensors: False)


def restore() -> None:
    kernels._persistent, kernels.tma_ready = real_persistent, real_tma_ready


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rounds", type=int, default=3, help="paired rounds per layer point")
parser.add_argument("--points", default="1:512:0.25,1:1024:0.25,1:512:0,1:1024:0", help="B:L:skip layer points")
args = parser.parse_args()
dev, dt = torch.device("cuda"), torch.bfloat16
torch.manual_seed(0)
w_q, w_g, w_u, w_d = gemm_weights(dev, dt)
results = {"gemm": [], "layer": []}
for T in (128, 256, 512, 1024):
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


for point in args.points.split(","):
    B, L, skip = point.split(":")
    B, L, skip = int(B), int(L), float(skip)
    hf = bench.step("hf", "prefill", B, L, skip)
    step = bench.step("triton-sparse", "prefill", B, L, skip)
    names = ["hf", *FORMS]
    fns = [hf, *(in_form(f, step) for f in FORMS)]
    for form in FORMS:
        use_form(form)
        print(f"B={B} L={L} skip {skip} {form:15s} host {per_call_us(step, 100):7.1f} us per step", flush=True)
    print(f"B={B} L={L} skip {skip} hf              host {per_call_us(hf, 100):7.1f} us per step", flush=True)
    for r in range(args.rounds):
        order = [(r + i) % len(fns) for i in range(len(fns))]  # rotated: no form always last
        timed_in_order = paired_timer([fns[i] for i in order], rep_ms=300)
        timed = [timed_in_order[order.index(i)] for i in range(len(fns))]
        row = dict(B=B, L=L, skip=skip, round=r, **{n: t[0] for n, t in zip(names, timed)})
        results["layer"].append(row)
        print(f"B={B} L={L} skip {skip} round {r}: " + "  ".join(
            f"{n} {t[0]:.3f} ms ({timed[0][0] / t[0]:.3f}x of hf)" for n, t in zip(names, timed)), flush=True)
restore()
out = os.path.join(os.environ.get("OUT", "/tmp"), "gemm-launch-ab.json")
with open(out, "w") as f:
    json.dump(results, f, indent=1)
print("wrote", out)
