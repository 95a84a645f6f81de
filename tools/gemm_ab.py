"""rows_gemm against an earlier version of itself and cuBLAS, with and without TMA loads, from
decode sizes (1 row) to 1024 rows, at 0% and 25% skip (Llama-3.1-8B projections, bf16; device
machine). The earlier kernels module is a file, loaded as a sibling of today's:

    git show 6d971d8:ops/linear/kernels.py > old_kernels.py
    python tools/gemm_ab.py old_kernels.py        # writes $OUT/gemm-ab.json (or /tmp)

The earlier module must take rows_gemm's keyword arguments of 6d971d8 (residual via slot only).
"now, TMA" and "now, pointers" force tma_ready's answer; rows_gemm loads through TMA only above
64 rows, so the two agree below.
"""
import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

from form_sweep import gemm_inputs, gemm_weights  # this folder is on sys.path when run as a script
from skipgpt.benchmark import cuda_timer
from skipgpt.ops.linear import kernels

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("earlier", help="an earlier ops/linear/kernels.py, as `git show REV:ops/linear/kernels.py` writes it")
args = parser.parse_args()
if not os.path.isfile(args.earlier):
    sys.exit(f"gemm_ab: no such file: {args.earlier}")
spec = importlib.util.spec_from_file_location("skipgpt.ops.linear._earlier_kernels", args.earlier)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)

dev, dt = torch.device("cuda"), torch.bfloat16
torch.manual_seed(0)
w_q, w_g, w_u, w_d = gemm_weights(dev, dt)
results = []
real_ready = kernels.tma_ready
for T in (1, 8, 16, 32, 64, 128, 256, 512, 1024):
    for skip in (0.0, 0.25):
        M = max(1, T - int(T * skip))
        count, rows, slot, x, xi, res = gemm_inputs(T, M, dev, dt)
        cases = {
            "q": (dict(x=x, weight=w_q), {}, lambda: F.linear(x[:M], w_q)),
            "gated": (dict(x=x, weight=w_g, w2=w_u, activation="silu"), {}, lambda: kernels.act_mul(F.linear(x[:M], w_g), F.linear(x[:M], w_u), "silu")),
            "o+res": (dict(x=x, weight=w_q, residual=res, slot=slot), dict(rows=rows), lambda: kernels.scatter_residual(res, F.linear(x[:M], w_q), slot)),
            "down+res": (dict(x=xi, weight=w_d, residual=res, slot=slot), dict(rows=rows), lambda: kernels.scatter_residual(res, F.linear(xi[:M], w_d), slot)),
        }
        for name, (op_args, extra, cublas) in cases.items():
            row = {"T": T, "M": M, "gemm": name, "cublas": cuda_timer(cublas)[0] * 1e3}
            row["old"] = cuda_timer(lambda: old.rows_gemm(count=count, **op_args))[0] * 1e3
            for tma in (True, False):
                kernels.tma_ready = (lambda *t: real_ready(*t)) if tma else (lambda *t: False)
                row["new_tma" if tma else "new_ptr"] = cuda_timer(lambda: kernels.rows_gemm(count=count, **op_args, **extra))[0] * 1e3
            kernels.tma_ready = real_ready
            results.append(row)
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
json.dump(results, open(os.path.join(os.environ.get("OUT", "/tmp"), "gemm-ab.json"), "w"), indent=1)
