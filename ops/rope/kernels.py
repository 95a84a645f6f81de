"""Triton rotary embedding. One program per token row rotates all its heads; the K variant
writes straight into the seq-first cache, together with V, so K/V cost one pass."""
import torch
import triton
import triton.language as tl

from .._common import known_empty, launch, next_power_of_2


@triton.jit
def _rotate(x_base, cos_base, sin_base, heads, half, h_mask, HEAD_DIM: tl.constexpr):
    # Rotates the heads at x_base in registers: out = x*cos + rotate_half(x)*sin.
    HALF: tl.constexpr = HEAD_DIM // 2
    x1 = tl.load(x_base + heads * HEAD_DIM + half, mask=h_mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + heads * HEAD_DIM + HALF + half, mask=h_mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_base + half).to(tl.float32)
    c2 = tl.load(cos_base + HALF + half).to(tl.float32)
    s1 = tl.load(sin_base + half).to(tl.float32)
    s2 = tl.load(sin_base + HALF + half).to(tl.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


# rows/count may be views at an offset whose alignment varies with the token count: not
# specialised on, so a new length never recompiles (as with the ints).
@triton.jit(do_not_specialize=["M", "T", "rows_ptr", "count_ptr"])
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, rows_ptr, count_ptr, M, T,
    NUM_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_ROWS: tl.constexpr, HAS_COUNT: tl.constexpr,
):
    m = tl.program_id(0)
    limit = M
    if HAS_COUNT:
        limit = tl.minimum(tl.load(count_ptr), M)
    if m < limit:
        src = m
        if HAS_ROWS:
            src = tl.load(rows_ptr + m)
        src = tl.where((src >= 0) & (src < T), src, 0).to(tl.int64)
        HALF: tl.constexpr = HEAD_DIM // 2
        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        half = tl.arange(0, HALF)[None, :]
        h_mask = heads < NUM_HEADS
        row = m.to(tl.int64) * NUM_HEADS * HEAD_DIM
        o1, o2 = _rotate(x_ptr + row, cos_ptr + src * HEAD_DIM, sin_ptr + src * HEAD_DIM, heads, half, h_mask, HEAD_DIM)
        dst = out_ptr + row + heads * HEAD_DIM + half
        tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=h_mask)
        tl.store(dst + HALF, o2.to(out_ptr.dtype.element_ty), mask=h_mask)


@triton.jit(do_not_specialize=["L", "S", "start_ptr"])
def _rope_kv_write_kernel(
    k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, start_ptr, L, S,
    NUM_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # token b*L + l
    b = t // L
    slot = tl.load(start_ptr) + t % L
    if (slot >= 0) & (slot < S):
        HALF: tl.constexpr = HEAD_DIM // 2
        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        half = tl.arange(0, HALF)[None, :]
        h_mask = heads < NUM_HEADS
        row = t * NUM_HEADS * HEAD_DIM
        dst = (b * S + slot) * NUM_HEADS * HEAD_DIM + heads * HEAD_DIM + half
        o1, o2 = _rotate(k_ptr + row, cos_ptr + t * HEAD_DIM, sin_ptr + t * HEAD_DIM, heads, half, h_mask, HEAD_DIM)
        tl.store(kc_ptr + dst, o1.to(kc_ptr.dtype.element_ty), mask=h_mask)
        tl.store(kc_ptr + dst + HALF, o2.to(kc_ptr.dtype.element_ty), mask=h_mask)
        v1 = tl.load(v_ptr + row + heads * HEAD_DIM + half, mask=h_mask)
        v2 = tl.load(v_ptr + row + heads * HEAD_DIM + HALF + half, mask=h_mask)
        tl.store(vc_ptr + dst, v1, mask=h_mask)
        tl.store(vc_ptr + dst + HALF, v2, mask=h_mask)


def rope(x, cos, sin, rows=None, count=None):
    M, num_heads, head_dim = x.shape
    out = torch.empty_like(x)
    if known_empty(out.numel()):  # no rows, heads or dims: nothing to write (tl.arange cannot tile 0)
        return out
    dummy = x  # for absent pointers (never dereferenced): an input, never the output
    launch(_rope_kernel)[(M,)](
        x, cos, sin, out,
        rows if rows is not None else dummy, count if count is not None else dummy,
        M, cos.shape[0],
        NUM_HEADS=num_heads, BLOCK_HEADS=next_power_of_2(num_heads), HEAD_DIM=head_dim,
        HAS_ROWS=rows is not None, HAS_COUNT=count is not None,
    )
    return out


def rope_kv_write(k, v, cos, sin, k_cache, v_cache, start):
    B, L, num_heads, head_dim = k.shape
    if known_empty(k.numel()):  # no tokens, heads or dims: nothing to write (tl.arange cannot tile 0)
        return
    launch(_rope_kv_write_kernel)[(B * L,)](
        k, v, cos, sin, k_cache, v_cache, start, L, k_cache.shape[1],
        NUM_HEADS=num_heads, BLOCK_HEADS=next_power_of_2(num_heads), HEAD_DIM=head_dim,
    )
