"""Property-based robustness tests of every public op (issue #10).

Hypothesis builds a valid call of an op from random sizes (0, 1 and odd ones included), dtypes
and index data, then applies at most one mutation: another dtype, a non-contiguous layout
(transposed, sliced with a step, expanded), a 'meta' tensor among CPU ones (or every tensor on
'meta'), a wrong rank or size, a non-tensor, an out-of-range integer, or index values outside
their range (negative, past B*L, positions past the cache). Each call then goes through

1. the public wrapper `skipgpt.ops.<family>.<op>` and the registered `torch.ops.skipgpt.<op>`
   on CPU (the PyTorch implementation): they must agree, and either match the op's reference
   or raise ValueError/TypeError/RuntimeError whose message names the mutated argument;
2. the CUDA implementation (the Triton kernels; on CPU through Triton's interpreter) with every
   tensor, input or output, inside guard bands: it must raise what the CPU op raises (or a
   clean error about a kernel-only size limit), or match the reference on the part of the
   output the op specifies, and leave every guard band untouched.

Index values in device tensors are never synced to the host for checking (DESIGN.md section 4);
the ops document what an out-of-range value does, and this file checks that the kernels do it.
Examples are few (60 per op; SKIPGPT_PROPERTY_EXAMPLES=N asks for more), sizes tiny and the
search derandomized, so the file runs in seconds under the interpreter.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipgpt import ops
from skipgpt.ops import attention, linear, norm, routing
from skipgpt.ops._common import HAS_TRITON
from skipgpt.ops.routing.reference import compact_reference
from tests.helpers import KERNEL_DEVICE, TOL
from tests.ops.opsutil import Guards, assert_rel, guarded_outputs, randn

PROPERTY = settings(
    max_examples=int(os.environ.get("SKIPGPT_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
rope = importlib.import_module("skipgpt.ops.rope")  # the family (skipgpt.ops.rope is also the op)
CPU = torch.device("cpu")
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
OTHER_DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.bool]
CLEAN = (ValueError, TypeError, RuntimeError)
# The kernels run on the GPU, or on CPU tensors through Triton's interpreter (tests/conftest.py).
KERNELS = HAS_TRITON and (KERNEL_DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
# Index values outside any valid range, within int32 (the index dtype).
BAD_INDEX = [-1, -3, -(2**31), 2**31 - 1]


def _kernel_modules():
    from skipgpt.ops.attention import kernels as attention_k
    from skipgpt.ops.linear import kernels as linear_k
    from skipgpt.ops.norm import kernels as norm_k
    from skipgpt.ops.rope import kernels as rope_k
    from skipgpt.ops.routing import kernels as routing_k

    return attention_k, linear_k, norm_k, rope_k, routing_k


# ---------------------------------------------------------------------------------------------
# cases: a base builder (valid arguments) plus at most one mutation


@dataclass
class Case:
    op: str
    base: Callable[..., dict]  # (device, put) -> {argument name: value}, in schema order
    mutation: str = "none"
    target: Optional[str] = None  # the argument the mutation changed
    value: Any = None  # the mutation's parameter (a dtype, an int, ...)
    by_keyword: bool = False

    def build(self, device=CPU, guards: Optional[Guards] = None, mutate: bool = True) -> dict:
        def put(t: torch.Tensor, name: str) -> torch.Tensor:
            t = t.to(device)
            return guards.wrap(t, name) if guards is not None else t

        args = self.base(device, put)
        return _mutate(args, self.mutation, self.target, self.value, device) if mutate else args

    def __repr__(self):  # what Hypothesis prints for a failing example
        shapes = {k: (tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else v
                  for k, v in self.build(mutate=False).items()}
        return f"Case({self.op}, {self.mutation} on {self.target} ({self.value}), kw={self.by_keyword}, base={shapes})"


def _mutate(args: dict, mutation: str, target: Optional[str], value: Any, device) -> dict:
    args = dict(args)
    if mutation == "none":
        return args
    if mutation == "all_meta":
        return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    t = args[target]
    if mutation == "set":  # a new value for a Python scalar, or a replacement tensor
        args[target] = value.to(device) if isinstance(value, torch.Tensor) else value
    elif mutation == "dtype":
        args[target] = t.to(value)
    elif mutation == "transpose":
        args[target] = t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    elif mutation == "step":  # same values, every other element of a twice-as-long tensor
        args[target] = t.repeat_interleave(2, dim=0)[::2] if t.dim() >= 1 else t
    elif mutation == "expand":  # row 0 broadcast over dim 0 (stride 0)
        args[target] = t[:1].expand_as(t) if t.dim() >= 1 and t.shape[0] > 0 else t
    elif mutation == "meta":
        args[target] = t.to("meta")
    elif mutation == "unsqueeze":
        args[target] = t.unsqueeze(0)
    elif mutation == "grow":  # one more entry along dim 0
        args[target] = torch.cat([t, torch.zeros_like(t[:1]) if t.shape[0] == 0 else t[:1]])
    elif mutation == "list":
        args[target] = t.tolist()
    else:  # pragma: no cover
        raise AssertionError(mutation)
    return args


GENERIC = ["dtype", "transpose", "step", "expand", "meta", "unsqueeze", "grow", "list"]


@st.composite
def mutations(draw, case: Case, tensor_args: list, scalar_values: dict, keyword_ok: bool = True) -> Case:
    """`case` with one mutation drawn (or none): a generic one on one of `tensor_args`, a new
    value for a scalar argument (`scalar_values`: name -> candidate values), or every tensor on
    'meta'."""
    kind = draw(st.sampled_from(["none", "none", "generic", "generic", "generic", "scalar", "all_meta"]))
    case.by_keyword = keyword_ok and draw(st.booleans())
    if kind == "generic":
        case.target = draw(st.sampled_from(tensor_args))
        case.mutation = draw(st.sampled_from(GENERIC))
        if case.mutation == "dtype":
            case.value = draw(st.sampled_from(OTHER_DTYPES))
    elif kind == "scalar" and scalar_values:
        case.target = draw(st.sampled_from(sorted(scalar_values)))
        case.mutation, case.value = "set", draw(st.sampled_from(scalar_values[case.target]))
    elif kind == "all_meta":
        case.mutation = "all_meta"
    if case.mutation != "none" and case.build(mutate=False).get(case.target, 0) is None:
        case.mutation, case.target = "none", None  # an absent optional argument: nothing to change
    return case


# ---------------------------------------------------------------------------------------------
# the checks


def _names(message: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


KERNEL_LIMIT = "the Triton kernels need"  # a size only the CUDA implementation rejects


def _assert_clean(err: BaseException, case: Case, where: str) -> None:
    assert isinstance(err, CLEAN), f"{where}: {type(err).__name__} is not a clean error: {err}"
    message = str(err)
    if case.target is not None and KERNEL_LIMIT not in message:
        assert _names(message, case.target), f"{where}: error does not name {case.target!r}: {message}"
    else:  # a valid call or every tensor on meta: whatever failed must at least name an argument
        schema_args = [a.name for a in getattr(torch.ops.skipgpt, case.op).default._schema.arguments]
        assert any(_names(message, n) for n in schema_args), f"{where}: error names no argument: {message}"


def _call(fn, args: dict, by_keyword: bool = False):
    try:
        return (fn(**args) if by_keyword else fn(*args.values())), None
    except Exception as e:  # noqa: BLE001 - judged by _assert_clean
        return None, e


def _is_meta(out) -> bool:
    if isinstance(out, torch.Tensor):
        return out.is_meta
    return isinstance(out, (list, tuple)) and any(_is_meta(o) for o in out)


def _shapes(out):
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape), out.dtype)
    if isinstance(out, (list, tuple)):
        return [_shapes(o) for o in out]
    return out


@dataclass
class Spec:
    entry: Callable  # the public wrapper in skipgpt.ops.<family>
    cuda_impl: Optional[Callable]  # the CUDA implementation (validation + Triton launch)
    expect: Callable[[dict], Any]  # what the op must return for these (fresh, CPU) arguments
    compare: Callable[[Any, Any, dict, bool, Case], None]  # (out, expected, args, kernel, case)
    kernel_expect: Optional[Callable[[dict], Any]] = None  # on the kernel path, if it differs
    kernel_only_errors: tuple = ()  # CPU errors the kernels answer by masking (documented)
    tensor_count: Callable[[dict], int] = field(default=lambda a: sum(isinstance(v, torch.Tensor) for v in a.values()))


def check(case: Case) -> None:
    spec = SPECS[case.op]
    op = getattr(torch.ops.skipgpt, case.op)
    entry_args = case.build()
    out, err = _call(spec.entry, entry_args, case.by_keyword)
    op_args = case.build()
    out_op, err_op = _call(op, op_args)
    # 1. The public wrapper and the registered op agree.
    assert (err is None) == (err_op is None), f"wrapper: {err!r}, op: {err_op!r}"
    if err is not None:
        _assert_clean(err, case, "wrapper")
        _assert_clean(err_op, case, "op")
        assert type(err) is type(err_op) and str(err).splitlines()[0] == str(err_op).splitlines()[0]
    else:
        assert not (case.mutation == "meta" and spec.tensor_count(entry_args) > 1), "mixed devices were accepted"
        if case.mutation == "all_meta" or _is_meta(out):  # every tensor on meta: the fake ran
            twin, twin_err = _call(spec.entry, case.build(mutate=False))
            if twin_err is None:
                assert _shapes(out) == _shapes(twin), "meta (fake) and CPU outputs differ in shape or dtype"
        else:
            expected = spec.expect(case.build())
            spec.compare(out, expected, entry_args, False, case)
            spec.compare(out_op, expected, op_args, False, case)
    # 2. The CUDA implementation: Triton kernels inside guard bands.
    if not KERNELS or spec.cuda_impl is None or case.mutation in ("meta", "all_meta"):
        return
    probe = case.build()
    if KERNEL_DEVICE.type == "cpu" and any(
        isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 for v in probe.values()
    ):
        return  # the interpreter computes bf16 wrongly (DESIGN.md section 6)
    guards = Guards()
    kernel_args = case.build(KERNEL_DEVICE, guards)
    with guarded_outputs(guards, *_kernel_modules()):
        k_out, k_err = _call(spec.cuda_impl, kernel_args)
    guards.check()
    if k_err is not None:
        _assert_clean(k_err, case, "CUDA implementation")
        # Rejected by both (messages may differ: the CPU op's schema check speaks first there),
        # or by a size limit of the kernels alone.
        assert err is not None or KERNEL_LIMIT in str(k_err), f"only the CUDA implementation rejected it: {k_err}"
        return
    if err is not None:
        assert any(re.search(p, str(err)) for p in spec.kernel_only_errors), (
            f"the CUDA implementation accepted what the CPU op rejected: {err}"
        )
    expected = (spec.kernel_expect or spec.expect)(case.build())
    spec.compare(k_out, expected, kernel_args, True, case)


def _close(out: torch.Tensor, want: torch.Tensor, what: str, kernel: bool) -> None:
    assert out.shape == want.shape, f"{what}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    assert out.dtype == want.dtype, f"{what}: dtype {out.dtype} != {want.dtype}"
    if not kernel:  # the CPU op runs the reference itself: bit for bit
        assert torch.equal(out.cpu(), want.cpu()) or torch.allclose(
            out.cpu().double(), want.cpu().double(), equal_nan=True), what
        return
    if out.dtype in (torch.bool, torch.int32, torch.int64):
        assert torch.equal(out.cpu(), want.cpu()), what
    else:
        assert_rel(out.cpu().float(), want.cpu().float(), TOL[out.dtype], what)


def _count(args: dict, m: int, count_name: str = "count") -> int:
    """Rows the capacity form computes: count clamped to [0, m] (all m without a count)."""
    count = args.get(count_name)
    return m if count is None else max(0, min(m, int(count.reshape(-1)[-1])))  # the last entry: seq_offsets[B]


def _sizes(*choices):
    return st.sampled_from(list(choices))


# ---------------------------------------------------------------------------------------------
# routing: router_execute, forced_execute, compact, counts_to_host, exact_rows


@st.composite
def router_cases(draw):
    T, H, R = draw(_sizes(0, 1, 2, 5, 17)), draw(_sizes(0, 1, 3, 16)), draw(_sizes(1, 2))
    x_dtype, w_dtype, seed = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS)), draw(st.integers(0, 99))

    def base(device, put):
        return dict(
            x=put(randn(T, H, dtype=x_dtype, seed=seed), "x"),
            weight=put(randn(2 * R, H, dtype=w_dtype, seed=seed + 1, scale=H**-0.5 if H else 1.0), "weight"),
            bias=put(randn(2 * R, dtype=w_dtype, seed=seed + 2), "bias"),
        )

    case = Case("router_execute", base)
    if draw(st.integers(0, 3)) == 0:  # a weight whose row count is no 2R with R a power of two
        rows = draw(_sizes(0, 3, 6))
        case.mutation, case.target = "set", "weight"
        case.value = randn(rows, H, dtype=w_dtype, seed=seed)
        return case
    return draw(mutations(case, ["x", "weight", "bias"], {}))


def _router_compare(out, want, args, kernel, case):
    if not kernel:
        return _close(out, want, "router_execute", kernel)
    assert out.shape == want.shape and out.dtype == torch.bool
    # Summation order differs from the reference: only clear decisions must agree.
    x, w, b = (args[k].cpu().double() for k in ("x", "weight", "bias"))
    logits = F.linear(x, w, b).view(x.shape[0], w.shape[0] // 2, 2)
    clear = ((logits[..., 0] - logits[..., 1]).abs() > 0.05 * (1 + logits.abs().amax(-1))).t()
    assert torch.equal(out.cpu()[clear], want[clear])


@st.composite
def forced_cases(draw):
    seed = draw(st.sampled_from([0, 5, -5, 2**31 + 3, -(2**40), 2**62]))
    threshold = draw(st.sampled_from([0, 2**30, 2**31, -1]))
    first = draw(st.sampled_from([0, 3, -7, 2**40]))
    batch, seq_len = draw(_sizes(0, 1, 2, 3)), draw(_sizes(0, 1, 5, 17))
    layer = draw(st.sampled_from([0, 3, -2, 2**31 + 1, 2**40]))

    def base(device, put):
        return dict(
            params=put(torch.tensor([seed, threshold]), "params"),
            start=put(torch.tensor([first]), "start"),
            batch=batch, seq_len=seq_len, layer_idx=layer,
        )

    return draw(mutations(Case("forced_execute", base), ["params", "start"],
                          {"batch": [-1, -5], "seq_len": [-1, -3], "layer_idx": [1.5, None]}))


@st.composite
def compact_cases(draw):
    R, B, L = draw(_sizes(0, 1, 2)), draw(_sizes(0, 1, 2, 3)), draw(_sizes(0, 1, 2, 5, 33))
    p, seed = draw(st.sampled_from([0.0, 0.4, 1.0])), draw(st.integers(0, 99))
    raw_bytes = draw(st.booleans())  # bools whose bytes are not all 0/1 (viewed from uint8)
    with_valid, with_counts = draw(st.booleans()), draw(st.booleans())

    def base(device, put):
        g = torch.Generator().manual_seed(seed)
        if raw_bytes:
            execute = torch.randint(0, 256, (R, B, L), generator=g, dtype=torch.uint8).view(torch.bool)
        else:
            execute = torch.rand(R, B, L, generator=g) < p
        valid = put(torch.rand(B, L, generator=g) < 0.7, "valid") if with_valid else None
        # Counters that already hold counts: the op adds to them.
        counts = put(torch.randint(0, 50, (R + 1,), generator=g), "route_counts") if with_counts else None
        return dict(execute=put(execute, "execute"), valid=valid, route_counts=counts)

    return draw(mutations(Case("compact", base), ["execute", "valid", "route_counts"], {}))


def _compact_expect(args):
    counts = args["route_counts"]
    counts = counts.clone() if isinstance(counts, torch.Tensor) else None
    return (*compact_reference(args["execute"].view(torch.uint8) != 0, args["valid"], counts), counts)


def _compact_compare(out, want, args, kernel, case):
    for got, ref, what in zip(out, want, ("rows", "slot", "seq_offsets")):
        _close(got, ref, what, kernel)
    if want[3] is not None:  # the counters, updated in place
        _close(args["route_counts"], want[3], "route_counts", kernel)


@st.composite
def exact_rows_cases(draw):
    R, B, L = draw(_sizes(1, 2)), draw(_sizes(0, 1, 3)), draw(_sizes(0, 1, 4))
    seed = draw(st.integers(0, 99))
    bad_count = draw(st.sampled_from([None, None, -1, -3, B * L + 1, 2**31 - 1]))
    copied = draw(st.booleans())  # the counts handed over by counts_to_host

    def base(device, put):
        execute = torch.rand(R, B, L, generator=torch.Generator().manual_seed(seed)) < 0.5
        rows, _, offsets = compact_reference(execute)
        if bad_count is not None:
            offsets[-1, -1] = bad_count
        host = offsets[:, -1].clone() if copied else None  # always on the CPU
        return dict(rows=put(rows, "rows"), seq_offsets=put(offsets, "seq_offsets"), host_counts=host)

    case = Case("exact_rows", base)
    if bad_count is not None:
        case.target = "seq_offsets"  # the error must name it
        return case
    if draw(st.booleans()):
        case.mutation, case.target, case.value = "set", "seq_offsets", torch.zeros(R, 0, dtype=torch.int32)
        return case
    return draw(mutations(case, ["rows", "seq_offsets", "host_counts"], {}))


def _exact_rows_expect(args):
    rows, offsets, host = args["rows"], args["seq_offsets"], args["host_counts"]
    counts = (offsets[:, -1] if host is None else host).tolist()
    assert all(0 <= n <= rows.shape[1] for n in counts), f"exact_rows accepted counts {counts} for T = {rows.shape[1]}"
    return [rows[r, :n] for r, n in enumerate(counts)]


@st.composite
def counts_to_host_cases(draw):
    R, B, seed = draw(_sizes(0, 1, 2)), draw(_sizes(0, 1, 3)), draw(st.integers(0, 99))

    def base(device, put):
        g = torch.Generator().manual_seed(seed)
        return dict(seq_offsets=put(torch.randint(0, 9, (R, B + 1), generator=g, dtype=torch.int32), "seq_offsets"))

    case = Case("counts_to_host", base)
    if draw(st.booleans()):
        case.mutation, case.target, case.value = "set", "seq_offsets", torch.zeros(R, 0, dtype=torch.int32)
        return case
    return draw(mutations(case, ["seq_offsets"], {}))


def _counts_to_host_compare(out, want, args, kernel, case):
    assert out.device.type == "cpu", out.device
    _close(out, want, "counts_to_host", kernel)


def _list_compare(out, want, args, kernel, case):
    assert len(out) == len(want)
    for got, ref in zip(out, want):
        _close(got, ref, "exact_rows", kernel)


# ---------------------------------------------------------------------------------------------
# norm: rms_norm, rms_norm_split


def _index_rows(draw, T: int, M: int, seed: int) -> tuple[torch.Tensor, bool]:
    """[M] int32 rows into T tokens: valid ones, or (half the time) with out-of-range entries."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, max(T, 1), (M,), generator=g, dtype=torch.int32)
    bad = draw(st.booleans()) and M > 0
    if bad:
        where = torch.rand(M, generator=g) < 0.5
        rows = torch.where(where, torch.tensor(draw(st.sampled_from(BAD_INDEX + [T, T + 2])), dtype=torch.int32), rows)
    elif T == 0:
        rows = torch.full((M,), -1, dtype=torch.int32)
    return rows, bad


