
import pytest
import torch

from skipgpt.ops import rope, rope_kv_write  # the ops (they shadow the subpackage's name)
from skipgpt.ops.rope import rope_kv_write_reference, rope_reference
from tests.helpers import KERNEL_DEVICE, KERNEL_DTYPES, TOL, requires_triton
from tests.ops.opsutil import assert_rel, make_routes, poisoned_outputs, randn

THETA = 10000.0


def inv_freq(D):
    return 1.0 / THETA ** (torch.arange(0, D, 2, dtype=torch.float64) / D)


def cos_sin(positions, D, dtype, device="cpu"):
    """Hugging Face's rotary tables (cat(freqs, freqs)) for integer positions [...] -> [..., D]."""
    freqs = positions.double()[..., None] * inv_freq(D)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


def brute_rope(x, positions):
    """x [M, Hx, D] rotated pairwise, (i, i + D/2) by angle position * inv_freq[i], in float64."""
    x = x.double().cpu()
    D = x.shape[-1]
    half = D // 2
    out = torch.empty_like(x)
    for i in range(half):
        angle = positions.double().cpu() * inv_freq(D)[i]  # [M]
        c, s = angle.cos()[:, None], angle.sin()[:, None]
        a, b = x[:, :, i], x[:, :, i + half]
        out[:, :, i] = a * c - b * s
        out[:, :, i + half] = b * c + a * s
    return out


