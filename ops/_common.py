"""Shared by every op family: input validation, the launch device, Triton availability, and how
the ops' CUDA implementations are traced under torch.compile (`decompose_under_compile`).

Every op validates on the host before anything launches, so a kernel never sees an argument
it could index out of bounds with. Messages name the argument, what was expected and what came.

What is checked where: everything the host knows without reading device memory (types, dtypes,
shapes, strides, devices) is checked on every call. Index *values* held in device tensors (rows,
slot, count, seq_offsets, start) are data: checking them would cost a host sync per op, which
the capacity form exists to avoid (DESIGN.md section 4). The kernels clamp or mask such values
instead, so a bad index never reads or writes outside a tensor; each op's docstring says what
an out-of-range value does, and the PyTorch references follow the same rule.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import threading
from typing import Callable, Optional, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

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
    device_of: Optional[str] = None,
    contiguous: bool = True,
) -> None:
    """Raise TypeError/ValueError unless `t` (the argument called `name`) is a tensor with `ndim`
    dims, a dtype in `dtypes`, on `device` (that of argument `device_of`, named in the message)
    and, with `contiguous`, laid out densely in row-major order."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        # Every tensor of one op must live on one device: a kernel launched for one device
        # cannot dereference another device's memory.
        like = f" like {device_of}" if device_of else ""
        raise ValueError(f"{name}: expected a tensor on {device}{like}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor, got shape {tuple(t.shape)} with strides "
            f"{tuple(t.stride())}; call .contiguous() first"
        )


def check_scalar(name: str, value, kind: type) -> None:
    """A Python scalar argument (int, float, bool or str). The dispatcher checks these against
    the schema, but `eager_entry` calls CUDA implementations directly, so they check themselves.
    Symbolic sizes (torch.SymInt, under torch.compile) count as ints."""
    if type(value) is kind or (kind is float and type(value) is int):
        return  # the common case, without the slower abstract-class checks below
    if kind is int:
        ok = isinstance(value, (numbers.Integral, torch.SymInt))
    elif kind is float:
        ok = isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat))
    else:
        ok = isinstance(value, kind)
    if not ok or (kind is not bool and isinstance(value, bool)):
        raise TypeError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")


def check_dim(name: str, t: torch.Tensor, dim: int, expected, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}: dim {dim} must equal {what} ({expected}), got shape {tuple(t.shape)}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from {ref_name}'s {ref.dtype}")


