"""Static pruning baseline (ShortGPT-style): drop whole modules, the same for every token.

The SkipGPT paper compares token routing against static pruning, which removes the modules
that matter least for every token alike. This module builds that baseline at the same compute
as a routed model, so the quality table shows what routing per token buys.

Score. For module m (the attention or the MLP of layer l) with residual stream `u` before it and
`v` after it (attention: `u = x`, `v = h = x + attn(x)`; MLP: `u = h`, `v = y = h + mlp(h)`),
measured on the dense model over calibration text:

    importance(m) = 1 - mean over tokens of cos(u_t, v_t)

(ShortGPT's "block influence", taken per module instead of per layer.) A module that barely
turns the residual stream scores near 0 and is dropped first. Scores come from one dense pass:
dropping a module does not re-score the others.

Choice. `round(rate * num_layers)` attention modules with the lowest scores (rounding half up)
and likewise for the MLP modules, with separate rates for the two kinds (by default the same),
so both kinds match a routed model's per-kind skip.

Application. A dropped module gets a forced router: a Linear `Router` with zero weights and
bias `[0, 1]` (logits (0, 1) for every token: argmax is SKIP); a kept one gets bias `[1, 0]`
(EXECUTE). These are ordinary router files, so the static baseline runs through every
pipeline, `skipgpt.load(router=...)` and `skipgpt eval --router` unchanged.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .checkpoint import ROUTER_NAMES, decoder_layers, write_state_dict
from .router import Router

MODULES = ("attention", "mlp")


@torch.no_grad()
def module_importance(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """`[num_layers, 2]` float64 importance scores (column 0 attention, 1 MLP) of the dense model
    over the token rows `ids` `[N, L]` (no padding)."""
    from .training import observe_dense

    num_layers = len(decoder_layers(model))
    sums = torch.zeros(num_layers, 2, dtype=torch.float64)

    def observe(layer_idx, x, h, y):
        for col, (u, v) in enumerate(((x, h), (h, y))):
            cos = torch.nn.functional.cosine_similarity(u.float(), v.float(), dim=-1)
            sums[layer_idx, col] += float((1.0 - cos).double().sum())

    tokens = observe_dense(model, ids, batch_size, observe)
    return sums / max(tokens, 1)


def _count(rate: float, num_layers: int) -> int:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"skip rate: expected a value in [0, 1], got {rate}")
    return min(num_layers, int(math.floor(rate * num_layers + 0.5)))


def choose_drops(scores: torch.Tensor, attention_skip: float, mlp_skip: Optional[float] = None) -> dict[str, list[int]]:
    """{"attention": [layers], "mlp": [layers]}: the lowest-scoring `round(rate * num_layers)`
    modules of each kind (ties: the lower layer index first), sorted by layer."""
    mlp_skip = attention_skip if mlp_skip is None else mlp_skip
    num_layers = scores.shape[0]
    drops = {}
    for col, (name, rate) in enumerate(zip(MODULES, (attention_skip, mlp_skip))):
        n = _count(rate, num_layers)
        order = sorted(range(num_layers), key=lambda layer: (float(scores[layer, col]), layer))
        drops[name] = sorted(order[:n])
    return drops


def forced_router(hidden_size: int, skip: bool, device=None) -> Router:
    """A Linear router whose decision ignores its input: zero weights, bias (0, 1) to always
    SKIP or (1, 0) to always EXECUTE (argmax of the logits; finite inputs)."""
    router = Router(hidden_size, "linear", dtype=torch.float32, device=device)
    with torch.no_grad():
        router.weight_predictor.weight.zero_()
        router.weight_predictor.bias.copy_(torch.tensor([0.0, 1.0] if skip else [1.0, 0.0]))
    return router


def static_router_state(num_layers: int, hidden_size: int, drops: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The router file content (stage-1 keys) that realizes `drops`."""
    state = {}
    for layer in range(num_layers):
        for module, name in zip(MODULES, ROUTER_NAMES):
            router = forced_router(hidden_size, layer in drops[module])
            for key, value in router.state_dict().items():
                state[f"model.layers.{layer}.{name}.{key}"] = value
    return state


def apply_static_routes(model: nn.Module, drops: dict[str, list[int]]) -> nn.Module:
    """Set forced routers on every decoder layer of a wrapped model (`skipgpt.wrap`), in place."""
    hidden = model.config.hidden_size
    for layer_idx, layer in enumerate(decoder_layers(model)):
        device = next(layer.parameters()).device
        for module, name in zip(MODULES, ROUTER_NAMES):
            setattr(layer, name, forced_router(hidden, layer_idx in drops[module], device))
    return model


def prune_static(model_path: Union[str, os.PathLike], output: Union[str, os.PathLike], skip: float = 0.25,
                 mlp_skip: Optional[float] = None, data: str = "wiki", samples: int = 16, seq_len: int = 512,
                 batch_size: int = 8, device: Optional[str] = None, dtype: Optional[str] = None) -> dict:
    """Score the modules of the model at `model_path` on `samples` rows of `seq_len` tokens of
    `data` ("wiki": the train split; or a text/JSONL file), choose the drops (`skip` for attention,
    `mlp_skip` for the MLP, default `skip`), write the router file `output` and a JSON report
    next to it (`output` with suffix .json). Returns the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .training import pack_documents, read_texts, resolve_device, resolve_dtype

    start = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = pack_documents(read_texts(data, "train"), tokenizer, seq_len)[:samples]
    if len(ids) == 0:
        raise ValueError(f"{data}: not enough text for one row of {seq_len} tokens")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(dev)
    scores = module_importance(model, ids, batch_size)
    drops = choose_drops(scores, skip, mlp_skip)
    num_layers = scores.shape[0]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_state_dict(static_router_state(num_layers, model.config.hidden_size, drops), output)
    report = {
        "model": str(model_path), "data": str(data), "rows": len(ids), "seq_len": seq_len,
        "score": "1 - mean cos(residual before module, residual after module), dense model",
        "requested_skip": {"attention": skip, "mlp": skip if mlp_skip is None else mlp_skip},
        "realized_skip": {m: len(drops[m]) / num_layers for m in MODULES},
        "dropped": drops,
        "scores": [{"layer": i, "attention": float(a), "mlp": float(m)} for i, (a, m) in enumerate(scores.tolist())],
        "router_file": str(output), "device": str(dev), "dtype": str(torch_dtype).replace("torch.", ""),
        "wall_seconds": time.perf_counter() - start,
    }
    output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
