import math

import pytest
import torch

from skipgpt.ops import attention
from skipgpt.ops.attention import sparse_attention_reference
from tests.helpers import KERNEL_DEVICE, KERNEL_DTYPES, TOL, requires_triton
from tests.ops.opsutil import assert_rel, make_routes, padding_mask, poisoned_outputs, randn


def brute_attention(q, k_cache, v_cache, start, L, scale, rows=None, count=None, key_mask=None):
    """One query at a time, in float64: query row m is token r = rows[m] (m without rows) of
    sequence r // L at slot start + r % L; it attends to the keys of its sequence at slots <= its
    own that key_mask keeps (slots past key_mask's width are padding). Rows >= count are left
    out (returned as None)."""
    q, k_cache, v_cache = q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu()
    M, Hq, D = q.shape
    B, S, Hk, _ = k_cache.shape
    group = Hq // Hk
    start = int(start.reshape(-1)[0])
    n = M if count is None else int(count.reshape(-1)[0])
    out = torch.zeros(M, Hq, D, dtype=torch.float64)
    for m in range(n):
        r = m if rows is None else int(rows[m])
        b, pos = r // L, start + r % L
        for h in range(Hq):
            keys = [
                j for j in range(S)
                if j <= pos and (key_mask is None or (j < key_mask.shape[1] and bool(key_mask[b, j])))
            ]
            if not keys:
                continue  # a query that sees no key gives zeros
            kv = h // group
            scores = torch.stack([q[m, h] @ k_cache[b, j, kv] for j in keys]) * scale
            probs = torch.softmax(scores, dim=0)
            out[m, h] = sum(p * v_cache[b, j, kv] for p, j in zip(probs, keys))
    return out, n


# ---------------------------------------------------------------------------------------------
# the reference against the per-query loop


@pytest.mark.parametrize("L,start,kind,p", [(6, 0, "left", 0.6), (5, 3, "right", 1.0), (1, 7, "left", 1.0), (4, 2, None, 0.5)])
@pytest.mark.parametrize("Hq,Hk", [(2, 2), (4, 1)])
def test_reference_matches_brute_force(L, start, kind, p, Hq, Hk):
    B, D, extra = 3, 16, 2
    S = start + L + extra
    k_cache = randn(B, S, Hk, D, seed=1)
    v_cache = randn(B, S, Hk, D, seed=2)
    key_mask = None if kind is None else padding_mask(B, start + L, kind, seed=3)
    routes = make_routes(B, L, p, seed=4)
    scale = D ** -0.5
    st = torch.tensor([start])
    # dense
    q = randn(B * L, Hq, D, seed=5)
    want, _ = brute_attention(q, k_cache, v_cache, st, L, scale, key_mask=key_mask)
    got = sparse_attention_reference(q, k_cache, v_cache, st, L, scale, key_mask=key_mask)
    assert got.dtype == torch.float32
    assert_rel(got, want, 1e-5, "dense")
    # exact
    qe = q[: routes.n].contiguous()
    want, _ = brute_attention(qe, k_cache, v_cache, st, L, scale, routes.rows, key_mask=key_mask)
    got = sparse_attention_reference(qe, k_cache, v_cache, st, L, scale, routes.rows, routes.seq_offsets, key_mask)
    assert_rel(got, want, 1e-5, "exact")
    # capacity: rows past the count come out zero in the reference
    want, n = brute_attention(q, k_cache, v_cache, st, L, scale, routes.rows_cap, routes.count, key_mask)
    got = sparse_attention_reference(q, k_cache, v_cache, st, L, scale, routes.rows_cap, routes.seq_offsets, key_mask)
    assert_rel(got[:n], want[:n], 1e-5, "capacity")
    assert (got[n:] == 0).all()


