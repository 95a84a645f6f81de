import pytest
import torch
import torch.nn.functional as F

from skipgpt.ops import linear
from skipgpt.ops.linear import gated_mlp_reference, linear_residual_reference, linear_rows_reference
from tests.helpers import KERNEL_DEVICE, KERNEL_DTYPES, TOL, requires_triton
from tests.ops.opsutil import assert_rel, make_routes, poisoned_outputs, randn

ACT64 = {"silu": lambda t: t / (1 + torch.exp(-t)), "relu": lambda t: t.clamp(min=0)}


def brute_linear(x, w, b=None):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def brute_gated(x, wg, wu, activation):
    return ACT64[activation](brute_linear(x, wg)) * brute_linear(x, wu)


def brute_residual(residual, x, w, slot=None, count=None):
    """Token by token: residual[t] + x[slot[t]] @ w.T where slot[t] is a valid row, else the
    residual row itself (returned as is, for bit-exact comparison)."""
    T = residual.shape[0]
    limit = x.shape[0] if count is None else min(int(count), x.shape[0])
    out = residual.double().clone()
    executes = []
    for t in range(T):
        s = t if slot is None else int(slot[t])
        if 0 <= s < limit:
            out[t] = residual[t].double() + x[s].double() @ w.double().T
            executes.append(t)
    return out, torch.tensor(executes, dtype=torch.long)


def _w(N, K, dtype, device="cpu", seed=0):
    return randn(N, K, dtype=dtype, device=device, seed=seed, scale=K ** -0.5)


