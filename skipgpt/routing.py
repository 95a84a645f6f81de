"""Routing state shared by a model's routed layers: the call's padding mask and forced routes.

The decisions themselves come from the routers or from the `skipgpt::forced_execute` op (seeded,
for tests and benchmarks); padding never executes (DESIGN.md section 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .ops.routing.reference import HASH_PRIME



@dataclass
class RoutingState:
    """Shared by the routed layers of one model.

    padding_mask: the model call's attention mask, captured by a forward pre-hook on the base
    model: 2-D [B, past + L] (1 = token), or the 4-D causal mask transformers builds for static
    caches; None when the caller passed none (no padding).
    forced_skip: the rate set by `skipgpt.force_routes` (None: the routers decide).
    forced_params: [2] int64 on the model's device, (seed, skip threshold); a tensor, so a new
    seed or rate reaches compiled code as data instead of forcing a recompile.
    single_graph: how compiled triton-sparse layers pick the capacity or exact form. True:
    `torch.cond`, so with a symbolic token count one graph serves every count, but Inductor never
    captures a graph holding torch.cond in a CUDA graph. False (the default): a Python branch,
    i.e. a guard on a symbolic count, so steps of at most 64 tokens (decode) and longer ones
    (prefill) get a graph each, and the decode graph is CUDA-graph safe.
    `skipgpt.compile.compile_model` sets it from its `mode`.
    """

    padding_mask: Optional[torch.Tensor] = None
    forced_skip: Optional[float] = None
    forced_params: Optional[torch.Tensor] = None
    single_graph: bool = False

    def force(self, skip: Optional[float], seed: int, device) -> None:
        """Force seeded random routes at rate `skip` (None: the routers decide again)."""
        self.forced_skip = None if skip is None else float(skip)
        self.forced_params = None if skip is None else forced_params(int(seed), float(skip), device)


def forced_params(seed: int, rate: float, device) -> torch.Tensor:
    """[2] int64 (seed, skip threshold) for the `skipgpt::forced_execute` op."""
    params = torch.tensor([seed % HASH_PRIME, int(rate * HASH_PRIME)], dtype=torch.int64, device=device)
    # Static shape: under dynamic=True its length 2 would otherwise be tied to any dim that
    # happens to be 2 at the first compile (duck sizing), and recompile when that dim changes.
    torch._dynamo.mark_static(params, 0)
    return params
