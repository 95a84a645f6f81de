"""Shared by the placement tests (CPU and GPU): device maps and where they put each weight."""
from __future__ import annotations

import torch


def layer_split_map(num_layers: int, first, second, split: int | None = None) -> dict:
    """An explicit per-module device map: the embedding, RoPE and layers [0, split) on `first`,
    layers [split, num_layers) and the final norm on `second`, lm_head on `first` (with the
    embedding it may be tied to), so activations cross devices both ways."""
    split = num_layers // 2 if split is None else split
    placement = {"model.embed_tokens": first, "model.rotary_emb": first}
    for i in range(num_layers):
        placement[f"model.layers.{i}"] = first if i < split else second
    placement.update({"model.norm": second, "lm_head": first})
    return placement


def expected_device(name: str, placement: dict) -> torch.device:
    """The device `placement` gives the parameter or buffer `name`: its longest module prefix."""
    best = max((key for key in placement if key == "" or name == key or name.startswith(key + ".")), key=len)
    value = placement[best]
    return torch.device(f"cuda:{value}" if isinstance(value, int) else value)


def misplaced(model: torch.nn.Module, placement: dict) -> list[str]:
    """Parameters and buffers not on the device `placement` asks for, as "name on device". A
    routed layer's own additions (routers, route counts) belong with their layer too."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [f"{name} on {t.device}" for name, t in tensors if t.device != expected_device(name, placement)]


def random_router_file(path, num_layers: int, hidden: int, seed: int = 0):
    """A stage-1 router checkpoint of random Linear routers (about half the tokens skip each
    module), so real routers decide routes in tests of models without trained ones."""
    from skipgpt.checkpoint import write_state_dict

    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(num_layers):
        for name in ("router_attention", "router_mlp"):
            key = f"model.layers.{i}.{name}.weight_predictor"
            state[f"{key}.weight"] = torch.randn(2, hidden, generator=g) / hidden ** 0.5
            state[f"{key}.bias"] = torch.zeros(2)
    return write_state_dict(state, path)
