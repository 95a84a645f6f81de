"""Triton query-sparse attention.

Prefill: one program per (sequence, tile of that sequence's compacted queries, query head).
Tiles never straddle sequences because `seq_offsets` gives each sequence's query range on the
device; tiles past a sequence's count exit at once, so the grid is static (B * cdiv(L, BLOCK_M)).
Decode (one query per sequence): split-KV. Each program takes one query, one KV head with its
whole GQA group, and one chunk of keys; a second kernel merges the chunks by log-sum-exp.
"""

import torch
import triton
import triton.language as tl

from .._common import bool_bytes, cdiv, dot_precision, known_empty, launch, next_power_of_2, num_sms, static_ints

LOG2E = 1.4426950408889634
# Decode: at most this many chunks of keys per query, merged this many at a time (the CPU's
# interpreter merges 4 at a time, so that tests cover several rounds).
MAX_SPLITS = 256
COMBINE_SPLITS = 32


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, k_base, v_base, kmask_base, n0, pos, S, SM, qk_scale,
    KV_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < S
    k_t = tl.load(k_base + offs_n[None, :].to(tl.int64) * KV_STRIDE + d[:, None], mask=n_ok[None, :], other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    visible = n_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= pos[:, None])
    if HAS_KMASK:
        km = tl.load(kmask_base + offs_n, mask=offs_n < SM, other=0)
        visible = visible & (km != 0)[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # m_i starts finite, so no inf - inf
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * KV_STRIDE + d[None, :], mask=n_ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Index pointers (rows, seq_offsets, counts, start) may be views at offsets that move with the
# batch or token count; like the per-call ints they are not specialised on (alignment), so a
# new batch or length never recompiles.
@triton.jit(do_not_specialize=["M", "L", "S", "SM", "TILES", "rows_ptr", "offsets_ptr", "start_ptr"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rows_ptr, offsets_ptr, start_ptr, kmask_ptr,
    M, L, S, SM, TILES, qk_scale,
    HQ: tl.constexpr, HK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROWS: tl.constexpr, HAS_KMASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Inductor passes a Python float as fp64 (Triton's launcher: fp32); fp32 either way.
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = pid // TILES
    tile = pid % TILES
    if HAS_ROWS:
        # seq_offsets are device data: clamped to [0, M], so whatever they hold, rows, q and
        # the output are only touched inside their M rows.
        q_begin = tl.minimum(tl.maximum(tl.load(offsets_ptr + b), 0), M)
        q_end = tl.minimum(tl.load(offsets_ptr + b + 1), M)
    else:
        q_begin = b * L
        q_end = q_begin + L
    m0 = q_begin + tile * BLOCK_M
    if m0 < q_end:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_end
        if HAS_ROWS:
            r = tl.load(rows_ptr + offs_m, mask=m_ok, other=0)
        else:
            r = offs_m
        # A row outside sequence b (bad input) sees no key instead of reading another sequence.
        in_seq = m_ok & (r >= b * L) & (r < b * L + L)
        pos = tl.where(in_seq, tl.load(start_ptr) + (r - b * L), -1)
        d = tl.arange(0, HEAD_DIM)
        q_rows = offs_m.to(tl.int64) * (HQ * HEAD_DIM) + h * HEAD_DIM
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=m_ok[:, None], other=0.0)
        kv_head = h // (HQ // HK)
        kv_off = b.to(tl.int64) * S * (HK * HEAD_DIM) + kv_head * HEAD_DIM
        k_base = k_ptr + kv_off
        v_base = v_ptr + kv_off
        kmask_base = kmask_ptr + b.to(tl.int64) * SM
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        pos_min = tl.min(tl.where(m_ok, pos, 2147483647), axis=0)
        pos_max = tl.max(pos, axis=0)
        # Keys below every query's slot need no causal mask; the rest (a band around the
        # diagonal, widened by skipped tokens) do. Both loops stop at the cache's S slots: a
        # start past the cache (bad data) must not spin through slots that hold no key.
        full_end = tl.minimum(tl.maximum(pos_min + 1, 0), S) // BLOCK_N * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, k_base, v_base, kmask_base, n0, pos, S, SM, qk_scale,
                HK * HEAD_DIM, HEAD_DIM, BLOCK_N, False, HAS_KMASK, DOT_PRECISION,
            )
        for n0 in range(full_end, tl.minimum(pos_max + 1, S), BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, k_base, v_base, kmask_base, n0, pos, S, SM, qk_scale,
                HK * HEAD_DIM, HEAD_DIM, BLOCK_N, True, HAS_KMASK, DOT_PRECISION,
            )
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + q_rows[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])


# The split count is a runtime int like the sizes it follows (M, S), so that compiled code with
# symbolic sizes traces the launch (compile_model's single graph) and a new size never recompiles.
# With seq_offsets, the executing count is seq_offsets[B]: read there rather than from a view,
# which Inductor fails to lower inside torch.cond.
@triton.jit(do_not_specialize=["M", "B", "T", "L", "S", "SM", "CHUNK", "NUM_SPLITS", "rows_ptr", "offsets_ptr",
                               "start_ptr"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, rows_ptr, offsets_ptr, start_ptr, kmask_ptr,
    M, B, T, L, S, SM, CHUNK, NUM_SPLITS, qk_scale,
    HQ: tl.constexpr, HK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROWS: tl.constexpr, HAS_KMASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # see _prefill_kernel
    m = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    limit = M
    if HAS_ROWS:
        limit = tl.minimum(tl.load(offsets_ptr + B), M)
    if m < limit:
        r = m
        if HAS_ROWS:
            r = tl.load(rows_ptr + m)
        r_ok = (r >= 0) & (r < T)
        r = tl.where(r_ok, r, 0)
        GROUP: tl.constexpr = HQ // HK
        g = tl.arange(0, BLOCK_G)
        g_ok = g < GROUP
        heads = kv_head * GROUP + g
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + m.to(tl.int64) * (HQ * HEAD_DIM) + heads[:, None] * HEAD_DIM + d[None, :],
                    mask=g_ok[:, None], other=0.0)
        b = r // L
        slot = tl.load(start_ptr) + r % L
        pos = tl.full([BLOCK_G], 0, dtype=tl.int64) + slot
        kv_off = b.to(tl.int64) * S * (HK * HEAD_DIM) + kv_head * HEAD_DIM
        m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        lo = split * CHUNK
        hi = tl.where(r_ok, tl.minimum(lo + CHUNK, slot + 1), lo)  # a bad row sees no key
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, k_ptr + kv_off, v_ptr + kv_off, kmask_ptr + b.to(tl.int64) * SM,
                n0, pos, S, SM, qk_scale, HK * HEAD_DIM, HEAD_DIM, BLOCK_N, True, HAS_KMASK, DOT_PRECISION,
            )
        part = (m.to(tl.int64) * HQ + heads) * NUM_SPLITS + split
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_ok)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None])