@st.composite
def rms_norm_cases(draw):
    T, H, M = draw(_sizes(0, 1, 2, 5, 7)), draw(_sizes(0, 1, 3, 8, 33)), draw(_sizes(0, 1, 3, 6))
    dtype, seed = draw(st.sampled_from(FLOATS)), draw(st.integers(0, 99))
    form = draw(st.sampled_from(["dense", "rows", "capacity"]))
    count_value = draw(st.sampled_from([0, 1, M, M + 3, -2, 2**31 - 1]))
    rows, _ = _index_rows(draw, T, M, seed)

    def base(device, put):
        x = put(randn(T, H, dtype=dtype, seed=seed), "x")
        w = put(randn(H, dtype=dtype, seed=seed + 1), "weight")
        r = None if form == "dense" else put(rows, "rows")
        c = put(torch.tensor([count_value], dtype=torch.int32), "count") if form == "capacity" else None
        return dict(x=x, weight=w, eps=1e-5, rows=r, count=c)

    case = Case("rms_norm", base)
    if form == "dense" and draw(st.booleans()):  # a count without rows
        case.mutation, case.target, case.value = "set", "count", torch.tensor([1], dtype=torch.int32)
        return case
    return draw(mutations(case, ["x", "weight", "rows", "count"], {"eps": ["1e-5"]}))