def test_reference_query_seeing_no_key_is_zero():
    B, L, Hq, Hk, D = 2, 3, 2, 1, 8
    k_cache = randn(B, L, Hk, D, seed=1)
    v_cache = randn(B, L, Hk, D, seed=2)
    q = randn(B * L, Hq, D, seed=3)
    key_mask = torch.tensor([[False, False, True], [True, True, True]])
    out = sparse_attention_reference(q, k_cache, v_cache, torch.tensor([0]), L, 0.3, key_mask=key_mask)
    assert (out[:2] == 0).all() and (out[2:] != 0).any()


def test_reference_gqa_uses_the_kv_head_of_each_group():
    # query head h reads KV head h // (Hq/Hk): give each KV head a constant value to see which.
    B, L, Hq, Hk, D = 1, 2, 4, 2, 8
    k_cache = torch.zeros(B, L, Hk, D)
    v_cache = torch.arange(Hk, dtype=torch.float32).view(1, 1, Hk, 1).expand(B, L, Hk, D).contiguous()
    q = randn(B * L, Hq, D, seed=1)
    out = sparse_attention_reference(q, k_cache, v_cache, torch.tensor([0]), L, 1.0)
    assert out[:, :, 0].tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2


# ---------------------------------------------------------------------------------------------
# Triton launchers against the reference


def _setup(B, L, Hq, Hk, D, start, extra, kind, p, form, dtype, seed):
    """Inputs of one attention step on KERNEL_DEVICE. The cache holds `start` earlier slots, this
    step's L slots and `extra` spare slots full of large garbage (never attended to)."""
    S = start + L + extra
    k_cache = randn(B, S, Hk, D, dtype=dtype, device=KERNEL_DEVICE, seed=seed)
    v_cache = randn(B, S, Hk, D, dtype=dtype, device=KERNEL_DEVICE, seed=seed + 1)
    if extra:
        k_cache[:, start + L:] = 300.0
        v_cache[:, start + L:] = -500.0
    key_mask = None if kind is None else padding_mask(B, start + L, kind, seed=seed).to(KERNEL_DEVICE)
    routes = make_routes(B, L, p, seed=seed, device=KERNEL_DEVICE)
    if form == "dense":
        rows = offsets = None
        M = B * L
    elif form == "exact":
        rows, offsets, M = routes.rows.clone(), routes.seq_offsets, routes.n
    else:
        rows, offsets, M = routes.rows_cap, routes.seq_offsets, B * L
    q = randn(M, Hq, D, dtype=dtype, device=KERNEL_DEVICE, seed=seed + 2)
    n = M if form == "dense" else routes.n
    start_t = torch.tensor([start], device=KERNEL_DEVICE)
    return q, k_cache, v_cache, start_t, rows, offsets, key_mask, n


def _check(launch, dtype, B, L, Hq, Hk, D, start, extra, kind, p, form, seed):
    from skipgpt.ops.attention import kernels

    q, k_cache, v_cache, start_t, rows, offsets, key_mask, n = _setup(
        B, L, Hq, Hk, D, start, extra, kind, p, form, dtype, seed
    )
    scale = 1.0 / math.sqrt(D)
    with poisoned_outputs(kernels):
        out = getattr(kernels, launch)(q, k_cache, v_cache, start_t, L, scale, rows, offsets, key_mask)
    assert out.shape == q.shape and out.dtype == dtype
    want = sparse_attention_reference(q, k_cache, v_cache, start_t, L, scale, rows, offsets, key_mask)
    assert_rel(out[:n], want[:n], TOL[dtype])
    if n < q.shape[0]:
        assert torch.isnan(out[n:]).all(), "capacity rows past the count were written"
    return out[:n], want[:n]


