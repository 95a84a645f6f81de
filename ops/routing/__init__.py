"""Compaction ops: which tokens execute a module, as flat row indices.

Two forms (DESIGN.md section 4):
- capacity: `compact` returns T-sized index tensors plus per-sequence offsets whose last entry is
  the executing count, all on the device. No host sync; static shapes; CUDA-graph safe.
- exact: `exact_rows` narrows the capacity rows to their true counts with one host sync for all
  route sets of a layer (an unbacked SymInt under torch.compile).

`counts_to_host` starts an asynchronous copy of the counts into pinned host memory; `exact_rows`
given its result then waits for that copy only, not for everything queued on the GPU, so work
enqueued in between keeps the GPU busy through the sync.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from torch import Tensor

from .._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_same_dtype,
    check_scalar,
    check_tensor,
    decompose_under_compile,
    eager_entry,
    on_input_device,
)
from .reference import compact_reference, forced_execute_reference, router_execute_reference

__all__ = [
    "router_execute",
    "forced_execute",
    "compact",
    "counts_to_host",
    "exact_rows",
    "router_execute_reference",
    "forced_execute_reference",
    "compact_reference",
]


def _check_router(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device, device_of="x")
    check_tensor("bias", bias, ndim=1, device=x.device, device_of="x")
    check_same_dtype("bias", bias, "weight", weight)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight: expected {x.shape[1]} columns like x, got shape {tuple(weight.shape)}")
    if weight.shape[0] % 2 or weight.shape[0] == 0 or weight.shape[0] & (weight.shape[0] - 1):
        raise ValueError(
            f"weight: expected 2R rows (two logits per router, R a power of two), got shape {tuple(weight.shape)}"
        )
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias: expected {weight.shape[0]} entries like weight's rows, got {bias.shape[0]}")


@torch.library.custom_op("skipgpt::router_execute", mutates_args=())
def router_execute(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Decisions of R Linear routers in one pass over x.

    x: [T, H]; weight: [2R, H] and bias: [2R], routers' dtype (x is cast to it), router r's
    EXECUTE/SKIP logits in rows 2r/2r+1. Returns [R, T] bool, True = execute (argmax semantics:
    a tie executes, NaN counts as the maximum).
    """
    _check_router(x, weight, bias)
    return router_execute_reference(x, weight, bias)


