"""Shared by every op family: input validation and Triton availability.

Every op validates on the host before anything launches, so a kernel never sees an argument
it could index out of bounds with. Messages name the argument, what was expected and what came.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

try:  # Triton is a Linux-only dependency; without it every op runs its PyTorch reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAS_TRITON = False

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32,)


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = True,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor, got shape {tuple(t.shape)} with strides "
            f"{tuple(t.stride())}; call .contiguous() first"
        )


def check_dim(name: str, t: torch.Tensor, dim: int, expected, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}: dim {dim} must equal {what} ({expected}), got shape {tuple(t.shape)}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from {ref_name}'s {ref.dtype}")


def check_count(count: Optional[torch.Tensor], device: torch.device) -> None:
    """`count` holds the number of valid rows of a capacity-sized tensor, on the device."""
    if count is None:
        return
    check_tensor("count", count, dtypes=INDEX_DTYPES, device=device, contiguous=False)
    if count.numel() != 1:
        raise ValueError(f"count: expected a single element, got shape {tuple(count.shape)}")


def check_rows(name: str, rows: Optional[torch.Tensor], device: torch.device) -> None:
    """`rows` hold flat token indices. Their values are data: kernels mask indices outside the
    indexed tensor instead of syncing with the host to check them."""
    if rows is None:
        return
    check_tensor(name, rows, ndim=1, dtypes=INDEX_DTYPES, device=device, contiguous=False)
    if rows.stride(0) != 1:
        raise ValueError(f"{name}: expected unit stride, got stride {rows.stride(0)}")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def eager_entry(op, cuda_impl):
    """The public entry of custom op `op`, whose CUDA implementation is `cuda_impl`.

    Eager calls on CUDA tensors run `cuda_impl` directly: the dispatcher round trip costs ~40 us
    of host time per call (measured on the device machine), which made decode steps host-bound.
    Under torch.compile, and on CPU, calls go through the op (torch.ops.skipgpt.*), so tracing,
    fake tensors and opcheck see the registered op. Validation is identical either way: it lives
    in the implementations. The op itself stays reachable as `entry.op`.
    """

    def entry(*args, **kwargs):
        if cuda_impl is not None and args[0].is_cuda and not torch.compiler.is_compiling():
            return cuda_impl(*args, **kwargs)
        return op(*args, **kwargs)

    functools.update_wrapper(entry, op._init_fn)
    entry.op = op
    return entry