PREFILL_CASES = [
    # B, L, Hq, Hk, D, start, extra, padding, p, form
    (2, 1, 2, 2, 64, 0, 0, None, 1.0, "dense"),
    (3, 7, 4, 1, 64, 0, 0, "left", 0.6, "exact"),
    (2, 7, 2, 2, 128, 3, 2, "right", 0.6, "capacity"),
    (2, 63, 4, 1, 128, 0, 0, "right", 0.6, "exact"),
    (2, 63, 2, 2, 64, 17, 5, "left", 0.6, "capacity"),
    (2, 63, 4, 1, 64, 0, 0, None, 0.0, "exact"),  # N = 0
    (2, 63, 2, 2, 64, 0, 3, "left", 0.0, "capacity"),  # N = 0, capacity
    (2, 129, 4, 1, 128, 0, 0, "left", 0.75, "exact"),
    (1, 129, 2, 2, 64, 5, 0, "right", 1.0, "dense"),
    (2, 129, 4, 1, 64, 0, 1, None, 1.0, "capacity"),  # all execute, capacity
]


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,L,Hq,Hk,D,start,extra,kind,p,form", PREFILL_CASES)
def test_prefill_kernel(dtype, B, L, Hq, Hk, D, start, extra, kind, p, form):
    _check("prefill", dtype, B, L, Hq, Hk, D, start, extra, kind, p, form, seed=L + D + start)


DECODE_CASES = [
    # B, Hq, Hk, D, start, extra, padding, p, form
    (1, 4, 1, 64, 0, 0, None, 1.0, "dense"),  # first token, one-slot cache
    (1, 4, 1, 128, 100, 27, "left", 1.0, "dense"),  # several KV splits
    (3, 2, 2, 64, 40, 9, "left", 0.6, "exact"),
    (3, 4, 1, 128, 61, 3, "right", 0.6, "capacity"),
    (8, 4, 2, 64, 20, 12, "left", 0.5, "capacity"),
    (5, 2, 2, 64, 9, 4, None, 0.0, "exact"),  # N = 0
    (5, 4, 1, 64, 9, 4, "left", 0.0, "capacity"),  # N = 0, capacity
    (4, 4, 1, 64, 33, 0, "left", 1.0, "capacity"),  # all execute, capacity
    (1, 4, 1, 64, 150, 5, "right", 1.0, "capacity"),  # splits merged in several rounds, capacity
]


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,Hq,Hk,D,start,extra,kind,p,form", DECODE_CASES)
def test_decode_kernel(dtype, B, Hq, Hk, D, start, extra, kind, p, form):
    _check("decode", dtype, B, 1, Hq, Hk, D, start, extra, kind, p, form, seed=B + D + start)


@requires_triton
@pytest.mark.parametrize("launch,L", [("prefill", 5), ("decode", 1)])
def test_kernel_query_seeing_no_key_gives_zeros(launch, L):
    from skipgpt.ops.attention import kernels

    B, Hq, Hk, D, start = 2, 2, 1, 64, 4
    S = start + L
    k_cache = randn(B, S, Hk, D, device=KERNEL_DEVICE, seed=1)
    v_cache = randn(B, S, Hk, D, device=KERNEL_DEVICE, seed=2)
    q = randn(B * L, Hq, D, device=KERNEL_DEVICE, seed=3)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[0] = False  # sequence 0 is all padding
    key_mask = key_mask.to(KERNEL_DEVICE)
    start_t = torch.tensor([start], device=KERNEL_DEVICE)
    with poisoned_outputs(kernels):
        out = getattr(kernels, launch)(q, k_cache, v_cache, start_t, L, 0.125, None, None, key_mask)
    assert (out[:L] == 0).all()
    want = sparse_attention_reference(q, k_cache, v_cache, start_t, L, 0.125, key_mask=key_mask)
    assert_rel(out, want, TOL[torch.float32])


@requires_triton
def test_decode_merge_after_a_round_of_splits_that_see_no_key():
    # 5 splits of 32 slots, merged 4 at a time on the CPU: padding over the first 128 slots
    # leaves the whole first round with no key, so the merge's running maximum starts at -inf.
    from skipgpt.ops.attention import kernels

    B, Hq, Hk, D, start = 1, 4, 1, 64, 155
    S = start + 1
    k_cache = randn(B, S, Hk, D, device=KERNEL_DEVICE, seed=1)
    v_cache = randn(B, S, Hk, D, device=KERNEL_DEVICE, seed=2)
    q = randn(B, Hq, D, device=KERNEL_DEVICE, seed=3)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[:, :128] = False
    key_mask = key_mask.to(KERNEL_DEVICE)
    start_t = torch.tensor([start], device=KERNEL_DEVICE)
    out = kernels.decode(q, k_cache, v_cache, start_t, 1, 0.125, None, None, key_mask)
    want, _ = brute_attention(q, k_cache, v_cache, start_t, 1, 0.125, key_mask=key_mask)
    assert_rel(out, want, 1e-5)