@triton.jit(do_not_specialize=["M", "B", "NUM_SPLITS", "offsets_ptr"])
def _combine_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, offsets_ptr, M, B, NUM_SPLITS,
    HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    m = tl.program_id(0)
    h = tl.program_id(1)
    limit = M
    if HAS_ROWS:
        limit = tl.minimum(tl.load(offsets_ptr + B), M)
    if m < limit:
        d = tl.arange(0, HEAD_DIM)
        first = (m.to(tl.int64) * HQ + h) * NUM_SPLITS
        # Log-sum-exp over the splits, BLOCK_SPLITS at a time, rescaling what came before to each
        # block's new maximum. A split that saw no key has lse -inf and weighs nothing.
        top = tl.full([1], float("-inf"), dtype=tl.float32)
        total = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_SPLITS):
            splits = s0 + tl.arange(0, BLOCK_SPLITS)
            s_ok = splits < NUM_SPLITS
            lse = tl.load(part_lse_ptr + first + splits, mask=s_ok, other=float("-inf"))
            new_top = tl.maximum(top, tl.max(lse, axis=0))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # no -inf - -inf
            rescale = tl.math.exp2(top - shift)
            w = tl.math.exp2(lse - shift)
            o = tl.load(part_o_ptr + (first + splits)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
            acc = acc * rescale + tl.sum(w[:, None] * o, axis=0)
            total = total * rescale + tl.sum(w, axis=0)
            top = new_top
        out = acc / tl.where(total > 0, total, 1.0)
        tl.store(o_ptr + (m.to(tl.int64) * HQ + h) * HEAD_DIM + d, out.to(o_ptr.dtype.element_ty))


def _no_keys(q, B, S, seq_len):
    """No token or no key slot: every query sees no key (zeros). None when there is work."""
    if known_empty(q.numel()):
        return torch.empty_like(q)
    if known_empty(B * seq_len) or known_empty(S):  # rows then all fall outside [0, B*L), or no key exists
        return torch.zeros_like(q)
    return None


def prefill(q, k_cache, v_cache, start, seq_len, scale, rows, seq_offsets, key_mask):
    M, HQ, D = q.shape
    B, S, HK, _ = k_cache.shape
    done = _no_keys(q, B, S, seq_len)
    if done is not None:
        return done
    out = torch.empty_like(q)
    block_m, block_n = (64, 64) if D <= 64 or q.device.type != "cuda" else (128, 64)
    if q.device.type != "cuda":
        block_m, block_n = 16, 16
    tiles = cdiv(seq_len, block_m)
    dummy = q  # for absent pointers (never dereferenced): an input, never the output
    launch(_prefill_kernel)[(B * tiles, HQ)](
        q, k_cache, v_cache, out,
        rows if rows is not None else dummy,
        seq_offsets if seq_offsets is not None else dummy,
        start,
        bool_bytes(key_mask) if key_mask is not None else dummy,
        M, seq_len, S, key_mask.shape[1] if key_mask is not None else 0, tiles, scale * LOG2E,
        HQ=HQ, HK=HK, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_ROWS=rows is not None, HAS_KMASK=key_mask is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=8 if block_m >= 128 else 4, num_stages=3 if q.device.type == "cuda" else 1,
    )
    return out


def decode(q, k_cache, v_cache, start, seq_len, scale, rows, seq_offsets, key_mask):
    M, HQ, D = q.shape
    B, S, HK, _ = k_cache.shape
    done = _no_keys(q, B, S, seq_len)  # also keeps S = 0 from dividing by a zero chunk below
    if done is not None:
        return done
    out = torch.empty_like(q)
    cuda = q.device.type == "cuda"
    block_n = 64 if cuda else 16
    # Enough chunks to fill the machine twice over; a function of static shapes only, so a
    # captured CUDA graph stays valid as the cache fills. sym_max/sym_min: plain max/min would
    # guard on symbolic sizes (and M may be 0 at run time, hence the divisor's floor of 1).
    # (Eager sizes take the builtins: torch.sym_max costs ~1 us of host time a call.)
    top, bottom = (max, min) if static_ints(M, S) else (torch.sym_max, torch.sym_min)
    fill = cdiv(2 * num_sms(q.device), top(M * HK, 1))
    num_splits = top(1, bottom(bottom(cdiv(S, block_n), fill), MAX_SPLITS))
    chunk = cdiv(cdiv(S, num_splits), block_n) * block_n
    num_splits = top(1, cdiv(S, chunk))  # as cdiv alone for S >= 1; the floor keeps it provably >= 1
    # Flat: a multi-dim buffer with a symbolic split count would guard on its strides.
    part_lse = torch.empty(M * HQ * num_splits, dtype=torch.float32, device=q.device)  # [M, HQ, splits]
    part_o = torch.empty(M * HQ * num_splits * D, dtype=torch.float32, device=q.device)  # [M, HQ, splits, D]
    has_rows = rows is not None
    dummy = q  # for absent pointers (never dereferenced): an input, never the output
    group = HQ // HK
    launch(_decode_kernel)[(M, HK, num_splits)](
        q, k_cache, v_cache, part_o, part_lse,
        rows if has_rows else dummy,
        seq_offsets if has_rows else dummy,
        start,
        bool_bytes(key_mask) if key_mask is not None else dummy,
        M, B, B * seq_len, seq_len, S, key_mask.shape[1] if key_mask is not None else 0, chunk, num_splits,
        scale * LOG2E,
        HQ=HQ, HK=HK, HEAD_DIM=D,
        BLOCK_G=max(16, next_power_of_2(group)), BLOCK_N=block_n,
        HAS_ROWS=has_rows, HAS_KMASK=key_mask is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=2 if cuda else 1,
    )
    launch(_combine_kernel)[(M, HQ)](
        part_o, part_lse, out, seq_offsets if has_rows else dummy, M, B, num_splits,
        HQ=HQ, HEAD_DIM=D, BLOCK_SPLITS=COMBINE_SPLITS if cuda else 4, HAS_ROWS=has_rows,
    )
    return out
