"""Ops on a GPU that is not the current one (issue #10).

Triton launches on the current CUDA device. With every tensor on cuda:1 while cuda:0 is
current, each op must still run on cuda:1 (its CUDA implementations carry `on_input_device`),
through the public wrapper (which bypasses the dispatcher) and through `torch.ops.skipgpt`
alike, match the PyTorch reference computed on CPU, and leave the current device as it was.
Tensors of one call on two GPUs are refused with a message naming both arguments.

The GPU tests need two CUDA devices and skip otherwise; `test_on_input_device_switches_only_when_needed`
runs everywhere.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from skipgpt import ops
from skipgpt.ops import attention, linear, norm, routing
from skipgpt.ops._common import on_input_device
from skipgpt.routing import forced_params
from tests.helpers import rel_err
from tests.ops.opsutil import make_routes, randn

rope = importlib.import_module("skipgpt.ops.rope")  # the family (skipgpt.ops.rope is also the op)

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
TOL = 1e-4  # float32 throughout: the kernels use IEEE fp32 dots for fp32 inputs


def _inputs(dev):
    """Valid arguments of every op on `dev`, small but with several tiles, heads and splits.
    Built on the CPU from seeded generators and copied, so every device gets the same values."""
    B, L, H, HQ, HK, D, I, S, start = 2, 37, 64, 4, 2, 64, 96, 80, 11
    T = B * L
    routes = make_routes(B, L, 0.6, seed=1)
    n = routes.n
    angles = randn(T, D, seed=2)
    key_mask = torch.ones(B, start + L, dtype=torch.bool)
    key_mask[1, :5] = False
    cpu = dict(
        x=randn(T, H, seed=3), w=randn(H, seed=4), q=randn(T, HQ, D, seed=5),
        k_cache=randn(B, S, HK, D, seed=6), v_cache=randn(B, S, HK, D, seed=7),
        k=randn(B, L, HK, D, seed=8), v=randn(B, L, HK, D, seed=9),
        cos=angles.cos(), sin=angles.sin(), start=torch.tensor([start]),
        rows=routes.rows.clone(), rows_cap=routes.rows_cap.clone(), slot=routes.slot.clone(),
        offsets=routes.seq_offsets.clone(), key_mask=key_mask,
        w_gate=randn(I, H, seed=10, scale=0.2), w_up=randn(I, H, seed=11, scale=0.2),
        w_down=randn(H, I, seed=12, scale=0.2), bias=randn(I, seed=13),
        router_w=randn(4, H, seed=14, scale=0.2), router_b=randn(4, seed=15),
        execute=torch.rand(2, B, L, generator=torch.Generator().manual_seed(16)) < 0.6,
        params=forced_params(7, 0.25, "cpu"),
    )
    t = SimpleNamespace(**{k: v.to(dev) for k, v in cpu.items()})
    t.count = t.offsets[-1:]
    t.qe = t.q[:n].contiguous()
    t.xe = t.x[:n].contiguous()
    return t, dict(B=B, L=L, T=T, n=n, scale=D**-0.5)


def _calls(t, s):
    """(op name, args, reference on the same args, rows of the output the op specifies)."""
    B, L, n, scale = s["B"], s["L"], s["n"], s["scale"]
    return [
        ("router_execute", (t.x, t.router_w, t.router_b), routing.router_execute_reference, None),
        ("forced_execute", (t.params, t.start, B, L, 3), routing.forced_execute_reference, None),
        ("compact", (t.execute,), routing.compact_reference, None),
        ("rms_norm", (t.x, t.w, 1e-5), norm.rms_norm_reference, None),
        ("rms_norm", (t.x, t.w, 1e-5, t.rows), norm.rms_norm_reference, None),
        ("rms_norm", (t.x, t.w, 1e-5, t.rows_cap, t.count), norm.rms_norm_reference, n),
        ("rms_norm_split", (t.x, t.w, 1e-5, t.slot, n), norm.rms_norm_split_reference, None),
        ("rope", (t.q, t.cos, t.sin), rope.rope_reference, None),
        ("rope", (t.q, t.cos, t.sin, t.rows_cap, t.count), rope.rope_reference, n),
        ("sparse_attention", (t.q, t.k_cache, t.v_cache, t.start, L, scale, None, None, t.key_mask),
         attention.sparse_attention_reference, None),
        ("sparse_attention", (t.qe, t.k_cache, t.v_cache, t.start, L, scale, t.rows, t.offsets, t.key_mask),
         attention.sparse_attention_reference, None),
        ("sparse_attention", (t.q[:B].contiguous(), t.k_cache, t.v_cache, t.start, 1, scale),  # decode
         attention.sparse_attention_reference, None),
        ("linear_rows", (t.x, t.w_gate, t.bias), linear.linear_rows_reference, None),
        ("linear_rows", (t.x, t.w_gate, t.bias, t.count), linear.linear_rows_reference, n),
        ("gated_mlp", (t.x, t.w_gate, t.w_up, "silu"), linear.gated_mlp_reference, None),
        ("gated_mlp", (t.x, t.w_gate, t.w_up, "silu", t.count), linear.gated_mlp_reference, n),
        ("linear_residual", (t.x, t.xe @ t.w_gate.t(), t.w_down, t.slot), linear.linear_residual_reference, None),
        ("linear_residual", (t.x, t.x @ t.w_gate.t(), t.w_down, t.slot, t.count, t.rows_cap),
         linear.linear_residual_reference, None),
    ]


def _close(out, want, n, what):
    if isinstance(out, (tuple, list)):
        for o, w in zip(out, want):
            _close(o, w, n, what)
        return
    out = out.cpu()
    if n is not None:
        out, want = out[:n], want[:n]
    if out.dtype in (torch.bool, torch.int32, torch.int64):
        assert torch.equal(out, want), what
    else:
        assert out.shape == want.shape, what
        assert rel_err(out, want) < TOL, what


def _cpu(args):
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("tensors_on, current", [(1, 0), (0, 1)])
@pytest.mark.parametrize("path", ["wrapper", "torch.ops"])
def test_ops_run_on_their_inputs_gpu(tensors_on, current, path):
    t, s = _inputs(torch.device("cuda", tensors_on))
    with torch.cuda.device(current):
        for i, (name, args, reference, n) in enumerate(_calls(t, s)):
            fn = getattr(ops, name) if path == "wrapper" else getattr(torch.ops.skipgpt, name)
            out = fn(*args)
            assert torch.cuda.current_device() == current, f"{name} changed the current device"
            torch.cuda.synchronize(tensors_on)
            outs = out if isinstance(out, (tuple, list)) else [out]
            assert all(o.device == torch.device("cuda", tensors_on) for o in outs), name
            _close(out, reference(*_cpu(args)), n, f"{name} (call {i})")


@pytest.mark.gpu
@two_gpus
def test_kv_write_and_exact_counts_on_the_other_gpu():
    """The in-place cache write, and counts_to_host's asynchronous copy: its event must be
    recorded on cuda:1's stream, or exact_rows would read the pinned counts too early."""
    dev = torch.device("cuda", 1)
    t, s = _inputs(dev)
    B, L = s["B"], s["L"]
    cos, sin = t.cos.view(B, L, -1), t.sin.view(B, L, -1)
    want_k, want_v = t.k_cache.cpu(), t.v_cache.cpu()
    rope.rope_kv_write_reference(*_cpu((t.k, t.v, cos, sin)), want_k, want_v, t.start.cpu())
    execute = t.execute.repeat(1, 64, 1)  # counts no earlier call left in pinned memory
    with torch.cuda.device(0):
        ops.rope_kv_write(t.k, t.v, cos, sin, t.k_cache, t.v_cache, t.start)
        with torch.cuda.device(1):
            torch.cuda._sleep(10**8)  # delay cuda:1's stream: its count copy lands late
        rows, slot, offsets = ops.compact(execute)
        host = ops.counts_to_host(offsets)
        # An event recorded on idle cuda:0 would let exact_rows read the counts before they land.
        counts = [x.numel() for x in ops.exact_rows(rows, offsets, host)]
        assert torch.cuda.current_device() == 0
    assert torch.equal(t.k_cache.cpu(), want_k) or rel_err(t.k_cache.cpu(), want_k) < TOL
    assert torch.equal(t.v_cache.cpu(), want_v)
    assert counts == execute.reshape(2, -1).sum(-1).tolist()


