"""Shared by the op tests: random routes in both forms, poisoned kernel allocations, and guard
bands that catch reads and writes outside a tensor."""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch

from skipgpt.ops.routing.reference import compact_reference
from tests.helpers import poison


def padding_mask(B, width, kind, seed=0):
    """[B, width] bool key mask: 'left' pads the start of some sequences, 'right' the end,
    'none' keeps everything (still passed, to exercise the mask path)."""
    mask = torch.ones(B, width, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    for b in range(B):
        pad = int(torch.randint(1, max(2, width // 2), (1,), generator=g)) if b % 2 == 0 else 0
        if kind == "left":
            mask[b, :pad] = False
        elif kind == "right" and pad:
            mask[b, width - pad:] = False
    return mask


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


# ---------------------------------------------------------------------------------------------
# guard bands: memory-safety checks for kernels


class Guards:
    """Places tensors inside larger buffers whose margins (`width` elements on each side) hold
    poison: NaN for floating tensors, -7 for integer ones, True for bool. A kernel that reads
    past a tensor pulls poison into its result (NaN shows in float outputs); one that writes
    past it changes a margin, which `check()` reports. Triton's interpreter hands kernels the
    whole storage, so on CPU the margins are real neighbouring memory, as on the GPU."""

    def __init__(self, width: int = 64):
        self.width = width
        self._bands = []  # (name, buffer, numel, margins' bytes before)

    def wrap(self, t: torch.Tensor, name: str = "tensor") -> torch.Tensor:
        """A contiguous copy of `t` that lives between two poisoned margins."""
        n, w = t.numel(), self.width
        buf = poison(torch.empty(n + 2 * w, dtype=t.dtype, device=t.device))
        buf[w : w + n] = t.reshape(-1)
        self._bands.append((name, buf, n, self._margins(buf, n).clone()))
        return buf[w : w + n].view(t.shape)

    def empty(self, shape, dtype, device, name="output") -> torch.Tensor:
        """A poisoned tensor between poisoned margins (a kernel output)."""
        t = torch.empty(shape, dtype=dtype, device=device)
        return self.wrap(poison(t), name)

    def _margins(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        raw = buf.view(torch.uint8).view(-1, buf.element_size())
        return torch.cat([raw[: self.width], raw[self.width + n :]])

    def check(self) -> None:
        for name, buf, n, before in self._bands:
            after = self._margins(buf, n)
            if not torch.equal(after, before):
                raise AssertionError(f"{name}: a kernel wrote outside the tensor (guard band changed)")


class _GuardingTorch(types.ModuleType):
    """Stands in for `torch` inside a kernels module: `empty`, `empty_like`, `zeros` and
    `zeros_like` return tensors inside guard bands (poisoned, except zeros' interiors)."""

    def __init__(self, guards: Guards):
        super().__init__("torch")
        self._guards = guards

    def __getattr__(self, name):
        return getattr(torch, name)

    def _alloc(self, like: torch.Tensor, fill_zero: bool) -> torch.Tensor:
        # Contiguous, as the kernels assume for their outputs.
        out = self._guards.empty(like.shape, like.dtype, like.device)
        return out.zero_() if fill_zero else out

    def empty(self, *args, **kwargs):
        return self._alloc(torch.empty(*args, **kwargs), False)

    def empty_like(self, t, **kwargs):
        return self._alloc(torch.empty_like(t, **kwargs), False)

    def zeros(self, *args, **kwargs):
        return self._alloc(torch.empty(*args, **kwargs), True)

    def zeros_like(self, t, **kwargs):
        return self._alloc(torch.empty_like(t, **kwargs), True)


@contextlib.contextmanager
def guarded_outputs(guards: Guards, *modules):
    """Within the block, the kernels modules given allocate their outputs and scratch inside
    `guards`' bands (poisoned, so unwritten rows show as NaN); call `guards.check()` after."""
    saved = [m.torch for m in modules]
    try:
        for m in modules:
            m.torch = _GuardingTorch(guards)
        yield guards
    finally:
        for m, t in zip(modules, saved):
            m.torch = t
