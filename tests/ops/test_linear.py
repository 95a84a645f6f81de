import pytest
import torch
import torch.nn.functional as F

from skipgpt.ops import linear
from skipgpt.ops.linear import gated_mlp_reference, linear_residual_reference, linear_rows_reference
from tests.helpers import KERNEL_DEVICE, KERNEL_DTYPES, TOL, poison, requires_triton
from tests.ops.opsutil import assert_rel, make_routes, poisoned_outputs, randn

ACT64 = {"silu": lambda t: t / (1 + torch.exp(-t)), "relu": lambda t: t.clamp(min=0)}


def brute_linear(x, w, b=None):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def brute_gated(x, wg, wu, activation):
    return ACT64[activation](brute_linear(x, wg)) * brute_linear(x, wu)


def brute_residual(residual, x, w, slot=None, count=None, rows=None):
    """Token by token: residual[t] + x[slot[t]] @ w.T where slot[t] is a valid row (and, with
    rows, rows[slot[t]] == t), else the residual row itself (returned as is, for bit-exact
    comparison)."""
    T = residual.shape[0]
    limit = x.shape[0] if count is None else min(int(count), x.shape[0])
    out = residual.double().clone()
    executes = []
    for t in range(T):
        s = t if slot is None else int(slot[t])
        if 0 <= s < limit and (rows is None or int(rows[s]) == t):
            out[t] = residual[t].double() + x[s].double() @ w.double().T
            executes.append(t)
    return out, torch.tensor(executes, dtype=torch.long)


def _w(N, K, dtype, device="cpu", seed=0):
    return randn(N, K, dtype=dtype, device=device, seed=seed, scale=K ** -0.5)