def _rms_norm_compare(out, want, args, kernel, case):
    n = _count(args, want.shape[0])
    _close(out[:n], want[:n], "rms_norm", kernel)
    assert out.shape == want.shape


@st.composite
def rms_norm_split_cases(draw):
    T, H = draw(_sizes(0, 1, 2, 5, 7)), draw(_sizes(0, 1, 3, 8))
    dtype, seed = draw(st.sampled_from(FLOATS)), draw(st.integers(0, 99))
    num_rows = draw(_sizes(0, 1, 3, 9))
    g = torch.Generator().manual_seed(seed)
    # Any slots: in range (duplicates included), -1, past num_rows, extreme.
    pool = torch.tensor([-1, 0, 1, 2, num_rows, num_rows + 1, 2**31 - 1, -(2**31)], dtype=torch.int32)
    slot = pool[torch.randint(0, len(pool), (T,), generator=g)]

    def base(device, put):
        return dict(x=put(randn(T, H, dtype=dtype, seed=seed), "x"), weight=put(randn(H, dtype=dtype, seed=seed + 1), "weight"),
                    eps=1e-6, slot=put(slot, "slot"), num_rows=num_rows)

    return draw(mutations(Case("rms_norm_split", base), ["x", "weight", "slot"], {"num_rows": [-1, -4]}))