@pytest.mark.gpu
@two_gpus
def test_tensors_on_two_gpus_are_refused():
    t0, _ = _inputs(torch.device("cuda", 0))
    t1, _ = _inputs(torch.device("cuda", 1))
    with pytest.raises(ValueError, match=r"weight: expected a tensor on cuda:0 like x, got one on cuda:1"):
        ops.rms_norm(t0.x, t1.w, 1e-5)
    with pytest.raises(ValueError, match=r"k_cache: expected a tensor on cuda:1 like q, got one on cuda:0"):
        ops.sparse_attention(t1.q, t0.k_cache, t1.v_cache, t1.start, 37, 0.125)
    with pytest.raises(ValueError, match=r"count: expected a tensor on cuda:1 like x, got one on cuda:0"):
        torch.ops.skipgpt.linear_rows(t1.x, t1.w_gate, None, t0.count)


def test_on_input_device_switches_only_when_needed(monkeypatch):
    """The device switch happens only when the first tensor's GPU is not the current one (CPU
    test: a tensor subclass poses as a CUDA tensor, torch.cuda's device calls are recorded)."""

    class OnGpu(torch.Tensor):
        index = 0

        @property
        def is_cuda(self):
            return True

        def get_device(self):
            return self.index

    switches, seen = [], []

    class Switch:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            switches.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    impl = on_input_device(lambda x, *rest, **kw: seen.append((x, rest, kw)) or "result")
    first = torch.Tensor._make_subclass(OnGpu, torch.zeros(1))
    assert impl(first, 2, k=3) == "result" and switches == []  # same device: no switch
    OnGpu.index = 1
    assert impl(first, 2, k=3) == "result" and switches == [1]  # cuda:1 while cuda:0 is current
    assert impl(torch.zeros(1)) == "result" and switches == [1]  # CPU tensors: nothing to switch
    assert impl([1, 2]) == "result" and switches == [1]  # not a tensor: the validation reports it
    assert len(seen) == 4 and seen[0][1:] == ((2,), {"k": 3})
