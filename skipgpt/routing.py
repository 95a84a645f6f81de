"""Routing state shared by a model's routed layers: the call's padding mask and forced routes.

The decisions themselves come from the routers or from the `skipgpt::forced_execute` op (seeded,
for tests and benchmarks); padding never executes (DESIGN.md section 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch

from .ops.routing.reference import HASH_PRIME



@dataclass
class RoutingState:
    """Shared by the routed layers of one model.

    padding_mask: the model call's attention mask, captured by a forward pre-hook on the base
    model: 2-D [B, past + L] (1 = token), or the 4-D causal mask transformers builds for static
    caches; None when the caller passed none (no padding).
    forced_skip: the rate set by `skipgpt.force_routes` (None: the routers decide).
    forced_params: [2] int64 on the first layer's device, (seed, skip threshold); a tensor, so a
    new seed or rate reaches compiled code as data instead of forcing a recompile.
    forced_copies: the same values on the other devices of a model whose layers are spread over
    several (device_map), keyed by str(device); layers read them through `forced_params_on`.
    single_graph: how compiled triton-sparse layers pick the capacity or exact form, and compiled
    dense and triton-sparse layers their attention kernel (decode for single-token steps). True:
    `torch.cond`, so with a symbolic token count one graph serves every count, but Inductor never
    captures a graph holding torch.cond in a CUDA graph. False (the default): a Python branch,
    i.e. a guard on a symbolic count, so steps of at most `capacity_max_tokens` tokens and longer
    ones (prefill) get a graph each, and the decode graph is CUDA-graph safe.
    `skipgpt.compile.compile_model` sets it from its `mode`.
    capacity_max_tokens: steps of at most this many tokens (B * L) take triton-sparse's capacity
    form (no host sync, CUDA-graph safe: the projections of executing rows are Triton GEMMs that
    read the executing count on the device), longer ones the exact form (one host sync per
    layer, then cuBLAS over exactly the executing rows). The default, 2048: timed as a model's
    layers run, back to back (tools/form_sweep.py --steady, H200, docs/BENCHMARKS.md), the
    exact form's sync leaves the GPU idle while the host launches the layer's second half. At
    2048 tokens the capacity form's median step took 1-12% less time at 0-50% skip, except at
    B=1 L=2048 with 25-50% skip (6% more), and on a slow host the exact form fell to 0.89-0.91x
    of hf there. At 4096 tokens exact-form steps took 2-4% less time at 4 of 6 points.
    Benchmarks and tests pin a form with `use_form`.
    """

    padding_mask: Optional[torch.Tensor] = None
    forced_skip: Optional[float] = None
    forced_params: Optional[torch.Tensor] = None
    forced_copies: dict = field(default_factory=dict)
    single_graph: bool = False
    capacity_max_tokens: int = 2048

    FORMS = ("capacity", "exact")

    def use_form(self, form: str) -> None:
        """Make triton-sparse take `form` ("capacity" or "exact") at every token count."""
        if form not in self.FORMS:
            raise ValueError(f"form: expected one of {', '.join(self.FORMS)}, got {form!r}")
        self.capacity_max_tokens = 1 << 62 if form == "capacity" else 0

    def force(self, skip: Optional[float], seed: int,
              device: Union[torch.device, str, Iterable[Union[torch.device, str]]]) -> None:
        """Force seeded random routes at rate `skip` (None: the routers decide again).

        device: where the layers run: one device, or every device of a model placed with a
        device_map (the first holds `forced_params`, the others get their copy now, so no layer
        copies it during a forward).
        """
        devices = [device] if isinstance(device, (torch.device, str)) else list(device)
        if not devices:
            raise ValueError("force: expected at least one device")
        self.forced_skip = None if skip is None else float(skip)
        self.forced_copies = {}
        if skip is None:
            self.forced_params = None
            return
        self.forced_params = forced_params(int(seed), float(skip), devices[0])
        for other in devices[1:]:
            self.forced_params_on(torch.device(other))

    def forced_params_on(self, device: torch.device) -> torch.Tensor:
        """`forced_params` on `device`: the tensor itself when it is there already (the
        single-device case, which compiled code sees as a constant branch), else a copy made
        once per device and kept."""
        params = self.forced_params
        if params is None:
            raise RuntimeError("no forced routes: call skipgpt.force_routes(model, skip=...) first")
        if params.device == device:
            return params
        key = str(device)
        copy = self.forced_copies.get(key)
        if copy is None:
            copy = params.to(device)
            torch._dynamo.mark_static(copy, 0)  # as in forced_params(): no duck-sized length
            self.forced_copies[key] = copy
        return copy


def forced_params(seed: int, rate: float, device) -> torch.Tensor:
    """[2] int64 (seed, skip threshold) for the `skipgpt::forced_execute` op."""
    params = torch.tensor([seed % HASH_PRIME, int(rate * HASH_PRIME)], dtype=torch.int64, device=device)
    # Static shape: under dynamic=True its length 2 would otherwise be tied to any dim that
    # happens to be 2 at the first compile (duck sizing), and recompile when that dim changes.
    torch._dynamo.mark_static(params, 0)
    return params