def _rms_norm_split_compare(out, want, args, kernel, case):
    (y, yq), (y_ref, yq_ref) = out, want
    _close(y, y_ref, "rms_norm_split y", kernel)
    assert yq.shape == yq_ref.shape
    slot = args["slot"].cpu().long()
    writers = torch.bincount(slot[(slot >= 0) & (slot < yq.shape[0])], minlength=yq.shape[0])
    one = writers == 1  # rows several tokens write are unspecified; rows none writes too
    _close(yq[one.to(yq.device)], yq_ref[one], "rms_norm_split yq", kernel)


# ---------------------------------------------------------------------------------------------
# rope: rope, rope_kv_write


@st.composite
def rope_cases(draw):
    M, Hx, D, T = draw(_sizes(0, 1, 3)), draw(_sizes(1, 2, 3)), draw(_sizes(2, 4, 6, 16)), draw(_sizes(0, 1, 4))
    dtype, table_dtype = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 99))
    form = draw(st.sampled_from(["dense", "rows", "capacity"]))
    count_value = draw(st.sampled_from([0, 1, M, M + 2, -1]))
    if form != "dense" and M > 0:
        T = max(T, 1)  # out-of-range rows use table row 0 (a table without rows is a mutation below)
    rows, _ = _index_rows(draw, T, M, seed)
    rows_t = M if form == "dense" else T  # table rows

    def base(device, put):
        x = put(randn(M, Hx, D, dtype=dtype, seed=seed), "x")
        angles = randn(rows_t, D, seed=seed + 1)
        cos, sin = put(angles.cos().to(table_dtype), "cos"), put(angles.sin().to(table_dtype), "sin")
        r = None if form == "dense" else put(rows, "rows")
        c = put(torch.tensor([count_value], dtype=torch.int32), "count") if form == "capacity" else None
        return dict(x=x, cos=cos, sin=sin, rows=r, count=c)

    case = Case("rope", base)
    special = draw(st.sampled_from(["none", "odd", "no_table"]))
    if special == "odd":  # an odd head dim
        case.mutation, case.target, case.value = "set", "x", randn(M, Hx, 5, dtype=dtype, seed=seed)
        return case
    if special == "no_table" and form != "dense" and M > 0:  # nothing for rows to index
        case.mutation, case.target, case.value = "set", "cos", torch.zeros(0, D, dtype=table_dtype)
        return case
    return draw(mutations(case, ["x", "cos", "sin", "rows", "count"], {}))