@requires_triton
def test_kernel_key_mask_narrower_than_cache():
    # key_mask covers fewer slots than the cache: slots past its width count as padding.
    from skipgpt.ops.attention import kernels

    B, L, Hq, Hk, D, S = 2, 6, 2, 2, 64, 20
    k_cache = randn(B, S, Hk, D, device=KERNEL_DEVICE, seed=1)
    v_cache = randn(B, S, Hk, D, device=KERNEL_DEVICE, seed=2)
    start_t = torch.tensor([10], device=KERNEL_DEVICE)
    key_mask = torch.ones(B, 13, dtype=torch.bool, device=KERNEL_DEVICE)  # slots 13.. are padding
    for launch, steps in (("prefill", L), ("decode", 1)):
        q = randn(B * steps, Hq, D, device=KERNEL_DEVICE, seed=3)
        out = getattr(kernels, launch)(q, k_cache, v_cache, start_t, steps, 0.125, None, None, key_mask)
        want, _ = brute_attention(q, k_cache, v_cache, start_t, steps, 0.125, key_mask=key_mask)
        assert_rel(out, want, 1e-5, launch)


@requires_triton
@pytest.mark.parametrize("kernel,L,ran", [(None, 1, "decode"), (None, 3, "prefill"), ("prefill", 1, "prefill"),
                                          ("decode", 1, "decode"), ("prefill", 5, "prefill")])
