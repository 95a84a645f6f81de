"""What differs between the supported model families, in one small adapter each.

Everything else (RMSNorm, gated MLP, GQA, rotary embeddings computed by the model's own rotary
module, so Llama 3.x rope scaling comes for free) is shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .ops.linear import ACTIVATIONS


@dataclass(frozen=True)
class LayerGeometry:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    activation: str

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


class Family:
    """Llama: the base case. Subclasses override only what their architecture changes."""

    model_type = "llama"
    qk_norm = False  # a per-head RMSNorm of q and k before RoPE (q_norm, k_norm below)

    def geometry(self, config) -> LayerGeometry:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        activation = config.hidden_act
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"{config.model_type}: hidden_act {activation!r} is not supported; skipgpt supports {sorted(ACTIVATIONS)}"
            )
        return LayerGeometry(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            rms_norm_eps=config.rms_norm_eps,
            activation=activation,
        )

    def sliding_window(self, config) -> Optional[int]:
        """Attention window in tokens, or None for full causal attention."""
        return None

    def q_norm(self, attn: nn.Module, q: torch.Tensor) -> torch.Tensor:
        """Per-head normalisation of q [.., Hq, D] before RoPE (identity here)."""
        return q

    def k_norm(self, attn: nn.Module, k: torch.Tensor) -> torch.Tensor:
        """Per-head normalisation of k [.., Hk, D] before RoPE (identity here)."""
        return k

    def check_layer(self, layer: nn.Module, layer_idx: int) -> None:
        for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, name):
                raise ValueError(f"layer {layer_idx}: a {self.model_type} decoder layer without `{name}`")
        if layer.self_attn.o_proj.bias is not None:
            raise ValueError(f"layer {layer_idx}: o_proj has a bias, which skipgpt does not support")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if getattr(layer.mlp, proj).bias is not None:
                raise ValueError(f"layer {layer_idx}: mlp.{proj} has a bias, which skipgpt does not support")


class MistralFamily(Family):
    model_type = "mistral"

    def sliding_window(self, config) -> Optional[int]:
        return getattr(config, "sliding_window", None)


class Qwen2Family(Family):
    """q/k/v projections carry biases (handled generically); sliding window is opt-in."""

    model_type = "qwen2"

    def sliding_window(self, config) -> Optional[int]:
        if getattr(config, "use_sliding_window", False):
            return config.sliding_window
        return None


class Qwen3Family(Qwen2Family):
    """RMSNorm over each head of q and k before RoPE."""

    model_type = "qwen3"
    qk_norm = True

    def q_norm(self, attn: nn.Module, q: torch.Tensor) -> torch.Tensor:
        return attn.q_norm(q)

    def k_norm(self, attn: nn.Module, k: torch.Tensor) -> torch.Tensor:
        return attn.k_norm(k)


FAMILIES = {f.model_type: f for f in (Family(), MistralFamily(), Qwen2Family(), Qwen3Family())}


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; skipgpt supports {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
