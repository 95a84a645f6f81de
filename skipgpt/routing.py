"""Per-token route decisions: from the routers, or forced (seeded, for tests and benchmarks).

Both give, for one layer and one forward step, two `[B, L]` bool masks: which tokens execute
attention and which execute the MLP. Padding never executes (DESIGN.md section 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_PRIME = 2147483647  # 2^31 - 1: keeps every product below 2^62, so int64 never overflows
# Three multiply-mod rounds with distinct Lehmer multipliers, each followed by a xor-shift:
# fewer rounds left measurable correlation between neighbouring tokens and between modules.
_MULTIPLIERS = (48271, 69621, 16807)


@dataclass
class RoutingState:
    """Shared by the routed layers of one model.

    padding_mask: the model call's attention mask, captured by a forward pre-hook on the base
    model: 2-D [B, past + L] (1 = token), or the 4-D causal mask transformers builds for static
    caches; None when the caller passed none (no padding).
    forced_skip: the rate set by `skipgpt.force_routes` (None: the routers decide).
    forced_params: [2] int64 on the model's device, (seed, skip threshold); a tensor, so a new
    seed or rate reaches compiled code as data instead of forcing a recompile.
    """

    padding_mask: Optional[torch.Tensor] = None
    forced_skip: Optional[float] = None
    forced_params: Optional[torch.Tensor] = None

    def force(self, skip: Optional[float], seed: int, device) -> None:
        """Force seeded random routes at rate `skip` (None: the routers decide again)."""
        self.forced_skip = None if skip is None else float(skip)
        self.forced_params = None if skip is None else forced_params(int(seed), float(skip), device)


def forced_params(seed: int, rate: float, device) -> torch.Tensor:
    params = torch.tensor([seed % _PRIME, int(rate * _PRIME)], dtype=torch.int64, device=device)
    # Static shape: under dynamic=True its length 2 would otherwise be tied to any dim that
    # happens to be 2 at the first compile (duck sizing), and recompile when that dim changes.
    torch._dynamo.mark_static(params, 0)
    return params


def forced_skip_mask(params: torch.Tensor, layer_idx: int, batch: int, slots: torch.Tensor) -> torch.Tensor:
    """Seeded pseudo-random skips: [2, B, L] bool (row 0 attention, row 1 MLP), True = skip.

    params: [2] int64 from `forced_params` (seed, threshold = rate * (2^31 - 1)); slots: [L] int64
    cache slots of this step's tokens. A pure function of (seed, layer, module, sequence index,
    cache slot) computed with device integer arithmetic in a handful of kernels: identical on
    CPU and CUDA, in every pipeline, eager or compiled, and different at every decode step.
    """
    params = params.to(slots.device)
    base = (params[0] * 7919 + layer_idx * 131 + 1) % _PRIME
    module_and_seq = torch.arange(2 * batch, device=slots.device, dtype=torch.int64).view(2, batch, 1)
    h = (module_and_seq * 104729 + slots * 7919 + base) % _PRIME
    for mult in _MULTIPLIERS:
        h = (h * mult) % _PRIME
        h = h ^ (h >> 15)
    return h < params[1]
