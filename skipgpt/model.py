"""The user-facing model API: load or wrap a Hugging Face causal LM so its decoder layers are
routed, switch pipelines, force routes, and read the realized sparsity."""
from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
from torch import nn

from .families import family_for
from .layer import PIPELINES, RoutedDecoderLayer
from .routing import RoutingState

logger = logging.getLogger("skipgpt")

PathLike = Union[str, os.PathLike]
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def routed_layers(model: nn.Module) -> list[RoutedDecoderLayer]:
    layers = [m for m in model.modules() if isinstance(m, RoutedDecoderLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no routed layers; call skipgpt.wrap(model) or skipgpt.load(path) first")
    return layers


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}: expected a Hugging Face causal LM with `model.model.layers` "
            "(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
        )
    return layers


def _capture_padding(base_model, args, kwargs):
    """Forward pre-hook on the base model: hands the call's padding mask to the routed layers.
    The state is found through the module (not a closure), so a deepcopy of the model stays
    wired to its own copy."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and mask.dim() not in (2, 4):
        raise ValueError(
            "attention_mask: expected a 2-D [batch, sequence] padding mask (or the 4-D causal mask "
            f"transformers builds for static caches), got shape {tuple(mask.shape)}"
        )
    base_model.skipgpt_routing.padding_mask = mask


def wrap(
    model: nn.Module,
    router: Optional[PathLike] = None,
    lora: Optional[PathLike] = None,
    pipeline: str = "triton-sparse",
    lora_alpha: float = 32,
    lora_r: int = 16,
) -> nn.Module:
    """Route the decoder layers of an already loaded Hugging Face causal LM, in place.

    router: a router checkpoint (published `.pth` in either key style, or safetensors);
    lora: LoRA weights (flat state dict or PEFT adapter directory) merged into the base weights
    with scale lora_alpha / lora_r. Returns the same model object. Both files are read and
    checked against the model before it changes: a bad file raises CheckpointError and leaves
    the model as it was.
    """
    family_for(model.config)  # fails first, naming the supported families
    layers = _decoder_layers(model)
    if any(isinstance(layer, RoutedDecoderLayer) for layer in layers):
        raise ValueError("model is already wrapped by skipgpt; use skipgpt.set_pipeline to change its pipeline")
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline: expected one of {', '.join(PIPELINES)}, got {pipeline!r}")
    if router is not None:
        # Read and match the routers before anything changes: a router file for another model
        # must not leave the model half-converted (LoRA merged, layers wrapped).
        from .checkpoint import RouterCheckpoint, check_routers_fit, load_routers

        if not isinstance(router, RouterCheckpoint):
            router = load_routers(router)
        check_routers_fit(model, router)
    if lora is not None:
        from .checkpoint import merge_lora

        merge_lora(model, lora, alpha=lora_alpha, r=lora_r)  # checks everything before merging
    state = RoutingState()
    for i, layer in enumerate(layers):
        layers[i] = RoutedDecoderLayer(layer, i, model.config, state)
    model.model.skipgpt_routing = state
    model.model.register_forward_pre_hook(_capture_padding, with_kwargs=True)
    if router is not None:
        from .checkpoint import attach_routers

        attach_routers(model, router)
    set_pipeline(model, pipeline)
    return model


def load(
    path: PathLike,
    router: Optional[PathLike] = None,
    lora: Optional[PathLike] = None,
    pipeline: str = "triton-sparse",
    dtype: Union[torch.dtype, str, None] = None,
    device: Union[torch.device, str, None] = None,
    lora_alpha: float = 32,
    lora_r: int = 16,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a Hugging Face causal LM from a local folder and route it (see `wrap`).

    Returns the transformers model itself (a LlamaForCausalLM, Qwen3ForCausalLM, ...), in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    for name, p in (("router", router), ("lora", lora)):
        if p is not None and not os.path.exists(p):
            raise FileNotFoundError(f"{name} file not found: {p}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline: expected one of {', '.join(PIPELINES)}, got {pipeline!r}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    if device is not None:
        model.to(device)
    wrap(model, router=router, lora=lora, pipeline=pipeline, lora_alpha=lora_alpha, lora_r=lora_r)
    return model.eval()


def set_pipeline(model: nn.Module, name: str) -> nn.Module:
    """Switch every routed layer to `name`: "dense", "torch-sparse" or "triton-sparse"."""
    if name not in PIPELINES:
        raise ValueError(f"pipeline: expected one of {', '.join(PIPELINES)}, got {name!r}")
    layers = routed_layers(model)
    if name != "dense" and layers[0].state.forced_skip is None:
        missing = [layer.layer_idx for layer in layers if layer.router_attention is None or layer.router_mlp is None]
        if missing:
            raise ValueError(
                f"pipeline {name!r} routes tokens, but layers {missing[:8]}{'...' if len(missing) > 8 else ''} have no "
                "routers: pass router=PATH to skipgpt.load/wrap, call skipgpt.force_routes(model, skip=...), "
                "or use pipeline='dense'"
            )
    for layer in layers:
        layer.pipeline = name
    return model


def force_routes(model: nn.Module, skip: Optional[float] = 0.25, seed: int = 0) -> nn.Module:
    """Replace the routers' decisions by seeded pseudo-random ones: each token skips each module
    with probability `skip`, the same in every pipeline and on every device. skip=None restores
    the routers."""
    if skip is not None and not 0.0 <= skip <= 1.0:
        raise ValueError(f"skip: expected a rate in [0, 1] or None, got {skip}")
    layer = routed_layers(model)[0]
    layer.state.force(skip, seed, layer.route_counts.device)
    return model


def reset_sparsity(model: nn.Module) -> None:
    for layer in routed_layers(model):
        layer.route_counts.zero_()


def sparsity(model: nn.Module) -> dict:
    """Realized skip rates since the last `reset_sparsity`, over non-padding tokens.

    Returns {"attention": float, "mlp": float, "tokens": int, "per_layer": [{"layer", "attention",
    "mlp"}, ...]}. Reads every layer's device counters in one transfer.
    """
    layers = routed_layers(model)
    device = layers[0].route_counts.device
    counts = torch.stack([layer.route_counts.to(device) for layer in layers]).tolist()
    def skip_rate(executed: int, tokens: int) -> float:
        return (tokens - executed) / tokens if tokens else 0.0

    per_layer = [
        {"layer": layer.layer_idx, "attention": skip_rate(attn, tokens), "mlp": skip_rate(mlp, tokens)}
        for layer, (attn, mlp, tokens) in zip(layers, counts)
    ]
    tokens = sum(c[2] for c in counts)
    return {
        "attention": skip_rate(sum(c[0] for c in counts), tokens),
        "mlp": skip_rate(sum(c[1] for c in counts), tokens),
        "tokens": counts[0][2],
        "per_layer": per_layer,
    }
