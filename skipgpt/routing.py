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

    padding_mask: the model call's 2-D attention mask ([B, past + L] bool), captured by a
    forward pre-hook on the base model; None when the caller passed none (no padding).
    forced_skip / seed: set by `skipgpt.force_routes`.
    """

    padding_mask: Optional[torch.Tensor] = None
    forced_skip: Optional[float] = None
    seed: int = 0


def forced_skip_mask(seed: int, layer_idx: int, batch: int, slots: torch.Tensor, rate: float) -> torch.Tensor:
    """Seeded pseudo-random skips: [2, B, L] bool (row 0 attention, row 1 MLP), True = skip,
    each with probability `rate`.

    A pure function of (seed, layer, module, sequence index, cache slot), computed with device
    integer arithmetic in a handful of kernels: identical on CPU and CUDA, in every pipeline,
    eager or compiled, and different at every decode step. slots: [L] int64 cache slots.
    """
    base = (seed * 7919 + layer_idx * 131 + 1) % _PRIME
    module_and_seq = torch.arange(2 * batch, device=slots.device, dtype=torch.int64).view(2, batch, 1)
    h = (module_and_seq * 104729 + slots * 7919 + base) % _PRIME
    for mult in _MULTIPLIERS:
        h = (h * mult) % _PRIME
        h = h ^ (h >> 15)
    return h < int(rate * _PRIME)
