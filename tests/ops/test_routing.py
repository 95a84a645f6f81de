import pytest
import torch

from skipgpt.ops import routing
from tests.helpers import KERNEL_DEVICE, requires_triton
from tests.ops.opsutil import padding_mask

SHAPES = [(1, 1, 1), (2, 3, 7), (2, 2, 63), (1, 4, 129), (2, 1, 1100)]


def brute_force(execute):
    R, B, L = execute.shape
    rows, slots, offsets = [], [], []
    for r in range(R):
        flat = execute[r].flatten().tolist()
        idx = [t for t, e in enumerate(flat) if e]
        rows.append(idx + [-1] * (len(flat) - len(idx)))
        slot, n = [], 0
        for e in flat:
            slot.append(n if e else -1)
            n += e
        slots.append(slot)
        per_seq = execute[r].sum(1).tolist()
        offsets.append([sum(per_seq[:b]) for b in range(B + 1)])
    as_t = lambda x: torch.tensor(x, dtype=torch.int32).view(R, -1)
    return as_t(rows), as_t(slots), as_t(offsets)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_reference_matches_brute_force(shape, p):
    execute = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < p
    for got, want in zip(routing.compact_reference(execute), brute_force(execute)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@requires_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_kernel_matches_reference(shape, p):
    from skipgpt.ops.routing import kernels

    execute = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) < p).to(KERNEL_DEVICE)
    for got, want in zip(kernels.compact(execute), routing.compact_reference(execute)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["left", "right"])
def test_reference_takes_padding_out_and_counts(shape, kind):
    execute = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.6
    valid = padding_mask(shape[1], shape[2], kind, seed=3)
    counts = torch.tensor(list(range(10, 10 + shape[0])) + [100])  # counters accumulate
    got = routing.compact_reference(execute, valid, counts)
    for g, want in zip(got, brute_force(execute & valid)):
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    expected = [10 + r + int((execute[r] & valid).sum()) for r in range(shape[0])] + [100 + int(valid.sum())]
    assert counts.tolist() == expected
    routing.compact_reference(execute, None, counts)  # without a mask every token is valid
    assert counts[-1] == expected[-1] + valid.numel()


@requires_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", [None, "left", "right"])
def test_kernel_takes_padding_out_and_counts(shape, kind):
    from skipgpt.ops.routing import kernels

    execute = (torch.rand(shape, generator=torch.Generator().manual_seed(4)) < 0.5).to(KERNEL_DEVICE)
    B, L = shape[1:]
    # A strided view, as a layer passes the new tokens' columns of a longer mask.
    longer = torch.cat([padding_mask(B, L, kind, seed=4), torch.ones(B, 3, dtype=torch.bool)], 1)
    valid = None if kind is None else longer[:, :L].to(KERNEL_DEVICE)
    start = torch.arange(7, 8 + shape[0], dtype=torch.int64, device=KERNEL_DEVICE)
    counts, ref_counts = start.clone(), start.clone()
    got = kernels.compact(execute, valid, counts)
    want = routing.compact_reference(execute, valid, ref_counts)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert counts.tolist() == ref_counts.tolist()
    # The counters move unless every token is padding (shape (1, 1, 1) with its token padded).
    assert (counts.tolist() != start.tolist()) == (valid is None or bool(valid.any()))


