"""The SkipGPT router: a tiny per-token classifier that decides whether a token runs a module.

Every routed decoder layer holds two of them, `router_attention` and `router_mlp`, and both read
the layer input `x` (DESIGN.md section 1). Logit index 0 means EXECUTE, index 1 means SKIP.
"""
from __future__ import annotations

import torch
from torch import nn

ROUTER_KINDS = ("linear", "mlp")


class Router(nn.Module):
    """Maps hidden states `[..., H]` to two logits `[..., 2]` (EXECUTE, SKIP).

    kind="linear": `Linear(H, 2)` (the published checkpoints).
    kind="mlp":    `Linear(H, H // 4) -> ReLU -> Linear(H // 4, 2)` (the training code's variant).

    The module is stored as `weight_predictor`, so state-dict keys are
    `weight_predictor.{weight,bias}` (linear) or `weight_predictor.{0,2}.{weight,bias}` (mlp),
    matching the published checkpoints.
    """

    def __init__(self, hidden_size: int, kind: str = "linear", dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"Router kind must be one of {ROUTER_KINDS}, got {kind!r}")
        if hidden_size < 1 or (kind == "mlp" and hidden_size < 4):
            raise ValueError(f"Router hidden_size too small for kind {kind!r}: {hidden_size}")
        self.hidden_size = hidden_size
        self.kind = kind
        factory = {"dtype": dtype, "device": device}
        if kind == "linear":
            self.weight_predictor = nn.Linear(hidden_size, 2, **factory)
        else:
            inner = hidden_size // 4
            self.weight_predictor = nn.Sequential(
                nn.Linear(hidden_size, inner, **factory), nn.ReLU(), nn.Linear(inner, 2, **factory))

    @property
    def dtype(self) -> torch.dtype:
        """The parameter dtype the router computes in."""
        return next(self.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[..., H]` in any float dtype -> logits `[..., 2]` in the router's dtype.

        The input is cast to the router's own dtype (fp32 for the published routers) so that a
        bf16 model makes the same decisions as the fp32 model the routers were trained with.
        """
        return self.weight_predictor(x.to(self.dtype))

    @torch.no_grad()
    def execute(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[..., H]` -> bool `[...]`, True where the token runs the module.

        argmax returns the first maximal index, so a tie picks index 0: EXECUTE.
        """
        return self.forward(x).argmax(dim=-1) == 0

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, kind={self.kind!r}"