def _rope_compare(out, want, args, kernel, case):
    n = _count(args, want.shape[0])
    assert out.shape == want.shape
    _close(out[:n], want[:n], "rope", kernel)


@st.composite
def kv_write_cases(draw):
    B, L, Hk, D = draw(_sizes(0, 1, 2)), draw(_sizes(0, 1, 3)), draw(_sizes(1, 2)), draw(_sizes(2, 4, 6, 16))
    dtype, seed = draw(st.sampled_from(FLOATS)), draw(st.integers(0, 99))
    extra = draw(_sizes(0, 2))
    S = 3 + L + extra
    # The fill level: inside the cache, or (bad data) partly or wholly past either end.
    first = draw(st.sampled_from([0, 3, 3, S - L + 1, S + 2, -1, -(2**40), 2**40]))

    def base(device, put):
        angles = randn(B, L, D, seed=seed + 2)
        return dict(
            k=put(randn(B, L, Hk, D, dtype=dtype, seed=seed), "k"),
            v=put(randn(B, L, Hk, D, dtype=dtype, seed=seed + 1), "v"),
            cos=put(angles.cos(), "cos"), sin=put(angles.sin(), "sin"),
            k_cache=put(randn(B, S, Hk, D, dtype=dtype, seed=seed + 3), "k_cache"),
            v_cache=put(randn(B, S, Hk, D, dtype=dtype, seed=seed + 4), "v_cache"),
            start=put(torch.tensor([first]), "start"),
        )

    case = Case("rope_kv_write", base)
    if not 0 <= first <= S - L:
        case.target = "start"  # the CPU op must name it; the kernel drops the writes
        return case
    return draw(mutations(case, ["k", "v", "cos", "sin", "k_cache", "v_cache", "start"], {}))


def _kv_reference(args):
    """The caches after the call, by the reference (which raises for a start outside the cache,
    as the CPU implementation must)."""
    rope.rope_kv_write_reference(*args.values())
    return args["k_cache"], args["v_cache"]


def _kv_expect(args):
    """The caches after the call: rope(k) and v written at the slots inside [0, S); a start
    partly or wholly outside the cache writes only the slots that fall inside (the kernel's
    documented behaviour; the CPU implementation raises instead)."""
    k, v, cos, sin, k_cache, v_cache, start = args.values()
    B, L, Hk, D = k.shape
    S, first = k_cache.shape[1], int(start[0])
    rotated = rope.rope_reference(k.reshape(B * L, Hk, D), cos.reshape(B * L, D), sin.reshape(B * L, D)).view(B, L, Hk, D)
    for l in range(L):
        if 0 <= first + l < S:
            k_cache[:, first + l] = rotated[:, l]
            v_cache[:, first + l] = v[:, l]
    return k_cache, v_cache


def _kv_compare(out, want, args, kernel, case):
    assert out is None
    _close(args["k_cache"], want[0], "k_cache", kernel)
    _close(args["v_cache"], want[1], "v_cache", kernel)


# ---------------------------------------------------------------------------------------------
# attention


