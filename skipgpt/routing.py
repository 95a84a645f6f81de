"""Per-token route decisions: from the routers, or forced (seeded, for tests and benchmarks).

Both give, for one layer and one forward step, two `[B, L]` bool masks: which tokens execute
attention and which execute the MLP. Padding never executes (DESIGN.md section 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_PRIME = 2147483647  # 2^31 - 1: keeps every product below 2^62, so int64 never overflows
_MULT = 48271


@dataclass
class RoutingState:
    """Shared by the routed layers of one model.

    padding_mask: the model call's 2-D attention mask ([B, past + L] bool), captured by a
    forward pre-hook on the base model; None when the caller passed none (no padding).
    forced_skip / seed: set by `skipgpt.force_routes`.
    """

    padding_mask: Optional[torch.Tensor] = None
    forced_skip: Optional[float] = None
    seed: int = 0


def forced_skip_mask(seed: int, layer_idx: int, module: int, batch: int, slots: torch.Tensor, rate: float) -> torch.Tensor:
    """Seeded pseudo-random skips: [B, L] bool, True = skip, with P(skip) = rate.

    A pure function of (seed, layer, module, sequence index, cache slot), computed with device
    integer arithmetic: identical on CPU and CUDA, in every pipeline, eager or compiled, and
    different at every decode step. slots: [L] int64 cache slots of this step's tokens.
    """
    b = torch.arange(batch, device=slots.device, dtype=torch.int64)[:, None]
    h = torch.full((), (seed * 7919 + layer_idx * 131 + module * 17) % _PRIME, dtype=torch.int64, device=slots.device)
    h = ((h + b + 1) * _MULT) % _PRIME
    h = ((h + slots[None, :] + 1) * _MULT) % _PRIME
    for _ in range(3):  # xor-shift between multiplications breaks the lattice structure
        h = (h * _MULT) % _PRIME
        h = h ^ (h >> 15)
    return h.to(torch.float64) < rate * _PRIME
