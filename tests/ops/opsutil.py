"""Shared by the op tests: random routes in both forms, and poisoned kernel allocations."""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch

from skipgpt.ops.routing.reference import compact_reference
from tests.helpers import poison


@dataclass
class Routes:
    """One route set of a [B, L] batch, in the exact and the capacity form."""

    execute: torch.Tensor  # [B, L] bool
    rows_cap: torch.Tensor  # [T] int32: executing flat indices, then -1 (capacity form)
    slot: torch.Tensor  # [T] int32: position of token t among the executing rows, or -1
    seq_offsets: torch.Tensor  # [B+1] int32
    count: torch.Tensor  # [1] int32 view of seq_offsets[-1:] (capacity form)
    n: int  # executing tokens

    @property
    def rows(self) -> torch.Tensor:  # exact form: [N] int32
        return self.rows_cap[: self.n]


def make_routes(B: int, L: int, p: float, seed: int = 0, device="cpu", route_set: int = 1) -> Routes:
    """Random execute masks for two route sets (as a layer has, attention and MLP) compacted
    with `compact_reference`; returns route set `route_set`. Route set 1 lives at an offset of
    T int32s into the compacted tensors, as a layer's MLP routes do."""
    g = torch.Generator().manual_seed(seed)
    if p >= 1.0:
        execute = torch.ones(2, B, L, dtype=torch.bool)
    elif p <= 0.0:
        execute = torch.zeros(2, B, L, dtype=torch.bool)
    else:
        execute = torch.rand(2, B, L, generator=g) < p
    rows, slot, offsets = compact_reference(execute.to(device))
    r = route_set
    return Routes(execute[r].to(device), rows[r], slot[r], offsets[r], offsets[r, -1:], int(offsets[r, -1]))


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


class _PoisoningTorch(types.ModuleType):
    """Stands in for `torch` inside a kernels module: every floating tensor it allocates with
    `empty`/`empty_like` comes back full of NaN, so a row the kernel forgets to write shows."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return poison(t) if t.is_floating_point() else t

    @staticmethod
    def empty_like(*args, **kwargs):
        t = torch.empty_like(*args, **kwargs)
        return poison(t) if t.is_floating_point() else t


@contextlib.contextmanager
def poisoned_outputs(*modules):
    """Within the block, the kernels modules given allocate NaN-filled outputs and scratch."""
    saved = [m.torch for m in modules]
    try:
        for m in modules:
            m.torch = _PoisoningTorch()
        yield
    finally:
        for m, t in zip(modules, saved):
            m.torch = t


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    from tests.helpers import rel_err

    if ref.numel() == 0:
        assert out.numel() == 0
        return
    err = rel_err(out.cpu(), ref.cpu())
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:.3g}"