@st.composite
def attention_cases(draw):
    B, L, Hk, group = draw(_sizes(0, 1, 2)), draw(_sizes(1, 1, 2, 5)), draw(_sizes(1, 2)), draw(_sizes(1, 2))
    D = draw(_sizes(16, 16, 8))
    dtype, seed = draw(st.sampled_from(FLOATS)), draw(st.integers(0, 99))
    form = draw(st.sampled_from(["dense", "exact", "capacity"]))
    first, extra = draw(_sizes(0, 3)), draw(_sizes(0, 2))
    S = first + L + extra
    # Bad index data: positions past the cache or before it, rows outside [0, B*L), counts
    # outside [0, M], seq_offsets that do not describe rows.
    bad = draw(st.sampled_from(["none", "none", "start", "rows", "count", "offsets"]))
    bad_start = draw(st.sampled_from([S, S + 4, 2**40, -3, -(2**40)]))
    bad_row = draw(st.sampled_from(BAD_INDEX + [B * L]))
    bad_count = draw(st.sampled_from([-1, -(2**31), 2**31 - 1]))
    mask_width = draw(st.sampled_from([None, first + L, S + 2, max(S - 2, 0)]))
    g = torch.Generator().manual_seed(seed)
    execute = torch.rand(2, B, L, generator=g) < 0.6
    rows_cap, _, offsets = (t[1] for t in compact_reference(execute))
    n = int(offsets[-1])
    key_mask = None if mask_width is None else torch.rand(B, mask_width, generator=g) < 0.8
    if form == "dense":
        rows, M = None, B * L
    else:
        rows, M = (rows_cap[:n].clone() if form == "exact" else rows_cap.clone()), (n if form == "exact" else B * L)
    if bad == "rows" and rows is not None and n > 0:
        rows[int(torch.randint(0, n, (1,), generator=g))] = bad_row
    if bad == "count" and rows is not None:
        offsets[-1] = bad_count
    if bad == "offsets" and rows is not None:
        offsets = torch.randint(-5, M + 6, (B + 1,), generator=g, dtype=torch.int32)
    start = bad_start if bad == "start" else first

    def base(device, put):
        return dict(
            q=put(randn(M, Hk * group, D, dtype=dtype, seed=seed), "q"),
            k_cache=put(randn(B, S, Hk, D, dtype=dtype, seed=seed + 1), "k_cache"),
            v_cache=put(randn(B, S, Hk, D, dtype=dtype, seed=seed + 2), "v_cache"),
            start=put(torch.tensor([start]), "start"),
            seq_len=L, scale=D**-0.5,
            rows=None if rows is None else put(rows, "rows"),
            seq_offsets=None if rows is None else put(offsets, "seq_offsets"),
            key_mask=None if key_mask is None else put(key_mask, "key_mask"),
        )

    case = Case("sparse_attention", base, value=bad)
    if bad != "none":
        return case  # data only: memory-safe, and right where the op specifies the result
    return draw(mutations(case, ["q", "k_cache", "v_cache", "start", "rows", "seq_offsets", "key_mask"],
                          {"seq_len": [0, -1, L + 1]}))


def _attention_compare(out, want, args, kernel, case):
    assert out.shape == want.shape and out.dtype == want.dtype
    relabelled = case.mutation == "set" and case.target == "seq_len"  # rows then name other tokens
    if kernel and (case.value == "offsets" or (relabelled and args["rows"] is not None)):
        return  # seq_offsets that do not describe rows: unspecified values, memory safety only
    offsets = args["seq_offsets"]
    n = out.shape[0] if offsets is None else _count(args, out.shape[0], "seq_offsets")
    _close(out[:n], want[:n], "sparse_attention", kernel)


# ---------------------------------------------------------------------------------------------
# linear: linear_rows, gated_mlp, linear_residual


@st.composite
def _linear_dims(draw):
    return (draw(_sizes(0, 1, 2, 5, 17)), draw(_sizes(0, 1, 3, 16)), draw(_sizes(0, 1, 5, 16)),
            draw(st.sampled_from(FLOATS)), draw(st.integers(0, 99)),
            draw(st.sampled_from([None, None, 0, 1, 3, -2, 2**31 - 1])))


def _count_tensor(value, put):
    return None if value is None else put(torch.tensor([value], dtype=torch.int32), "count")


@st.composite
def linear_rows_cases(draw):
    M, K, N, dtype, seed, count = draw(_linear_dims())
    has_bias = draw(st.booleans())

    def base(device, put):
        return dict(x=put(randn(M, K, dtype=dtype, seed=seed), "x"),
                    weight=put(randn(N, K, dtype=dtype, seed=seed + 1, scale=0.3), "weight"),
                    bias=put(randn(N, dtype=dtype, seed=seed + 2), "bias") if has_bias else None,
                    count=_count_tensor(count, put))

    return draw(mutations(Case("linear_rows", base), ["x", "weight", "bias", "count"], {}))


@st.composite
def gated_mlp_cases(draw):
    M, K, N, dtype, seed, count = draw(_linear_dims())
    activation = draw(st.sampled_from(["silu", "relu"]))

    def base(device, put):
        return dict(x=put(randn(M, K, dtype=dtype, seed=seed), "x"),
                    w_gate=put(randn(N, K, dtype=dtype, seed=seed + 1, scale=0.3), "w_gate"),
                    w_up=put(randn(N, K, dtype=dtype, seed=seed + 2, scale=0.3), "w_up"),
                    activation=activation, count=_count_tensor(count, put))

    return draw(mutations(Case("gated_mlp", base), ["x", "w_gate", "w_up", "count"], {"activation": ["gelu", "SILU"]}))


def _rows_compare(out, want, args, kernel, case):
    n = _count(args, want.shape[0])
    assert out.shape == want.shape
    _close(out[:n], want[:n], "rows", kernel)


