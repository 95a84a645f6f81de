"""RMSNorm ops: dense, fused with a row gather (MLP input), and fused with a compacted copy
(attention: dense rows feed K/V, the compacted copy feeds Q) in one pass over x."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_count,
    check_dim,
    check_rows,
    check_same_dtype,
    check_scalar,
    check_tensor,
    decompose_under_compile,
    eager_entry,
    on_input_device,
)
from .reference import rms_norm_reference, rms_norm_split_reference

__all__ = ["rms_norm", "rms_norm_split", "rms_norm_reference", "rms_norm_split_reference"]


def _check(x: Tensor, weight: Tensor) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, device=x.device, device_of="x")
    check_same_dtype("weight", weight, "x", x)
    check_dim("weight", weight, 0, x.shape[1], "x's hidden size")


def _check_rms_norm(x, weight, eps, rows, count):
    _check(x, weight)
    check_scalar("eps", eps, float)
    check_rows("rows", rows, x.device, device_of="x")
    check_count(count, x.device, device_of="x")
    if count is not None and rows is None:
        raise ValueError("count: given without rows; count limits the gathered rows")


@torch.library.custom_op("skipgpt::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float, rows: Optional[Tensor] = None, count: Optional[Tensor] = None) -> Tensor:
    """RMSNorm, optionally of gathered rows.

    x: [T, H] fp16/bf16/fp32, weight: [H] same dtype.
    rows: optional [M] int32 flat indices into x: output row m normalises x[rows[m]].
    count: optional [1] int32 on the device: only rows m < count are written (capacity form).
    Returns [M, H] (M = T without rows).
    rows and count are device data, never synced to check: a row index outside [0, T) reads a
    zero row (output weight * 0), and count is clamped to [0, M].
    """
    _check_rms_norm(x, weight, eps, rows, count)
    return rms_norm_reference(x, weight, eps, rows, count)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps, rows=None, count=None):
    _check_rms_norm(x, weight, eps, rows, count)
    return x.new_empty((x.shape[0] if rows is None else rows.shape[0], x.shape[1]))


def _check_split(x, weight, eps, slot, num_rows):
    _check(x, weight)
    check_scalar("eps", eps, float)
    check_scalar("num_rows", num_rows, int)
    check_rows("slot", slot, x.device, device_of="x")
    check_dim("slot", slot, 0, x.shape[0], "x's row count")
    if num_rows < 0:
        raise ValueError(f"num_rows: must be >= 0, got {num_rows}")


@torch.library.custom_op("skipgpt::rms_norm_split", mutates_args=())
def rms_norm_split(x: Tensor, weight: Tensor, eps: float, slot: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """RMSNorm of every row plus a compacted copy, in one pass.

    x: [T, H], weight: [H], slot: [T] int32 (position of each token in the compacted tensor, -1 to
    leave it out), num_rows: rows of the compacted tensor (N exact, or T in capacity form).
    Returns (y [T, H], yq [num_rows, H]) with yq[slot[t]] = y[t]; other rows of yq unspecified.
    slot is device data: a slot outside [0, num_rows) writes nothing; if two tokens share a slot,
    which of them lands there is unspecified.
    """
    _check_split(x, weight, eps, slot, num_rows)
    return rms_norm_split_reference(x, weight, eps, slot, num_rows)


@rms_norm_split.register_fake
def _rms_norm_split_fake(x, weight, eps, slot, num_rows):
    _check_split(x, weight, eps, slot, num_rows)
    return torch.empty_like(x), x.new_empty((num_rows, x.shape[1]))


if HAS_TRITON:
    from . import kernels

    @rms_norm.register_kernel("cuda")
    @on_input_device
    def _rms_norm_cuda(x, weight, eps, rows=None, count=None):
        _check_rms_norm(x, weight, eps, rows, count)
        return kernels.rms_norm(x, weight, eps, rows, count)

    @rms_norm_split.register_kernel("cuda")
    @on_input_device
    def _rms_norm_split_cuda(x, weight, eps, slot, num_rows):
        _check_split(x, weight, eps, slot, num_rows)
        return kernels.rms_norm_split(x, weight, eps, slot, num_rows)

    decompose_under_compile(rms_norm, _rms_norm_cuda)
    decompose_under_compile(rms_norm_split, _rms_norm_split_cuda)


# Public entries (see eager_entry): eager CUDA calls skip the dispatcher.
rms_norm = eager_entry(rms_norm, _rms_norm_cuda if HAS_TRITON else None)
rms_norm_split = eager_entry(rms_norm_split, _rms_norm_split_cuda if HAS_TRITON else None)