def check_kv_caches(k_cache, v_cache, ref_name: str, ref: torch.Tensor) -> None:
    """A seq-first cache pair: 4-d [B, S, Hk, D] tensors of one shape, on the device and in the
    dtype of argument `ref_name` (`ref`)."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, ndim=4, device=ref.device, device_of=ref_name)
        check_same_dtype(name, t, ref_name, ref)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")


def check_count(count: Optional[torch.Tensor], device: torch.device, device_of: Optional[str] = None) -> None:
    """`count` holds the number of valid rows of a capacity-sized tensor, on the device: [1] (or
    a scalar) int32. Its value is data: kernels clamp it to [0, rows], never sync to check it."""
    if count is None:
        return
    check_tensor("count", count, dtypes=INDEX_DTYPES, device=device, device_of=device_of, contiguous=False)
    # A [1, 1] count would broadcast `arange(M) < count` to a matrix in the references.
    if count.numel() != 1 or count.dim() > 1:
        raise ValueError(f"count: expected a single element, of shape (1,) or (), got shape {tuple(count.shape)}")


def check_rows(name: str, rows: Optional[torch.Tensor], device: torch.device, device_of: Optional[str] = None) -> None:
    """`rows` hold flat token indices. Their values are data: kernels mask indices outside the
    indexed tensor instead of syncing with the host to check them."""
    if rows is None:
        return
    check_tensor(name, rows, ndim=1, dtypes=INDEX_DTYPES, device=device, device_of=device_of, contiguous=False)
    if rows.stride(0) != 1:
        raise ValueError(f"{name}: expected unit stride, got stride {rows.stride(0)}")


def check_kernel_head_dim(name: str, t: torch.Tensor, what: str, size: int, low: int, high: int) -> None:
    """The Triton kernels tile a head dim with `tl.arange`, which needs a power of two: `size`
    (the head dim, or half of it for rotary embeddings) must be one in [low, high]. Checked in
    the CUDA implementations only; the PyTorch (CPU) implementations take any size."""
    if size < low or size > high or size & (size - 1):
        raise ValueError(
            f"{name}: the Triton kernels need {what} to be a power of two in [{low}, {high}], "
            f"got shape {tuple(t.shape)}"
        )


def on_input_device(cuda_impl):
    """Run the CUDA implementation `cuda_impl` with its first argument's device current.

    Triton launches on the *current* CUDA device and its current stream (so does an event's
    `record()`, which `counts_to_host` uses), so a tensor on cuda:1 while cuda:0 is
    current would be handed to a kernel running on the wrong GPU. The dispatcher gives no help:
    only ATen's generated kernel wrappers install a DeviceGuard; a Python kernel registered with torch.library is called as it is (PyTorch's
    PythonKernelHolder), and `eager_entry` bypasses the dispatcher altogether. Eager decode is
    bound by host time, so the device is switched only when it differs: the common single-GPU
    case pays one integer comparison. The validation inside `cuda_impl` makes every other
    tensor argument live on the same device as the first.
    """

    @functools.wraps(cuda_impl)
    def run(*args, **kwargs):
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.is_cuda:
            index = first.get_device()
            if index != torch.cuda.current_device():
                with torch.cuda.device(index):
                    return cuda_impl(*args, **kwargs)
        return cuda_impl(*args, **kwargs)

    return run


# Grid and tile arithmetic of the host wrappers. Not triton.cdiv / triton.next_power_of_2: since
# Triton 3.5 they are ConstexprFunction objects, whose call costs ~1 us of host time on the device
# machine (Triton 3.6) and ~3-4 us on the CI machine (Triton 3.9), against ~0.1 us for a plain
# function; an eager layer step makes about fifteen such calls (docs/BENCHMARKS.md).
def cdiv(a, b):
    """ceil(a / b) of non-negative a and positive b; symbolic sizes stay symbolic (no guard)."""
    return (a + b - 1) // b


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device; 4 for the Triton interpreter (CPU), few
    enough that tests exercise grids that split or stride their work."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=None)
def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: Triton's fp32 dot defaults to tf32; an fp32 model asks for fp32
    accuracy."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for a plain int."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def eager_entry(op, cuda_impl):
    """The public entry of custom op `op`, whose CUDA implementation is `cuda_impl`.

    Eager calls on CUDA tensors run `cuda_impl` directly: the dispatcher round trip costs ~40 us
    of host time per call (measured on the device machine), which made decode steps host-bound.
    Under torch.compile, and on CPU, calls go through the op (torch.ops.skipgpt.*), so tracing,
    fake tensors and opcheck see the registered op. Validation is identical either way: it lives
    in the implementations. The op itself stays reachable as `entry.op`. The CUDA
    implementations carry `on_input_device`, so the fast path launches on the inputs' GPU too.
    Calls whose first argument is not a tensor, or that pass it by keyword, go through the op,
    whose schema check names the argument.
    """

    def entry(*args, **kwargs):
        if (
            cuda_impl is not None
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].is_cuda
            and not torch.compiler.is_compiling()
        ):
            return cuda_impl(*args, **kwargs)
        return op(*args, **kwargs)

    functools.update_wrapper(entry, op._init_fn)
    entry.op = op
    return entry


def known_empty(size) -> bool:
    """size == 0, where that is known without a guard: always for an int, and for a symbolic size
    (an op traced by `decompose_under_compile`) only where it is provable. Branching on an unknown
    size would guard, and a guard on a new shape recompiles; an unknown size goes on to a launch
    whose grid may turn out empty. Triton's launcher, which Inductor also uses for these kernels,
    skips those (tests/compile/test_gpu_compile.py runs compiled steps where no token executes)."""
    return statically_known_true(size == 0)


_decomposing = threading.local()


def _tracing_kernels() -> bool:
    """Whether `decompose_under_compile` is tracing an op's CUDA implementation on this thread."""
    return getattr(_decomposing, "active", False)


