"""GPU tests of the custom ops (skipped without CUDA): bf16 at Llama-3.1-8B layer shapes against
float64 references, and a count of Triton compilations across sequence lengths.

Layer shapes: hidden 4096, 32 query heads / 8 KV heads of dim 128, MLP 14336; prefill B=2 L=300,
decode B=8 against a 2048-slot cache; random routes at 25% skip.
"""
from __future__ import annotations

import logging
import math
import unittest

import pytest
import torch

from tests.helpers import rel_err
from tests.ops.opsutil import poisoned_outputs

pytestmark = pytest.mark.gpu

H, HQ, HK, D, I = 4096, 32, 8, 128, 14336
EPS, THETA = 1e-5, 500000.0
BF16 = torch.bfloat16
LIMIT = 1e-2  # relative error against float64
DEV = "cuda"


def _kernel_modules():
    from skipgpt.ops.attention import kernels as attention_k
    from skipgpt.ops.linear import kernels as linear_k
    from skipgpt.ops.norm import kernels as norm_k
    from skipgpt.ops.rope import kernels as rope_k
    from skipgpt.ops.routing import kernels as routing_k

    return norm_k, rope_k, attention_k, linear_k, routing_k


def poisoned():
    return poisoned_outputs(*_kernel_modules())


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(*shape, seed, scale=1.0, dtype=BF16):
    return (torch.randn(*shape, generator=gen(seed), device=DEV) * scale).to(dtype)


def routes(B, L, seed, skip=0.25, padding=None):
    """Route sets [2, B, L] (attention, MLP) at `skip`, padding never executing; compacted on the
    device by the op. Returns (execute, rows, slot, seq_offsets)."""
    execute = torch.rand(2, B, L, generator=gen(seed), device=DEV) >= skip
    if padding is not None:
        execute &= padding[None]
    rows, slot, offsets = torch.ops.skipgpt.compact(execute, None, None)
    return execute, rows, slot, offsets


def check(out, ref, what):
    assert out.shape == ref.shape, what
    err = rel_err(out, ref)  # also fails on NaN: a row the kernel should have written and did not
    assert err < LIMIT, f"{what}: relative error {err:.3g} vs float64"


# -- float64 references, written from the definitions -------------------------------------------


def rms_norm64(x, w):
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def rope_tables(positions):
    inv = 1.0 / THETA ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float64) / D)
    ang = positions.double()[..., None] * inv
    return torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()


def rope64(x, cos64, sin64):
    """x [M, Hx, D], tables [M, D] (float64): pairs (i, i + D/2) rotated."""
    x = x.double()
    half = D // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos64[:, None, :half], sin64[:, None, :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def attention64(q, k_cache, v_cache, start, L, scale, rows, n, key_mask):
    """[n, Hq, D] float64: query m (token rows[m], or m) of sequence r // L at slot start + r % L
    attends to its sequence's keys at slots <= its own that key_mask keeps."""
    B, S = k_cache.shape[:2]
    group = q.shape[1] // k_cache.shape[2]
    r = torch.arange(n, device=DEV) if rows is None else rows[:n].long()
    b, pos = r // L, start + r % L
    out = torch.zeros(n, q.shape[1], D, dtype=torch.float64, device=DEV)
    keys = torch.arange(S, device=DEV)
    for seq in range(B):
        sel = torch.nonzero(b == seq).flatten()
        if sel.numel() == 0:
            continue
        ks = k_cache[seq].double().repeat_interleave(group, 1)  # [S, Hq, D]
        vs = v_cache[seq].double().repeat_interleave(group, 1)
        scores = torch.einsum("mhd,shd->hms", q[sel].double(), ks) * scale
        visible = keys[None, :] <= pos[sel][:, None]
        if key_mask is not None:
            kept = torch.zeros(S, dtype=torch.bool, device=DEV)
            kept[: key_mask.shape[1]] = key_mask[seq, :S]
            visible &= kept[None, :]
        probs = torch.softmax(scores.masked_fill(~visible[None], -math.inf), -1).nan_to_num(0.0)
        out[sel] = torch.einsum("hms,shd->mhd", probs, vs)
    return out


def left_padding(B, width, pads):
    mask = torch.ones(B, width, dtype=torch.bool, device=DEV)
    for b, p in enumerate(pads):
        mask[b, :p] = False
    return mask


