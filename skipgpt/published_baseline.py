"""`skipgpt bench --baseline-published PATH`: time the published SkipGPT inference code's Triton
layer as one more provider (`published-triton-sparse`) next to skipgpt's, in the same run.

Nothing of that code ships with skipgpt; PATH is a checkout of it. What is expected there (the
layout of the published repository's `inference/` package when this hook was written):

- `inference/wrapper/model/llama.py` (PATH may also be the `inference/` folder itself) defining
  `LlamaMoDDecoderLayer(config, block)`: built around a transformers `LlamaDecoderLayer` `block`
  (whose weights it uses, so both implementations run the same weights); called as
  `layer(hidden_states, attention_mask=[B, S] bool, position_ids, past_key_values, use_cache,
  cache_position, position_embeddings=(cos, sin), is_benchmark=True)` and returning the layer's
  output hidden states. `config.sparse = True` and `_forward_impl = "triton"` (on the config,
  the layer, its `self_attn` and its `mlp`) select its Triton pipeline. It routes with its
  `router_attention` / `router_mlp` modules: `[..., 2]` logits, argmax 1 = skip.
- `inference/wrapper/model/cache.py` defining `DynamicCacheSeqFirst(config=...)`, whose
  `update(keys, values, layer_idx)` takes sequence-first `[B, S, Hk, D]` tensors.

The package is imported by file path under a private module name (its relative imports resolve
inside it; nothing is added to sys.path); its own requirements (Triton, flash-attn, the
transformers release it targets) must be installed. Its routers are replaced by modules that
return skipgpt's forced routes as logits, so both implementations see the same routes and its
output is checked against the same ground truth. As in the published benchmark, the layer is
called with `is_benchmark=True` (it copies the cache on every call, leaving it unchanged), so a
decode point repeats its first step (as the hf provider does).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Union

import torch
from torch import nn

from . import ops

LAYER_FILE = Path("wrapper", "model", "llama.py")
CACHE_FILE = Path("wrapper", "model", "cache.py")
LAYER_CLASS = "LlamaMoDDecoderLayer"
CACHE_CLASS = "DynamicCacheSeqFirst"
_PACKAGE = "_skipgpt_published_inference"


class PublishedError(Exception):
    """PATH does not hold the published code this hook expects (the message says what)."""


def locate(path: Union[str, Path]) -> Path:
    """The published `inference/` package folder under `path`, or PublishedError."""
    root = Path(path).expanduser()
    if not root.exists():
        raise PublishedError(f"--baseline-published: {root} does not exist")
    if not root.is_dir():
        raise PublishedError(f"--baseline-published: {root} is not a folder (expected a checkout of the published "
                             "SkipGPT repository)")
    for candidate in (root / "inference", root):
        if (candidate / LAYER_FILE).is_file():
            return candidate
    raise PublishedError(
        f"--baseline-published: {root} does not look like a checkout of the published SkipGPT inference code: "
        f"expected {Path('inference') / LAYER_FILE} (defining {LAYER_CLASS}) and {Path('inference') / CACHE_FILE} "
        f"(defining {CACHE_CLASS}) under it. See skipgpt/published_baseline.py for what the hook expects."
    )


def load(path: Union[str, Path]) -> types.SimpleNamespace:
    """Import the published layer and cache classes from `path`; PublishedError names what is
    missing or what failed to import."""
    package_dir = locate(path)
    if not (package_dir / CACHE_FILE).is_file():
        raise PublishedError(f"--baseline-published: {package_dir / CACHE_FILE} is missing (it should define {CACHE_CLASS})")
    # A package object rooted at the folder: its submodules import by path, relative imports
    # included, whether or not the folder has an __init__.py. Another checkout imported earlier
    # in this process (or a failed import) is dropped first.
    for name in [n for n in sys.modules if n == _PACKAGE or n.startswith(_PACKAGE + ".")]:
        del sys.modules[name]
    init = package_dir / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(_PACKAGE, init, submodule_search_locations=[str(package_dir)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = package
        try:
            spec.loader.exec_module(package)
        except Exception as e:
            del sys.modules[_PACKAGE]
            raise PublishedError(f"--baseline-published: importing {init} failed: {type(e).__name__}: {e}") from e
    else:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(package_dir)]
        package.__package__ = _PACKAGE
        sys.modules[_PACKAGE] = package
    found = {}
    for file, cls in ((LAYER_FILE, LAYER_CLASS), (CACHE_FILE, CACHE_CLASS)):
        name = f"{_PACKAGE}." + ".".join(file.with_suffix("").parts)
        try:
            module = importlib.import_module(name)
        except Exception as e:  # its own imports: triton, flash_attn, a transformers API it expects
            raise PublishedError(
                f"--baseline-published: importing {package_dir / file} failed: {type(e).__name__}: {e} "
                "(install the published code's requirements)"
            ) from e
        if not isinstance(getattr(module, cls, None), type):
            raise PublishedError(f"--baseline-published: {package_dir / file} defines no class {cls}; "
                                 "see skipgpt/published_baseline.py for what the hook expects")
        found[cls] = getattr(module, cls)
    return types.SimpleNamespace(path=package_dir, layer_class=found[LAYER_CLASS], cache_class=found[CACHE_CLASS])


class _FixedRoutes(nn.Module):
    """Stands in for a published router: returns the logits it was given for the current step."""

    def __init__(self):
        super().__init__()
        self.logits = None

    def forward(self, hidden_states):
        return self.logits


class PublishedLayer:
    """The published layer around a LayerBench's HF layer (same weights)."""

    def __init__(self, published: types.SimpleNamespace, bench):
        config = copy.deepcopy(bench.config)
        config.sparse = True
        config._forward_impl = "triton"
        self.config = config
        self.cache_class = published.cache_class
        try:
            self.layer = published.layer_class(config, bench.hf)
        except Exception as e:
            raise PublishedError(f"building {LAYER_CLASS}(config, block) failed: {type(e).__name__}: {e}") from e
        for module in (self.layer, getattr(self.layer, "self_attn", None), getattr(self.layer, "mlp", None)):
            if module is not None:
                module._forward_impl = "triton"
        self.layer.router_attention = _FixedRoutes()
        self.layer.router_mlp = _FixedRoutes()
        self.layer.eval()

    def step(self, bench, x, rope, past_kv, past: int, steps: int):
        """A closure like LayerBench.step's: the first step (prefill, or one decode token after
        `past` cached tokens), run `steps` times; routes are skipgpt's forced ones for layer 0."""
        batch, new = x.shape[:2]
        device = x.device
        slots = torch.arange(past, past + new, device=device)
        start = torch.full((1,), past, dtype=torch.int64, device=device)
        skip = ~ops.forced_execute(bench.state.forced_params, start, batch, new, 0)  # [2, B, new], True = skip
        # Logits whose argmax is 1 exactly where the token skips.
        logits = torch.stack([~skip, skip], dim=-1).to(x.dtype)
        self.layer.router_attention.logits, self.layer.router_mlp.logits = logits[0], logits[1]
        cache = self.cache_class(config=self.config)
        if past:
            cache.update(past_kv[0].clone(), past_kv[1].clone(), layer_idx=0)
        mask = torch.ones(batch, past + new, dtype=torch.bool, device=device)
        cache_position = slots
        position_ids = slots[None].expand(batch, -1)
        layer = self.layer

        def run():
            with torch.no_grad():
                for _ in range(steps):
                    out = layer(x, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                                use_cache=True, cache_position=cache_position, position_embeddings=rope[0],
                                is_benchmark=True)
            return out[0] if isinstance(out, tuple) else out

        return run
