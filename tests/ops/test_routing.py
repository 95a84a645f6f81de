import pytest
import torch

from skipgpt.ops import routing
from tests.helpers import KERNEL_DEVICE, requires_triton

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


def test_exact_rows_narrows_to_counts():
    execute = torch.tensor([[[1, 0, 1], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    rows, _, offsets = routing.compact(execute)
    attn, mlp = routing.exact_rows(rows, offsets)
    assert attn.tolist() == [0, 2, 5]
    assert mlp.tolist() == []


def test_opcheck():
    execute = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(2)) < 0.5
    torch.library.opcheck(torch.ops.skipgpt.compact.default, (execute,))
    rows, _, offsets = routing.compact(execute)
    torch.library.opcheck(torch.ops.skipgpt.exact_rows.default, (rows, offsets))


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="execute: expected dtype bool"):
        routing.compact(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="execute: expected a 3-d tensor"):
        routing.compact(torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="seq_offsets: expected 2 route sets"):
        routing.exact_rows(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32))
