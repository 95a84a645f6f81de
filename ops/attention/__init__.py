"""Query-sparse causal attention over a seq-first KV cache."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_kernel_head_dim,
    check_kv_caches,
    check_rows,
    check_scalar,
    check_tensor,
    decompose_under_compile,
    eager_entry,
    on_input_device,
    static_ints,
)
from .reference import sparse_attention_reference

__all__ = ["sparse_attention", "sparse_attention_reference", "ATTEND_WITH"]

ATTEND_WITH = ("decode", "prefill")


def _check(q, k_cache, v_cache, start, seq_len, scale, rows, seq_offsets, key_mask, attend_with):
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_scalar("seq_len", seq_len, int)
    check_scalar("scale", scale, float)
    if attend_with is not None:
        check_scalar("attend_with", attend_with, str)
        if attend_with not in ATTEND_WITH:
            raise ValueError(f"attend_with: expected one of {ATTEND_WITH} or None, got {attend_with!r}")
        # A symbolic seq_len (traced) cannot be checked without a guard: "decode" with one is the
        # caller's to vouch for (skipgpt's layers pass it only under a torch.cond on L == 1).
        if attend_with == "decode" and type(seq_len) is int and seq_len != 1:
            raise ValueError(
                f"attend_with: 'decode' attends one query per sequence and needs seq_len == 1, got {seq_len}"
            )
    check_kv_caches(k_cache, v_cache, "q", q)
    B, S, Hk, D = k_cache.shape
    M, Hq, Dq = q.shape
    if Dq != D:
        raise ValueError(f"q: head dim {Dq} differs from the cache's {D}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"q: {Hq} query heads is not a multiple of the cache's {Hk} KV heads")
    check_tensor("start", start, ndim=1, dtypes=(torch.int64,), device=q.device, device_of="q")
    if start.shape[0] != 1:
        raise ValueError(f"start: expected one element, got shape {tuple(start.shape)}")
    # Queries locate their sequence and slot as r // L and r % L: L = 0 leaves no token for a
    # query to be (B * 0 = 0 rows without `rows`; with rows, any query would divide by zero).
    if seq_len < 0 or (seq_len == 0 and M > 0):
        raise ValueError(f"seq_len: must be >= 1 (>= 0 when q has no rows), got {seq_len} with {M} query rows")
    check_rows("rows", rows, q.device, device_of="q")
    if rows is None:
        if seq_offsets is not None:
            raise ValueError("seq_offsets: given without rows")
        if M != B * seq_len:
            raise ValueError(f"q: without rows, expected B*seq_len = {B}*{seq_len} rows, got {M}")
    else:
        if seq_offsets is None:
            raise ValueError("seq_offsets: required with rows (per-sequence query ranges)")
        check_tensor("seq_offsets", seq_offsets, ndim=1, dtypes=(torch.int32,), device=q.device, device_of="q")
        if seq_offsets.shape[0] != B + 1:
            raise ValueError(f"seq_offsets: expected B+1 = {B + 1} entries, got {seq_offsets.shape[0]}")
        if rows.shape[0] != M:
            raise ValueError(f"rows: expected {M} entries like q, got {rows.shape[0]}")
    if key_mask is not None:
        check_tensor("key_mask", key_mask, ndim=2, dtypes=(torch.bool,), device=q.device, device_of="q")
        if key_mask.shape[0] != B:
            raise ValueError(f"key_mask: expected {B} sequences, got shape {tuple(key_mask.shape)}")


def _kernel_for(seq_len: int) -> str:
    return "decode" if seq_len == 1 else "prefill"


@torch.library.custom_op("skipgpt::sparse_attention", mutates_args=())
def sparse_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    start: Tensor,
    seq_len: int,
    scale: float,
    rows: Optional[Tensor] = None,
    seq_offsets: Optional[Tensor] = None,
    key_mask: Optional[Tensor] = None,
    attend_with: Optional[str] = None,
) -> Tensor:
    """Causal attention of compacted queries against a seq-first cache (GQA).

    q: [M, Hq, D] rotated queries; k_cache, v_cache: [B, S, Hk, D] (Hq % Hk == 0), already
    holding this step's keys; start: [1] int64, the cache slot of token column 0 of this step;
    seq_len: L, the step's token columns per sequence.
    rows: optional [M] int32 flat token indices b*L + l of the queries, ascending (None: every
    token, M = B*L); seq_offsets: [B+1] int32 with the queries of sequence b at
    [seq_offsets[b], seq_offsets[b+1]); seq_offsets[B] is the count, and rows past it are
    capacity padding (output unspecified).
    key_mask: optional [B, Sm] bool, False marks padding keys; slots >= Sm count as padding.

    The query of token b*L + l sits at slot p = start + l and attends to the keys of sequence b
    at slots <= p that the mask keeps. Returns [M, Hq, D]; a query that sees no key gets zeros.
    L == 1 takes the split-KV decode kernel, longer steps the tiled prefill kernel.
    attend_with: "decode" or "prefill" to name the kernel instead (results agree; "decode" needs
    L == 1). Compiled code whose L is symbolic names it (skipgpt's layers, in a torch.cond on
    L == 1): a choice by L would guard on L == 1, so such a call stays one op through the
    dispatcher (70-200 us of host time).

    Index values (rows, seq_offsets, start) live on the device and are not checked on the host
    (that would sync); the kernels stay inside every tensor whatever they hold:
    - a row outside [0, B*L) is a query that sees no key: zeros;
    - start may be anything: keys exist at slots [0, S) only (a slot past S sees every key up
      to S; a negative slot sees none);
    - the count is clamped to [0, M];
    - seq_offsets must list each sequence's queries as `compact` does; if they do not, the
      affected outputs are unspecified, but every read and write stays inside q, rows, the caches
      and the output.
    The CUDA implementation needs D to be a power of two in [16, 256] (ValueError otherwise).
    """
    _check(q, k_cache, v_cache, start, seq_len, scale, rows, seq_offsets, key_mask, attend_with)
    return sparse_attention_reference(q, k_cache, v_cache, start, seq_len, scale, rows, seq_offsets, key_mask)


@sparse_attention.register_fake
def _sparse_attention_fake(q, k_cache, v_cache, start, seq_len, scale, rows=None, seq_offsets=None, key_mask=None,
                           attend_with=None):
    _check(q, k_cache, v_cache, start, seq_len, scale, rows, seq_offsets, key_mask, attend_with)
    return torch.empty_like(q)


if HAS_TRITON:
    from . import kernels

    @sparse_attention.register_kernel("cuda")
    @on_input_device
    def _sparse_attention_cuda(q, k_cache, v_cache, start, seq_len, scale, rows=None, seq_offsets=None, key_mask=None,
                               attend_with=None):
        _check(q, k_cache, v_cache, start, seq_len, scale, rows, seq_offsets, key_mask, attend_with)
        # tl.arange tiles the head dim and tl.dot needs at least 16 on it.
        check_kernel_head_dim("q", q, "the head dim", q.shape[2], 16, 256)
        attend = kernels.decode if (attend_with or _kernel_for(seq_len)) == "decode" else kernels.prefill
        return attend(q, k_cache, v_cache, start, seq_len, scale, rows, seq_offsets, key_mask)

    def _traceable(q, k_cache, v_cache, start, seq_len, scale, rows=None, seq_offsets=None, key_mask=None,
                   attend_with=None):
        # Picking the kernel by a symbolic L would guard (and recompile at L = 1), so such calls
        # stay one op unless they name the kernel. Either kernel traces at symbolic sizes.
        return attend_with is not None or static_ints(seq_len)

    decompose_under_compile(sparse_attention, _sparse_attention_cuda, _traceable)


# Public entries (see eager_entry): eager CUDA calls skip the dispatcher.
sparse_attention = eager_entry(sparse_attention, _sparse_attention_cuda if HAS_TRITON else None)