@st.composite
def linear_residual_cases(draw):
    T, K, N, dtype, seed, count = draw(_linear_dims())
    form = draw(st.sampled_from(["dense", "exact", "capacity"]))
    g = torch.Generator().manual_seed(seed)
    execute = torch.rand(1, 1, T, generator=g) < 0.6
    rows, slot, _ = (t[0] for t in compact_reference(execute))
    n = int(execute.sum())
    if draw(st.booleans()) and T > 0:  # slots outside [0, M) or past the count
        slot[int(torch.randint(0, T, (1,), generator=g))] = draw(st.sampled_from(BAD_INDEX + [T, n]))
    if draw(st.booleans()) and T > 0:  # rows that are not slot's inverse
        rows[int(torch.randint(0, T, (1,), generator=g))] = draw(st.sampled_from(BAD_INDEX + [T, 0]))
    M = {"dense": T, "exact": n, "capacity": T}[form]

    def base(device, put):
        return dict(residual=put(randn(T, N, dtype=dtype, seed=seed + 3), "residual"),
                    x=put(randn(M, K, dtype=dtype, seed=seed), "x"),
                    weight=put(randn(N, K, dtype=dtype, seed=seed + 1, scale=0.3), "weight"),
                    slot=None if form == "dense" else put(slot, "slot"),
                    count=_count_tensor(n if count is None else count, put) if form == "capacity" else None,
                    rows=put(rows, "rows") if form == "capacity" else None)

    return draw(mutations(Case("linear_residual", base), ["residual", "x", "weight", "slot", "count", "rows"], {}))


def _residual_compare(out, want, args, kernel, case):
    _close(out, want, "linear_residual", kernel)


# ---------------------------------------------------------------------------------------------
# qkv_rope_write


@st.composite
def qkv_rope_write_cases(draw):
    B, L, Hk, group = draw(_sizes(0, 1, 2)), draw(_sizes(1, 1, 3)), draw(_sizes(1, 2)), draw(_sizes(1, 2))
    D, K = draw(_sizes(2, 6, 16)), draw(_sizes(0, 1, 5, 16))
    dtype, seed, has_bias = draw(st.sampled_from(FLOATS)), draw(st.integers(0, 99)), draw(st.booleans())
    T, M = B * L, draw(_sizes(0, 1, 3))
    M = M if T else 0  # rows need a token to index (else the op refuses them: a mutation below)
    count = draw(st.sampled_from([None, 0, 1, M, M + 2, -1]))
    rows, _ = _index_rows(draw, T, M, seed)
    S = 3 + L + draw(_sizes(0, 2))
    # The fill level: inside the cache, or (bad data) partly or wholly past either end.
    first = draw(st.sampled_from([0, 3, 3, 3, S - L + 1, S + 2, -1, -(2**40)]))
    Hq = Hk * group

    def base(device, put):
        angles = randn(T, D, seed=seed + 9)
        bias = lambda n, i: put(randn(n, dtype=dtype, seed=seed + i), f"b_{'qkv'[i - 5]}") if has_bias else None
        return dict(
            x=put(randn(T, K, dtype=dtype, seed=seed), "x"),
            w_q=put(randn(Hq * D, K, dtype=dtype, seed=seed + 2, scale=0.3), "w_q"),
            w_k=put(randn(Hk * D, K, dtype=dtype, seed=seed + 3, scale=0.3), "w_k"),
            w_v=put(randn(Hk * D, K, dtype=dtype, seed=seed + 4, scale=0.3), "w_v"),
            b_q=bias(Hq * D, 5), b_k=bias(Hk * D, 6), b_v=bias(Hk * D, 7),
            cos=put(angles.cos().to(dtype), "cos"), sin=put(angles.sin().to(dtype), "sin"),
            rows=put(rows, "rows"), count=_count_tensor(count, put),
            k_cache=put(randn(B, S, Hk, D, dtype=dtype, seed=seed + 10), "k_cache"),
            v_cache=put(randn(B, S, Hk, D, dtype=dtype, seed=seed + 11), "v_cache"),
            start=put(torch.tensor([first]), "start"),
        )

    case = Case("qkv_rope_write", base)
    if not 0 <= first <= S - L and T:
        case.target = "start"  # the CPU op must name it; the kernel drops the writes
        return case
    tensors = ["x", "w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "cos", "sin", "rows", "count", "k_cache", "v_cache",
               "start"]
    return draw(mutations(case, tensors, {}))


def _qkv_expect(args):
    """(q, k_cache, v_cache) by the reference, which raises for a start outside the cache."""
    q = linear.qkv_rope_write_reference(*args.values())
    return q, args["k_cache"], args["v_cache"]


def _qkv_kernel_expect(args):
    """As `_qkv_expect`, but a start partly or wholly outside the cache writes only the
    slots inside it (the kernel's documented behaviour)."""
    k_cache, v_cache, start = args["k_cache"], args["v_cache"], args["start"]
    B, S, Hk, D = k_cache.shape
    L = args["x"].shape[0] // B if B else 0
    step = dict(args, k_cache=torch.zeros(B, L, Hk, D, dtype=k_cache.dtype), v_cache=torch.zeros(B, L, Hk, D, dtype=v_cache.dtype),
                start=torch.zeros(1, dtype=torch.int64))
    q = linear.qkv_rope_write_reference(*step.values())
    first = int(start[0])
    for l in range(L):
        if 0 <= first + l < S:
            k_cache[:, first + l] = step["k_cache"][:, l]
            v_cache[:, first + l] = step["v_cache"][:, l]
    return q, k_cache, v_cache


