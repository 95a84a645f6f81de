"""Where triton-sparse should switch between its forms (device machine).

1. The projections of one Llama-3.1-8B layer over M compacted rows: cuBLAS (the exact form,
   plus its Triton epilogue) against the capacity-form Triton GEMM under a few tile configs.
2. The routed layer (--scope model: a whole model) at prefill, triton-sparse forced into each
   form (capacity, exact), against hf and dense from the same run.

Usage: python tools/form_sweep.py [--json PATH] [--layer-only] [--scope model --layers 8]
                                  [--repeats 3] [--skips 0,0.25,0.5] [--compiled]
                                  [--points 1:512,1:1024] [--steady]
"""
import argparse
import json

import torch
import torch.nn.functional as F

from skipgpt.benchmark import LayerBench, ModelBench, cuda_timer, steady_timer
from skipgpt.ops.linear import kernels

H, I = 4096, 14336
# (block_m, block_n, block_k, num_warps, num_stages); None: what rows_gemm picks today.
PREFILL_CONFIGS = [None, (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                   (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
DECODE_CONFIGS = [None, (16, 32, 128, 4, 4), (16, 16, 256, 4, 3), (16, 32, 256, 4, 3), (16, 64, 256, 4, 3),
                  (16, 16, 128, 2, 4), (16, 32, 128, 2, 6), (32, 32, 128, 4, 4), (64, 32, 128, 4, 4)]


def rows_gemm_with(config, x, w, count, w2=None, residual=None, rows=None, slot=None):
    """rows_gemm, with its tiles replaced by `config` (None: its own)."""
    tiles = kernels._tiles if config is None else (lambda *args: config)

    def run():
        picked, kernels._tiles = kernels._tiles, tiles
        try:
            return kernels.rows_gemm(x, w, count, w2=w2, activation="silu" if w2 is not None else "none",
                                     residual=residual, rows=rows, slot=slot)
        finally:
            kernels._tiles = picked
    return run


def gemm_inputs(T: int, M: int, dev, dt):
    """A capacity-form step of T tokens, M of them executing at random: count [1], compact's rows
    [T] and slot [T], inputs x [T, H] and xi [T, I], residual [T, H]."""
    count = torch.tensor([M], dtype=torch.int32, device=dev)
    keep = torch.sort(torch.randperm(T, device=dev)[:M]).values
    rows = torch.full((T,), -1, dtype=torch.int32, device=dev)
    rows[:M] = keep.to(torch.int32)
    slot = torch.full((T,), -1, dtype=torch.int32, device=dev)
    slot[keep] = torch.arange(M, dtype=torch.int32, device=dev)
    x = torch.randn(T, H, device=dev, dtype=dt)
    xi = torch.randn(T, I, device=dev, dtype=dt)
    res = torch.randn(T, H, device=dev, dtype=dt)
    return count, rows, slot, x, xi, res


def gemm_weights(dev, dt):
    """Random Llama-3.1-8B projection weights: Q (also timed as o_proj) [H, H], gate and up [I, H],
    down [H, I]."""
    w_q = torch.randn(H, H, device=dev, dtype=dt) * 0.02
    w_g, w_u = (torch.randn(I, H, device=dev, dtype=dt) * 0.02 for _ in range(2))
    w_d = torch.randn(H, I, device=dev, dtype=dt) * 0.02
    return w_q, w_g, w_u, w_d


def gemm_sweep(results):
    dev, dt = torch.device("cuda"), torch.bfloat16
    w_q, w_g, w_u, w_d = gemm_weights(dev, dt)
    for T in (1, 8, 64, 128, 256, 512, 1024, 2048):
        M = max(1, int(T * 0.75))  # 25% skip
        count, rows, slot, x, xi, res = gemm_inputs(T, M, dev, dt)
        cases = {
            "q": (lambda: F.linear(x[:M], w_q), dict(x=x, w=w_q)),
            "o+res": (lambda: kernels.scatter_residual(res, F.linear(x[:M], w_q), slot), dict(x=x, w=w_q, residual=res, rows=rows, slot=slot)),
            "gated": (lambda: kernels.act_mul(F.linear(x[:M], w_g), F.linear(x[:M], w_u), "silu"), dict(x=x, w=w_g, w2=w_u)),
            "down+res": (lambda: kernels.scatter_residual(res, F.linear(xi[:M], w_d), slot), dict(x=xi, w=w_d, residual=res, rows=rows, slot=slot)),
        }
        for name, (cublas, args) in cases.items():
            row = {"T": T, "M": M, "gemm": name, "cublas_ms": cuda_timer(cublas)[0]}
            for cfg in DECODE_CONFIGS if T <= 64 else PREFILL_CONFIGS:
                if cfg is not None and cfg[0] > max(16, T):
                    continue
                try:
                    row[f"triton{cfg}"] = cuda_timer(rows_gemm_with(cfg, count=count, **args))[0]
                except Exception as e:  # out of shared memory for a big tile: record, go on
                    row[f"triton{cfg}"] = f"{type(e).__name__}"
            best = min((v, k) for k, v in row.items() if k.startswith("triton") and isinstance(v, float))
            row["best"] = best[1]
            results.append(row)
            print(row, flush=True)


# (B, L) prefill points from 256 to 2048 tokens, around the switch between the forms.
POINTS = ((1, 256), (1, 512), (2, 512), (4, 256), (1, 1024), (4, 512), (2, 1024), (1, 2048))


def form_sweep(bench, state, results, rep_ms, repeats, skips, compiled, points=POINTS, steady=False):
    """Each point with triton-sparse forced into each form, against hf and dense (and with
    `compiled`, compiled-sparse at the default switch) in the same run; the whole grid
    `repeats` times over, since host-bound points jitter between runs. steady: time them
    together, back to back in interleaved blocks (benchmark.steady_timer, as `skipgpt bench
    --steady`), where a form's host sync costs what it costs a model's consecutive layers.
    (The fused and unfused capacity forms: tools/fusion_ab.py.)"""
    default = state.capacity_max_tokens

    def step(provider, form, B, L, skip):
        fn = bench.step(provider, "prefill", B, L, skip)

        def switched():  # each step sets the switch it needs: under --steady the steps interleave
            state.capacity_max_tokens = default
            if form is not None:
                state.use_form(form)
            return fn()
        return switched

    names = ("hf", "dense") + (("compiled-sparse",) if compiled else ()) + state.FORMS
    specs = [(name, None) for name in names[:-len(state.FORMS)]] + [("triton-sparse", f) for f in state.FORMS]
    for run in range(repeats):
        for B, L in points:
            for skip in skips:
                row = {"scope": bench.scope, "run": run, "B": B, "L": L, "skip": skip}
                if steady:  # every step held at once, to interleave them
                    times = steady_timer([step(p, f, B, L, skip) for p, f in specs], rep_ms=rep_ms)
                    row.update({name: t[0] for name, t in zip(names, times)})
                else:  # one step at a time (a whole model's steps each hold their own memory)
                    row.update({name: cuda_timer(step(p, f, B, L, skip), rep_ms=rep_ms)[0]
                                for name, (p, f) in zip(names, specs)})
                state.capacity_max_tokens = default
                results.append(row)
                print(row, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--layer-only", action="store_true", help="skip the GEMM sweep")
    parser.add_argument("--rep", type=float, default=100, help="ms of timed repeats per point (default 100)")
    parser.add_argument("--repeats", type=int, default=1, help="times over the whole grid (default 1)")
    parser.add_argument("--skips", default="0.25", help="comma-separated skip rates (default 0.25)")
    parser.add_argument("--compiled", action="store_true", help="also time compiled-sparse (default switch)")
    parser.add_argument("--scope", choices=("layer", "model"), default="layer",
                        help="sweep one 8B layer, or a whole model of --layers 8B layers (default layer)")
    parser.add_argument("--layers", type=int, default=8, help="--scope model: decoder layers (default 8)")
    parser.add_argument("--points", help="B:L,B:L,... prefill points (default: 256 to 2048 tokens)")
    parser.add_argument("--steady", action="store_true",
                        help="time each point's steps together, back to back in interleaved blocks (as bench --steady)")
    args = parser.parse_args()
    points = [tuple(int(v) for v in p.split(":")) for p in args.points.split(",")] if args.points else POINTS
    skips = [float(s) for s in args.skips.split(",")]
    gemm_rows, layer_rows = [], []
    if not args.layer_only:
        gemm_sweep(gemm_rows)
    device = torch.device("cuda")
    if args.scope == "layer":
        bench = LayerBench("llama-3.1-8b", torch.bfloat16, device)
        state = bench.state
    else:
        bench = ModelBench("llama-3.1-8b", torch.bfloat16, device, layers=args.layers, fp32_reference=False)
        state = bench.routed.model.skipgpt_routing
    form_sweep(bench, state, layer_rows, args.rep, args.repeats, skips, args.compiled, points, args.steady)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gemm": gemm_rows, "layer": layer_rows, "gpu": torch.cuda.get_device_name()}, f, indent=1)