# -- bf16 at Llama-3.1-8B shapes ------------------------------------------------------------------


@pytest.mark.parametrize("B,L", [(2, 300), (8, 1)])
def test_norm_8b(B, L):
    T = B * L
    x = randn(T, H, seed=1, scale=2.0)
    w = (1 + 0.1 * torch.randn(H, generator=gen(2), device=DEV)).to(BF16)
    _, rows, slot, offsets = routes(B, L, seed=3)
    n_attn, n_mlp = int(offsets[0, -1]), int(offsets[1, -1])
    want = rms_norm64(x, w)
    with poisoned():
        for num_rows in (n_attn, T):  # exact, capacity
            y, yq = torch.ops.skipgpt.rms_norm_split(x, w, EPS, slot[0], num_rows)
            check(y, want, "rms_norm_split y")
            check(yq[:n_attn], want[rows[0, :n_attn].long()], f"rms_norm_split yq ({num_rows} rows)")
        check(torch.ops.skipgpt.rms_norm(x, w, EPS), want, "rms_norm dense")
        exact = rows[1, :n_mlp].clone()
        check(torch.ops.skipgpt.rms_norm(x, w, EPS, exact), want[exact.long()], "rms_norm exact rows")
        out = torch.ops.skipgpt.rms_norm(x, w, EPS, rows[1], offsets[1, B:])
        check(out[:n_mlp], want[exact.long()], "rms_norm capacity rows")


@pytest.mark.parametrize("B,L,start,S", [(2, 300, 0, 2048), (8, 1, 1500, 2048)])
def test_rope_8b(B, L, start, S):
    T = B * L
    pads = [0] + [37] * (B - 1)
    positions = (start + torch.arange(L, device=DEV))[None, :] - torch.tensor(pads, device=DEV)[:, None]
    positions = positions.clamp(min=0)
    cos64, sin64 = rope_tables(positions.reshape(T))
    cos, sin = cos64.to(BF16), sin64.to(BF16)
    _, rows, slot, offsets = routes(B, L, seed=4)
    n = int(offsets[0, -1])
    q = randn(T, HQ, D, seed=5)
    with poisoned():
        out = torch.ops.skipgpt.rope(q, cos, sin)
        check(out, rope64(q, cos64, sin64), "rope dense")
        exact = rows[0, :n].clone()
        qe = q[:n].contiguous()
        out = torch.ops.skipgpt.rope(qe, cos, sin, exact)
        check(out, rope64(qe, cos64[exact.long()], sin64[exact.long()]), "rope exact")
        out = torch.ops.skipgpt.rope(q, cos, sin, rows[0], offsets[0, B:])
        check(out[:n], rope64(q[:n], cos64[exact.long()], sin64[exact.long()]), "rope capacity")
    k = randn(B, L, HK, D, seed=6)
    v = randn(B, L, HK, D, seed=7)
    k_cache = torch.full((B, S, HK, D), float("nan"), dtype=BF16, device=DEV)
    v_cache = torch.full_like(k_cache, float("nan"))
    torch.ops.skipgpt.rope_kv_write(
        k, v, cos.view(B, L, D), sin.view(B, L, D), k_cache, v_cache, torch.tensor([start], device=DEV)
    )
    step = slice(start, start + L)
    want_k = rope64(k.reshape(T, HK, D), cos64, sin64).view(B, L, HK, D)
    check(k_cache[:, step], want_k, "rope_kv_write k")
    assert torch.equal(v_cache[:, step], v)
    assert torch.isnan(k_cache[:, :start]).all() and torch.isnan(k_cache[:, start + L:]).all()
    assert torch.isnan(v_cache[:, :start]).all() and torch.isnan(v_cache[:, start + L:]).all()


