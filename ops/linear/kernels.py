"""Triton kernels for projections over compacted rows.

- `act_mul` and `scatter_residual` finish the exact-count path, whose GEMMs run in cuBLAS.
- `rows_gemm` is the capacity-form GEMM: it reads the executing count on the device, so a
  module that no row executes exits before streaming a byte of its weights. Optional epilogues:
  bias, gated activation (two weights), residual add onto each row's token (`rows`), in which
  case the same launch copies the residual rows of the tokens that no row takes.
- `qkv_rope_write` is the attention's input stage after its RMSNorm in one launch: the Q
  projection of the gathered executing rows and the K/V projections of every token, RoPE on Q
  and K, and the K/V write into the seq-first cache.
"""
import torch
import triton
import triton.language as tl

from .._common import cdiv, dot_precision, known_empty, launch, next_power_of_2, num_sms, tma_ready

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


@triton.jit
def _rows_gemm_tile(
    x_ptr, x_desc, w_ptr, w_desc, w2_ptr, w2_desc, bias_ptr, res_ptr, out_ptr, rows_ptr, slot_ptr,
    pid_m, pid_n, limit, T,
    N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Output tile (pid_m, pid_n) of rows_gemm: x's rows pid_m * BLOCK_M.. below `limit`."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    a_ok = offs_m < limit
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # A tile past the executing rows skips the K loop, so its weights are never read.
    k_end = tl.where(pid_m * BLOCK_M < limit, K, 0)
    for k0 in range(0, k_end, BLOCK_K):
        if TMA:  # rows past `limit` and columns past N come back zero
            a = x_desc.load([pid_m * BLOCK_M, k0])
            acc = tl.dot(a, w_desc.load([pid_n * BLOCK_N, k0]).T, acc, input_precision=DOT_PRECISION)
            if GATED:
                acc2 = tl.dot(a, w2_desc.load([pid_n * BLOCK_N, k0]).T, acc2, input_precision=DOT_PRECISION)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
                        mask=a_ok[:, None] & k_ok[None, :], other=0.0)
            w_off = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
            w_ok = n_ok[None, :] & k_ok[:, None]
            acc = tl.dot(a, tl.load(w_ptr + w_off, mask=w_ok, other=0.0), acc, input_precision=DOT_PRECISION)
            if GATED:
                acc2 = tl.dot(a, tl.load(w2_ptr + w_off, mask=w_ok, other=0.0), acc2, input_precision=DOT_PRECISION)
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if GATED:
        a_act = _activate(y.to(tl.float32), ACT).to(dtype)
        y = (a_act.to(tl.float32) * acc2.to(dtype).to(tl.float32)).to(dtype)
    if RESIDUAL:
        # Row m belongs to token rows[m], and only if slot[rows[m]] == m: a token is then written
        # by exactly one program, here or in _copy_skipped_rows, whatever the index data hold.
        tok = tl.load(rows_ptr + offs_m, mask=a_ok, other=-1)
        ok = a_ok & (tok >= 0) & (tok < T)
        tok = tl.where(ok, tok, 0)
        ok = ok & (tl.load(slot_ptr + tok, mask=ok, other=-1) == offs_m)
        out_off = tok.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = ok[:, None] & n_ok[None, :]
        res = tl.load(res_ptr + out_off, mask=mask, other=0.0)
        tl.store(out_ptr + out_off, (res.to(tl.float32) + y.to(tl.float32)).to(dtype), mask=mask)
    else:
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y, mask=a_ok[:, None] & n_ok[None, :])


