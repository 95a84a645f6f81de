"""Triton kernels for projections over compacted rows.

- `act_mul` and `scatter_residual` finish the exact-count path, whose GEMMs run in cuBLAS.
- `rows_gemm` is the capacity-form GEMM: it reads the executing count on the device, so a
  module that no row executes exits before streaming a byte of its weights. Optional epilogues:
  bias, gated activation (two weights), residual add scattered through `slot`.
"""
import torch
import triton
import triton.language as tl

from .._common import known_empty, launch

ACT_IDS = {"none": 0, "silu": 1, "relu": 2}


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 1:
        x = x * tl.sigmoid(x)
    elif ACT == 2:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit(do_not_specialize=["M", "N"])
def _act_mul_kernel(g_ptr, u_ptr, out_ptr, M, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * N + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * N + cols, mask=ok, other=0.0)
    # Round where the Hugging Face MLP rounds: after the activation, then after the product.
    a = _activate(g.to(tl.float32), ACT).to(g.dtype)
    tl.store(out_ptr + row * N + cols, (a.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


# slot/count are views at offsets into the compacted tensors (route set 1, seq_offsets[r, B:]) whose
# alignment moves with the token count: not specialised on, so a new length never recompiles.
@triton.jit(do_not_specialize=["T", "M", "N", "slot_ptr"])
def _scatter_residual_kernel(res_ptr, y_ptr, out_ptr, slot_ptr, T, M, N, HAS_SLOT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    res = tl.load(res_ptr + t * N + cols, mask=ok, other=0.0)
    if HAS_SLOT:
        src = tl.load(slot_ptr + t).to(tl.int64)
    else:
        src = t
    take = (src >= 0) & (src < M)
    y = tl.load(y_ptr + tl.where(take, src, 0) * N + cols, mask=ok & take, other=0.0)
    out = tl.where(take, (res.to(tl.float32) + y.to(tl.float32)).to(res.dtype), res)
    tl.store(out_ptr + t * N + cols, out, mask=ok)


@triton.jit(do_not_specialize=["M", "T", "slot_ptr", "count_ptr"])
def _rows_gemm_kernel(
    x_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr, slot_ptr, count_ptr,
    M, T,
    N: tl.constexpr, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    limit = tl.minimum(tl.load(count_ptr), M)
    if RESIDUAL:  # output rows are tokens; token t reads x[slot[t]]
        out_ok = offs_m < T
        src = tl.load(slot_ptr + offs_m, mask=out_ok, other=-1)
        a_ok = out_ok & (src >= 0) & (src < limit)
    else:  # output rows are x's rows
        src = offs_m
        a_ok = offs_m < limit
    src = tl.where(a_ok, src, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # No executing row in this block: skip the K loop, so the weights are never read.
    k_end = tl.where(tl.max(a_ok.to(tl.int32), axis=0) > 0, K, 0)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(x_ptr + src[:, None] * K + offs_k[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
        w_ok = n_ok[None, :] & k_ok[:, None]
        acc += tl.dot(a, tl.load(w_ptr + w_off, mask=w_ok, other=0.0), input_precision=DOT_PRECISION)
        if GATED:
            acc2 += tl.dot(a, tl.load(w2_ptr + w_off, mask=w_ok, other=0.0), input_precision=DOT_PRECISION)
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if GATED:
        a_act = _activate(y.to(tl.float32), ACT).to(dtype)
        y = (a_act.to(tl.float32) * acc2.to(dtype).to(tl.float32)).to(dtype)
    out_off = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if RESIDUAL:
        res = tl.load(res_ptr + out_off, mask=out_ok[:, None] & n_ok[None, :], other=0.0)
        y = tl.where(a_ok[:, None], (res.to(tl.float32) + y.to(tl.float32)).to(dtype), res)
        tl.store(out_ptr + out_off, y, mask=out_ok[:, None] & n_ok[None, :])
    else:
        tl.store(out_ptr + out_off, y, mask=a_ok[:, None] & n_ok[None, :])


def _elementwise_block(n: int) -> int:
    return min(1024, triton.next_power_of_2(max(n, 1)))


def act_mul(g, u, activation):
    out = torch.empty_like(g)
    M, N = g.shape
    if not known_empty(M * N):
        block = _elementwise_block(N)
        launch(_act_mul_kernel)[(M, triton.cdiv(N, block))](g, u, out, M, N, ACT=ACT_IDS[activation], BLOCK=block)
    return out


def scatter_residual(residual, y, slot):
    out = torch.empty_like(residual)
    T, N = residual.shape
    if not known_empty(T * N):
        block = _elementwise_block(N)
        launch(_scatter_residual_kernel)[(T, triton.cdiv(N, block))](
            residual, y, out, slot if slot is not None else residual, T, y.shape[0], N,
            HAS_SLOT=slot is not None, BLOCK=block,
        )
    return out


def _tiles(rows: int, itemsize: int, gated: bool, on_gpu: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a GEMM with `rows` output rows.
    Picked from the bucketed row count only, so a new batch or length never recompiles.
    Measured on an H100 with tools/form_sweep.py (Llama-3.1-8B projections, bf16): up to 64 rows
    (decode) the GEMM streams weights, and narrow 32-column tiles spread them over more SMs (the
    4096-wide projections get 128 programs instead of 64); from 128 rows (a capacity-form
    prefill) 128x128 tiles reuse each weight tile across rows."""
    if not on_gpu:  # the interpreter: small tiles keep CPU tests fast
        return min(64, max(16, triton.next_power_of_2(rows))), 16, 32, 4, 1
    # fp32 tiles take twice the shared memory of 16-bit ones: halve BLOCK_K to stay within a
    # Hopper SM's 227 KB (the gated GEMM's 128x128x64 pipeline would need 288 KB in fp32).
    wide = itemsize <= 2
    if rows <= 16:
        return (16, 32, 256 if wide else 128, 4, 3) if gated else (16, 32, 128 if wide else 64, 2, 6)
    if rows <= 64:
        return triton.next_power_of_2(rows), 64 if gated else 32, 128 if wide else 64, 4, 4
    return 128, 128, 64 if wide else 32, 8, 3


def rows_gemm(x, weight, count, *, bias=None, w2=None, activation="none", residual=None, slot=None):
    """Capacity-form GEMM: see the module docstring. Returns [M, N], or [T, N] with residual."""
    M, K = x.shape
    N = weight.shape[0]
    out_rows = residual.shape[0] if residual is not None else M
    out = torch.empty(out_rows, N, dtype=x.dtype, device=x.device)
    if known_empty(out_rows * N):
        return out
    block_m, block_n, block_k, warps, stages = _tiles(out_rows, x.element_size(), w2 is not None, x.device.type == "cuda")
    dummy = x  # for absent pointers (never dereferenced): an input, never the output
    launch(_rows_gemm_kernel)[(triton.cdiv(N, block_n), triton.cdiv(out_rows, block_m))](
        x, weight, w2 if w2 is not None else dummy, bias if bias is not None else dummy,
        residual if residual is not None else dummy, out, slot if slot is not None else dummy, count,
        M, out_rows, N=N, K=K, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        ACT=ACT_IDS[activation], GATED=w2 is not None, HAS_BIAS=bias is not None,
        RESIDUAL=residual is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    return out