def test_kernel_argument_picks_the_launch(monkeypatch, kernel, L, ran):
    # attend_with names the kernel (compiled code at a symbolic L, in a torch.cond on L == 1); None picks by L.
    from skipgpt.ops.attention import kernels

    ran_kernels = []
    for name in ("decode", "prefill"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *args, _real=real, _name=name: ran_kernels.append(_name) or _real(*args)
        )
    q, k, v, start, rows, offsets, mask, n = _setup(2, L, 4, 2, 64, 5, 2, "left", 0.6, "capacity", torch.float32, 7)
    out = attention._sparse_attention_cuda(q, k, v, start, L, 0.125, rows, offsets, mask, attend_with=kernel)
    assert ran_kernels == [ran]
    want = sparse_attention_reference(q, k, v, start, L, 0.125, rows, offsets, mask)
    assert_rel(out[:n], want[:n], TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# opcheck and errors


def _op_args(B=2, L=3, Hq=4, Hk=2, D=16, start=2, p=0.5, form="dense", kind="left"):
    S = start + L + 1
    k_cache, v_cache = randn(B, S, Hk, D, seed=1), randn(B, S, Hk, D, seed=2)
    routes = make_routes(B, L, p, seed=3)
    key_mask = None if kind is None else padding_mask(B, start + L, kind)
    if form == "dense":
        rows = offsets = None
        M = B * L
    elif form == "exact":
        rows, offsets, M = routes.rows.clone(), routes.seq_offsets.clone(), routes.n
    else:
        rows, offsets, M = routes.rows_cap.clone(), routes.seq_offsets.clone(), B * L
    q = randn(M, Hq, D, seed=4)
    return q, k_cache, v_cache, torch.tensor([start]), L, D ** -0.5, rows, offsets, key_mask


@pytest.mark.parametrize("form", ["dense", "exact", "capacity"])
@pytest.mark.parametrize("L,kind", [(3, "left"), (1, None), (4, "right")])
def test_opcheck(form, L, kind):
    args = _op_args(L=L, form=form, kind=kind)
    torch.library.opcheck(torch.ops.skipgpt.sparse_attention.default, args)


@pytest.mark.parametrize("kernel,L", [("prefill", 1), ("decode", 1), ("prefill", 4)])
def test_opcheck_naming_the_kernel(kernel, L):
    args = _op_args(L=L, form="capacity")
    torch.library.opcheck(torch.ops.skipgpt.sparse_attention.default, args, {"attend_with": kernel})


def test_opcheck_fp16_no_executing_tokens():
    q, k, v, start, L, scale, rows, offsets, mask = _op_args(p=0.0, form="exact")
    torch.library.opcheck(torch.ops.skipgpt.sparse_attention.default, (q.half(), k.half(), v.half(), start, L, scale, rows, offsets, mask))


def _bad_cases():
    q, k, v, start, L, scale, rows, offsets, mask = _op_args(form="exact")
    qd, kd, vd, sd, _, _, _, _, maskd = _op_args(form="dense")
    B = k.shape[0]
    return [
        ((q[0], k, v, start, L, scale, rows, offsets), ValueError, "q: expected a 3-d tensor"),
        ((q.long(), k, v, start, L, scale, rows, offsets), TypeError, "q: expected dtype"),
        ((q, k.half(), v, start, L, scale, rows, offsets), TypeError, "k_cache: dtype"),
        ((q, k, v[0], start, L, scale, rows, offsets), ValueError, "v_cache: expected a 4-d tensor"),
        ((q, k, v[:, :-1].contiguous(), start, L, scale, rows, offsets), ValueError, "v_cache: shape"),
        ((q, k[..., :8].contiguous(), v[..., :8].contiguous(), start, L, scale, rows, offsets), ValueError, "q: head dim"),
        ((torch.zeros(q.shape[0], 3, q.shape[2]), k, v, start, L, scale, rows, offsets), ValueError, "q: 3 query heads"),
        ((q, k, v, start.int(), L, scale, rows, offsets), TypeError, "start: expected dtype int64"),
        ((q, k, v, torch.tensor([1, 2]), L, scale, rows, offsets), ValueError, "start: expected one element"),
        ((q, k, v, start, L, scale, rows.long(), offsets), TypeError, "rows: expected dtype int32"),
        ((q, k, v, start, L, scale, rows, None), ValueError, "seq_offsets: required with rows"),
        ((q, k, v, start, L, scale, rows, offsets.long()), TypeError, "seq_offsets: expected dtype int32"),
        ((q, k, v, start, L, scale, rows, offsets[:-1]), ValueError, f"seq_offsets: expected B\\+1 = {B + 1}"),
        ((q, k, v, start, L, scale, torch.cat([rows, rows]), offsets), ValueError, "rows: expected"),
        ((qd, kd, vd, sd, L, scale, None, offsets), ValueError, "seq_offsets: given without rows"),
        ((qd[:-1].contiguous(), kd, vd, sd, L, scale), ValueError, "q: without rows, expected B\\*seq_len"),
        ((qd, kd, vd, sd, L, scale, None, None, maskd.int()), TypeError, "key_mask: expected dtype bool"),
        ((qd, kd, vd, sd, L, scale, None, None, maskd[:1]), ValueError, "key_mask: expected 2 sequences"),
        ((qd, kd, vd, sd, L, scale, None, None, maskd[0]), ValueError, "key_mask: expected a 2-d tensor"),
        ((qd.transpose(0, 1).contiguous().transpose(0, 1), kd, vd, sd, L, scale), ValueError, "q: expected a contiguous"),
        ((qd, kd, vd, sd, L, scale, None, None, torch.ones(2, 12, dtype=torch.bool)[:, ::2]), ValueError,
         "key_mask: expected a contiguous"),
        ((qd, kd, vd, sd, L, scale, None, None, None, "flash"), ValueError, "attend_with: expected one of"),
        ((qd, kd, vd, sd, L, scale, None, None, None, "decode"), ValueError, "attend_with: 'decode' .* needs seq_len == 1"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_rejects_bad_input(case):
    args, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg):
        attention.sparse_attention(*args)