@triton.jit
def _copy_skipped_rows(res_ptr, out_ptr, rows_ptr, slot_ptr, pid_t, pid_n, limit, T,
                       N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = residual[t] for the tokens t of tile (pid_t, pid_n) that no row m < limit takes."""
    offs_t = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = offs_t < T
    s = tl.load(slot_ptr + offs_t, mask=t_ok, other=-1)
    taken = t_ok & (s >= 0) & (s < limit)
    taken = taken & (tl.load(rows_ptr + tl.where(taken, s, 0), mask=taken, other=-1) == offs_t)
    mask = (t_ok & ~taken)[:, None] & (offs_n < N)[None, :]
    off = offs_t[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptr + off, tl.load(res_ptr + off, mask=mask, other=0.0), mask=mask)


# rows/slot/count are views at offsets into the compacted tensors whose alignment moves with the
# token count: not specialised on, so a new length never recompiles.
@triton.jit(do_not_specialize=["M", "T", "rows_ptr", "slot_ptr", "count_ptr"])
def _rows_gemm_kernel(
    x_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr, rows_ptr, slot_ptr, count_ptr,
    M, T,
    N: tl.constexpr, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
    TMA: tl.constexpr, PROGRAMS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Tiles: first the GEMM's, row tiles varying fastest, so the programs that share a weight
    # tile run together and read it from HBM once; then, with RESIDUAL, the copies of the tokens
    # no row takes. PROGRAMS > 0: a persistent grid of that many programs strides over the tiles
    # of the rows below the count only (no program is launched just to exit); PROGRAMS == 0: one
    # program per tile of all M rows.
    limit = tl.maximum(tl.minimum(tl.load(count_ptr), M), 0)  # a negative count: no row
    COL_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    if PROGRAMS > 0:
        row_tiles = tl.cdiv(limit, BLOCK_M)
    else:
        row_tiles = tl.cdiv(M, BLOCK_M)
    gemm_tiles = row_tiles * COL_TILES
    tiles = gemm_tiles
    if RESIDUAL:
        tiles += tl.cdiv(T, BLOCK_M) * COL_TILES
    x_desc = x_ptr
    w_desc = w_ptr
    w2_desc = w2_ptr
    if TMA:  # needs 16-byte aligned bases and row strides (rows_gemm checks)
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[limit, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        if GATED:
            w2_desc = tl.make_tensor_descriptor(w2_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    if PROGRAMS > 0:
        step = PROGRAMS
    else:
        step = 1
        tiles = tl.minimum(tiles, tl.program_id(0) + 1)
    for tile in range(tl.program_id(0), tiles, step):
        if tile < gemm_tiles:
            _rows_gemm_tile(x_ptr, x_desc, w_ptr, w_desc, w2_ptr, w2_desc, bias_ptr, res_ptr, out_ptr, rows_ptr,
                            slot_ptr, tile % row_tiles, tile // row_tiles, limit, T, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                            ACT, GATED, HAS_BIAS, RESIDUAL, TMA, DOT_PRECISION)
        else:
            copy = tile - gemm_tiles
            token_tiles = tl.cdiv(T, BLOCK_M)
            _copy_skipped_rows(res_ptr, out_ptr, rows_ptr, slot_ptr, copy % token_tiles, copy // token_tiles, limit,
                               T, N, BLOCK_M, BLOCK_N)


def _elementwise_block(n: int) -> int:
    return min(1024, next_power_of_2(max(n, 1)))


def act_mul(g, u, activation):
    out = torch.empty_like(g)
    M, N = g.shape
    if not known_empty(M * N):
        block = _elementwise_block(N)
        launch(_act_mul_kernel)[(M, cdiv(N, block))](g, u, out, M, N, ACT=ACT_IDS[activation], BLOCK=block)
    return out


def scatter_residual(residual, y, slot):
    out = torch.empty_like(residual)
    T, N = residual.shape
    if not known_empty(T * N):
        block = _elementwise_block(N)
        launch(_scatter_residual_kernel)[(T, cdiv(N, block))](
            residual, y, out, slot if slot is not None else residual, T, y.shape[0], N,
            HAS_SLOT=slot is not None, BLOCK=block,
        )
    return out


def _tiles(rows: int, itemsize: int, kind: str, on_gpu: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a GEMM over `rows` input rows;
    kind: "single" (one accumulator), "gated" (two: gate and up) or "halves" (two, each half the
    tile's columns: a head's halves in qkv_rope_write).
    Picked from the bucketed row count only, so a new batch or length never recompiles.
    Measured on an H100 with tools/form_sweep.py (Llama-3.1-8B projections, bf16;
    docs/bench/form-sweep-gemm-and-layer.json): up to 64 rows (decode) the GEMM streams weights,
    and narrow 32-column tiles spread them over more SMs (the 4096-wide projections get 128
    programs instead of 64). From 128 rows (a capacity-form prefill) 128-row tiles reuse each
    weight tile across rows; a single GEMM's tiles widen with the rows (64, 128, then 256
    columns: enough programs for the SMs first, then fewer passes over the rows), while the
    two-accumulator GEMMs stay at 128x128. Re-measured for the persistent TMA kernel on an H200
    (docs/bench/form-sweep-gemm-and-layer-599c7df-draft.json): the gated GEMM gains a fourth stage,
    and past 1024 rows (capacity-form steps of 1025-2048 tokens) 128x128 tiles beat 128x256."""
    if not on_gpu:  # the interpreter: small tiles keep CPU tests fast
        return min(64, max(16, next_power_of_2(rows))), 16, 32, 4, 1
    # fp32 tiles take twice the shared memory of 16-bit ones: halve BLOCK_K to stay within a
    # Hopper SM's 227 KB (the gated GEMM's 128x128x64 pipeline would need 288 KB in fp32).
    wide = itemsize <= 2
    block_k = 64 if wide else 32
    gated = kind == "gated"
    if rows <= 16:
        return (16, 32, 256 if wide else 128, 4, 3) if gated else (16, 32, 128 if wide else 64, 2, 6)
    if rows <= 64:
        return next_power_of_2(rows), 64 if gated else 32, 128 if wide else 64, 4, 4
    if kind != "single":  # two accumulators (wider tiles run out of registers or shared memory)
        return 128, 128, block_k, 8, 4 if gated and wide else 3
    if rows <= 256:
        return 128, 64, block_k, 4, 4
    if rows <= 512 or rows > 1024:
        return 128, 128, block_k, 4, 4
    return 128, 256, block_k, 8, 3


# Capacity-form GEMMs of up to this many rows launch one program per tile with pointer loads, as
# decode-sized ones do. Such steps are bound by host time, and the persistent grid's TMA
# descriptors cost each launch ~13 us more of it (Triton asks the host for their scratch memory),
# more than they save on the GPU: eager layer steps of B=1 L=512, timed back to back in
# interleaved blocks, ran 1.07-1.09x faster than hf per tile, 0.99-1.01x with the persistent TMA
# grid, though that grid took 7-15% less GPU time (H200; docs/bench/gemm-launch-ab-a1b8a27.json).
# At 1024 rows, where the GPU bounds the step, the persistent TMA grid won: 1.18-1.28x against
# 1.02-1.10x. Up to 256 rows the two grids took the same GPU time; at 257-512 rows a CUDA-graph
# replay (no host time) would gain ~14% of these GEMMs' time with the persistent grid, which is
# not taken: those are decode batches of more than 256 sequences, captured.
PER_TILE_MAX_ROWS = 512


def rows_gemm(x, weight, count, *, bias=None, w2=None, activation="none", residual=None, rows=None, slot=None,
              tile_rows=None):
    """Capacity-form GEMM: see the module docstring. Returns [M, N], or [T, N] with residual
    (rows [M] and slot [T] given: x's row m is token rows[m]'s).
    tile_rows: the row count to pick tiles by (default: x's rows; a symbolic one would guard).
    Above PER_TILE_MAX_ROWS rows a persistent grid of one program per SM strides over the live
    tiles, and operands with 16-byte aligned rows load through TMA descriptors: 1.1-1.3x less GPU
    time than one program per tile with pointer loads above 512 rows, most of it in the gated GEMM
    (docs/bench/gemm-variants-6d971d8.json, H200)."""
    if not (residual is None) == (rows is None) == (slot is None):
        raise ValueError("rows_gemm: residual, rows and slot go together")
    M, K = x.shape
    N = weight.shape[0]
    T = residual.shape[0] if residual is not None else M
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if known_empty(T * N):
        return out
    on_gpu = x.device.type == "cuda"
    tiled_as = M if tile_rows is None else tile_rows
    block_m, block_n, block_k, warps, stages = _tiles(tiled_as, x.element_size(), "gated" if w2 is not None else "single",
                                                      on_gpu)
    # Above PER_TILE_MAX_ROWS: persistent, and TMA loads where the operands allow. Up to it: one
    # program per tile, whose weights spread over the SMs, and pointer loads (at decode sizes TMA
    # took 1-5 us longer in graph replays too; docs/bench/gemm-ab-599c7df-vs-6d971d8.json).
    persistent = tiled_as > PER_TILE_MAX_ROWS
    tma = persistent and tma_ready(*(t for t in (x, weight, w2) if t is not None))
    if persistent:
        programs = num_sms(x.device)
        grid = (programs,)
    else:
        programs = 0
        grid = (cdiv(M, block_m) * cdiv(N, block_n) + (cdiv(T, block_m) * cdiv(N, block_n) if residual is not None else 0),)
    dummy = x  # for absent pointers (never dereferenced): an input, never the output
    launch(_rows_gemm_kernel, scratch=tma and on_gpu)[grid](
        x, weight, w2 if w2 is not None else dummy, bias if bias is not None else dummy,
        residual if residual is not None else dummy, out, rows if rows is not None else count,
        slot if slot is not None else count, count,  # count for absent index pointers, never dereferenced
        M, T, N=N, K=K, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        ACT=ACT_IDS[activation], GATED=w2 is not None, HAS_BIAS=bias is not None,
        RESIDUAL=residual is not None, TMA=tma, PROGRAMS=programs,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out


@triton.jit
def _head_halves(x_ptr, src, a_ok, k_end, w_ptr, lo, c_ok, K: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x[src] @ w[lo].T and x[src] @ w[lo + HALF].T, [BLOCK_M, BLOCK_H] fp32 each: a head's two
    halves, which RoPE rotates together. Called with each weight argument itself rather than a
    pointer picked at run time, whose alignment Triton could not see."""
    acc_lo = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(x_ptr + src[:, None] * K + offs_k[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = lo[None, :].to(tl.int64) * K + offs_k[:, None]
        w_mask = c_ok[None, :] & k_ok[:, None]
        acc_lo += tl.dot(a, tl.load(w_ptr + w_off, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
        acc_hi += tl.dot(a, tl.load(w_ptr + w_off + HALF * K, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
    return acc_lo, acc_hi


# Index pointers and sizes unspecialised, as for the scatter kernel above.
@triton.jit(do_not_specialize=["T", "M", "L", "S", "rows_ptr", "count_ptr", "start_ptr"])
def _qkv_rope_write_kernel(
    x_ptr, wq_ptr, wk_ptr, wv_ptr, bq_ptr, bk_ptr, bv_ptr, cos_ptr, sin_ptr,
    rows_ptr, count_ptr, q_ptr, kc_ptr, vc_ptr, start_ptr,
    T, M, L, S,
    K: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_COUNT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (m, n): rows m*BLOCK_M.. of one head's BLOCK_H column pairs (c, c + HEAD_DIM/2),
    # the pairs RoPE rotates together. Heads run Q (gathered rows), then K, then V (every token).
    # Row tiles vary fastest, so each weight tile is read from HBM once (as in _rows_gemm_kernel).
    HALF: tl.constexpr = HEAD_DIM // 2
    CHUNKS: tl.constexpr = (HALF + BLOCK_H - 1) // BLOCK_H
    head = tl.program_id(1) // CHUNKS
    c = (tl.program_id(1) % CHUNKS) * BLOCK_H + tl.arange(0, BLOCK_H)
    c_ok = c < HALF
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    is_q = head < HQ
    is_v = head >= HQ + HK
    h = tl.where(is_q, head, tl.where(is_v, head - HQ - HK, head - HQ))
    limit = M
    if HAS_COUNT:
        limit = tl.minimum(tl.load(count_ptr), M)
    limit = tl.where(is_q, limit, T)
    live = offs_m < limit  # rows to store; a query row whose index is outside [0, T) projects a zero row
    src = tl.where(is_q, tl.load(rows_ptr + offs_m, mask=is_q & live, other=-1), offs_m)
    a_ok = live & (src >= 0) & (src < T)
    src = tl.where(a_ok, src, 0).to(tl.int64)  # and rotates with table row 0, as the rope op does
    lo = h * HEAD_DIM + c  # output features (weight rows) of the first half; + HALF the second
    k_end = tl.where(tl.max(a_ok.to(tl.int32), axis=0) > 0, K, 0)  # no row: never read weights
    if is_q:
        acc_lo, acc_hi = _head_halves(x_ptr, src, a_ok, k_end, wq_ptr, lo, c_ok, K, HALF, BLOCK_M, BLOCK_H,
                                      BLOCK_K, DOT_PRECISION)
        b_ptr = bq_ptr
    elif is_v:
        acc_lo, acc_hi = _head_halves(x_ptr, src, a_ok, k_end, wv_ptr, lo, c_ok, K, HALF, BLOCK_M, BLOCK_H,
                                      BLOCK_K, DOT_PRECISION)
        b_ptr = bv_ptr
    else:
        acc_lo, acc_hi = _head_halves(x_ptr, src, a_ok, k_end, wk_ptr, lo, c_ok, K, HALF, BLOCK_M, BLOCK_H,
                                      BLOCK_K, DOT_PRECISION)
        b_ptr = bk_ptr
    if HAS_BIAS:
        acc_lo += tl.load(b_ptr + lo, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        acc_hi += tl.load(b_ptr + lo + HALF, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    # Round as the projection's output is rounded, then rotate in fp32 as the rope op does.
    dtype = q_ptr.dtype.element_ty
    y_lo = acc_lo.to(dtype).to(tl.float32)
    y_hi = acc_hi.to(dtype).to(tl.float32)
    ok = live[:, None] & c_ok[None, :]
    table = src[:, None] * HEAD_DIM + c[None, :]
    rotate = ok & (head < HQ + HK)  # Q and K heads; V is stored as projected
    cos_lo = tl.load(cos_ptr + table, mask=rotate, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + table + HALF, mask=rotate, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + table, mask=rotate, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + table + HALF, mask=rotate, other=0.0).to(tl.float32)
    out_lo = tl.where(is_v, y_lo, y_lo * cos_lo - y_hi * sin_lo).to(dtype)
    out_hi = tl.where(is_v, y_hi, y_hi * cos_hi + y_lo * sin_hi).to(dtype)
    if is_q:
        dst = offs_m.to(tl.int64)[:, None] * (HQ * HEAD_DIM) + lo[None, :]
        tl.store(q_ptr + dst, out_lo, mask=ok)
        tl.store(q_ptr + dst + HALF, out_hi, mask=ok)
    else:
        # Token src = b * L + l goes to cache slot start + l of sequence b.
        slot = tl.load(start_ptr) + src % L
        ok = ok & ((slot >= 0) & (slot < S))[:, None]
        dst = ((src // L) * S + slot)[:, None] * (HK * HEAD_DIM) + lo[None, :]
        if is_v:
            tl.store(vc_ptr + dst, out_lo, mask=ok)
            tl.store(vc_ptr + dst + HALF, out_hi, mask=ok)
        else:
            tl.store(kc_ptr + dst, out_lo, mask=ok)
            tl.store(kc_ptr + dst + HALF, out_hi, mask=ok)


def qkv_rope_write(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start):
    T, K = x.shape
    B, S, HK, D = k_cache.shape
    M = rows.shape[0]
    HQ = w_q.shape[0] // D
    q = torch.empty(M, HQ, D, dtype=x.dtype, device=x.device)
    if known_empty(max(M, T) * D):
        return q
    # Tiles whose columns split into the two dots' halves (tl.dot needs >= 16): at decode as many
    # programs as the Q projection alone had, so the weights still spread over the SMs.
    block_m, block_n, block_k, warps, stages = _tiles(max(M, T), x.element_size(), "halves", x.device.type == "cuda")
    block_h = max(16, min(block_n // 2, next_power_of_2(D // 2)))
    chunks = cdiv(D // 2, block_h)
    dummy = x
    launch(_qkv_rope_write_kernel)[(cdiv(max(M, T), block_m), (HQ + 2 * HK) * chunks)](
        x, w_q, w_k, w_v,
        b_q if b_q is not None else dummy, b_k if b_k is not None else dummy, b_v if b_v is not None else dummy,
        cos, sin, rows, count if count is not None else dummy, q, k_cache, v_cache, start,
        T, M, T // B, S, K=K, HQ=HQ, HK=HK, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_K=block_k,
        HAS_BIAS=b_q is not None, HAS_COUNT=count is not None, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=warps, num_stages=stages,
    )
    return q
