import pytest
import torch

from skipgpt.ops import norm
from skipgpt.ops.norm import rms_norm_reference, rms_norm_split_reference
from tests.helpers import KERNEL_DEVICE, KERNEL_DTYPES, TOL, requires_triton
from tests.ops.opsutil import assert_rel, make_routes, poisoned_outputs, randn

EPS = 1e-5
CPU_DTYPES = [torch.float32, torch.float16]


def brute_rms_norm(x, w, eps, dtype):
    """Row by row from the formula, in float64, rounding to `dtype` where Hugging Face's RMSNorm
    does (the normalised row, before the weight)."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        row = x[t].double()
        normed = row / torch.sqrt((row * row).sum() / row.numel() + eps)
        out[t] = w.double() * normed.to(dtype).double()
    return out


# ---------------------------------------------------------------------------------------------
# the reference against the formula


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_reference_matches_formula(dtype):
    x = randn(11, 48, dtype=dtype, seed=1, scale=3.0)
    w = randn(48, dtype=dtype, seed=2)
    want = brute_rms_norm(x, w, EPS, dtype)
    got = rms_norm_reference(x, w, EPS)
    assert got.dtype == dtype and got.shape == x.shape
    assert_rel(got, want, TOL[dtype], "dense")

    rows = torch.tensor([10, 0, 3, 3, 7], dtype=torch.int32)
    got = rms_norm_reference(x, w, EPS, rows)
    assert got.shape == (5, 48)
    assert_rel(got, want[rows.long()], TOL[dtype], "gathered")

    # capacity form: rows at or past count are zero in the reference
    cap = torch.tensor([2, 5, 9, -1, -1, -1], dtype=torch.int32)
    got = rms_norm_reference(x, w, EPS, cap, torch.tensor([3], dtype=torch.int32))
    assert_rel(got[:3], want[cap[:3].long()], TOL[dtype], "capacity")
    assert (got[3:] == 0).all()


def test_reference_rounds_like_hugging_face():
    # fp16: x/rms is rounded to fp16 before the weight multiplies it.
    x = randn(5, 64, dtype=torch.float16, seed=3)
    w = randn(64, dtype=torch.float16, seed=4)
    xf = x.float()
    hf = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.float16)
    torch.testing.assert_close(rms_norm_reference(x, w, EPS), hf, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_split_reference_matches_formula(dtype):
    B, L = 3, 5
    routes = make_routes(B, L, 0.5, seed=5)
    x = randn(B * L, 40, dtype=dtype, seed=6)
    w = randn(40, dtype=dtype, seed=7)
    want = brute_rms_norm(x, w, EPS, dtype)
    for num_rows in (routes.n, B * L):
        y, yq = rms_norm_split_reference(x, w, EPS, routes.slot, num_rows)
        assert y.shape == x.shape and yq.shape == (num_rows, 40)
        assert_rel(y, want, TOL[dtype], "y")
        for t in range(B * L):
            s = int(routes.slot[t])
            if s >= 0:
                assert torch.equal(yq[s], y[t]), f"yq[{s}] is not y[{t}]"


# ---------------------------------------------------------------------------------------------
# Triton launchers against the reference


def _inputs(T, H, dtype, seed):
    x = randn(T, H, dtype=dtype, device=KERNEL_DEVICE, seed=seed, scale=2.0)
    w = randn(H, dtype=dtype, device=KERNEL_DEVICE, seed=seed + 1)
    return x, w


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("L", [1, 7, 63, 129])
@pytest.mark.parametrize("H", [48, 128])
def test_kernel_dense(dtype, L, H):
    from skipgpt.ops.norm import kernels

    x, w = _inputs(2 * L, H, dtype, seed=L)
    with poisoned_outputs(kernels):
        out = kernels.rms_norm(x, w, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert_rel(out, rms_norm_reference(x, w, EPS), TOL[dtype])


# (L, share of executing tokens): odd lengths at a random share, plus N = 0 and all executing
ROUTE_CASES = [(1, 0.6), (7, 0.6), (63, 0.6), (129, 0.6), (63, 0.0), (7, 1.0), (1, 0.0)]


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("L,p", ROUTE_CASES)
@pytest.mark.parametrize("form", ["exact", "capacity"])
def test_kernel_gather(dtype, L, p, form):
    from skipgpt.ops.norm import kernels

    B, H = 2, 48
    x, w = _inputs(B * L, H, dtype, seed=L)
    routes = make_routes(B, L, p, seed=L, device=KERNEL_DEVICE)
    if form == "exact":
        rows, count = routes.rows.clone(), None
    else:
        rows, count = routes.rows_cap, routes.count
    with poisoned_outputs(kernels):
        out = kernels.rms_norm(x, w, EPS, rows, count)
    assert out.shape == (rows.shape[0], H)
    want = rms_norm_reference(x, w, EPS, rows, count)
    n = routes.n
    assert_rel(out[:n], want[:n], TOL[dtype])
    if form == "capacity" and n < B * L:
        # rows past the count are unspecified; the poison shows the kernel did not touch them
        assert torch.isnan(out[n:]).all()


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("L,p", ROUTE_CASES)
@pytest.mark.parametrize("form", ["exact", "capacity"])
def test_kernel_split(dtype, L, p, form):
    from skipgpt.ops.norm import kernels

    B, H = 2, 128 if L == 63 else 48
    x, w = _inputs(B * L, H, dtype, seed=L + 100)
    routes = make_routes(B, L, p, seed=L + 1, device=KERNEL_DEVICE)
    num_rows = routes.n if form == "exact" else B * L
    with poisoned_outputs(kernels):
        y, yq = kernels.rms_norm_split(x, w, EPS, routes.slot, num_rows)
    want_y, want_yq = rms_norm_split_reference(x, w, EPS, routes.slot, num_rows)
    assert y.shape == x.shape and yq.shape == (num_rows, H)
    assert_rel(y, want_y, TOL[dtype], "y")
    n = routes.n
    assert_rel(yq[:n], want_yq[:n], TOL[dtype], "yq")
    # the compacted copy holds exactly the dense rows of the executing tokens
    assert torch.equal(yq[:n], y[routes.rows.long()])


# ---------------------------------------------------------------------------------------------
# opcheck and errors


def test_opcheck():
    x = randn(6, 16, seed=8)
    w = randn(16, seed=9)
    routes = make_routes(2, 3, 0.5, seed=10)
    torch.library.opcheck(torch.ops.skipgpt.rms_norm.default, (x, w, EPS))
    torch.library.opcheck(torch.ops.skipgpt.rms_norm.default, (x, w, EPS, routes.rows.clone()))
    torch.library.opcheck(torch.ops.skipgpt.rms_norm.default, (x, w, EPS, routes.rows_cap.clone(), routes.count.clone()))
    torch.library.opcheck(torch.ops.skipgpt.rms_norm_split.default, (x, w, EPS, routes.slot, routes.n))
    torch.library.opcheck(torch.ops.skipgpt.rms_norm_split.default, (x, w, EPS, routes.slot, 6))
    none = make_routes(2, 3, 0.0)  # nothing executes: an empty compacted copy
    torch.library.opcheck(torch.ops.skipgpt.rms_norm_split.default, (x.half(), w.half(), EPS, none.slot, 0))


def test_op_matches_reference_on_cpu():
    x = randn(6, 16, seed=8)
    w = randn(16, seed=9)
    rows = torch.tensor([5, 1], dtype=torch.int32)
    torch.testing.assert_close(torch.ops.skipgpt.rms_norm(x, w, EPS, rows), rms_norm_reference(x, w, EPS, rows))


def _bad_rms_norm_cases():
    x, w = torch.zeros(4, 8), torch.zeros(8)
    rows = torch.zeros(3, dtype=torch.int32)
    count = torch.ones(1, dtype=torch.int32)
    return [
        ((x.long(), w.long(), EPS), TypeError, "x: expected dtype"),
        ((x.double(), w.double(), EPS), TypeError, "x: expected dtype"),
        ((x[None], w, EPS), ValueError, "x: expected a 2-d tensor"),
        ((x, w.half(), EPS), TypeError, "weight: dtype"),
        ((x, torch.zeros(2, 4), EPS), ValueError, "weight: expected a 1-d tensor"),
        ((x, torch.zeros(7), EPS), ValueError, "weight: dim 0 must equal x's hidden size"),
        ((torch.zeros(8, 4).t(), w, EPS), ValueError, "x: expected a contiguous tensor"),
        ((x, w, EPS, rows.long()), TypeError, "rows: expected dtype int32"),
        ((x, w, EPS, rows[None]), ValueError, "rows: expected a 1-d tensor"),
        ((x, w, EPS, torch.zeros(6, dtype=torch.int32)[::2]), ValueError, "rows: expected unit stride"),
        ((x, w, EPS, rows, count.long()), TypeError, "count: expected dtype int32"),
        ((x, w, EPS, rows, torch.ones(2, dtype=torch.int32)), ValueError, "count: expected a single element"),
        ((x, w, EPS, None, count), ValueError, "count: given without rows"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_rms_norm_cases())))
def test_rms_norm_rejects_bad_input(case):
    args, exc, msg = _bad_rms_norm_cases()[case]
    with pytest.raises(exc, match=msg):
        norm.rms_norm(*args)


def test_rms_norm_split_rejects_bad_input():
    x, w = torch.zeros(4, 8), torch.zeros(8)
    slot = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="slot: dim 0 must equal x's row count"):
        norm.rms_norm_split(x, w, EPS, slot[:3], 2)
    with pytest.raises(TypeError, match="slot: expected dtype int32"):
        norm.rms_norm_split(x, w, EPS, slot.long(), 2)
    with pytest.raises(ValueError, match="num_rows: must be >= 0"):
        norm.rms_norm_split(x, w, EPS, slot, -1)
    with pytest.raises(TypeError, match="x: expected dtype"):
        norm.rms_norm_split(x.int(), w, EPS, slot, 2)
    with pytest.raises(TypeError, match="weight: dtype"):
        norm.rms_norm_split(x, w.half(), EPS, slot, 2)
