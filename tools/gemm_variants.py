"""Prototype capacity-form GEMM schedules against rows_gemm and cuBLAS (device machine).

Variants of one kernel, picked by constexpr flags: the weights (and the rows) loaded through
TMA tensor descriptors rather than pointers; a persistent grid over the live tiles only; the
residual projections (o_proj, down_proj) over the compacted rows, scattered onto their tokens
through `rows`, with the skipping tokens' residual rows copied by the same launch (rows_gemm
runs them over every token's row instead). Llama-3.1-8B shapes, bf16.

Usage: python tools/gemm_variants.py [--json PATH] [--rows 512,1024] [--skips 0,0.25,0.5]
"""
import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from skipgpt.benchmark import cuda_timer
from skipgpt.ops.linear import kernels

H, I = 4096, 14336


@triton.jit(do_not_specialize=["M", "T"])
def _variant_kernel(
    x_ptr, w_ptr, w2_ptr, res_ptr, out_ptr, rows_ptr, slot_ptr, count_ptr, M, T,
    N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, RESIDUAL: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    limit = tl.minimum(tl.load(count_ptr), M)
    col_tiles: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    if PERSISTENT:
        row_tiles = tl.cdiv(limit, BLOCK_M)  # live tiles only
    else:
        row_tiles = tl.cdiv(M, BLOCK_M)
    gemm_tiles = row_tiles * col_tiles
    copy_tiles = 0
    if RESIDUAL:
        copy_tiles = tl.cdiv(T, BLOCK_M) * col_tiles
    if W_TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        w2_desc = tl.make_tensor_descriptor(w2_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    if A_TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[limit, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    if PERSISTENT:
        first = tl.program_id(0)
        step = NUM_PROGRAMS
        end = gemm_tiles + copy_tiles
    else:
        first = tl.program_id(0)
        step = 1
        end = first + 1
    for tile in range(first, end, step):
        if tile < gemm_tiles:
            pid_m = tile % row_tiles
            pid_n = tile // row_tiles
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            a_ok = offs_m < limit
            k_end = tl.where(pid_m * BLOCK_M < limit, K, 0)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, k_end, BLOCK_K):
                if A_TMA:
                    a = x_desc.load([pid_m * BLOCK_M, k0])
                else:
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=a_ok[:, None], other=0.0)
                if W_TMA:
                    acc = tl.dot(a, w_desc.load([pid_n * BLOCK_N, k0]).T, acc)
                    if GATED:
                        acc2 = tl.dot(a, w2_desc.load([pid_n * BLOCK_N, k0]).T, acc2)
                else:
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    w_off = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
                    acc = tl.dot(a, tl.load(w_ptr + w_off), acc)
                    if GATED:
                        acc2 = tl.dot(a, tl.load(w2_ptr + w_off), acc2)
            dtype = out_ptr.dtype.element_ty
            y = acc.to(dtype)
            if GATED:
                g = y.to(tl.float32)
                y = ((g * tl.sigmoid(g)).to(dtype).to(tl.float32) * acc2.to(dtype).to(tl.float32)).to(dtype)
            if RESIDUAL:
                tok = tl.load(rows_ptr + offs_m, mask=a_ok, other=-1)
                ok = a_ok & (tok >= 0) & (tok < T)
                dst = tl.where(ok, tok, 0).to(tl.int64)[:, None] * N + offs_n[None, :]
                res = tl.load(res_ptr + dst, mask=ok[:, None], other=0.0)
                tl.store(out_ptr + dst, (res.to(tl.float32) + y.to(tl.float32)).to(dtype), mask=ok[:, None])
            else:
                tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y, mask=a_ok[:, None])
        elif tile < gemm_tiles + copy_tiles:
            c = tile - gemm_tiles
            t_tiles = tl.cdiv(T, BLOCK_M)
            offs_t = (c % t_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = (c // t_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            t_ok = offs_t < T
            s = tl.load(slot_ptr + offs_t, mask=t_ok, other=-1)
            keep = t_ok & ((s < 0) | (s >= limit))
            off = offs_t[:, None].to(tl.int64) * N + offs_n[None, :]
            tl.store(out_ptr + off, tl.load(res_ptr + off, mask=keep[:, None], other=0.0), mask=keep[:, None])


def variant(config, flags, x, w, count, w2=None, residual=None, rows=None, slot=None):
    bm, bn, bk, warps, stages = config
    M, K = x.shape
    N = w.shape[0]
    T = residual.shape[0] if residual is not None else M
    out = torch.empty(T if residual is not None else M, N, dtype=x.dtype, device=x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    persistent = flags.get("persistent", False)
    grid_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn) + (triton.cdiv(T, bm) * triton.cdiv(N, bn) if residual is not None else 0)
    grid = (sms * flags.get("per_sm", 1),) if persistent else (grid_tiles,)

    def run():
        _variant_kernel[grid](
            x, w, w2 if w2 is not None else w, residual if residual is not None else out, out,
            rows if rows is not None else count, slot if slot is not None else count, count, M, T,
            N=N, K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GATED=w2 is not None, RESIDUAL=residual is not None,
            A_TMA=flags.get("a_tma", False), W_TMA=flags.get("w_tma", False), PERSISTENT=persistent,
            NUM_PROGRAMS=grid[0], num_warps=warps, num_stages=stages)
        return out
    return run


FLAGS = {
    "ptr": {},
    "w_tma": {"w_tma": True},
    "aw_tma": {"w_tma": True, "a_tma": True},
    "persist_ptr": {"persistent": True},
    "persist_aw_tma": {"w_tma": True, "a_tma": True, "persistent": True},
}
GATED_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
SINGLE_CONFIGS = [(128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4)]


def sweep(results, row_counts, skips, rep_ms):
    dev, dt = torch.device("cuda"), torch.bfloat16
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device=dev, dtype=torch.int8))
    torch.manual_seed(0)
    w_q = torch.randn(H, H, device=dev, dtype=dt) * 0.02
    w_g, w_u = (torch.randn(I, H, device=dev, dtype=dt) * 0.02 for _ in range(2))
    w_gu = torch.cat([w_g, w_u])
    w_d = torch.randn(H, I, device=dev, dtype=dt) * 0.02
    for T in row_counts:
        for skip in skips:
            M = T - int(T * skip)
            count = torch.tensor([M], dtype=torch.int32, device=dev)
            keep = torch.sort(torch.randperm(T, device=dev)[:M]).values
            rows = torch.full((T,), -1, dtype=torch.int32, device=dev)
            rows[:M] = keep.to(torch.int32)
            slot = torch.full((T,), -1, dtype=torch.int32, device=dev)
            slot[keep] = torch.arange(M, dtype=torch.int32, device=dev)
            x = torch.randn(T, H, device=dev, dtype=dt)
            xi = torch.randn(T, I, device=dev, dtype=dt)
            res = torch.randn(T, H, device=dev, dtype=dt)
            cases = {
                "q": dict(x=x, w=w_q, cublas=lambda: F.linear(x[:M], w_q),
                          ref=lambda: F.linear(x[:M], w_q), configs=SINGLE_CONFIGS),
                "gated": dict(x=x, w=w_g, w2=w_u,
                              cublas=lambda: kernels.act_mul(F.linear(x[:M], w_g), F.linear(x[:M], w_u), "silu"),
                              cublas_cat=lambda: F.linear(x[:M], w_gu),
                              ref=lambda: kernels.act_mul(F.linear(x[:M], w_g), F.linear(x[:M], w_u), "silu"),
                              configs=GATED_CONFIGS),
                "o+res": dict(x=x, w=w_q, residual=res,
                              cublas=lambda: kernels.scatter_residual(res, F.linear(x[:M], w_q), slot),
                              ref=lambda: kernels.scatter_residual(res, F.linear(x[:M], w_q), slot),
                              configs=SINGLE_CONFIGS),
                "down+res": dict(x=xi, w=w_d, residual=res,
                                 cublas=lambda: kernels.scatter_residual(res, F.linear(xi[:M], w_d), slot),
                                 ref=lambda: kernels.scatter_residual(res, F.linear(xi[:M], w_d), slot),
                                 configs=SINGLE_CONFIGS),
            }
            for name, case in cases.items():
                configs = case.pop("configs")
                ref = case.pop("ref")()
                row = {"T": T, "M": M, "skip": skip, "gemm": name, "cublas": cuda_timer(case.pop("cublas"), rep_ms=rep_ms)[0]}
                if "cublas_cat" in case:
                    row["cublas_cat"] = cuda_timer(case.pop("cublas_cat"), rep_ms=rep_ms)[0]
                w2, resid = case.get("w2"), case.get("residual")
                prod = lambda: kernels.rows_gemm(case["x"], case["w"], count, w2=w2, activation="silu" if w2 is not None else "none",
                                                 residual=resid, slot=slot if resid is not None else None)
                row["prod"] = cuda_timer(prod, rep_ms=rep_ms)[0]
                for fname, flags in FLAGS.items():
                    for cfg in configs:
                        key = f"{fname}{cfg}"
                        try:
                            fn = variant(cfg, flags, count=count, rows=rows, slot=slot, **case)
                            out = fn()
                            got = out[:M] if resid is None else out
                            want = ref[:M] if resid is None else ref
                            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                            if not err < 1e-2:
                                row[key] = f"wrong {err:.3g}"
                                continue
                            row[key] = cuda_timer(fn, rep_ms=rep_ms)[0]
                        except Exception as e:
                            row[key] = f"{type(e).__name__}: {str(e)[:120]}"
                timed = [(v, k) for k, v in row.items() if isinstance(v, float) and k not in ("skip",)]
                row["best"] = min(timed)[1]
                results.append(row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--rows", default="512,1024", help="comma-separated token counts T (default 512,1024)")
    parser.add_argument("--skips", default="0,0.25,0.5", help="comma-separated skip rates (default 0,0.25,0.5)")
    parser.add_argument("--rep", type=float, default=50, help="ms of timed repeats per variant (default 50)")
    args = parser.parse_args()
    results = []
    try:
        sweep(results, [int(t) for t in args.rows.split(",")], [float(s) for s in args.skips.split(",")], args.rep)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