def force_grid(monkeypatch, grid: str) -> None:
    """Make rows_gemm launch `grid` ("per-tile" or "persistent") at any row count: it takes the
    persistent grid only above PER_TILE_MAX_ROWS rows, more than these tests run."""
    from skipgpt.ops.linear import kernels

    monkeypatch.setattr(kernels, "PER_TILE_MAX_ROWS", -1 if grid == "persistent" else 1 << 62)  # -1: even 0 rows


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
    rows = routes.rows_cap if form == "capacity" else None
    got = linear_residual_reference(residual, x, w, slot, count, rows)
    want, executes = brute_residual(residual, x, w, slot, count, rows)
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
@pytest.mark.parametrize("rows", [1, 20, 130, 300, 600])  # one per tile regime of `_tiles` on a GPU
@pytest.mark.parametrize("kind", ["plain", "gated", "residual"])
def test_rows_gemm_with_the_gpu_tiles(monkeypatch, dtype, rows, kind):
    """The interpreter normally runs small tiles; here rows_gemm runs the tiles a GPU picks,
    over K and N that no tile divides (SmolLM2's K=576 leaves a tail of a 256-wide K tile)."""
    from skipgpt.ops.linear import kernels

    gpu_tiles = kernels._tiles
    monkeypatch.setattr(kernels, "_tiles", lambda r, size, kind, on_gpu: gpu_tiles(r, size, kind, True))
    K, N = 300, 100
    x = randn(rows, K, dtype=dtype, device=KERNEL_DEVICE, seed=rows)
    w = _w(N, K, dtype, KERNEL_DEVICE, seed=rows + 1)
    n, count = _count(rows, max(1, rows * 7 // 10))
    if kind == "residual":
        routes = make_routes(1, rows, 0.3, seed=rows, device=KERNEL_DEVICE)
        residual = randn(rows, N, dtype=dtype, device=KERNEL_DEVICE, seed=rows + 2)
        with poisoned_outputs(kernels):
            out = kernels.rows_gemm(x, w, routes.count, residual=residual, rows=routes.rows_cap, slot=routes.slot)
        return _check_residual(out, residual, x, w, routes, dtype)
    w2 = _w(N, K, dtype, KERNEL_DEVICE, seed=rows + 3) if kind == "gated" else None
    with poisoned_outputs(kernels):
        out = kernels.rows_gemm(x, w, count, w2=w2, activation="silu" if w2 is not None else "none")
    want = gated_mlp_reference(x, w, w2, "silu", count) if w2 is not None else linear_rows_reference(x, w, None, count)
    assert_rel(out[:n], want[:n], TOL[dtype])
    assert torch.isnan(out[n:]).all()


@requires_triton
# Tiles far bigger, far smaller than the rows'; 1024 also takes the persistent grid (as the single
# graph's long prefills do) for rows that alone would run one program per tile.
@pytest.mark.parametrize("rows,tile_rows", [(20, 512), (20, 1024), (300, 1)])
@pytest.mark.parametrize("kind", ["plain", "gated", "residual"])
def test_rows_gemm_tile_rows_picks_tiles_not_results(monkeypatch, rows, tile_rows, kind):
    """tile_rows (what compiled code under torch.cond passes) changes the tiles, not the output."""
    from skipgpt.ops.linear import kernels

    gpu_tiles, picked = kernels._tiles, []

    def tiles(r, size, kind, on_gpu):
        picked.append(r)
        return gpu_tiles(r, size, kind, True)

    monkeypatch.setattr(kernels, "_tiles", tiles)
    K, N = 100, 40
    x = randn(rows, K, device=KERNEL_DEVICE, seed=rows)
    w = _w(N, K, torch.float32, KERNEL_DEVICE, seed=rows + 1)
    n, count = _count(rows, rows * 7 // 10)
    if kind == "residual":
        routes = make_routes(1, rows, 0.3, seed=rows, device=KERNEL_DEVICE)
        residual = randn(rows, N, device=KERNEL_DEVICE, seed=rows + 2)
        with poisoned_outputs(kernels):
            out = kernels.rows_gemm(x, w, routes.count, residual=residual, rows=routes.rows_cap, slot=routes.slot,
                                        tile_rows=tile_rows)
        _check_residual(out, residual, x, w, routes, torch.float32)
    else:
        w2 = _w(N, K, torch.float32, KERNEL_DEVICE, seed=rows + 3) if kind == "gated" else None
        with poisoned_outputs(kernels):
            out = kernels.rows_gemm(x, w, count, w2=w2, activation="silu" if w2 is not None else "none",
                                    tile_rows=tile_rows)
        want = gated_mlp_reference(x, w, w2, "silu", count) if w2 is not None else linear_rows_reference(x, w, None, count)
        assert_rel(out[:n], want[:n], TOL[torch.float32])
    assert picked == [tile_rows]


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
        out = kernels.rows_gemm(x, w, routes.count, residual=residual, rows=routes.rows_cap, slot=routes.slot)
    assert out.shape == (T, N)
    _check_residual(out, residual, x, w, routes, dtype)


@requires_triton
@pytest.mark.parametrize("grid", ["per-tile", "persistent"])
def test_rows_gemm_residual_writes_each_token_once_whatever_the_indices(monkeypatch, grid):
    """rows and slot that are not each other's inverse (device data nobody checks): every token
    is still written exactly once, by the GEMM where rows[slot[t]] == t, else with its residual."""
    from skipgpt.ops.linear import kernels

    force_grid(monkeypatch, grid)
    gpu_tiles = kernels._tiles
    monkeypatch.setattr(kernels, "_tiles", lambda r, size, kind, on_gpu: gpu_tiles(r, size, kind, True))
    B, L, K, N = 2, 70, 24, 40
    T = B * L
    routes = make_routes(B, L, 0.7, seed=8, device=KERNEL_DEVICE)
    n = routes.n
    rows, slot = routes.rows_cap.clone(), routes.slot.clone()
    t0, t1, t2 = (int(rows[i]) for i in (0, 1, 2))
    rows[0] = t1  # rows[0] and rows[1] both name t1: only row 1 is t1's (slot[t1] == 1); t0 has no row
    rows[2] = T + 5  # a token past the end: t2's slot points at a row that is not its own
    slot[int(torch.nonzero(slot < 0)[0])] = n - 1  # a skipping token claims the last row, which is not its
    x = randn(T, K, device=KERNEL_DEVICE, seed=9)
    residual = randn(T, N, device=KERNEL_DEVICE, seed=10)
    w = _w(N, K, torch.float32, KERNEL_DEVICE, seed=11)
    with poisoned_outputs(kernels):
        out = kernels.rows_gemm(x, w, routes.count, residual=residual, rows=rows, slot=slot)
    want, executes = brute_residual(residual, x, w, slot, routes.count, rows)
    assert torch.isfinite(out).all(), "some token row was not written"
    assert len(executes) == n - 2 and t0 not in executes and t2 not in executes
    skips = torch.ones(T, dtype=torch.bool)
    skips[executes] = False
    assert torch.equal(out[skips.to(out.device)], residual[skips.to(out.device)])
    assert_rel(out[executes.to(out.device)], want[executes], TOL[torch.float32])


@requires_triton
@pytest.mark.parametrize("value", [-1, -65, -1000, -(2**31), 2**31 - 1])
@pytest.mark.parametrize("grid", ["per-tile", "persistent"])
@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_rows_gemm_counts_outside_the_rows(monkeypatch, value, grid, kind):
    """A count below zero projects no row, one past M every row: each output row is still written
    exactly as the reference says (a negative row-tile count once left the copies unlaunched)."""
    from skipgpt.ops.linear import kernels

    force_grid(monkeypatch, grid)
    T, K, N = 70, 24, 40
    x = randn(T, K, device=KERNEL_DEVICE, seed=1)
    w = _w(N, K, torch.float32, KERNEL_DEVICE, seed=2)
    count = torch.tensor([value], dtype=torch.int32, device=KERNEL_DEVICE)
    if kind == "residual":
        routes = make_routes(1, T, 1.0, device=KERNEL_DEVICE)  # rows and slot: the identity
        residual = randn(T, N, device=KERNEL_DEVICE, seed=3)
        with poisoned_outputs(kernels):
            out = kernels.rows_gemm(x, w, count, residual=residual, rows=routes.rows_cap, slot=routes.slot)
        want = linear_residual_reference(residual, x, w, routes.slot, count, routes.rows_cap)
        assert torch.isfinite(out).all(), "some token row was not written"
        assert_rel(out, want, TOL[torch.float32])
        if value < 0:
            assert torch.equal(out, residual)
    else:
        with poisoned_outputs(kernels):
            out = kernels.rows_gemm(x, w, count)
        n = min(max(value, 0), T)
        assert_rel(out[:n], linear_rows_reference(x, w, None, count)[:n], TOL[torch.float32])
        assert torch.isnan(out[n:]).all(), "rows at or past the count were written"


@requires_triton
@pytest.mark.parametrize("grid", ["per-tile", "persistent"])
def test_rows_gemm_residual_with_no_rows_keeps_every_token(monkeypatch, grid):
    """x without rows (M = 0) but tokens and a count: every token keeps its residual row."""
    from skipgpt.ops.linear import kernels

    force_grid(monkeypatch, grid)
    T, K, N = 90, 16, 24
    residual = randn(T, N, device=KERNEL_DEVICE, seed=4)
    x = torch.empty(0, K, device=KERNEL_DEVICE)
    slot = torch.arange(T, dtype=torch.int32, device=KERNEL_DEVICE)  # slots past M: taken by no row
    count = torch.tensor([5], dtype=torch.int32, device=KERNEL_DEVICE)
    with poisoned_outputs(kernels):
        out = kernels.rows_gemm(x, _w(N, K, torch.float32, KERNEL_DEVICE), count, residual=residual,
                                rows=slot[:0], slot=slot)
    assert torch.equal(out, residual)


@requires_triton
@pytest.mark.parametrize("kind", ["plain", "gated", "residual"])
def test_rows_gemm_misaligned_operands_take_pointer_loads(monkeypatch, kind):
    """A base 4 bytes off 16-byte alignment cannot feed TMA: the persistent grid then loads the
    operand through pointers, with the same results."""
    from skipgpt.ops._common import tma_ready
    from skipgpt.ops.linear import kernels

    force_grid(monkeypatch, "persistent")
    T, K, N = 130, 64, 40
    x = randn(T * K + 1, device=KERNEL_DEVICE, seed=5)[1:].view(T, K)
    assert not tma_ready(x) and tma_ready(x.clone())
    w = _w(N, K, torch.float32, KERNEL_DEVICE, seed=6)
    routes = make_routes(1, T, 0.6, seed=7, device=KERNEL_DEVICE)
    if kind == "residual":
        residual = randn(T, N, device=KERNEL_DEVICE, seed=8)
        with poisoned_outputs(kernels):
            out = kernels.rows_gemm(x, w, routes.count, residual=residual, rows=routes.rows_cap, slot=routes.slot)
        return _check_residual(out, residual, x, w, routes, torch.float32)
    w2 = _w(N, K, torch.float32, KERNEL_DEVICE, seed=9) if kind == "gated" else None
    with poisoned_outputs(kernels):
        out = kernels.rows_gemm(x, w, routes.count, w2=w2, activation="silu" if w2 is not None else "none")
    want = gated_mlp_reference(x, w, w2, "silu", routes.count) if w2 is not None else \
        linear_rows_reference(x, w, None, routes.count)
    assert_rel(out[: routes.n], want[: routes.n], TOL[torch.float32])
    assert torch.isnan(out[routes.n:]).all()


def test_rows_gemm_wants_residual_rows_and_slot_together():
    from skipgpt.ops.linear import kernels

    x, w, count = torch.zeros(4, 8), torch.zeros(8, 8), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="residual, rows and slot go together"):
        kernels.rows_gemm(x, w, count, residual=torch.zeros(4, 8), slot=torch.zeros(4, dtype=torch.int32))


@requires_triton
def test_rows_gemm_grid_follows_the_rows():
    """One program per tile up to PER_TILE_MAX_ROWS rows (host-bound steps, where the persistent
    grid's TMA setup costs more host time than it saves GPU time), the persistent grid above; by
    the rows the tiles are picked for (tile_rows where given)."""
    from skipgpt.ops.linear import kernels

    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs["PROGRAMS"])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "launch", lambda kernel, scratch=False: Recorder())
        patch.setattr(kernels, "num_sms", lambda device: 132)
        w = torch.zeros(8, 16)
        for rows in (64, 65, kernels.PER_TILE_MAX_ROWS, kernels.PER_TILE_MAX_ROWS + 1):
            kernels.rows_gemm(torch.zeros(rows, 16), w, torch.ones(1, dtype=torch.int32))
        kernels.rows_gemm(torch.zeros(8, 16), w, torch.ones(1, dtype=torch.int32), tile_rows=1024)
    assert launched == [0, 0, 0, 132, 132]