def _qkv_compare(out, want, args, kernel, case):
    q_want, k_want, v_want = want
    assert out.shape == q_want.shape
    n = _count(args, q_want.shape[0])
    _close(out[:n], q_want[:n], "qkv_rope_write q", kernel)
    _close(args["k_cache"], k_want, "k_cache", kernel)
    _close(args["v_cache"], v_want, "v_cache", kernel)


# ---------------------------------------------------------------------------------------------
# the table of every public op


def _impl(module, name):
    return getattr(module, f"_{name}_cuda", None) if HAS_TRITON else None


def _ref(fn, names):
    return lambda a: fn(*(a[n] for n in names))


SPECS = {
    "router_execute": Spec(routing.router_execute, _impl(routing, "router_execute"),
                           _ref(routing.router_execute_reference, ["x", "weight", "bias"]), _router_compare),
    "forced_execute": Spec(routing.forced_execute, _impl(routing, "forced_execute"),
                           _ref(routing.forced_execute_reference, ["params", "start", "batch", "seq_len", "layer_idx"]),
                           lambda o, w, a, k, c: _close(o, w, "forced_execute", k)),
    "compact": Spec(routing.compact, _impl(routing, "compact"), _compact_expect, _compact_compare),
    "exact_rows": Spec(routing.exact_rows, None, _exact_rows_expect, _list_compare),
    # No kernel: on CUDA, a copy into pinned memory (tests/ops/test_ops_gpu.py).
    "counts_to_host": Spec(routing.counts_to_host, None, lambda a: a["seq_offsets"][:, -1].clone(),
                           _counts_to_host_compare),
    "rms_norm": Spec(norm.rms_norm, _impl(norm, "rms_norm"),
                     _ref(norm.rms_norm_reference, ["x", "weight", "eps", "rows", "count"]), _rms_norm_compare),
    "rms_norm_split": Spec(norm.rms_norm_split, _impl(norm, "rms_norm_split"),
                           _ref(norm.rms_norm_split_reference, ["x", "weight", "eps", "slot", "num_rows"]),
                           _rms_norm_split_compare),
    "rope": Spec(rope.rope, _impl(rope, "rope"), _ref(rope.rope_reference, ["x", "cos", "sin", "rows", "count"]),
                 _rope_compare),
    "rope_kv_write": Spec(rope.rope_kv_write, _impl(rope, "rope_kv_write"), _kv_reference, _kv_compare,
                          kernel_expect=_kv_expect, kernel_only_errors=(r"^start: slots",)),
    "sparse_attention": Spec(attention.sparse_attention, _impl(attention, "sparse_attention"),
                             _ref(attention.sparse_attention_reference,
                                  ["q", "k_cache", "v_cache", "start", "seq_len", "scale", "rows", "seq_offsets", "key_mask"]),
                             _attention_compare),
    "linear_rows": Spec(linear.linear_rows, _impl(linear, "linear_rows"),
                        _ref(linear.linear_rows_reference, ["x", "weight", "bias", "count"]), _rows_compare),
    "gated_mlp": Spec(linear.gated_mlp, _impl(linear, "gated_mlp"),
                      _ref(linear.gated_mlp_reference, ["x", "w_gate", "w_up", "activation", "count"]), _rows_compare),
    "linear_residual": Spec(linear.linear_residual, _impl(linear, "linear_residual"),
                            _ref(linear.linear_residual_reference, ["residual", "x", "weight", "slot", "count", "rows"]),
                            _residual_compare),
    "qkv_rope_write": Spec(linear.qkv_rope_write, _impl(linear, "qkv_rope_write"), _qkv_expect, _qkv_compare,
                     kernel_expect=_qkv_kernel_expect, kernel_only_errors=(r"^start: slots",)),
}


def test_every_public_op_is_covered():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("skipgpt::")}
    registered = {n.split(".")[0] for n in registered}
    assert registered == set(SPECS), "a new op needs a property test here"
    assert set(ops.__all__) == set(SPECS)
    for name, spec in SPECS.items():
        assert spec.entry is getattr(ops, name)
        assert spec.entry.op._opoverload is getattr(torch.ops.skipgpt, name).default
        if HAS_TRITON and name not in ("exact_rows", "counts_to_host"):
            assert spec.cuda_impl is not None, name


def test_mutated_arguments_have_no_default():
    """Up to torch 2.11 at least, calling a custom op without a mutated argument that has a
    default crashes its version bump with an IndexError (pytorch#176078): the schema must not
    give one, and the public entry supplies it instead (compact's, the one mutating op today,
    still runs without it)."""
    for name in SPECS:
        schema = getattr(torch.ops.skipgpt, name).default._schema
        for arg in schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write:
                assert not arg.has_default_value(), f"{name}: mutated argument {arg.name} has a default"
    execute = torch.ones(2, 1, 3, dtype=torch.bool)
    assert ops.compact(execute)[2][:, -1].tolist() == [3, 3]


STRATEGIES = {
    "router_execute": router_cases, "forced_execute": forced_cases, "compact": compact_cases,
    "counts_to_host": counts_to_host_cases, "exact_rows": exact_rows_cases, "rms_norm": rms_norm_cases,
    "rms_norm_split": rms_norm_split_cases,
    "rope": rope_cases, "rope_kv_write": kv_write_cases, "sparse_attention": attention_cases,
    "linear_rows": linear_rows_cases, "gated_mlp": gated_mlp_cases, "linear_residual": linear_residual_cases,
    "qkv_rope_write": qkv_rope_write_cases,
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_op_properties(name):
    @PROPERTY
    @given(case=STRATEGIES[name]())
    def run(case):
        check(case)

    run()