# ---------------------------------------------------------------------------------------------
# the references against float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_rows_reference(dtype):
    x, w, b = randn(9, 24, dtype=dtype, seed=1), _w(10, 24, dtype, seed=2), randn(10, dtype=dtype, seed=3)
    assert_rel(linear_rows_reference(x, w), brute_linear(x, w), TOL[dtype], "no bias")
    assert_rel(linear_rows_reference(x, w, b), brute_linear(x, w, b), TOL[dtype], "bias")
    got = linear_rows_reference(x, w, b, torch.tensor([4], dtype=torch.int32))
    assert_rel(got[:4], brute_linear(x[:4], w, b), TOL[dtype], "count")
    assert (got[4:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_gated_mlp_reference(dtype, activation):
    x, wg, wu = randn(9, 24, dtype=dtype, seed=1), _w(40, 24, dtype, seed=2), _w(40, 24, dtype, seed=3)
    got = gated_mlp_reference(x, wg, wu, activation)
    assert got.dtype == dtype and got.shape == (9, 40)
    assert_rel(got, brute_gated(x, wg, wu, activation), TOL[dtype])
    got = gated_mlp_reference(x, wg, wu, activation, torch.tensor([0], dtype=torch.int32))
    assert (got == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", ["dense", "exact", "capacity"])
@pytest.mark.parametrize("p", [0.0, 0.6, 1.0])
def test_linear_residual_reference(dtype, form, p):
    B, L, K, N = 3, 5, 24, 16
    routes = make_routes(B, L, p, seed=4)
    residual = randn(B * L, N, dtype=dtype, seed=5)
    w = _w(N, K, dtype, seed=6)
    if form == "dense":
        x, slot, count = randn(B * L, K, dtype=dtype, seed=7), None, None
    elif form == "exact":
        x, slot, count = randn(routes.n, K, dtype=dtype, seed=7), routes.slot, None
    else:
        x, slot, count = randn(B * L, K, dtype=dtype, seed=7), routes.slot, routes.count
    got = linear_residual_reference(residual, x, w, slot, count)
    want, executes = brute_residual(residual, x, w, slot, count)
    assert got.dtype == dtype
    assert_rel(got[executes], want[executes], TOL[dtype])
    skips = torch.ones(B * L, dtype=torch.bool)
    skips[executes] = False
    assert torch.equal(got[skips], residual[skips]), "skipping tokens must keep their residual bit for bit"
    if form != "dense":
        assert len(executes) == routes.n


# ---------------------------------------------------------------------------------------------
# Triton launchers against the references

# (rows, executing count or "all"/"none"): T = B*L for L in 1, 7, 63, 129 with B = 2, and B = 1 at L = 1
ROW_CASES = [(1, "all"), (2, "none"), (14, 9), (126, "all"), (126, 0), (258, 101)]


def _count(M, c):
    n = M if c == "all" else 0 if c == "none" else c
    return n, torch.tensor([n], dtype=torch.int32, device=KERNEL_DEVICE)


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,c", ROW_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_rows_gemm(dtype, M, c, bias):
    from skipgpt.ops.linear import kernels

    K, N = 72, 40  # neither a multiple of the tile sizes
    x = randn(M, K, dtype=dtype, device=KERNEL_DEVICE, seed=M)
    w = _w(N, K, dtype, KERNEL_DEVICE, seed=M + 1)
    b = randn(N, dtype=dtype, device=KERNEL_DEVICE, seed=M + 2) if bias else None
    n, count = _count(M, c)
    with poisoned_outputs(kernels):
        out = kernels.rows_gemm(x, w, count, bias=b)
    assert out.shape == (M, N) and out.dtype == dtype
    want = linear_rows_reference(x, w, b, count)
    assert_rel(out[:n], want[:n], TOL[dtype])
    assert torch.isnan(out[n:]).all(), "rows at or past the count were written"


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,c", ROW_CASES)
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_rows_gemm_gated(dtype, M, c, activation):
    from skipgpt.ops.linear import kernels

    K, I = 48, 56
    x = randn(M, K, dtype=dtype, device=KERNEL_DEVICE, seed=M)
    wg = _w(I, K, dtype, KERNEL_DEVICE, seed=M + 1)
    wu = _w(I, K, dtype, KERNEL_DEVICE, seed=M + 2)
    n, count = _count(M, c)
    with poisoned_outputs(kernels):
        out = kernels.rows_gemm(x, wg, count, w2=wu, activation=activation)
    want = gated_mlp_reference(x, wg, wu, activation, count)
    assert out.shape == (M, I)
    assert_rel(out[:n], want[:n], TOL[dtype])
    assert torch.isnan(out[n:]).all()


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("rows", [1, 20, 130])  # one per tile regime of `_tiles` on a GPU
@pytest.mark.parametrize("kind", ["plain", "gated", "residual"])
def test_rows_gemm_with_the_gpu_tiles(monkeypatch, dtype, rows, kind):
    """The interpreter normally runs small tiles; here rows_gemm runs the tiles a GPU picks,
    over K and N that no tile divides (SmolLM2's K=576 leaves a tail of a 256-wide K tile)."""
    from skipgpt.ops.linear import kernels

    gpu_tiles = kernels._tiles
    monkeypatch.setattr(kernels, "_tiles", lambda r, size, gated, on_gpu: gpu_tiles(r, size, gated, True))
    K, N = 300, 100
    x = randn(rows, K, dtype=dtype, device=KERNEL_DEVICE, seed=rows)
    w = _w(N, K, dtype, KERNEL_DEVICE, seed=rows + 1)
    n, count = _count(rows, max(1, rows * 7 // 10))
    if kind == "residual":
        routes = make_routes(1, rows, 0.3, seed=rows, device=KERNEL_DEVICE)
        residual = randn(rows, N, dtype=dtype, device=KERNEL_DEVICE, seed=rows + 2)
        with poisoned_outputs(kernels):
            out = kernels.rows_gemm(x, w, routes.count, residual=residual, slot=routes.slot)
        return _check_residual(out, residual, x, w, routes, dtype)
    w2 = _w(N, K, dtype, KERNEL_DEVICE, seed=rows + 3) if kind == "gated" else None
    with poisoned_outputs(kernels):
        out = kernels.rows_gemm(x, w, count, w2=w2, activation="silu" if w2 is not None else "none")
    want = gated_mlp_reference(x, w, w2, "silu", count) if w2 is not None else linear_rows_reference(x, w, None, count)
    assert_rel(out[:n], want[:n], TOL[dtype])
    assert torch.isnan(out[n:]).all()


RESIDUAL_CASES = [(2, 1, 1.0), (1, 1, 0.0), (2, 7, 0.6), (2, 63, 0.0), (2, 63, 1.0), (2, 129, 0.75)]


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,L,p", RESIDUAL_CASES)
def test_rows_gemm_residual(dtype, B, L, p):
    from skipgpt.ops.linear import kernels

    K, N = 40, 48
    T = B * L
    routes = make_routes(B, L, p, seed=L, device=KERNEL_DEVICE)
    x = randn(T, K, dtype=dtype, device=KERNEL_DEVICE, seed=L + 1)  # capacity rows: x[:n] are live
    x[routes.n:] = float("nan")  # capacity padding rows must never be read
    residual = randn(T, N, dtype=dtype, device=KERNEL_DEVICE, seed=L + 2)
    w = _w(N, K, dtype, KERNEL_DEVICE, seed=L + 3)
    with poisoned_outputs(kernels):
        out = kernels.rows_gemm(x, w, routes.count, residual=residual, slot=routes.slot)
    assert out.shape == (T, N)
    _check_residual(out, residual, x, w, routes, dtype)


def _check_residual(out, residual, x, w, routes, dtype):
    flat = routes.execute.flatten()
    assert torch.equal(out[~flat], residual[~flat]), "skipping tokens must keep their residual bit for bit"
    want = linear_residual_reference(residual, x, w, routes.slot, routes.count)
    assert_rel(out[flat], want[flat], TOL[dtype])
    assert torch.isfinite(out).all(), "some token row was not written"


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,N", [(0, 40), (1, 40), (7, 1100), (129, 24)])
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_act_mul(dtype, M, N, activation):
    from skipgpt.ops.linear import kernels

    g = randn(M, N, dtype=dtype, device=KERNEL_DEVICE, seed=N, scale=3.0)
    u = randn(M, N, dtype=dtype, device=KERNEL_DEVICE, seed=N + 1)
    with poisoned_outputs(kernels):
        out = kernels.act_mul(g, u, activation)
    assert out.shape == (M, N) and out.dtype == dtype
    # Hugging Face rounds after the activation and after the product, as the reference does
    want = (F.silu(g) if activation == "silu" else F.relu(g)) * u
    assert_rel(out, want, TOL[dtype], "vs torch")
    assert_rel(out, ACT64[activation](g.double()) * u.double(), TOL[dtype], "vs float64")


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,L,p", RESIDUAL_CASES)
@pytest.mark.parametrize("N", [48, 1100])
def test_scatter_residual(dtype, B, L, p, N):
    from skipgpt.ops.linear import kernels

    T = B * L
    routes = make_routes(B, L, p, seed=L + N, device=KERNEL_DEVICE)
    residual = randn(T, N, dtype=dtype, device=KERNEL_DEVICE, seed=L)
    y = randn(routes.n, N, dtype=dtype, device=KERNEL_DEVICE, seed=L + 1)
    with poisoned_outputs(kernels):
        out = kernels.scatter_residual(residual, y, routes.slot)
        dense = kernels.scatter_residual(residual, residual * 0.5, None)
    flat = routes.execute.flatten()
    assert torch.equal(out[~flat], residual[~flat])
    want = residual.clone()
    want[flat] = residual[flat] + y  # executing rows in ascending token order
    assert torch.equal(out, want), "the fp32 sum rounded once equals the dtype add"
    assert torch.equal(dense, residual + residual * 0.5)


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,L,p", [(2, 7, 0.6), (2, 63, 0.0), (1, 129, 1.0)])
def test_exact_paths_as_registered(dtype, B, L, p):
    """The CUDA registrations' exact paths: cuBLAS GEMMs (F.linear) finished by the Triton
    epilogues act_mul and scatter_residual."""
    from skipgpt.ops.linear import kernels

    K, I, H = 40, 56, 24
    routes = make_routes(B, L, p, seed=L, device=KERNEL_DEVICE)
    x = randn(routes.n, K, dtype=dtype, device=KERNEL_DEVICE, seed=1)
    wg, wu = _w(I, K, dtype, KERNEL_DEVICE, 2), _w(I, K, dtype, KERNEL_DEVICE, 3)
    with poisoned_outputs(kernels):
        a = kernels.act_mul(F.linear(x, wg), F.linear(x, wu), "silu")
    assert_rel(a, gated_mlp_reference(x, wg, wu, "silu"), TOL[dtype], "gated")
    assert_rel(a, brute_gated(x, wg, wu, "silu"), TOL[dtype], "gated vs float64")
    wd = _w(H, I, dtype, KERNEL_DEVICE, 4)
    residual = randn(B * L, H, dtype=dtype, device=KERNEL_DEVICE, seed=5)
    with poisoned_outputs(kernels):
        out = kernels.scatter_residual(residual, F.linear(a, wd), routes.slot)
    _check_residual(out, residual, a, wd, routes, dtype)


# ---------------------------------------------------------------------------------------------
# opcheck and errors


def test_opcheck():
    routes = make_routes(2, 4, 0.5, seed=1)
    T, K, N = 8, 12, 10
    x, w, b = randn(T, K, seed=2), _w(N, K, torch.float32, seed=3), randn(N, seed=4)
    cnt = routes.count.clone()
    torch.library.opcheck(torch.ops.skipgpt.linear_rows.default, (x, w))
    torch.library.opcheck(torch.ops.skipgpt.linear_rows.default, (x, w, b))
    torch.library.opcheck(torch.ops.skipgpt.linear_rows.default, (x, w, b, cnt))
    torch.library.opcheck(torch.ops.skipgpt.linear_rows.default, (x.half(), w.half(), None, cnt))
    wu = _w(N, K, torch.float32, seed=5)
    for act in ("silu", "relu"):
        torch.library.opcheck(torch.ops.skipgpt.gated_mlp.default, (x, w, wu, act))
        torch.library.opcheck(torch.ops.skipgpt.gated_mlp.default, (x, w, wu, act, cnt))
    residual = randn(T, N, seed=6)
    xe = randn(routes.n, K, seed=7)
    torch.library.opcheck(torch.ops.skipgpt.linear_residual.default, (residual, x, w))
    torch.library.opcheck(torch.ops.skipgpt.linear_residual.default, (residual, xe, w, routes.slot.clone()))
    torch.library.opcheck(torch.ops.skipgpt.linear_residual.default, (residual, x, w, routes.slot.clone(), cnt))
    none = make_routes(2, 4, 0.0)  # exact form with no executing token: x has no rows
    torch.library.opcheck(torch.ops.skipgpt.linear_residual.default, (residual, x[:0], w, none.slot.clone()))
    torch.library.opcheck(torch.ops.skipgpt.linear_rows.default, (x[:0], w, b))
    torch.library.opcheck(torch.ops.skipgpt.gated_mlp.default, (x[:0], w, wu, "silu"))


def _bad_cases():
    x, w, b = torch.zeros(4, 6), torch.zeros(5, 6), torch.zeros(5)
    count = torch.ones(1, dtype=torch.int32)
    res, slot = torch.zeros(4, 5), torch.zeros(4, dtype=torch.int32)
    lr, gm, rs = linear.linear_rows, linear.gated_mlp, linear.linear_residual
    return [
        (lr, (x[0], w), ValueError, "x: expected a 2-d tensor"),
        (lr, (x.long(), w.long()), TypeError, "x: expected dtype"),
        (lr, (x, w.half()), TypeError, "weight: dtype"),
        (lr, (x, torch.zeros(5, 7)), ValueError, "weight: dim 1 must equal x's feature size"),
        (lr, (x, w[0]), ValueError, "weight: expected a 2-d tensor"),
        (lr, (x, w, torch.zeros(4)), ValueError, "bias: dim 0 must equal weight's output size"),
        (lr, (x, w, b.half()), TypeError, "bias: dtype"),
        (lr, (x, w, None, count.long()), TypeError, "count: expected dtype int32"),
        (lr, (x, w, None, torch.ones(2, dtype=torch.int32)), ValueError, "count: expected a single element"),
        (lr, (torch.zeros(6, 4).t(), w), ValueError, "x: expected a contiguous tensor"),
        (lr, (x, torch.zeros(6, 5).t()), ValueError, "weight: expected a contiguous tensor"),
        (gm, (x, w, torch.zeros(4, 6), "silu"), ValueError, "w_up: shape"),
        (gm, (x, w, w.half(), "silu"), TypeError, "w_up: dtype"),
        (gm, (x, w, w, "gelu"), ValueError, "activation: expected one of"),
        (gm, (x, torch.zeros(5, 3), w, "relu"), ValueError, "w_gate: dim 1"),
        (rs, (torch.zeros(4, 3), x, w), ValueError, "residual: dim 1 must equal weight's output size"),
        (rs, (res.half(), x, w), TypeError, "residual: dtype"),
        (rs, (res[0], x, w), ValueError, "residual: expected a 2-d tensor"),
        (rs, (torch.zeros(3, 5), x, w), ValueError, "x: dim 0 must equal residual's row count"),
        (rs, (res, x, w, slot[:3]), ValueError, "slot: dim 0 must equal residual's row count"),
        (rs, (res, x, w, slot.long()), TypeError, "slot: expected dtype int32"),
        (rs, (res, x, w, None, count), ValueError, "count: given without slot"),
        (rs, (torch.zeros(5, 4).t(), x, w), ValueError, "residual: expected a contiguous tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_rejects_bad_input(case):
    op, args, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg):
        op(*args)
