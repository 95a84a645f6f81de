"""Projection ops over compacted rows: the gated MLP, projections whose output is added back
into the residual stream (through `slot`, or in the capacity form onto each row's token through
`rows`; no zero-fill, no separate residual pass), and
`qkv_rope_write`, the attention's Q/K/V projections with RoPE and the KV-cache write.

Exact form (count None): cuBLAS does the GEMM over the compacted rows, Triton the epilogue pass.
Capacity form (count given): one Triton GEMM reads the count on the device; blocks with no
executing row exit without reading weights. No host sync, so CUDA graphs can capture it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_count,
    check_dim,
    check_kv_caches,
    check_rows,
    check_same_dtype,
    check_scalar,
    check_tensor,
    decompose_under_compile,
    eager_entry,
    on_input_device,
    static_ints,
)
from .reference import (
    ACTIVATIONS,
    gated_mlp_reference,
    linear_residual_reference,
    linear_rows_reference,
    qkv_rope_write_reference,
)

__all__ = [
    "linear_rows",
    "gated_mlp",
    "linear_residual",
    "qkv_rope_write",
    "linear_rows_reference",
    "gated_mlp_reference",
    "linear_residual_reference",
    "qkv_rope_write_reference",
    "ACTIVATIONS",
]


def _check_weight(name: str, w: Tensor, x: Tensor) -> None:
    check_tensor(name, w, ndim=2, device=x.device, device_of="x")
    check_same_dtype(name, w, "x", x)
    check_dim(name, w, 1, x.shape[1], "x's feature size")


def _check_x(x: Tensor, count: Optional[Tensor], tile_rows: Optional[int]) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_count(count, x.device, device_of="x")
    if tile_rows is not None:
        check_scalar("tile_rows", tile_rows, int)
        if count is None:
            raise ValueError("tile_rows: given without count; only the capacity form picks its own tiles")
        if tile_rows < 1:
            raise ValueError(f"tile_rows: expected a row count >= 1, got {tile_rows}")


def _check_linear_rows(x, weight, bias, count, tile_rows):
    _check_x(x, count, tile_rows)
    _check_weight("weight", weight, x)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device, device_of="x")
        check_same_dtype("bias", bias, "x", x)
        check_dim("bias", bias, 0, weight.shape[0], "weight's output size")


@torch.library.custom_op("skipgpt::linear_rows", mutates_args=())
def linear_rows(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, count: Optional[Tensor] = None,
    tile_rows: Optional[int] = None,
) -> Tensor:
    """x [M, K] @ weight [N, K].T + bias [N] -> [M, N].

    count: optional [1] int32 on the device (capacity form): rows m >= count are not computed
    (unspecified in the output) and a zero count reads no weights. The count is data, never
    synced to the host: a value outside [0, M] is clamped to it.
    tile_rows: optional int, capacity form only: pick the GEMM's tiles as for this many rows
    instead of by the actual row count. Compiled code whose token count is symbolic passes one,
    so that the GEMM traces into its graph (Inductor launches the kernel); without it the tile
    choice would guard on the count, so such a call stays one op through the dispatcher, at
    70-200 us of host time (measured on the device machine). Results do not depend on it.
    """
    _check_linear_rows(x, weight, bias, count, tile_rows)
    return linear_rows_reference(x, weight, bias, count)


@linear_rows.register_fake
def _linear_rows_fake(x, weight, bias=None, count=None, tile_rows=None):
    _check_linear_rows(x, weight, bias, count, tile_rows)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _check_gated(x, w_gate, w_up, activation, count, tile_rows):
    _check_x(x, count, tile_rows)
    _check_weight("w_gate", w_gate, x)
    _check_weight("w_up", w_up, x)
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up: shape {tuple(w_up.shape)} differs from w_gate's {tuple(w_gate.shape)}")
    check_scalar("activation", activation, str)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")


@torch.library.custom_op("skipgpt::gated_mlp", mutates_args=())
def gated_mlp(
    x: Tensor, w_gate: Tensor, w_up: Tensor, activation: str, count: Optional[Tensor] = None,
    tile_rows: Optional[int] = None,
) -> Tensor:
    """act(x @ w_gate.T) * (x @ w_up.T), the first half of a gated MLP on compacted rows.

    x: [M, K]; w_gate, w_up: [I, K]; activation: "silu" or "relu"; count: optional [1] int32
    (capacity form, as in `linear_rows`). Returns [M, I] in x's dtype. tile_rows: as in
    `linear_rows`.
    """
    _check_gated(x, w_gate, w_up, activation, count, tile_rows)
    return gated_mlp_reference(x, w_gate, w_up, activation, count)


@gated_mlp.register_fake
def _gated_mlp_fake(x, w_gate, w_up, activation, count=None, tile_rows=None):
    _check_gated(x, w_gate, w_up, activation, count, tile_rows)
    return x.new_empty((x.shape[0], w_gate.shape[0]))


def _check_residual(residual, x, weight, slot, count, rows, tile_rows):
    _check_x(x, count, tile_rows)
    _check_weight("weight", weight, x)
    check_tensor("residual", residual, ndim=2, device=x.device, device_of="x")
    check_same_dtype("residual", residual, "x", x)
    check_dim("residual", residual, 1, weight.shape[0], "weight's output size")
    check_rows("slot", slot, x.device, device_of="x")
    check_rows("rows", rows, x.device, device_of="x")
    if slot is None:
        if count is not None:
            raise ValueError("count: given without slot; the capacity form needs slot and rows")
        check_dim("x", x, 0, residual.shape[0], "residual's row count (no slot given)")
    else:
        check_dim("slot", slot, 0, residual.shape[0], "residual's row count")
    if count is not None and rows is None:
        raise ValueError("rows: missing; the capacity form needs rows (and slot) from compact")
    if count is None and rows is not None:
        raise ValueError("rows: given without count; only the capacity form takes rows")
    if rows is not None:
        check_dim("rows", rows, 0, x.shape[0], "x's row count")


@torch.library.custom_op("skipgpt::linear_residual", mutates_args=())
def linear_residual(
    residual: Tensor, x: Tensor, weight: Tensor, slot: Optional[Tensor] = None, count: Optional[Tensor] = None,
    rows: Optional[Tensor] = None, tile_rows: Optional[int] = None,
) -> Tensor:
    """out = residual; out[t] += x[slot[t]] @ weight.T for every token t with slot[t] >= 0.

    residual: [T, N]; x: [M, K] compacted rows (M = N_exec, or capacity T with `count`);
    weight: [N, K]; slot: [T] int32 from `compact` (None: dense, x row t belongs to token t).
    Capacity form: count [1] int32 and rows [M] int32, compact's token of each of x's rows (the
    inverse of slot); only the rows below count are projected, then added onto their tokens.
    Returns a new [T, N]: skipping tokens keep their residual row bit for bit.
    slot, rows and count are device data, not checked on the host: a token whose slot falls
    outside [0, M) (in the capacity form: outside [0, count), or at a row m with rows[m] != t)
    keeps its residual row, as a skipping token does.
    tile_rows: as in `linear_rows`.
    """
    _check_residual(residual, x, weight, slot, count, rows, tile_rows)
    return linear_residual_reference(residual, x, weight, slot, count, rows)


@linear_residual.register_fake
def _linear_residual_fake(residual, x, weight, slot=None, count=None, rows=None, tile_rows=None):
    _check_residual(residual, x, weight, slot, count, rows, tile_rows)
    return torch.empty_like(residual)


def _check_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_kv_caches(k_cache, v_cache, "x", x)
    B, _, num_kv_heads, head_dim = k_cache.shape
    if head_dim % 2:
        raise ValueError(f"k_cache: head dim must be even for rotary embeddings, got shape {tuple(k_cache.shape)}")
    if (x.shape[0] % B) if B else x.shape[0]:
        raise ValueError(f"x: {x.shape[0]} rows do not split into the cache's batch of {B} sequences")
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        _check_weight(name, w, x)
    if head_dim == 0 or w_q.shape[0] % head_dim:
        raise ValueError(f"w_q: {w_q.shape[0]} output features are not a whole number of {head_dim}-wide heads")
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        check_dim(name, w, 0, num_kv_heads * head_dim, "the cache's KV heads times head dim")
    biases = (("b_q", b_q, w_q), ("b_k", b_k, w_k), ("b_v", b_v, w_v))
    if len({b is None for _, b, _ in biases}) > 1:
        raise ValueError("b_q, b_k, b_v: give all three biases or none")
    for name, b, w in biases:
        if b is not None:
            check_tensor(name, b, ndim=1, device=x.device, device_of="x")
            check_same_dtype(name, b, "x", x)
            check_dim(name, b, 0, w.shape[0], "its weight's output size")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=x.device, device_of="x")
        if t.shape != (x.shape[0], head_dim):
            raise ValueError(f"{name}: expected shape {(x.shape[0], head_dim)} (x's rows, head dim), got {tuple(t.shape)}")
    check_rows("rows", rows, x.device, device_of="x")
    if rows is None:
        raise ValueError("rows: required (the rows whose queries to project)")
    if x.shape[0] == 0 and rows.shape[0] > 0:
        # Out-of-range rows rotate with table row 0, which must exist.
        raise ValueError(f"rows: {rows.shape[0]} query rows, but x has no token for them to index")
    check_count(count, x.device, device_of="x")
    check_tensor("start", start, ndim=1, dtypes=(torch.int64,), device=x.device, device_of="x")
    check_dim("start", start, 0, 1, "one element")


@torch.library.custom_op("skipgpt::qkv_rope_write", mutates_args=("k_cache", "v_cache"))
def qkv_rope_write(
    x: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor, b_q: Optional[Tensor], b_k: Optional[Tensor],
    b_v: Optional[Tensor], cos: Tensor, sin: Tensor, rows: Tensor, count: Optional[Tensor], k_cache: Tensor,
    v_cache: Tensor, start: Tensor,
) -> Tensor:
    """The attention's input stage after its RMSNorm: K and V of every token, K rotated, written
    into the caches at slots start .. start+L-1 (in place, as `rope_kv_write`); Q of the rows,
    rotated (as `linear_rows` then `rope`). One launch on CUDA.

    x: [T, H] normalised tokens of B sequences of L (T = B*L); w_q: [Hq*D, H], w_k, w_v:
    [Hk*D, H]; b_q, b_k, b_v: all [out features] or all None; cos, sin: [T, D] per token; rows:
    [M] int32 flat token indices of the queries; count: optional [1] int32 (capacity form: query
    rows m >= count unspecified); k_cache, v_cache: [B, S, Hk, D]; start: [1] int64.
    Returns q [M, Hq, D].
    rows, count and start are device data, never synced to check: a query row outside [0, T)
    projects a zero row (its bias, rotated with table row 0), count is clamped to [0, M], and the
    Triton kernel drops the writes of slots outside [0, S) (the CPU implementation raises
    ValueError instead).
    """
    _check_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start)
    return qkv_rope_write_reference(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start)


@qkv_rope_write.register_fake
def _qkv_rope_write_fake(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start):
    _check_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start)
    head_dim = k_cache.shape[3]
    return x.new_empty((rows.shape[0], w_q.shape[0] // head_dim, head_dim))


if HAS_TRITON:
    from . import kernels

    @linear_rows.register_kernel("cuda")
    @on_input_device
    def _linear_rows_cuda(x, weight, bias=None, count=None, tile_rows=None):
        _check_linear_rows(x, weight, bias, count, tile_rows)
        if count is None:
            return F.linear(x, weight, bias)
        return kernels.rows_gemm(x, weight, count, bias=bias, tile_rows=tile_rows)

    @gated_mlp.register_kernel("cuda")
    @on_input_device
    def _gated_mlp_cuda(x, w_gate, w_up, activation, count=None, tile_rows=None):
        _check_gated(x, w_gate, w_up, activation, count, tile_rows)
        if count is None:
            return kernels.act_mul(F.linear(x, w_gate), F.linear(x, w_up), activation)
        return kernels.rows_gemm(x, w_gate, count, w2=w_up, activation=activation, tile_rows=tile_rows)

    @linear_residual.register_kernel("cuda")
    @on_input_device
    def _linear_residual_cuda(residual, x, weight, slot=None, count=None, rows=None, tile_rows=None):
        _check_residual(residual, x, weight, slot, count, rows, tile_rows)
        if count is None:
            return kernels.scatter_residual(residual, F.linear(x, weight), slot)
        return kernels.rows_gemm(x, weight, count, residual=residual, rows=rows, slot=slot, tile_rows=tile_rows)

    @qkv_rope_write.register_kernel("cuda")
    @on_input_device
    def _qkv_rope_write_cuda(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start):
        _check_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start)
        return kernels.qkv_rope_write(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start)

    # The exact form (cuBLAS, then an elementwise kernel) traces into the graph. The capacity
    # form's tiles depend on the bucketed row count, which would guard on the token count: it
    # traces only with tile_rows given, else stays one op. Inside a CUDA graph (decode) the
    # dispatcher costs nothing; outside one, each such call costs 70-200 us of host time.
    def _gemm_traceable(count, tile_rows):
        return count is None or tile_rows is not None

    decompose_under_compile(
        linear_rows, _linear_rows_cuda,
        lambda x, weight, bias=None, count=None, tile_rows=None: _gemm_traceable(count, tile_rows),
    )
    decompose_under_compile(
        gated_mlp, _gated_mlp_cuda,
        lambda x, w_gate, w_up, activation, count=None, tile_rows=None: _gemm_traceable(count, tile_rows),
    )
    decompose_under_compile(
        linear_residual, _linear_residual_cuda,
        lambda residual, x, weight, slot=None, count=None, rows=None, tile_rows=None: _gemm_traceable(count, tile_rows),
    )
    # Its tiles follow the bucketed token count: traced where that count is static (a decode
    # graph), one op where it is symbolic.
    decompose_under_compile(qkv_rope_write, _qkv_rope_write_cuda, lambda x, *args: static_ints(x))

# Public entries (see eager_entry): eager CUDA calls skip the dispatcher.
linear_rows = eager_entry(linear_rows, _linear_rows_cuda if HAS_TRITON else None)
gated_mlp = eager_entry(gated_mlp, _gated_mlp_cuda if HAS_TRITON else None)
linear_residual = eager_entry(linear_residual, _linear_residual_cuda if HAS_TRITON else None)
qkv_rope_write = eager_entry(qkv_rope_write, _qkv_rope_write_cuda if HAS_TRITON else None)
