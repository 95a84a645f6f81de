"""Under torch.compile, CUDA calls of the skipgpt ops trace into their ATen ops and Triton
kernels (`decompose_under_compile`), so Inductor launches the kernels itself instead of calling
each op through the dispatcher. Calls whose host code would guard on a symbolic size stay one
opaque op, and so does every CPU call.

The decomposition runs in AOTAutograd's functionalization, so the cases below trace with
AOTAutograd on fake CUDA tensors: no GPU needed. They run in a child process (this file as a
script, importing the installed skipgpt; the checkout's root is appended to its path for
tests.helpers) because the test session runs Triton in its
interpreter, whose kernels cannot be traced. Without a GPU the child gives Triton a target (sm_90)
so that PyTorch can read from each kernel's IR which arguments it writes; where that analysis
fails, PyTorch logs a warning and takes every argument as written, which costs the graph copies.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from skipgpt.ops._common import HAS_TRITON

H, HQ, HK, D, I = 64, 4, 2, 16, 96  # hidden, query/KV heads, head dim, MLP width


# -- the cases, traced in the child process ------------------------------------------------------
class DynamicSize:
    """An input [n] whose size is symbolic, as torch.compile traces a dynamic sequence length."""

    def __init__(self, n, name="L"):
        self.n, self.name = n, name

    def fake(self, mode):  # outside the mode: from_tensor keeps a tensor that is already fake as it is
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

        context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC], constraint_sizes=[None])
        return mode.from_tensor(torch.empty(self.n), source=ConstantSource(self.name), symbolic_context=context)


def traced(fn, *inputs):
    """Trace fn(*inputs) (inputs built on "cuda" inside a fake mode) with AOTAutograd. Returns
    "calls", the forward graph's calls in order ("kernel:<name>" for a Triton launch,
    "skipgpt::<op>" for an opaque skipgpt op, "aten::<op>" for the rest), and "guards", the shape
    guards the trace added (each would recompile a compiled graph on shapes that break it)."""
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from tests.helpers import kernel_write_analysis_failures

    graphs = []

    def capture(gm, _):
        graphs.append(gm)
        return gm

    mode = FakeTensorMode(shape_env=ShapeEnv())
    sized = {i: x.fake(mode) for i, x in enumerate(inputs) if isinstance(x, DynamicSize)}
    with mode:
        args = [sized[i] if i in sized else x() for i, x in enumerate(inputs)]
        try:
            with kernel_write_analysis_failures() as failures:
                aot_function(fn, fw_compiler=capture)(*args)
        except RuntimeError:
            if torch.cuda.is_available() or not graphs:
                raise  # without CUDA only running the captured graph fails
    calls = []
    for node in graphs[0].graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            calls.append("kernel:" + kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
        elif isinstance(node.target, torch._ops.OpOverload):
            calls.append(node.target.name().split(".")[0])
    return {"calls": calls, "guards": [str(g.expr) for g in mode.shape_env.guards], "analysis_failures": failures}


def trace_cases():
    import skipgpt.ops  # noqa: F401  (registers torch.ops.skipgpt)
    from skipgpt.ops.attention import kernels as attention_kernels
    from skipgpt.ops.linear import kernels as linear_kernels

    if not torch.cuda.is_available():  # decode splits and persistent grids ask the GPU for its SM count
        attention_kernels.num_sms = linear_kernels.num_sms = lambda device: 132
        import triton
        from triton.backends.compiler import GPUTarget

        class TargetOnly:  # all of a driver that PyTorch's write analysis asks for
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        triton.runtime.driver.set_active(TargetOnly())

    # The ops as a torch.compile graph calls them (the public entries skip the dispatcher in
    # eager). No views inside: functionalizing a view of a fake CUDA tensor needs a CUDA build.
    ops = torch.ops.skipgpt

    def cuda(*shape):
        return lambda: torch.randn(*shape, device="cuda").half()

    def ints(*shape, dtype=torch.int32):
        return lambda: torch.zeros(*shape, dtype=dtype, device="cuda")

    def norm_rope(x, w, q, cos, sin, slot, rows, k, v, cos3, sin3, kc, vc, start):
        y = ops.rms_norm(x, w, 1e-5)
        n, nq = ops.rms_norm_split(x, w, 1e-5, slot, 6)
        r = ops.rope(q, cos, sin, rows)
        ops.rope_kv_write(k, v, cos3, sin3, kc, vc, start)
        return y, n, nq, r

    def projections(x, wq, wg, wu, wd, res, slot):
        q = ops.linear_rows(x, wq)
        a = ops.gated_mlp(x, wg, wu, "silu")
        return q, ops.linear_residual(res, a, wd, slot)

    def routes(x, w, b, params, start, mask, counters):
        routed = ops.router_execute(x, w, b)  # [2, 6]
        forced = ops.forced_execute(params, start, 1, 6, 5)  # [2, 1, 6]
        # As a layer calls it, with the padding mask and the layer's counters, which the kernel
        # adds to. (A contiguous mask: views of fake CUDA tensors fail on a CPU-only torch.)
        rows, slot, offsets = ops.compact(forced, mask, counters)
        return routed, rows, slot, offsets, ops.counts_to_host(offsets)

    def attend(q, kc, vc, start, rows, offsets, tokens, attend_with=None):  # L from tokens [L], a dynamic size
        return ops.sparse_attention(q, kc, vc, start, tokens.shape[0], D ** -0.5, rows, offsets, attend_with=attend_with)

    def symbolic_sizes(x0, w, wq, wg, wu, wd, wr, br, start, count, tokens):
        # Sizes as a compiled layer sees them: T tokens (a dynamic length: backed) and n executing
        # rows (a count read from the device: unbacked). new_empty, not views (see above).
        T, n = tokens.shape[0], count.item()
        torch._check_is_size(n)
        torch._check(n <= T)
        x, xr = x0.new_empty((T, H)), x0.new_empty((n, H))
        slot, rows = x0.new_empty((T,), dtype=torch.int32), x0.new_empty((n,), dtype=torch.int32)
        cos, k = x0.new_empty((1, T, D)), x0.new_empty((1, T, HK, D))
        kc, vc = x0.new_empty((1, T, HK, D)), x0.new_empty((1, T, HK, D))
        ops.rope_kv_write(k, k, cos, cos, kc, vc, start)  # returned below: a write nothing reads is dropped
        return (
            kc, vc,
            ops.rms_norm(x, w, 1e-5), ops.rms_norm_split(x, w, 1e-5, slot, T), ops.rms_norm(x, w, 1e-5, rows),
            ops.router_execute(x, wr, br), ops.linear_rows(xr, wq),
            ops.rope(x0.new_empty((n, HQ, D)), cos.view(T, D), cos.view(T, D), rows),
            ops.linear_residual(x, ops.gated_mlp(xr, wg, wu, "silu"), wd, slot),
        )

    def symbolic_capacity(x0, wq, wg, wu, wd, params, start, count, tokens):
        # The capacity form under torch.cond: T symbolic, GEMM tiles fixed by tile_rows (the 1024-
        # and 2048-row prefill buckets' persistent grid; the 512-row bucket's and decode's grids
        # of one program per tile).
        T = tokens.shape[0]
        x, res = x0.new_empty((T, H)), x0.new_empty((T, H))
        slot, rows = x0.new_empty((T,), dtype=torch.int32), x0.new_empty((T,), dtype=torch.int32)
        return (
            ops.forced_execute(params, start, 1, T, 3), ops.linear_rows(x, wq, None, count, 512),
            ops.linear_rows(x, wq, None, count, 1024), ops.linear_rows(x, wq, None, count, 2048),
            ops.linear_residual(res, ops.gated_mlp(x, wg, wu, "silu", count, 512), wd, slot, count, rows, 512),
            ops.linear_residual(res, ops.gated_mlp(x, wg, wu, "silu", count, 64), wd, slot, count, rows, 64),
        )

    def symbolic_decode(q0, start, tokens, slots):
        # Single-token attention as compile_model's single graph runs it (the decode side of the
        # layer's torch.cond on L == 1): the rows (T), L and the cache's length S all symbolic.
        T, S = tokens.shape[0], slots.shape[0]
        q, rows = q0.new_empty((T, HQ, D)), q0.new_empty((T,), dtype=torch.int32)
        kc, vc = q0.new_empty((1, S, HK, D)), q0.new_empty((1, S, HK, D))
        offsets = q0.new_empty((2,), dtype=torch.int32)
        return ops.sparse_attention(q, kc, vc, start, T, D ** -0.5, rows, offsets, attend_with="decode")

    cache = [cuda(2, 16, HK, D), cuda(2, 16, HK, D), ints(1, dtype=torch.int64)]
    cases = {
        "norm_rope": traced(
            norm_rope, cuda(6, H), cuda(H), cuda(3, HQ, D), cuda(6, D), cuda(6, D), ints(6), ints(3),
            cuda(1, 6, HK, D), cuda(1, 6, HK, D), cuda(1, 6, D), cuda(1, 6, D), cuda(1, 8, HK, D),
            cuda(1, 8, HK, D), ints(1, dtype=torch.int64),
        ),
        "projections": traced(
            projections, cuda(5, H), cuda(H, H), cuda(I, H), cuda(I, H), cuda(H, I), cuda(9, H), ints(9)
        ),
        "prefill": traced(
            lambda q, kc, vc, start, rows, offsets: ops.sparse_attention(q, kc, vc, start, 7, D ** -0.5, rows, offsets),
            cuda(5, HQ, D), *cache, ints(5), ints(3),
        ),
        "decode": traced(
            lambda q, kc, vc, start, mask: ops.sparse_attention(q, kc, vc, start, 1, D ** -0.5, key_mask=mask),
            cuda(2, HQ, D), *cache, lambda: torch.ones(2, 16, dtype=torch.bool, device="cuda"),
        ),
        "routes": traced(
            routes, cuda(6, H), cuda(4, H), cuda(4), ints(2, dtype=torch.int64), ints(1, dtype=torch.int64),
            lambda: torch.ones(1, 6, dtype=torch.bool, device="cuda"), ints(3, dtype=torch.int64),
        ),
        "capacity_gemm": traced(lambda x, w, n: ops.linear_rows(x, w, None, n), cuda(5, H), cuda(H, H), ints(1)),
        "symbolic_capacity": traced(
            symbolic_capacity, cuda(4, H), cuda(H, H), cuda(I, H), cuda(I, H), cuda(H, I), ints(2, dtype=torch.int64),
            ints(1, dtype=torch.int64), ints(1), DynamicSize(6),
        ),
        "symbolic_compact": traced(
            lambda x0, tokens: ops.compact(x0.new_empty((2, 1, tokens.shape[0]), dtype=torch.bool), None, None),
            cuda(1), DynamicSize(6),
        ),
        "symbolic_length": traced(
            attend, cuda(5, HQ, D), cuda(1, 16, HK, D), cuda(1, 16, HK, D), ints(1, dtype=torch.int64), ints(5), ints(2),
            DynamicSize(6),
        ),
        "symbolic_prefill": traced(
            lambda *args: attend(*args, attend_with="prefill"), cuda(5, HQ, D), cuda(1, 16, HK, D), cuda(1, 16, HK, D),
            ints(1, dtype=torch.int64), ints(5), ints(2), DynamicSize(6),
        ),
        "symbolic_decode": traced(
            symbolic_decode, cuda(1), ints(1, dtype=torch.int64), DynamicSize(6), DynamicSize(40, name="S"),
        ),
        "symbolic_sizes": traced(
            symbolic_sizes, cuda(4, H), cuda(H), cuda(H, H), cuda(I, H), cuda(I, H), cuda(H, I), cuda(4, H), cuda(4),
            ints(1, dtype=torch.int64), ints((), dtype=torch.int64), DynamicSize(6),
        ),
        "cpu": traced(
            lambda x, w: ops.rms_norm(x, w, 1e-5), lambda: torch.randn(4, H), lambda: torch.ones(H)
        ),
    }
    if not torch.cuda.is_available():
        # A control for the failure collector: with no target, the analysis must fail and say so.
        class NoTarget:
            def get_current_target(self):
                raise RuntimeError("no target (control)")

        triton.runtime.driver.set_active(NoTarget())
        cases["analysis_control"] = traced(lambda x, w: ops.rms_norm(x, w, 1e-5), cuda(6, H), cuda(H))
    return cases


# -- the tests ------------------------------------------------------------------------------------
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


@pytest.fixture(scope="module")
def traces():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def calls(traces):
    return {name: trace["calls"] for name, trace in traces.items()}


def kernels(calls):
    return [c for c in calls if c.startswith("kernel:")]


def no_skipgpt_op(calls):
    return not any(c.startswith("skipgpt::") for c in calls)


def test_norm_and_rope_trace_into_their_kernels(calls):
    c = calls["norm_rope"]
    assert no_skipgpt_op(c), c
    assert kernels(c) == [
        "kernel:_rms_norm_kernel", "kernel:_rms_norm_kernel", "kernel:_rope_kernel", "kernel:_rope_kv_write_kernel",
    ]


def test_exact_form_projections_are_cublas_plus_one_kernel(calls):
    c = calls["projections"]
    assert no_skipgpt_op(c), c
    assert c.count("aten::mm") == 4, c
    assert kernels(c) == ["kernel:_act_mul_kernel", "kernel:_scatter_residual_kernel"]


def test_attention_traces_at_a_static_length(calls):
    assert calls["prefill"] == ["aten::empty_like", "kernel:_prefill_kernel"], calls["prefill"]
    c = calls["decode"]
    assert no_skipgpt_op(c), c
    assert kernels(c) == ["kernel:_decode_kernel", "kernel:_combine_kernel"]
    assert "aten::view" not in c, c  # the bool mask is copied, not viewed (see bool_bytes)


def test_routes_trace_and_the_copy_to_the_host_stays_one_op(calls):
    c = calls["routes"]
    assert kernels(c) == ["kernel:_router_execute_kernel", "kernel:_forced_execute_kernel", "kernel:_compact_kernel"], c
    assert "aten::view" not in c, c  # Inductor (torch 2.11) cannot lower a bool dtype view
    assert [x for x in c if x.startswith("skipgpt::")] == ["skipgpt::counts_to_host"], c


def test_calls_that_would_guard_stay_one_op(calls):
    # Capacity form without tile_rows: GEMM tiles follow the bucketed row count.
    assert calls["capacity_gemm"] == ["skipgpt::linear_rows"]
    # A symbolic L picks the decode or the prefill kernel: it would guard on L == 1.
    assert calls["symbolic_length"] == ["aten::sym_size", "skipgpt::sparse_attention"]


def test_calls_that_name_their_choice_trace_at_symbolic_sizes(traces):
    # Attention that names its kernel (compile_model's single graph), and compaction, whose scan
    # takes a fixed block at a symbolic T: their kernels go into the graph, without a guard.
    prefill, decode, compact = traces["symbolic_prefill"], traces["symbolic_decode"], traces["symbolic_compact"]
    assert no_skipgpt_op(prefill["calls"]) and kernels(prefill["calls"]) == ["kernel:_prefill_kernel"], prefill
    assert no_skipgpt_op(decode["calls"]), decode
    assert kernels(decode["calls"]) == ["kernel:_decode_kernel", "kernel:_combine_kernel"], decode
    assert no_skipgpt_op(compact["calls"]) and kernels(compact["calls"]) == ["kernel:_compact_kernel"], compact
    for trace in (prefill, decode, compact):
        assert trace["guards"] == [], trace["guards"]


def test_symbolic_sizes_trace_without_guards(traces):
    # A dynamic token count and an unbacked executing-row count: every op still traces into its
    # kernels, and no size is guarded on (a guard would recompile on new lengths or routes).
    trace = traces["symbolic_sizes"]
    assert no_skipgpt_op(trace["calls"]), trace["calls"]
    assert kernels(trace["calls"]) == [
        "kernel:_rope_kv_write_kernel", "kernel:_rms_norm_kernel", "kernel:_rms_norm_kernel",
        "kernel:_rms_norm_kernel", "kernel:_router_execute_kernel", "kernel:_rope_kernel",
        "kernel:_act_mul_kernel", "kernel:_scatter_residual_kernel",
    ]
    assert trace["guards"] == []


def test_capacity_form_with_tile_rows_traces_at_a_symbolic_length(traces):
    # What a layer under torch.cond calls: forced routes (block fixed for a symbolic length) and
    # the capacity branch's GEMMs (tiles fixed by tile_rows), with no guard.
    trace = traces["symbolic_capacity"]
    assert no_skipgpt_op(trace["calls"]), trace["calls"]
    assert kernels(trace["calls"]) == ["kernel:_forced_execute_kernel"] + ["kernel:_rows_gemm_kernel"] * 7
    assert trace["guards"] == []


def test_inductor_sees_what_each_kernel_writes(traces):
    # Where PyTorch cannot analyse a kernel's IR it takes every argument as written and copies
    # them in the graph; it only logs a warning, so the test reads the log.
    traces = dict(traces)
    control = traces.pop("analysis_control", None)
    assert control is None or any("no target (control)" in f for f in control["analysis_failures"]), control
    failed = {name: trace["analysis_failures"] for name, trace in traces.items() if trace["analysis_failures"]}
    assert not failed, failed


def test_cpu_calls_stay_one_op(calls):
    assert calls["cpu"] == ["skipgpt::rms_norm"]


if __name__ == "__main__":
    sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # for tests.helpers
    print(json.dumps(trace_cases()))