@router_execute.register_fake
def _router_execute_fake(x, weight, bias):
    _check_router(x, weight, bias)
    return x.new_empty((weight.shape[0] // 2, x.shape[0]), dtype=torch.bool)


def _check_forced(params: Tensor, start: Tensor, batch: int, seq_len: int, layer_idx: int) -> None:
    check_tensor("start", start, ndim=1, dtypes=(torch.int64,))
    check_tensor("params", params, ndim=1, dtypes=(torch.int64,), device=start.device, device_of="start")
    for name, value in (("batch", batch), ("seq_len", seq_len), ("layer_idx", layer_idx)):
        check_scalar(name, value, int)
    if params.shape[0] != 2 or start.shape[0] != 1:
        raise ValueError(f"params/start: expected 2 and 1 elements, got {params.shape[0]} and {start.shape[0]}")
    if batch < 0 or seq_len < 0:
        raise ValueError(f"batch, seq_len: expected sizes >= 0, got {batch}, {seq_len}")


@torch.library.custom_op("skipgpt::forced_execute", mutates_args=())
def forced_execute(params: Tensor, start: Tensor, batch: int, seq_len: int, layer_idx: int) -> Tensor:
    """Seeded pseudo-random routes for benchmarks and tests: [2, B, L] bool, True = execute.

    params: [2] int64 (seed, skip threshold); start: [1] int64 cache slot of token column 0.
    See `forced_execute_reference` for the hash; identical on every device and pipeline, for any
    int64 values of params and start (negative ones included: both reduce modulo 2^31 - 1 the
    way torch's `%` does) and any layer_idx.
    """
    _check_forced(params, start, batch, seq_len, layer_idx)
    return forced_execute_reference(params, start, batch, seq_len, layer_idx)


@forced_execute.register_fake
def _forced_execute_fake(params, start, batch, seq_len, layer_idx):
    _check_forced(params, start, batch, seq_len, layer_idx)
    return start.new_empty((2, batch, seq_len), dtype=torch.bool)


def _check_compact(execute: Tensor, valid: Optional[Tensor], route_counts: Optional[Tensor]) -> None:
    check_tensor("execute", execute, ndim=3, dtypes=(torch.bool,))
    if valid is not None:
        check_tensor("valid", valid, ndim=2, dtypes=(torch.bool,), device=execute.device, device_of="execute",
                     contiguous=False)
        if valid.shape != execute.shape[1:]:
            raise ValueError(
                f"valid: expected shape {tuple(execute.shape[1:])} ([B, L] like execute), got {tuple(valid.shape)}"
            )
    if route_counts is not None:
        check_tensor("route_counts", route_counts, ndim=1, dtypes=(torch.int64,), device=execute.device,
                     device_of="execute")
        if route_counts.shape[0] != execute.shape[0] + 1:
            raise ValueError(
                f"route_counts: expected {execute.shape[0] + 1} entries (R route sets, then the valid tokens), "
                f"got shape {tuple(route_counts.shape)}"
            )


# The op's schema gives `valid` and `route_counts` no defaults: up to torch 2.11 at least, a
# mutated argument left at its default crashes the op's version bump (pytorch#176078), and the
# dispatcher strips an explicit None equal to a default. The public `compact` below supplies them.
@torch.library.custom_op("skipgpt::compact", mutates_args=("route_counts",))
def compact(execute: Tensor, valid: Optional[Tensor],
            route_counts: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Capacity-form compaction of R route sets.

    execute: [R, B, L] bool (True = the token executes the module; any nonzero byte counts as
    True, as in PyTorch). valid: optional [B, L] bool (any strides), False for padding, which then
    executes in no route set. route_counts: optional [R+1] int64, a layer's counters, accumulated
    in place: += each route set's executing count, and the last += the valid tokens (B*L without
    `valid`). Folding the mask and the counting into the compaction saves an eager layer step two
    launches, four with padding (the mask, its sum and the two count updates).
    Returns rows [R, B*L] int32, slot [R, B*L] int32, seq_offsets [R, B+1] int32 as described in
    `compact_reference`; `seq_offsets[r, B:]` is route set r's executing count.
    """
    _check_compact(execute, valid, route_counts)
    return compact_reference(execute, valid, route_counts)


if HAS_TRITON:
    from . import kernels

    @router_execute.register_kernel("cuda")
    @on_input_device
    def _router_execute_cuda(x, weight, bias):
        _check_router(x, weight, bias)
        return kernels.router_execute(x, weight, bias)

    @forced_execute.register_kernel("cuda")
    @on_input_device
    def _forced_execute_cuda(params, start, batch, seq_len, layer_idx):
        _check_forced(params, start, batch, seq_len, layer_idx)
        return kernels.forced_execute(params, start, batch, seq_len, layer_idx)

    # No size-picked launch parameter, or a fixed one where the size is symbolic: always traced.
    decompose_under_compile(router_execute, _router_execute_cuda)
    decompose_under_compile(forced_execute, _forced_execute_cuda)

    @compact.register_kernel("cuda")
    @on_input_device
    def _compact_cuda(execute: Tensor, valid: Optional[Tensor], route_counts: Optional[Tensor]):
        _check_compact(execute, valid, route_counts)
        return kernels.compact(execute, valid, route_counts)

    decompose_under_compile(compact, _compact_cuda)


@compact.register_fake
def _compact_fake(execute: Tensor, valid: Optional[Tensor], route_counts: Optional[Tensor]):
    _check_compact(execute, valid, route_counts)
    R, B, L = execute.shape
    rows = execute.new_empty((R, B * L), dtype=torch.int32)
    return rows, torch.empty_like(rows), execute.new_empty((R, B + 1), dtype=torch.int32)


def _check_seq_offsets(seq_offsets: Tensor, device=None) -> None:
    check_tensor("seq_offsets", seq_offsets, ndim=2, dtypes=(torch.int32,), device=device, device_of="rows")
    if seq_offsets.shape[1] == 0:
        raise ValueError("seq_offsets: expected B+1 >= 1 columns (the last one holds the count), got 0")


@torch.library.custom_op("skipgpt::counts_to_host", mutates_args=())
def counts_to_host(seq_offsets: Tensor) -> Tensor:
    """Start copying each route set's executing count (the last column of `compact`'s
    seq_offsets [R, B+1] int32) to the host, for the exact form's `exact_rows`.

    Returns [R] int32 on the CPU. From a CUDA tensor it is pinned memory filled asynchronously:
    `exact_rows` given it waits for this copy only, not for the work queued on the GPU after it.
    Raises RuntimeError while a CUDA graph is being captured (the exact form syncs; capture
    capacity-form steps only).
    """
    _check_seq_offsets(seq_offsets)
    return seq_offsets[:, -1].to("cpu", copy=True)


def _no_values(t: Tensor) -> bool:
    """A plain meta tensor: not the fake tensors of tracing (which may wrap meta storage), whose
    ops produce outputs of known size only."""
    return t.device.type == "meta" and not isinstance(t, torch._subclasses.FakeTensor)


@counts_to_host.register_fake
def _counts_to_host_fake(seq_offsets: Tensor):
    _check_seq_offsets(seq_offsets)
    if _no_values(seq_offsets):  # the result lives on the CPU, where a meta input has no values for it
        raise ValueError("seq_offsets: counts_to_host copies the counts' values, which meta tensors do not hold")
    return torch.empty(seq_offsets.shape[0], dtype=torch.int32, device="cpu")


@counts_to_host.register_kernel("cuda")
@on_input_device
def _counts_to_host_cuda(seq_offsets: Tensor):
    _check_seq_offsets(seq_offsets)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "counts_to_host: called while a CUDA graph is being captured; the exact form reads the counts on "
            "the host, so only capacity-form steps can be captured"
        )
    host = torch.empty(seq_offsets.shape[0], dtype=torch.int32, pin_memory=True)
    host.copy_(seq_offsets[:, -1], non_blocking=True)
    done = torch.cuda.Event()
    done.record()  # on the current stream of seq_offsets' device (on_input_device)
    host._skipgpt_copied = done
    return host


def _check_exact(rows: Tensor, seq_offsets: Tensor, host_counts: Optional[Tensor]) -> None:
    check_tensor("rows", rows, ndim=2, dtypes=(torch.int32,))
    _check_seq_offsets(seq_offsets, rows.device)
    if seq_offsets.shape[0] != rows.shape[0]:
        raise ValueError(
            f"seq_offsets: expected {rows.shape[0]} route sets like rows, got shape {tuple(seq_offsets.shape)}"
        )
    if host_counts is not None:
        check_tensor("host_counts", host_counts, ndim=1, dtypes=(torch.int32,), device=torch.device("cpu"))
        if host_counts.shape[0] != rows.shape[0]:
            raise ValueError(f"host_counts: expected {rows.shape[0]} counts like rows, got shape {tuple(host_counts.shape)}")


def _check_counts(counts: list, rows: Tensor) -> None:
    # The counts are on the host here anyway (this is the one sync of the exact form), so unlike
    # the capacity form they are checked: a negative count would slice rows[r, :-n] from the end.
    T = rows.shape[1]
    for r, n in enumerate(counts):
        if not 0 <= n <= T:
            raise ValueError(f"seq_offsets: route set {r} counts {n} executing rows, expected 0..{T} (rows' T)")


@torch.library.custom_op("skipgpt::exact_rows", mutates_args=())
def exact_rows(rows: Tensor, seq_offsets: Tensor, host_counts: Optional[Tensor] = None) -> list[Tensor]:
    """Exact form: rows [R, T] int32 and seq_offsets [R, B+1] int32 from `compact` ->
    R tensors [N_r] int32 holding each route set's executing rows.

    Reads every count in one host sync: the only sync a routed layer makes, and only at prefill.
    host_counts: optional [R] int32, `counts_to_host(seq_offsets)`'s result: the sync then waits
    for that copy only. Having the counts on the host, it checks them: a count outside [0, T]
    raises ValueError.
    """
    _check_exact(rows, seq_offsets, host_counts)
    if host_counts is None:
        counts = seq_offsets[:, -1].tolist()
    else:
        copied = getattr(host_counts, "_skipgpt_copied", None)
        if copied is not None:
            copied.synchronize()
        elif rows.is_cuda:
            # The copy's event did not come along (another tensor object, say): wait for the
            # stream the copy was queued on, as a plain read of the counts would.
            _warn_waiting_for_the_stream()
            torch.cuda.current_stream(rows.device).synchronize()
        counts = host_counts.tolist()
    _check_counts(counts, rows)
    return [rows[r, :n].clone() for r, n in enumerate(counts)]


@functools.cache  # logs once; tests clear it
def _warn_waiting_for_the_stream() -> None:
    logging.getLogger("skipgpt").warning(
        "exact_rows: host_counts came without its copy's CUDA event (not counts_to_host's own result), so "
        "it waits for all the work queued on the stream, not for the copy only: slower, same results"
    )


@exact_rows.register_fake
def _exact_rows_fake(rows: Tensor, seq_offsets: Tensor, host_counts: Optional[Tensor] = None):
    _check_exact(rows, seq_offsets, host_counts)
    # Plain meta tensors have no data to size the outputs with; PyTorch's own error for this
    # names no argument.
    if _no_values(rows):
        raise ValueError(
            "seq_offsets: exact_rows sizes its outputs by the counts' values, which meta tensors do not "
            "hold; trace it with fake tensors (torch.compile) instead"
        )
    ctx = torch.library.get_ctx()
    out = []
    for _ in range(rows.shape[0]):
        n = ctx.new_dynamic_size()
        torch._check(n <= rows.shape[1])  # lets the compiler bound the count by T
        out.append(rows.new_empty(n))
    return out


# Public entries (see eager_entry): eager CUDA calls skip the dispatcher.
router_execute = eager_entry(router_execute, _router_execute_cuda if HAS_TRITON else None)
forced_execute = eager_entry(forced_execute, _forced_execute_cuda if HAS_TRITON else None)
counts_to_host = eager_entry(counts_to_host, _counts_to_host_cuda)
exact_rows = eager_entry(exact_rows, exact_rows._init_fn)
_compact_entry = eager_entry(compact, _compact_cuda if HAS_TRITON else None)


def compact(execute: Tensor, valid: Optional[Tensor] = None,
            route_counts: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _compact_entry(execute, valid, route_counts)


compact.__doc__, compact.op = _compact_entry.__doc__, _compact_entry.op
