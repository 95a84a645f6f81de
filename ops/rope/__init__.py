"""Rotary-embedding ops: compacted Q rotated at each token's own position, and dense K rotated
on its way into the seq-first KV cache (with V) in one pass."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_count,
    check_dim,
    check_kernel_head_dim,
    check_rows,
    check_same_dtype,
    check_tensor,
    decompose_under_compile,
    eager_entry,
    on_input_device,
)
from .reference import rope_kv_write_reference, rope_reference

__all__ = ["rope", "rope_kv_write", "rope_reference", "rope_kv_write_reference"]


def _check_head_dim(name: str, t: Tensor) -> None:
    if t.shape[-1] % 2:
        raise ValueError(f"{name}: head dim must be even for rotary embeddings, got {t.shape[-1]}")


def _check_rope(x, cos, sin, rows, count):
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    _check_head_dim("x", x)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=x.device, device_of="x")
        check_dim(name, t, 1, x.shape[2], "x's head dim")
    check_dim("sin", sin, 0, cos.shape[0], "cos's row count")
    check_rows("rows", rows, x.device, device_of="x")
    check_count(count, x.device, device_of="x")
    if rows is None:
        check_dim("cos", cos, 0, x.shape[0], "x's row count (no rows given)")
        return
    # The kernel reads rows[m] for each of x's rows: a shorter rows would be read past its end.
    check_dim("rows", rows, 0, x.shape[0], "x's row count")
    if cos.shape[0] == 0 and x.shape[0] > 0:
        # Out-of-range rows fall back to table row 0, which must exist.
        raise ValueError(f"cos: expected at least one row for x's {x.shape[0]} rows to index, got shape {tuple(cos.shape)}")


@torch.library.custom_op("skipgpt::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor, rows: Optional[Tensor] = None, count: Optional[Tensor] = None) -> Tensor:
    """Rotary embedding of (compacted) rows.

    x: [M, Hx, D]; cos, sin: [T, D] per token (Hugging Face's `position_embeddings`, flattened);
    rows: optional [M] int32, row m uses cos/sin[rows[m]] (row m itself without rows);
    count: optional [1] int32, rows m >= count are left unwritten. Returns [M, Hx, D].
    rows and count are device data, never synced to check: a row index outside [0, T) rotates
    with table row 0, and count is clamped to [0, M].
    The CUDA implementation needs D / 2 to be a power of two (ValueError otherwise).
    """
    _check_rope(x, cos, sin, rows, count)
    return rope_reference(x, cos, sin, rows, count)


@rope.register_fake
def _rope_fake(x, cos, sin, rows=None, count=None):
    _check_rope(x, cos, sin, rows, count)
    return torch.empty_like(x)


def _check_kv_write(k, v, cos, sin, k_cache, v_cache, start):
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    _check_head_dim("k", k)
    check_tensor("v", v, ndim=4, device=k.device, device_of="k")
    check_same_dtype("v", v, "k", k)
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    B, L, Hk, D = k.shape
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES, device=k.device, device_of="k")
        if t.shape != (B, L, D):
            raise ValueError(f"{name}: expected shape {(B, L, D)}, got {tuple(t.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, ndim=4, device=k.device, device_of="k")
        check_same_dtype(name, t, "k", k)
        if t.shape[0] != B or t.shape[2:] != (Hk, D):
            raise ValueError(f"{name}: expected shape ({B}, S, {Hk}, {D}), got {tuple(t.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")
    check_tensor("start", start, ndim=1, dtypes=(torch.int64,), device=k.device, device_of="k")
    check_dim("start", start, 0, 1, "one element")


@torch.library.custom_op("skipgpt::rope_kv_write", mutates_args=("k_cache", "v_cache"))
def rope_kv_write(k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor) -> None:
    """Write rope(k) and v into seq-first caches at slots start .. start+L-1, in place.

    k, v: [B, L, Hk, D]; cos, sin: [B, L, D]; k_cache, v_cache: [B, S, Hk, D]; start: [1] int64
    on the device (the cache's fill level before this call). The caller guarantees
    0 <= start and start+L <= S. start is device data, not synced to check: the Triton kernel
    drops the writes of slots outside [0, S) rather than corrupt memory, and writes the others;
    the CPU implementation (which reads start for free) raises ValueError instead.
    The CUDA implementation needs D / 2 to be a power of two (ValueError otherwise).
    """
    _check_kv_write(k, v, cos, sin, k_cache, v_cache, start)
    rope_kv_write_reference(k, v, cos, sin, k_cache, v_cache, start)


@rope_kv_write.register_fake
def _rope_kv_write_fake(k, v, cos, sin, k_cache, v_cache, start):
    _check_kv_write(k, v, cos, sin, k_cache, v_cache, start)


if HAS_TRITON:
    from . import kernels

    @rope.register_kernel("cuda")
    @on_input_device
    def _rope_cuda(x, cos, sin, rows=None, count=None):
        _check_rope(x, cos, sin, rows, count)
        # The kernel tiles each half of the head dim with tl.arange.
        check_kernel_head_dim("x", x, "half the head dim", x.shape[2] // 2, 1, 1 << 16)
        return kernels.rope(x, cos, sin, rows, count)

    @rope_kv_write.register_kernel("cuda")
    @on_input_device
    def _rope_kv_write_cuda(k, v, cos, sin, k_cache, v_cache, start):
        _check_kv_write(k, v, cos, sin, k_cache, v_cache, start)
        check_kernel_head_dim("k", k, "half the head dim", k.shape[3] // 2, 1, 1 << 16)
        kernels.rope_kv_write(k, v, cos, sin, k_cache, v_cache, start)

    decompose_under_compile(rope, _rope_cuda)
    decompose_under_compile(rope_kv_write, _rope_kv_write_cuda)


# Public entries (see eager_entry): eager CUDA calls skip the dispatcher.
rope = eager_entry(rope, _rope_cuda if HAS_TRITON else None)
rope_kv_write = eager_entry(rope_kv_write, _rope_kv_write_cuda if HAS_TRITON else None)
