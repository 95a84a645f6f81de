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

    A model spread over several devices by from_pretrained(device_map=...) works as is: each
    routed layer runs on the device of its weights and moves its inputs there (the decoder layers
    replaced here take accelerate's input-moving hooks with them; the modules around them keep
    theirs).
    """
    family_for(model.config)  # fails first, naming the supported families
    if hasattr(model, "hf_device_map"):  # placed by from_pretrained(device_map=...)
        check_placement(model)
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
    device_map: Union[str, dict, None] = None,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a Hugging Face causal LM from a local folder and route it (see `wrap`).

    device: put the whole model on one device ("cpu", "cuda", "cuda:1").
    device_map: spread it over several instead, through transformers/accelerate placement
    (`from_pretrained(device_map=...)`): "auto", "balanced", "balanced_low_0", "sequential",
    or a dict from module names to devices, e.g. {"model.embed_tokens": 0, "model.rotary_emb": 0,
    "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    (a key covers its submodules; "" is the whole model). Every module must land on a device
    that computes (a GPU or the CPU): maps that offload weights (to "disk", or to "cpu" next to
    GPUs, where accelerate keeps them off the device until each forward) are refused, because
    the routed layers read their weights directly. transformers records the placement in
    `model.hf_device_map` when it spans several devices.

    Returns the transformers model itself (a LlamaForCausalLM, Qwen3ForCausalLM, ...), in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if device is not None and device_map is not None:
        raise ValueError(
            f"device={device!r} and device_map={device_map!r}: pass one; device puts the whole model on "
            "one device, device_map spreads it over several"
        )
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise ValueError(f"device_map: expected a strategy name or a dict of module name -> device, got {device_map!r}")
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
    if device_map is not None:
        from_pretrained_kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    if device is not None:
        model.to(device)
    if device_map is not None:
        check_placement(model)
    wrap(model, router=router, lora=lora, pipeline=pipeline, lora_alpha=lora_alpha, lora_r=lora_r)
    return model.eval()


def check_placement(model: nn.Module) -> None:
    """Raise ValueError if a parameter or buffer was offloaded (left on the meta device by
    accelerate, which streams such weights in through hooks at each forward): the routed
    layers read weights directly, so every one must sit on the device that computes with it."""
    offloaded = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if offloaded:
        placement = {str(d) for d in getattr(model, "hf_device_map", {}).values()}
        # accelerate offloads "disk" entries always, "cpu" entries only when a GPU is in the map.
        where = [d for d in ("disk", "cpu") if d in placement and (d == "disk" or placement - {"cpu", "disk"})]
        raise ValueError(
            f"device_map left {len(offloaded)} weights off the device that computes with them (first: {offloaded[0]}; "
            f"offloaded to {' and '.join(where) or 'meta'}): accelerate streams such weights in at each forward, but "
            "skipgpt's routed layers read their weights directly. Put every module on a GPU (give them room: "
            "max_memory, a smaller dtype, more GPUs), or the whole model on the CPU"
        )


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices of the routed layers, in layer order, each once."""
    return list(dict.fromkeys(layer.route_counts.device for layer in routed_layers(model)))


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
    if name != "dense":
        _let_dynamo_capture_row_counts()
    for layer in layers:
        layer.pipeline = name
    return model


def _let_dynamo_capture_row_counts() -> None:
    # The sparse pipelines' exact-count form runs ops whose output size is the number of
    # executing tokens (data-dependent). Without this switch Dynamo breaks the graph at each of
    # them in a plain `torch.compile(model)` (30 layers: dozens of graphs), and fails outright
    # inside torch.cond (compile_model's single-graph mode). Capturing them as unbacked sizes is
    # what the pipelines need, so the switch is turned on, and said so.
    import torch._dynamo.config as dynamo_config

    if not dynamo_config.capture_dynamic_output_shape_ops:
        dynamo_config.capture_dynamic_output_shape_ops = True
        logger.info("skipgpt: set torch._dynamo.config.capture_dynamic_output_shape_ops = True so that "
                    "torch.compile keeps the sparse pipelines' data-dependent row counts in one graph")


def force_routes(model: nn.Module, skip: Optional[float] = 0.25, seed: int = 0) -> nn.Module:
    """Replace the routers' decisions by seeded pseudo-random ones: each token skips each module
    with probability `skip`, the same in every pipeline and on every device. skip=None restores
    the routers."""
    if skip is not None and not 0.0 <= skip <= 1.0:
        raise ValueError(f"skip: expected a rate in [0, 1] or None, got {skip}")
    # Every layer's device gets its copy of the parameters now (layers spread by a device_map).
    routed_layers(model)[0].state.force(skip, seed, model_devices(model))
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
    return sparsity_from_counts([layer.layer_idx for layer in layers], route_counts(model).tolist())


def route_counts(model: nn.Module) -> torch.Tensor:
    """[layers, 3] int64 on the first layer's device: per layer, tokens that executed attention,
    tokens that executed the MLP, and non-padding tokens, since the last `reset_sparsity`. Layers
    on other devices (device_map) are copied over, so the caller reads them in one transfer."""
    layers = routed_layers(model)
    device = layers[0].route_counts.device
    return torch.stack([layer.route_counts.to(device) for layer in layers])


def sparsity_from_counts(layer_ids: list[int], counts: list[list[int]]) -> dict:
    """`sparsity`'s dict from per-layer [attention executed, MLP executed, tokens] counts (one row
    per entry of layer_ids); also used on counts summed over data-parallel ranks."""
    def skip_rate(executed: int, tokens: int) -> float:
        return (tokens - executed) / tokens if tokens else 0.0

    per_layer = [
        {"layer": layer, "attention": skip_rate(attn, tokens), "mlp": skip_rate(mlp, tokens)}
        for layer, (attn, mlp, tokens) in zip(layer_ids, counts)
    ]
    tokens = sum(c[2] for c in counts)
    return {
        "attention": skip_rate(sum(c[0] for c in counts), tokens),
        "mlp": skip_rate(sum(c[1] for c in counts), tokens),
        "tokens": int(counts[0][2]) if counts else 0,
        "per_layer": per_layer,
    }