def test_tma_ready_needs_16_byte_rows_and_bases():
    from skipgpt.ops._common import tma_ready

    flat = torch.zeros(4096, dtype=torch.float16)
    assert tma_ready(flat[:304 * 4].view(4, 304))
    assert not tma_ready(flat[:300 * 4].view(4, 300)), "600-byte rows"
    assert tma_ready(flat[8:8 + 304 * 4].view(4, 304)), "a base 16 bytes in"
    assert not tma_ready(flat[4:4 + 304 * 4].view(4, 304)), "a base 8 bytes in"
    assert not tma_ready(flat[:304 * 4].view(4, 304), flat[:300 * 4].view(4, 300)), "one operand unfit"
    assert not tma_ready(torch.zeros(4, 4)[:1, :3]), "one 12-byte row (its stride(0) is 4 elements)"


def test_scratch_allocator_is_set_only_where_none_is(monkeypatch):
    """Triton asks an allocator for TMA descriptors' scratch: launch(scratch=True) gives one where
    none is set, keeps one the caller set, and reads older Triton's plain module attribute too."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    from skipgpt.ops import _common

    def current():
        held = _allocation._allocator
        return held.get() if hasattr(held, "get") else held

    def fresh():  # a new context: what another thread starts with
        assert isinstance(current(), _allocation.NullAllocator)
        _common._set_scratch_allocator()
        assert current() is _common._scratch
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        _common._set_scratch_allocator()
        assert current() is mine, "the caller's allocator was replaced"

    contextvars.Context().run(fresh)
    set_to = []
    monkeypatch.setattr(_allocation, "_allocator", _allocation.NullAllocator())  # older Triton's layout
    monkeypatch.setattr(triton, "set_allocator", set_to.append)
    _common._set_scratch_allocator()
    assert set_to == [_common._scratch]


def _check_residual(out, residual, x, w, routes, dtype):
    flat = routes.execute.flatten()
    assert torch.equal(out[~flat], residual[~flat]), "skipping tokens must keep their residual bit for bit"
    want = linear_residual_reference(residual, x, w, routes.slot, routes.count, routes.rows_cap)
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
# qkv_rope_write (its CUDA registration; the kernel runs in the interpreter on CPU)


def brute_rope(y, cos, sin):
    """y [M, heads, D] float64 rotated with cos/sin [M, D]."""
    half = y.shape[-1] // 2
    rotated = torch.cat((-y[..., half:], y[..., :half]), dim=-1)
    return y * cos.double()[:, None] + rotated * sin.double()[:, None]


def _qkv_case(dtype, B, L, p, Hq, Hk, D, bias, K=40, S_extra=4, start=3):
    T = B * L
    routes = make_routes(B, L, p, seed=L + D, device=KERNEL_DEVICE, route_set=0)
    x = randn(T, K, dtype=dtype, device=KERNEL_DEVICE, seed=1, scale=3.0)
    weights = [_w(h * D, K, dtype, KERNEL_DEVICE, seed) for h, seed in ((Hq, 2), (Hk, 3), (Hk, 4))]
    biases = [randn(w.shape[0], dtype=dtype, device=KERNEL_DEVICE, seed=5 + i) if bias else None
              for i, w in enumerate(weights)]
    positions = torch.arange(start, start + L).repeat(B).double()
    angles = positions[:, None] * 10000.0 ** (-torch.arange(0, D, 2).double() / D)
    table = torch.cat([angles, angles], -1)
    cos, sin = (t.to(dtype=dtype, device=KERNEL_DEVICE) for t in (table.cos(), table.sin()))
    caches = [poison(torch.empty(B, L + S_extra + start, Hk, D, dtype=dtype, device=KERNEL_DEVICE)) for _ in range(2)]
    start_t = torch.tensor([start], device=KERNEL_DEVICE)
    args = (x, *weights, *biases, cos, sin, routes.rows_cap, routes.count)
    return routes, args, caches, start_t


QKV_CASES = [
    (2, 7, 0.6, 4, 2, 8, False),  # a head narrower than a tile's columns
    (1, 1, 1.0, 2, 2, 64, True),  # one decode token
    (2, 63, 0.0, 4, 1, 16, False),  # no query executes; K/V are still written
    (1, 129, 0.75, 4, 1, 64, True),  # GQA 4, two column chunks per head
]


@requires_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,L,p,Hq,Hk,D,bias", QKV_CASES)
def test_qkv_rope_write(dtype, B, L, p, Hq, Hk, D, bias):
    from skipgpt.ops.linear import kernels

    routes, args, (k_cache, v_cache), start = _qkv_case(dtype, B, L, p, Hq, Hk, D, bias)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    with poisoned_outputs(kernels):
        q = linear._qkv_rope_write_cuda(*args, k_cache, v_cache, start)
    want_q = linear.qkv_rope_write_reference(*args, want_k, want_v, start)
    n, s = routes.n, int(start)
    assert q.shape == (B * L, Hq, D) and q.dtype == dtype
    assert_rel(q[:n], want_q[:n], TOL[dtype], "q vs the reference")
    assert torch.isnan(q[n:]).all(), "query rows at or past the count were written"
    for got, want, name in ((k_cache, want_k, "k"), (v_cache, want_v, "v")):
        assert_rel(got[:, s:s + L], want[:, s:s + L], TOL[dtype], f"{name} cache vs the reference")
        assert torch.isnan(got[:, :s]).all() and torch.isnan(got[:, s + L:]).all(), f"{name}: a slot outside the step was written"
    # q and K against float64
    x, wq, wk, _, bq, bk, _, cos, sin, *_ = args
    xn = x.double()
    rows = routes.rows.long()
    q64 = brute_rope(brute_linear(xn[rows], wq, bq).view(n, Hq, D), cos[rows], sin[rows])
    assert_rel(q[:n], q64, TOL[dtype], "q vs float64")
    k64 = brute_rope(brute_linear(xn, wk, bk).view(B * L, Hk, D), cos, sin).view(B, L, Hk, D)
    assert_rel(k_cache[:, s:s + L], k64, TOL[dtype], "k vs float64")


@requires_triton
@pytest.mark.parametrize("rows", [1, 20, 130, 600])  # one per tile regime of `_tiles` on a GPU
def test_qkv_rope_write_with_the_gpu_tiles(monkeypatch, rows):
    from skipgpt.ops.linear import kernels

    gpu_tiles = kernels._tiles
    monkeypatch.setattr(kernels, "_tiles", lambda r, size, kind, on_gpu: gpu_tiles(r, size, kind, True))
    dtype = torch.float16
    routes, args, (k_cache, v_cache), start = _qkv_case(dtype, 1, rows, 0.7, 2, 1, 128, True, K=300)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    q = linear._qkv_rope_write_cuda(*args, k_cache, v_cache, start)
    want_q = linear.qkv_rope_write_reference(*args, want_k, want_v, start)
    assert_rel(q[:routes.n], want_q[:routes.n], TOL[dtype], "q")
    s = int(start)
    assert_rel(k_cache[:, s:s + rows], want_k[:, s:s + rows], TOL[dtype], "k")
    assert_rel(v_cache[:, s:s + rows], want_v[:, s:s + rows], TOL[dtype], "v")


@requires_triton
def test_qkv_rope_write_drops_writes_past_the_cache():
    """start is device data: slots past the cache's end are dropped, never written out of bounds
    (the CPU implementation, which reads start for free, raises instead)."""
    routes, args, (k_cache, v_cache), _ = _qkv_case(torch.float32, 1, 7, 1.0, 2, 1, 16, False, S_extra=0, start=0)
    S = k_cache.shape[1]  # 7 slots
    start = torch.tensor([S - 2], device=KERNEL_DEVICE)
    linear._qkv_rope_write_cuda(*args, k_cache, v_cache, start)
    assert torch.isfinite(k_cache[:, S - 2:]).all() and torch.isnan(k_cache[:, :S - 2]).all()
    assert torch.isfinite(v_cache[:, S - 2:]).all() and torch.isnan(v_cache[:, :S - 2]).all()
    with pytest.raises(ValueError, match="start: slots 5..11 fall outside a cache of 7 slots"):
        linear.qkv_rope_write(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in args),
                        k_cache.cpu(), v_cache.cpu(), start.cpu())


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
    torch.library.opcheck(torch.ops.skipgpt.linear_rows.default, (x, w, b, cnt, 512))
    wu = _w(N, K, torch.float32, seed=5)
    for act in ("silu", "relu"):
        torch.library.opcheck(torch.ops.skipgpt.gated_mlp.default, (x, w, wu, act))
        torch.library.opcheck(torch.ops.skipgpt.gated_mlp.default, (x, w, wu, act, cnt))
        torch.library.opcheck(torch.ops.skipgpt.gated_mlp.default, (x, w, wu, act, cnt, 1))
    residual = randn(T, N, seed=6)
    xe = randn(routes.n, K, seed=7)
    torch.library.opcheck(torch.ops.skipgpt.linear_residual.default, (residual, x, w))
    torch.library.opcheck(torch.ops.skipgpt.linear_residual.default, (residual, xe, w, routes.slot.clone()))
    cap = (routes.slot.clone(), cnt, routes.rows_cap.clone())
    torch.library.opcheck(torch.ops.skipgpt.linear_residual.default, (residual, x, w, *cap))
    torch.library.opcheck(torch.ops.skipgpt.linear_residual.default, (residual, x, w, *cap, 64))
    none = make_routes(2, 4, 0.0)  # exact form with no executing token: x has no rows
    torch.library.opcheck(torch.ops.skipgpt.linear_residual.default, (residual, x[:0], w, none.slot.clone()))
    torch.library.opcheck(torch.ops.skipgpt.linear_rows.default, (x[:0], w, b))
    torch.library.opcheck(torch.ops.skipgpt.gated_mlp.default, (x[:0], w, wu, "silu"))
    for bias in (False, True):
        _, args, caches, start = _qkv_case(torch.float32, 2, 4, 0.5, 4, 2, 8, bias)
        torch.library.opcheck(torch.ops.skipgpt.qkv_rope_write.default, (*args, *(c.zero_() for c in caches), start))


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
        (rs, (res, x, w, slot, count), ValueError, "rows: missing; the capacity form needs rows"),
        (rs, (res, x, w, slot, None, slot), ValueError, "rows: given without count; only the capacity form"),
        (rs, (res, x, w, slot, count, slot[:3]), ValueError, "rows: dim 0 must equal x's row count"),
        (rs, (res, x, w, slot, count, slot.long()), TypeError, "rows: expected dtype int32"),
        (rs, (torch.zeros(5, 4).t(), x, w), ValueError, "residual: expected a contiguous tensor"),
        (lr, (x, w, None, None, 4), ValueError, "tile_rows: given without count"),
        (gm, (x, w, w, "silu", count, 0), ValueError, "tile_rows: expected a row count >= 1"),
        (rs, (res, x, w, slot, None, None, 512), ValueError, "tile_rows: given without count"),
    ]


def _bad_qkv_cases():
    _, qkv, (kc, vc), start = _qkv_case(torch.float32, 2, 2, 0.5, 2, 1, 8, False, K=6)
    wide = torch.zeros(*kc.shape[:3], 16)  # two caches side by side: strided views

    def with_(i, value, caches=(kc, vc), start=start):
        args = list(qkv)  # x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count
        if i is not None:
            args[i] = value
        return (*args, *caches, start)

    return [
        (with_(None, None), None, None),
        (with_(0, qkv[0][:3]), ValueError, "x: 3 rows do not split into the cache's batch of 2"),
        (with_(0, qkv[0].half()), TypeError, "k_cache: dtype"),
        (with_(1, qkv[1][:5]), ValueError, "w_q: 5 output features are not a whole number of 8-wide heads"),
        (with_(2, qkv[3][:0]), ValueError, "w_k: dim 0 must equal the cache's KV heads times head dim"),
        (with_(3, qkv[3].half()), TypeError, "w_v: dtype"),
        (with_(3, qkv[3][:, :5].contiguous()), ValueError, "w_v: dim 1 must equal x's feature size"),
        (with_(4, torch.zeros(16)), ValueError, "b_q, b_k, b_v: give all three biases or none"),
        (with_(7, qkv[7][:, :4].contiguous()), ValueError, r"cos: expected shape \(4, 8\)"),
        (with_(8, qkv[8].long()), TypeError, "sin: expected dtype"),
        (with_(9, None), ValueError, "rows: required"),
        (with_(9, qkv[9].long()), TypeError, "rows: expected dtype int32"),
        (with_(10, torch.ones(1, dtype=torch.int64)), TypeError, "count: expected dtype int32"),
        (with_(None, None, caches=(kc, vc[:, :2].contiguous())), ValueError, "v_cache: shape"),
        (with_(None, None, caches=(kc.half(), vc.half())), TypeError, "k_cache: dtype"),
        (with_(None, None, caches=(kc[..., :7].contiguous(), vc[..., :7].contiguous())), ValueError,
         "k_cache: head dim must be even"),
        (with_(None, None, caches=(wide[..., :8], wide[..., 8:])), ValueError, "k_cache: expected a contiguous tensor"),
        (with_(None, None, start=start.int()), TypeError, "start: expected dtype int64"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_qkv_cases())))
def test_qkv_rope_write_rejects_bad_input(case):
    args, exc, msg = _bad_qkv_cases()[case]
    if exc is None:  # a valid call, beside the bad ones
        linear.qkv_rope_write(*args)
        return
    with pytest.raises(exc, match=msg):
        linear.qkv_rope_write(*args)


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_rejects_bad_input(case):
    op, args, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg):
        op(*args)