@pytest.mark.parametrize("B,L,start,S", [(2, 300, 0, 2048), (2, 300, 211, 1024), (8, 1, 1500, 2048), (8, 1, 2047, 2048)])
def test_attention_8b(B, L, start, S):
    T = B * L
    pads = [0, 37, 0, 5, 400, 0, 1, 1200][:B]
    key_mask = left_padding(B, start + L, pads)
    k_cache = torch.zeros(B, S, HK, D, dtype=BF16, device=DEV)  # a zero-initialised cache
    k_cache[:, : start + L] = randn(B, start + L, HK, D, seed=8)
    v_cache = torch.zeros_like(k_cache)
    v_cache[:, : start + L] = randn(B, start + L, HK, D, seed=9)
    valid = key_mask[:, start:]
    _, rows, slot, offsets = routes(B, L, seed=10, padding=valid)
    n = int(offsets[0, -1])
    scale = D ** -0.5
    start_t = torch.tensor([start], device=DEV)
    q = randn(T, HQ, D, seed=11, scale=3.0)  # peaky attention
    exact = rows[0, :n].clone()
    qe = q[:n].contiguous()
    want = attention64(qe, k_cache, v_cache, start, L, scale, exact, n, key_mask)
    with poisoned():
        out = torch.ops.skipgpt.sparse_attention(qe, k_cache, v_cache, start_t, L, scale, exact, offsets[0], key_mask)
        check(out, want, "exact rows")
        out = torch.ops.skipgpt.sparse_attention(q, k_cache, v_cache, start_t, L, scale, rows[0], offsets[0], key_mask)
        check(out[:n], want, "capacity rows")
        out = torch.ops.skipgpt.sparse_attention(q, k_cache, v_cache, start_t, L, scale, key_mask=key_mask)
        check(out, attention64(q, k_cache, v_cache, start, L, scale, None, T, key_mask), "dense")


def _weights(seed):
    s = H ** -0.5
    return dict(
        q=randn(HQ * D, H, seed=seed, scale=s), q_bias=randn(HQ * D, seed=seed + 1, scale=0.1),
        k=randn(HK * D, H, seed=seed + 6, scale=s), v=randn(HK * D, H, seed=seed + 7, scale=s),
        o=randn(H, HQ * D, seed=seed + 2, scale=s),
        gate=randn(I, H, seed=seed + 3, scale=s), up=randn(I, H, seed=seed + 4, scale=s),
        down=randn(H, I, seed=seed + 5, scale=I ** -0.5),
    )


@pytest.mark.parametrize("B,L", [(2, 300), (1, 400), (8, 1)])  # rows_gemm's tiles change at 64, 256 and 512 rows
def test_linear_8b(B, L):
    T = B * L
    W = _weights(20)
    _, rows, slot, offsets = routes(B, L, seed=12)
    n_attn, n_mlp = int(offsets[0, -1]), int(offsets[1, -1])
    count_attn, count_mlp = offsets[0, B:], offsets[1, B:]
    x = randn(T, H, seed=13)  # capacity-sized input; the first n rows are live
    residual = randn(T, H, seed=14, scale=4.0)
    a_in = randn(T, I, seed=15)
    lin64 = lambda inp, w, b=None: inp.double() @ w.double().T + (0 if b is None else b.double())
    silu64 = lambda t: t / (1 + torch.exp(-t))
    with poisoned():
        for form, m, count in (("exact", n_attn, None), ("capacity", T, count_attn)):
            out = torch.ops.skipgpt.linear_rows(x[:m], W["q"], W["q_bias"], count)
            check(out[:n_attn], lin64(x[:n_attn], W["q"], W["q_bias"]), f"linear_rows {form}")
            out = torch.ops.skipgpt.linear_rows(x[:m], W["q"], None, count)
            check(out[:n_attn], lin64(x[:n_attn], W["q"]), f"linear_rows {form}, no bias")
        for form, m, count in (("exact", n_mlp, None), ("capacity", T, count_mlp)):
            out = torch.ops.skipgpt.gated_mlp(x[:m], W["gate"], W["up"], "silu", count)
            want = silu64(lin64(x[:n_mlp], W["gate"])) * lin64(x[:n_mlp], W["up"])
            check(out[:n_mlp], want, f"gated_mlp {form}")
        for name, w, inp, n, count, slot_r, rows_r in (
            ("o_proj", W["o"], x, n_attn, count_attn, slot[0], rows[0]),
            ("down_proj", W["down"], a_in, n_mlp, count_mlp, slot[1], rows[1]),
        ):
            executes = slot_r >= 0
            for form, m, cnt, rows_f in (("exact", n, None, None), ("capacity", T, count, rows_r)):
                out = torch.ops.skipgpt.linear_residual(residual, inp[:m], w, slot_r, cnt, rows_f)
                assert torch.equal(out[~executes], residual[~executes]), f"{name} {form}: skipping rows changed"
                want = residual[executes].double() + lin64(inp[:n], w)
                check(out[executes], want, f"{name} {form}")
        out = torch.ops.skipgpt.linear_residual(residual, x, W["o"])
        check(out, residual.double() + lin64(x, W["o"]), "linear_residual dense")