def test_exact_rows_narrows_to_counts():
    execute = torch.tensor([[[1, 0, 1], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    rows, _, offsets = routing.compact(execute)
    attn, mlp = routing.exact_rows(rows, offsets)
    assert attn.tolist() == [0, 2, 5]
    assert mlp.tolist() == []


def test_exact_rows_reads_counts_copied_to_the_host():
    # The copied counts are what exact_rows goes by (seq_offsets' own are not read again).
    execute = torch.tensor([[[1, 0, 1], [0, 1, 1]], [[1, 1, 1], [0, 0, 0]]], dtype=torch.bool)
    rows, _, offsets = routing.compact(execute)
    host = routing.counts_to_host(offsets)
    assert host.device.type == "cpu" and host.dtype == torch.int32 and host.tolist() == [4, 3]
    offsets[:, -1] = 0
    attn, mlp = routing.exact_rows(rows, offsets, host)
    assert attn.tolist() == [0, 2, 4, 5] and mlp.tolist() == [0, 1, 2]


def test_opcheck():
    execute = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(2)) < 0.5
    torch.library.opcheck(torch.ops.skipgpt.compact.default, (execute, None, None))
    valid = padding_mask(3, 5, "left", seed=2)
    torch.library.opcheck(torch.ops.skipgpt.compact.default, (execute, valid, torch.zeros(3, dtype=torch.int64)))
    rows, _, offsets = routing.compact(execute)
    torch.library.opcheck(torch.ops.skipgpt.exact_rows.default, (rows, offsets))
    torch.library.opcheck(torch.ops.skipgpt.counts_to_host.default, (offsets,))
    torch.library.opcheck(torch.ops.skipgpt.exact_rows.default, (rows, offsets, routing.counts_to_host(offsets)))


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="execute: expected dtype bool"):
        routing.compact(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="execute: expected a 3-d tensor"):
        routing.compact(torch.zeros(2, 3, dtype=torch.bool))
    execute = torch.zeros(2, 3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"valid: expected shape \(3, 4\)"):
        routing.compact(execute, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid: expected dtype bool"):
        routing.compact(execute, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="route_counts: expected 3 entries"):
        routing.compact(execute, None, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="route_counts: expected dtype int64"):
        routing.compact(execute, None, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_offsets: expected 2 route sets"):
        routing.exact_rows(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32))
    rows, offsets = torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="host_counts: expected 2 counts like rows"):
        routing.exact_rows(rows, offsets, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="host_counts: expected dtype int32"):
        routing.exact_rows(rows, offsets, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="host_counts: expected a tensor on cpu"):
        routing.exact_rows(rows, offsets, torch.zeros(2, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="seq_offsets: expected a 2-d tensor"):
        routing.counts_to_host(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_offsets: expected B\\+1 >= 1 columns"):
        routing.counts_to_host(torch.zeros(2, 0, dtype=torch.int32))


# ---------------------------------------------------------------------------- route decisions

from skipgpt.routing import forced_params  # noqa: E402


def forced_skip(seed, rate, layer, batch, first, length, device="cpu"):
    start = torch.tensor([first], device=device)
    return ~routing.forced_execute_reference(forced_params(seed, rate, device), start, batch, length, layer)


def test_forced_routes_have_the_rate_and_look_independent():
    skip = forced_skip(0, 0.25, 3, 8, 0, 8192)
    assert skip.shape == (2, 8, 8192)
    assert abs(skip.float().mean().item() - 0.25) < 0.01
    # Neighbouring tokens, the two modules and two sequences agree as often as independent
    # coin flips would: 0.75^2 + 0.25^2 = 0.625 and 0.25^2 = 0.0625.
    assert abs(skip[:, :, 1:].eq(skip[:, :, :-1]).float().mean().item() - 0.625) < 0.01
    assert abs((skip[0] & skip[1]).float().mean().item() - 0.0625) < 0.005
    assert abs((skip[:, 0] & skip[:, 1]).float().mean().item() - 0.0625) < 0.007


def test_forced_routes_depend_on_seed_layer_and_slot_only():
    a = forced_skip(1, 0.5, 2, 3, 100, 64)
    assert torch.equal(a, forced_skip(1, 0.5, 2, 3, 100, 64))
    assert not torch.equal(a, forced_skip(2, 0.5, 2, 3, 100, 64))
    assert not torch.equal(a, forced_skip(1, 0.5, 5, 3, 100, 64))
    # A decode step sees the same decision as the full forward at that slot.
    assert torch.equal(a[:, :, 10:11], forced_skip(1, 0.5, 2, 3, 110, 1))
    assert not forced_skip(1, 0.0, 2, 3, 100, 64).any()
    assert forced_skip(1, 1.0, 2, 3, 100, 64).all()


@requires_triton
@pytest.mark.parametrize("batch, length, first", [(1, 1, 0), (3, 7, 5), (2, 1100, 37)])
def test_forced_kernel_matches_reference(batch, length, first):
    from skipgpt.ops.routing import kernels

    params = forced_params(11, 0.3, KERNEL_DEVICE)
    start = torch.tensor([first], device=KERNEL_DEVICE)
    got = kernels.forced_execute(params, start, batch, length, 4)
    assert torch.equal(got, routing.forced_execute_reference(params, start, batch, length, 4))


def router_inputs(T, H, R, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.randn(2 * R, H, generator=g) / H**0.5
    b = torch.randn(2 * R, generator=g)
    return x, w, b


def test_router_reference_is_the_router_modules_argmax():
    from skipgpt.router import Router

    x, w, b = router_inputs(33, 24, 2, torch.float16)
    routers = [Router(24) for _ in range(2)]
    for r, router in enumerate(routers):
        router.weight_predictor.weight.data.copy_(w[2 * r : 2 * r + 2])
        router.weight_predictor.bias.data.copy_(b[2 * r : 2 * r + 2])
    want = torch.stack([router.execute(x) for router in routers])
    assert torch.equal(routing.router_execute_reference(x, w, b), want)


@requires_triton
@pytest.mark.parametrize("T, H", [(1, 64), (7, 129), (130, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_router_kernel_matches_reference(T, H, dtype):
    from skipgpt.ops.routing import kernels

    x, w, b = (t.to(KERNEL_DEVICE) for t in router_inputs(T, H, 2, dtype, seed=T))
    got = kernels.router_execute(x, w, b)
    want = routing.router_execute_reference(x, w, b)
    # Summation order differs: only near-ties may disagree.
    logits = torch.nn.functional.linear(x.float(), w, b).view(T, 2, 2)
    margin = (logits[..., 0] - logits[..., 1]).abs().t()
    assert torch.equal(got[margin > 1e-4], want[margin > 1e-4])


@requires_triton
def test_router_kernel_ties_execute_and_nan_is_the_maximum():
    from skipgpt.ops.routing import kernels

    x = torch.zeros(3, 16, device=KERNEL_DEVICE)
    w = torch.zeros(4, 16, device=KERNEL_DEVICE)
    b = torch.tensor([0.0, 0.0, float("nan"), 1.0], device=KERNEL_DEVICE)
    got = kernels.router_execute(x, w, b)
    assert got[0].all()  # tie -> execute
    assert got[1].all()  # NaN execute logit -> argmax picks it -> execute
    assert torch.equal(got, routing.router_execute_reference(x, w, b))


def test_route_ops_opcheck():
    x, w, b = router_inputs(5, 16, 2, torch.float32)
    torch.library.opcheck(torch.ops.skipgpt.router_execute.default, (x, w, b))
    torch.library.opcheck(torch.ops.skipgpt.forced_execute.default, (forced_params(3, 0.4, "cpu"), torch.tensor([2]), 2, 5, 1))


def test_route_ops_reject_bad_input():
    x, w, b = router_inputs(5, 16, 2, torch.float32)
    with pytest.raises(ValueError, match="weight: expected 16 columns"):
        routing.router_execute(x, w[:, :8].contiguous(), b)
    with pytest.raises(ValueError, match="weight: expected 2R rows"):
        routing.router_execute(x, w[:3].contiguous(), b[:3])
    with pytest.raises(TypeError, match="params: expected dtype int64"):
        routing.forced_execute(torch.zeros(2), torch.tensor([0]), 1, 1, 0)