def launch(kernel, scratch: bool = False):
    """`kernel`, to index with a grid and call. While `decompose_under_compile` traces an op's
    CUDA implementation, its `torch.library.wrap_triton` form instead, which records the launch in
    the graph for Inductor rather than running it. scratch: the kernel builds TMA descriptors,
    for which Triton asks an allocator for global memory at each launch (Inductor sets its own)."""
    if _tracing_kernels():
        return torch.library.wrap_triton(kernel)
    if scratch:
        _set_scratch_allocator()
    return kernel


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether TMA can load these contiguous row-major 2-d tensors: 16-byte aligned bases and rows
    (the row size, not stride(0), which a one-row tensor may leave arbitrary). While an op is
    traced the tensors have no address; Inductor keeps its buffers and the graph's inputs 16-byte
    aligned (it copies a misaligned input), so there the row sizes decide."""
    tracing = _tracing_kernels()
    return all(t.shape[1] * t.element_size() % 16 == 0 and (tracing or t.data_ptr() % 16 == 0) for t in tensors)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device: on_input_device's


def _set_scratch_allocator() -> None:
    """Give Triton an allocator unless one is set (by the caller, or by Inductor before its
    launches): without one, a launch that needs scratch raises."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current  # a ContextVar, or (older) the allocator
    if current is None or isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def bool_bytes(t: torch.Tensor) -> torch.Tensor:
    """A bool tensor's bytes as uint8, for a kernel to read (any nonzero byte is True, as in
    PyTorch): a view, except while `decompose_under_compile` traces an op. Inductor (torch 2.11)
    cannot lower a view between bool and another dtype, so there it is a copy (a mask's few bytes)."""
    return t.to(torch.uint8) if _tracing_kernels() else t.view(torch.uint8)


def bytes_to_bool(t: torch.Tensor) -> torch.Tensor:
    """The int8 0/1 bytes a kernel wrote, as bool: a view, or while an op is traced a comparison
    (see `bool_bytes`)."""
    return (t != 0) if _tracing_kernels() else t.view(torch.bool)


def decompose_under_compile(op, cuda_impl, traceable: Optional[Callable[..., bool]] = None) -> None:
    """Under torch.compile, trace calls of custom op `op` on CUDA tensors through `cuda_impl`
    (its host code, ATen ops and `launch`ed Triton kernels), so the graph holds the kernels
    themselves and Inductor launches them with its own launcher. An opaque custom op is called
    through the dispatcher instead, ~40 us of host time per call on the device machine
    (docs/BENCHMARKS.md), which made compiled layers slower than eager ones wherever the host
    bounds the layer. This is what `torch.library.triton_op` does, but for CUDA inputs only: on
    CPU the op stays one opaque call to its PyTorch implementation.

    The trace runs `cuda_impl` on functional fake tensors, so the host code must not branch on a
    symbolic size (that would guard, and recompile on a new shape): `known_empty` for empty checks,
    and `traceable(*args, **kwargs)` to leave calls opaque where the host code has to pick kernels
    or tiles by size (say, by the bucketed row count of a capacity-form GEMM). Eager calls are not
    affected: they never enter this path.
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    # Without on_input_device: in compiled code, Inductor puts each launch on its inputs' device.
    impl = inspect.unwrap(cuda_impl)

    def decompose(mode, func, types, args, kwargs):
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented  # a tensor subclass: let it handle the op
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        # torch.export keeps custom ops whole unless asked otherwise (as it does for triton_op):
        # an exported program holding raw Triton launches could not be saved.
        opaque = custom_triton_ops_decomposition_disabled() or not args[0].is_cuda
        if opaque or (traceable is not None and not traceable(*args, **kwargs)):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        was = _tracing_kernels()
        _decomposing.active = True
        try:
            with mode:
                return impl(*args, **kwargs)
        finally:
            _decomposing.active = was

    op.register_torch_dispatch(FunctionalTensorMode, decompose)


def static_ints(*values) -> bool:
    """True when every value (an int, or a tensor's sizes) is a plain int: not symbolic."""
    for v in values:
        sizes = v.shape if isinstance(v, torch.Tensor) else (v,)
        if not all(type(s) is int for s in sizes):
            return False
    return True