@pytest.mark.parametrize("T", [512, 1024])
def test_capacity_gemms_replay_in_a_cuda_graph(T):
    """The capacity-form GEMMs, captured in a CUDA graph with one set of routes and replayed with
    others (new counts, rows and slot copied into the captured tensors), match eager calls bit for
    bit: 512 rows launch one program per tile, 1024 the persistent grid, whose TMA descriptors
    take scratch from an allocator at every launch."""
    W = _weights(50)
    x, a_in, residual = randn(T, H, seed=51), randn(T, I, seed=52), randn(T, H, seed=53)
    _, rows, slot, offsets = routes(1, T, seed=54)
    rows, slot, offsets = rows.clone(), slot.clone(), offsets.clone()  # the graph's inputs

    def step():
        count = offsets[1, -1:]
        return (torch.ops.skipgpt.linear_rows(x, W["q"], None, count),
                torch.ops.skipgpt.gated_mlp(x, W["gate"], W["up"], "silu", count),
                torch.ops.skipgpt.linear_residual(residual, a_in, W["down"], slot[1], count, rows[1]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed, skip in ((55, 0.25), (56, 0.6), (57, 0.0)):
        _, new_rows, new_slot, new_offsets = routes(1, T, seed=seed, skip=skip)
        rows.copy_(new_rows)
        slot.copy_(new_slot)
        offsets.copy_(new_offsets)
        graph.replay()
        eager = step()
        n = int(offsets[1, -1])
        for name, got, want, live in zip(("Q", "gated", "down + residual"), captured, eager, (n, n, T)):
            assert torch.equal(got[:live], want[:live]), f"{name}: the replay differs from eager at skip {skip}"


@pytest.mark.parametrize("B,L", [(2, 300), (1, 400), (8, 1)])
def test_qkv_rope_write_8b(B, L):
    """Q of the executing rows (capacity form) and K/V of every token in one launch, against float64."""
    T = B * L
    W = _weights(40)
    _, rows, slot, offsets = routes(B, L, seed=41)
    n_attn = int(offsets[0, -1])
    x = randn(T, H, seed=42)
    start, S = 5, L + 9
    cos64, sin64 = rope_tables(start + torch.arange(L, device=DEV).repeat(B))
    cos, sin = cos64.to(BF16), sin64.to(BF16)
    k_cache = torch.full((B, S, HK, D), float("nan"), dtype=BF16, device=DEV)
    v_cache = k_cache.clone()
    start_t = torch.full((1,), start, dtype=torch.int64, device=DEV)
    lin64 = lambda inp, w, b=None: inp.double() @ w.double().T + (0 if b is None else b.double())
    ra = rows[0, :n_attn].long()
    with poisoned():
        q = torch.ops.skipgpt.qkv_rope_write(x, W["q"], W["k"], W["v"], None, None, None, cos, sin, rows[0],
                                             offsets[0, B:], k_cache, v_cache, start_t)
    check(q[:n_attn], rope64(lin64(x[ra], W["q"]).view(-1, HQ, D), cos64[ra], sin64[ra]), "qkv_rope_write q")
    k64 = rope64(lin64(x, W["k"]).view(T, HK, D), cos64, sin64).view(B, L, HK, D)
    check(k_cache[:, start:start + L], k64, "qkv_rope_write k cache")
    check(v_cache[:, start:start + L], lin64(x, W["v"]).view(B, L, HK, D), "qkv_rope_write v cache")
    assert k_cache[:, :start].isnan().all() and v_cache[:, start + L:].isnan().all(), "a write outside the step"


# -- no recompilation for new sequence lengths ----------------------------------------------------


def compiled_variants(fn) -> int:
    """Compiled specialisations a @triton.jit function holds in memory, summed over devices.

    Triton 3.x keeps `JITFunction.device_caches[device]`, a tuple whose first element is the
    kernel cache (3.2-3.4: (kernel_cache, target, backend, binder); 3.5+: (kernel_cache,
    kernel_key_cache, target, backend, binder)). Triton 2.x kept `JITFunction.cache[device]`.
    An autotuner wraps the function as `.fn`."""
    while not hasattr(fn, "device_caches") and not hasattr(fn, "cache") and hasattr(fn, "fn"):
        fn = fn.fn
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    cache = getattr(fn, "cache", None)
    if isinstance(cache, dict):
        return sum(len(c) for c in cache.values())
    raise AssertionError(f"cannot find the compiled-kernel cache of {fn!r} in this Triton version")


def _jit_functions():
    norm_k, rope_k, attention_k, linear_k, routing_k = _kernel_modules()
    return {
        "compact": routing_k._compact_kernel,
        "rms_norm": norm_k._rms_norm_kernel,
        "rope": rope_k._rope_kernel,
        "rope_kv_write": rope_k._rope_kv_write_kernel,
        "prefill": attention_k._prefill_kernel,
        "decode": attention_k._decode_kernel,
        "combine": attention_k._combine_kernel,
        "act_mul": linear_k._act_mul_kernel,
        "scatter_residual": linear_k._scatter_residual_kernel,
        "rows_gemm": linear_k._rows_gemm_kernel,
        "qkv_rope_write": linear_k._qkv_rope_write_kernel,
    }


def _layer_step(W, B, L, start, S, seed):
    """One routed layer step through every op, both forms, with the tensors a layer passes
    (route set 1 is a view at an offset into the compacted tensors, as in skipgpt/layer.py)."""
    T = B * L
    x = randn(T, H, seed=seed)
    w_norm = torch.ones(H, dtype=BF16, device=DEV)
    key_mask = left_padding(B, start + L, [3] + [0] * (B - 1))
    execute = (torch.rand(2, B, L, generator=gen(seed), device=DEV) >= 0.25) & key_mask[None, :, start:]
    rows, slot, offsets = torch.ops.skipgpt.compact(execute, None, None)
    exact = torch.ops.skipgpt.exact_rows(rows, offsets)
    forms = [(rows[r], offsets[r, B:]) for r in (0, 1)]  # capacity
    if L > 1:
        forms = [(exact[0], None), (exact[1], None)] + forms
    k_cache = torch.zeros(B, S, HK, D, dtype=BF16, device=DEV)
    v_cache = torch.zeros_like(k_cache)
    start_t = torch.full((1,), start, dtype=torch.int64, device=DEV)
    cos = torch.ones(B, L, D, dtype=BF16, device=DEV)
    sin = torch.zeros_like(cos)
    xn, xq = torch.ops.skipgpt.rms_norm_split(x, w_norm, EPS, slot[0], T)
    k = v = xn[:, : HK * D].reshape(B, L, HK, D).contiguous()
    torch.ops.skipgpt.rope_kv_write(k, v, cos, sin, k_cache, v_cache, start_t)
    torch.ops.skipgpt.qkv_rope_write(xn, W["q"], W["k"], W["v"], None, None, None, cos.view(T, D), sin.view(T, D),
                                     rows[0], offsets[0, B:], k_cache, v_cache, start_t)
    for i in range(0, len(forms), 2):
        (ra, ca), (rm, cm) = forms[i], forms[i + 1]
        q = torch.ops.skipgpt.linear_rows(xq[: ra.shape[0]], W["q"], None, ca).view(-1, HQ, D)
        q = torch.ops.skipgpt.rope(q, cos.view(T, D), sin.view(T, D), ra, ca)
        o = torch.ops.skipgpt.sparse_attention(q, k_cache, v_cache, start_t, L, D ** -0.5, ra, offsets[0], key_mask)
        h = torch.ops.skipgpt.linear_residual(x, o.view(-1, HQ * D), W["o"], slot[0], ca, ra if ca is not None else None)
        hn = torch.ops.skipgpt.rms_norm(h, w_norm, EPS, rm, cm)
        a = torch.ops.skipgpt.gated_mlp(hn, W["gate"], W["up"], "silu", cm)
        torch.ops.skipgpt.linear_residual(h, a, W["down"], slot[1], cm, rm if cm is not None else None)
    torch.ops.skipgpt.rms_norm(x, w_norm, EPS)
    torch.cuda.synchronize()


def _counts():
    return {name: compiled_variants(fn) for name, fn in _jit_functions().items()}


def _assert_no_new_variants(steps, exempt=()):
    W = _weights(30)
    steps[0](W)
    first = _counts()
    assert all(v > 0 for k, v in first.items() if k not in exempt), first
    for step in steps[1:]:
        step(W)
    after = _counts()
    grown = {k: (first[k], after[k]) for k in first if after[k] != first[k]}
    assert not grown, f"recompiled for a new length (variants before -> after): {grown}"


def test_counts_reach_the_host_ahead_of_queued_work():
    """counts_to_host copies into pinned memory behind compaction only: exact_rows given it
    returns the right rows while a long kernel queued after the copy still runs. Counts that
    lost the copy's event make it wait for the whole stream, and say so."""
    from skipgpt import ops
    from skipgpt.ops.routing import _warn_waiting_for_the_stream

    execute = torch.rand(2, 8, 300, device=DEV, generator=torch.Generator(DEV).manual_seed(3)) < 0.75
    rows, _, offsets = ops.compact(execute)
    host = ops.counts_to_host(offsets)
    assert host.device.type == "cpu" and host.is_pinned() and host.dtype == torch.int32
    torch.cuda._sleep(10**9)  # ~0.5-1 s of GPU time queued after the copy
    queued = torch.cuda.Event()
    queued.record()
    _warn_waiting_for_the_stream.cache_clear()
    # assertNoLogs/assertLogs, not caplog: the tests run without pytest's logging plugin.
    with unittest.TestCase().assertNoLogs(logging.getLogger("skipgpt"), "WARNING"):
        got = ops.exact_rows(rows, offsets, host)
    assert not queued.query(), "exact_rows waited for work queued after the copy"
    want = ops.exact_rows(rows, offsets)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    assert [g.numel() for g in got] == execute.flatten(1).sum(1).tolist()
    with unittest.TestCase().assertLogs(logging.getLogger("skipgpt"), "WARNING") as logs:
        again = ops.exact_rows(rows, offsets, host.clone())  # a new tensor: no event
    assert "without its copy's CUDA event" in " ".join(logs.output)
    assert [g.tolist() for g in again] == [w.tolist() for w in want]


def test_no_recompilation_across_prefill_lengths():
    # T = B*L >= 1024 in every step: the size-bucketed constexprs (compact's BLOCK, rows_gemm's
    # BLOCK_M) are saturated, so any recompilation comes from a per-call value being
    # specialised on (an int's value or divisibility, or a pointer's alignment).
    lengths = [520, 601, 700, 803, 1000]
    steps = [lambda W, L=L, i=i: _layer_step(W, 2, L, 0, L + 64 * i, seed=40 + i) for i, L in enumerate(lengths)]
    _assert_no_new_variants(steps, exempt=("decode", "combine"))


def test_no_recompilation_across_decode_steps():
    # Decode: B = 8 sequences, a static 2048-slot cache, five fill levels.
    steps = [lambda W, s=s, i=i: _layer_step(W, 8, 1, s, 2048, seed=50 + i) for i, s in enumerate([3, 100, 517, 1500, 2047])]
    _assert_no_new_variants(steps, exempt=("prefill", "act_mul", "scatter_residual"))


def test_bucketed_recompilation_stays_bounded():
    # Short prompts: only kernels with a size-bucketed constexpr may compile again, at most once
    # per new bucket (power of two of the token count T, capped) and per epilogue variant.
    W = _weights(30)
    lengths = [9, 13, 21, 37, 50]  # T = 18 .. 100
    _layer_step(W, 2, lengths[0], 0, 64, seed=60)
    first = _counts()
    for i, L in enumerate(lengths[1:]):
        _layer_step(W, 2, L, 0, 64 + L, seed=61 + i)
    after = _counts()
    from skipgpt.ops.linear.kernels import _tiles

    np2 = lambda n: 1 << (n - 1).bit_length()
    new_tiles = lambda kind: len({_tiles(2 * L, 2, kind, True) for L in lengths}) - 1  # tiles follow the row count's bucket
    allowed = {
        "compact": len({min(1024, np2(2 * L)) for L in lengths}) - 1,
        # rows_gemm: a single GEMM in 3 variants (Q; o_proj and down_proj, with the residual), the gated one
        "rows_gemm": 3 * new_tiles("single") + new_tiles("gated"),
        "qkv_rope_write": new_tiles("halves"),
    }
    for name in first:
        new = after[name] - first[name]
        assert new <= allowed.get(name, 0), f"{name} recompiled for a new length ({first[name]} -> {after[name]})"