def token_positions(B, L, start, pads):
    """Position ids [B, L] of a step at cache slot `start` where sequence b has pads[b] left-padding
    slots (its positions shift down by the padding, as Hugging Face's do; clamped at 0)."""
    slots = start + torch.arange(L)
    return (slots[None, :] - torch.tensor(pads)[:, None]).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# the references against the rotation written out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_rope_reference_matches_rotation(dtype, D):
    B, L, Hx = 2, 9, 3
    pos = token_positions(B, L, start=4, pads=[0, 3]).flatten()
    cos, sin = cos_sin(pos, D, dtype)
    x = randn(B * L, Hx, D, dtype=dtype, seed=1)
    got = rope_reference(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    assert_rel(got, brute_rope(x, pos), TOL[dtype], "dense")

    routes = make_routes(B, L, 0.5, seed=2)
    xq = x[: routes.n].contiguous()
    got = rope_reference(xq, cos, sin, routes.rows)
    assert_rel(got, brute_rope(xq, pos[routes.rows.long()]), TOL[dtype], "gathered")

    xc = x.clone()
    got = rope_reference(xc, cos, sin, routes.rows_cap, routes.count)
    n = routes.n
    assert_rel(got[:n], brute_rope(xc[:n], pos[routes.rows.long()]), TOL[dtype], "capacity")
    assert (got[n:] == 0).all()


def test_rope_keeps_x_dtype_with_wider_tables():
    # fp32 cos/sin tables with fp16 queries: the result is fp16, like the fake and the kernel.
    pos = torch.arange(6)
    cos, sin = cos_sin(pos, 16, torch.float32)
    x = randn(6, 2, 16, dtype=torch.float16, seed=3)
    out = rope(x, cos, sin)
    assert out.dtype == torch.float16
    assert_rel(out, brute_rope(x, pos), TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_write_reference_matches_rotation(dtype):
    B, L, Hk, D, S, start = 2, 5, 2, 64, 12, 4
    pos = token_positions(B, L, start, pads=[0, 2])
    cos, sin = cos_sin(pos, D, dtype)
    k = randn(B, L, Hk, D, dtype=dtype, seed=4)
    v = randn(B, L, Hk, D, dtype=dtype, seed=5)
    k_cache = randn(B, S, Hk, D, dtype=dtype, seed=6)
    v_cache = randn(B, S, Hk, D, dtype=dtype, seed=7)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    rope_kv_write_reference(k, v, cos, sin, k_cache, v_cache, torch.tensor([start]))
    for b in range(B):
        for s in range(S):
            if start <= s < start + L:
                l = s - start
                want = brute_rope(k[b, l][None], pos[b, l].reshape(1))[0]
                assert_rel(k_cache[b, s], want, TOL[dtype], f"k slot {s}")
                assert torch.equal(v_cache[b, s], v[b, l])
            else:
                assert torch.equal(k_cache[b, s], k_before[b, s])
                assert torch.equal(v_cache[b, s], v_before[b, s])
    with pytest.raises(ValueError, match="start: slots"):
        rope_kv_write_reference(k, v, cos, sin, k_cache, v_cache, torch.tensor([S - L + 1]))


# ---------------------------------------------------------------------------------------------
# Triton launchers against the references

ROUTED = [(L, 0.6) for L in (1, 7, 63, 129)] + [(63, 0.0), (7, 1.0)]  # N = 0, all executing
ROPE_CASES = [("dense", L, 1.0) for L in (1, 7, 63, 129)] + [
    (form, L, p) for form in ("exact", "capacity") for L, p in ROUTED
]


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("form,L,p", ROPE_CASES)
@pytest.mark.parametrize("D,Hx", [(64, 4), (128, 1)])
def test_rope_kernel(dtype, form, L, p, D, Hx):
    from skipgpt.ops.rope import kernels

    B = 2
    pos = token_positions(B, L, start=3, pads=[2, 0]).flatten()
    cos, sin = cos_sin(pos, D, dtype, KERNEL_DEVICE)
    routes = make_routes(B, L, p, seed=L, device=KERNEL_DEVICE)
    if form == "dense":
        rows, count, M = None, None, B * L
    elif form == "exact":
        rows, count, M = routes.rows.clone(), None, routes.n
    else:
        rows, count, M = routes.rows_cap, routes.count, B * L
    x = randn(M, Hx, D, dtype=dtype, device=KERNEL_DEVICE, seed=L + D)
    with poisoned_outputs(kernels):
        out = kernels.rope(x, cos, sin, rows, count)
    assert out.shape == x.shape and out.dtype == dtype
    n = M if form == "dense" else routes.n
    want = rope_reference(x, cos, sin, rows, count)
    assert_rel(out[:n], want[:n], TOL[dtype])
    if form == "capacity" and n < M:
        assert torch.isnan(out[n:]).all(), "rows past the count were written"


@requires_triton
def test_rope_kernel_wide_tables():
    from skipgpt.ops.rope import kernels

    pos = torch.arange(7) + 100
    cos, sin = cos_sin(pos, 64, torch.float32, KERNEL_DEVICE)
    x = randn(7, 2, 64, dtype=torch.float16, device=KERNEL_DEVICE, seed=9)
    out = kernels.rope(x, cos, sin)
    assert out.dtype == torch.float16
    assert_rel(out, rope_reference(x, cos, sin), TOL[torch.float16])
    assert_rel(out, brute_rope(x, pos), TOL[torch.float16])


KV_CASES = [
    # L, Hk, D, start, spare slots at the end of the cache
    (1, 1, 64, 0, 0),
    (1, 2, 128, 37, 5),  # decode: one token at slot 37 of a bigger cache
    (7, 2, 64, 0, 3),
    (7, 1, 128, 9, 0),
    (63, 2, 64, 5, 2),
    (129, 1, 128, 0, 4),
]


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("L,Hk,D,start,spare", KV_CASES)
def test_kv_write_kernel(dtype, L, Hk, D, start, spare):
    from skipgpt.ops.rope import kernels

    B = 2
    S = start + L + spare
    pos = token_positions(B, L, start, pads=[0, 3])
    cos, sin = cos_sin(pos, D, dtype, KERNEL_DEVICE)
    k = randn(B, L, Hk, D, dtype=dtype, device=KERNEL_DEVICE, seed=L)
    v = randn(B, L, Hk, D, dtype=dtype, device=KERNEL_DEVICE, seed=L + 1)
    k_cache = torch.full((B, S, Hk, D), float("nan"), dtype=dtype, device=KERNEL_DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    start_t = torch.tensor([start], device=KERNEL_DEVICE)
    kernels.rope_kv_write(k, v, cos, sin, k_cache, v_cache, start_t)
    rope_kv_write_reference(k, v, cos, sin, want_k, want_v, start_t)
    step = slice(start, start + L)
    assert_rel(k_cache[:, step], want_k[:, step], TOL[dtype], "k")
    assert torch.equal(v_cache[:, step], v), "v must be copied bit for bit"
    # slots outside the step stay untouched (still NaN)
    for part in (slice(0, start), slice(start + L, S)):
        assert torch.isnan(k_cache[:, part]).all() and torch.isnan(v_cache[:, part]).all()


@requires_triton
def test_kv_write_kernel_drops_writes_past_the_cache():
    from skipgpt.ops.rope import kernels

    B, L, Hk, D, S, start = 2, 7, 1, 64, 10, 6  # slots 6..12 of a 10-slot cache
    cos, sin = cos_sin(token_positions(B, L, start, [0, 0]), D, torch.float32, KERNEL_DEVICE)
    k = randn(B, L, Hk, D, device=KERNEL_DEVICE, seed=1)
    v = randn(B, L, Hk, D, device=KERNEL_DEVICE, seed=2)
    # Pad the cache with a guard region behind it, and hand the kernel the first S slots only.
    big_k = torch.full((B, S + 8, Hk, D), float("nan"), device=KERNEL_DEVICE)
    big_v = torch.full_like(big_k, float("nan"))
    k_cache, v_cache = big_k[:, :S].contiguous(), big_v[:, :S].contiguous()
    kernels.rope_kv_write(k, v, cos, sin, k_cache, v_cache, torch.tensor([start], device=KERNEL_DEVICE))
    want_k = torch.full_like(k_cache, float("nan"))
    want_v = torch.full_like(v_cache, float("nan"))
    fit = S - start
    rope_kv_write_reference(k[:, :fit], v[:, :fit], cos[:, :fit].contiguous(), sin[:, :fit].contiguous(),
                            want_k, want_v, torch.tensor([start], device=KERNEL_DEVICE))
    assert_rel(k_cache[:, start:], want_k[:, start:], TOL[torch.float32])
    assert torch.equal(v_cache[:, start:], want_v[:, start:])
    assert torch.isnan(k_cache[:, :start]).all()


# ---------------------------------------------------------------------------------------------
# opcheck and errors


def test_opcheck():
    B, L, D = 2, 3, 16
    pos = token_positions(B, L, 2, [1, 0]).flatten()
    cos, sin = cos_sin(pos, D, torch.float32)
    routes = make_routes(B, L, 0.5, seed=3)
    x = randn(B * L, 2, D, seed=4)
    torch.library.opcheck(torch.ops.skipgpt.rope.default, (x, cos, sin))
    torch.library.opcheck(torch.ops.skipgpt.rope.default, (x[: routes.n].contiguous(), cos, sin, routes.rows.clone()))
    torch.library.opcheck(torch.ops.skipgpt.rope.default, (x, cos, sin, routes.rows_cap.clone(), routes.count.clone()))
    torch.library.opcheck(torch.ops.skipgpt.rope.default, (x.half(), cos, sin))  # wider tables
    k = randn(B, L, 1, D, seed=5)
    v = randn(B, L, 1, D, seed=6)
    cache = lambda seed: randn(B, L + 4, 1, D, seed=seed)
    c3, s3 = cos.view(B, L, D), sin.view(B, L, D)
    torch.library.opcheck(torch.ops.skipgpt.rope_kv_write.default, (k, v, c3, s3, cache(7), cache(8), torch.tensor([2])))
    torch.library.opcheck(torch.ops.skipgpt.rope_kv_write.default, (k.half(), v.half(), c3, s3, cache(7).half(), cache(8).half(), torch.tensor([0])))


def test_rope_kv_write_is_declared_mutating():
    schema = torch.ops.skipgpt.rope_kv_write.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"k_cache", "v_cache"}


def _rope_bad_cases():
    x = torch.zeros(4, 2, 8)
    cos = sin = torch.zeros(4, 8)
    rows = torch.zeros(2, dtype=torch.int32)
    return [
        ((x[0], cos, sin), ValueError, "x: expected a 3-d tensor"),
        ((x.long(), cos, sin), TypeError, "x: expected dtype"),
        ((torch.zeros(4, 2, 7), torch.zeros(4, 7), torch.zeros(4, 7)), ValueError, "x: head dim must be even"),
        ((x, torch.zeros(4, 6), sin), ValueError, "cos: dim 1 must equal x's head dim"),
        ((x, cos, torch.zeros(3, 8)), ValueError, "sin: dim 0 must equal cos's row count"),
        ((x, torch.zeros(5, 8), torch.zeros(5, 8)), ValueError, "cos: dim 0 must equal x's row count"),
        ((x, cos.int(), sin), TypeError, "cos: expected dtype"),
        ((torch.zeros(2, 4, 8).transpose(0, 1), cos, sin), ValueError, "x: expected a contiguous tensor"),
        ((x, torch.zeros(8, 4).t(), sin), ValueError, "cos: expected a contiguous tensor"),
        ((x[:2], cos, sin, rows.long()), TypeError, "rows: expected dtype int32"),
        ((x[:2], cos, sin, rows, torch.zeros(1)), TypeError, "count: expected dtype int32"),
        ((x[:2], cos, sin, rows, torch.zeros(2, dtype=torch.int32)), ValueError, "count: expected a single element"),
    ]


@pytest.mark.parametrize("case", range(len(_rope_bad_cases())))
def test_rope_rejects_bad_input(case):
    args, exc, msg = _rope_bad_cases()[case]
    with pytest.raises(exc, match=msg):
        rope(*args)


def _kv_bad_cases():
    B, L, Hk, D, S = 2, 3, 1, 8, 5
    k = v = torch.zeros(B, L, Hk, D)
    cos = sin = torch.zeros(B, L, D)
    kc = vc = torch.zeros(B, S, Hk, D)
    start = torch.tensor([0])
    return [
        ((k[0], v, cos, sin, kc, vc, start), ValueError, "k: expected a 4-d tensor"),
        ((k.int(), v.int(), cos, sin, kc.int(), vc.int(), start), TypeError, "k: expected dtype"),
        ((k, v.half(), cos, sin, kc, vc, start), TypeError, "v: dtype"),
        ((k, torch.zeros(B, L, 2, D), cos, sin, kc, vc, start), ValueError, "v: shape"),
        ((k, v, torch.zeros(B, L + 1, D), sin, kc, vc, start), ValueError, "cos: expected shape"),
        ((k, v, cos, torch.zeros(B, L, D - 2), kc, vc, start), ValueError, "sin: expected shape"),
        ((k, v, cos, sin, kc.half(), vc, start), TypeError, "k_cache: dtype"),
        ((k, v, cos, sin, torch.zeros(B + 1, S, Hk, D), vc, start), ValueError, "k_cache: expected shape"),
        ((k, v, cos, sin, kc, torch.zeros(B, S, 2, D), start), ValueError, "v_cache: expected shape"),
        ((k, v, cos, sin, kc, torch.zeros(B, S + 1, Hk, D), start), ValueError, "v_cache: shape"),
        ((k, v, cos, sin, torch.zeros(B, S, Hk, 2 * D)[..., :D], vc, start), ValueError, "k_cache: expected a contiguous"),
        ((k, v, cos, sin, kc, vc, start.int()), TypeError, "start: expected dtype int64"),
        ((k, v, cos, sin, kc, vc, torch.tensor([0, 1])), ValueError, "start: dim 0"),
        ((k, v, cos, sin, kc, vc, torch.tensor(0)), ValueError, "start: expected a 1-d tensor"),
        ((torch.zeros(B, L, Hk, 7),) * 2 + (torch.zeros(B, L, 7),) * 2 + (torch.zeros(B, S, Hk, 7),) * 2 + (start,),
         ValueError, "k: head dim must be even"),
    ]


@pytest.mark.parametrize("case", range(len(_kv_bad_cases())))
def test_rope_kv_write_rejects_bad_input(case):
    args, exc, msg = _kv_bad_cases()[case]
    with pytest.raises(exc, match=msg):
        rope_kv_write(*args)
