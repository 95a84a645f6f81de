"""Reading, checking, attaching and writing SkipGPT checkpoints: routers and LoRA adapters.

Checkpoints come from the internet, so every reader here fails safe:
- `.pth/.pt/.bin` files load with `torch.load(weights_only=True)` only; a pickle that would need
  to run code is refused (never executed). safetensors is preferred and written by default.
- Missing, truncated or corrupted files, missing/unexpected keys, wrong shapes, NaN/Inf values
  and checkpoints saved for another model raise `CheckpointError` (a `ValueError`) whose
  message names the file and the key.
- Corruption: torch's zip reader ignores the CRC-32 each record of a `.pth` carries, so a
  flipped bit in a tensor loads silently; `read_state_dict` checks the CRCs first. safetensors
  has no checksum: damage to its header is caught, damage to tensor bytes only when it yields
  NaN/Inf or breaks a shape (as do legacy, non-zip `torch.save` files).

Key styles (DESIGN.md section 1):
- routers, stage 1: `model.layers.{i}.router_{attention,mlp}.weight_predictor.{weight,bias}`
  (Linear routers) or `...weight_predictor.{0,2}.{weight,bias}` (MLP routers);
  stage 2: the same under a `base_model.model.` prefix (saved from a PEFT-wrapped model).
- LoRA: `[base_model.model.]model.layers.{i}[.block].{self_attn|mlp}.{proj}.lora_{A|B}[.default].weight`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .router import Router

logger = logging.getLogger("skipgpt")

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
ROUTER_NAMES = ("router_attention", "router_mlp")

# The parameters (relative to `weight_predictor.`) each router kind holds.
_ROUTER_PARAMS = {
    "linear": ("weight", "bias"),
    "mlp": ("0.weight", "0.bias", "2.weight", "2.bias"),
}
_PARAM_KIND = {p: kind for kind, params in _ROUTER_PARAMS.items() for p in params}

_ROUTER_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\."
    r"(?P<router>router_attention|router_mlp)\.weight_predictor\.(?P<param>.+)$")
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?:block\.)?"
    r"(?P<module>self_attn|mlp)\.(?P<proj>\w+?)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, malformed, or does not fit the model."""


# ----------------------------------------------------------------------------- files

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat `{name: tensor}` dict from `.safetensors` or `.pth/.pt/.bin`, on CPU.

    A top-level `{"state_dict": {...}}` or `{"model": {...}}` wrapper (training checkpoints) is
    unwrapped. Raises FileNotFoundError for a missing file and CheckpointError for anything
    unreadable, unsafe or not a flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError and friends: truncated header, bad offsets...
            raise CheckpointError(f"{path}: not a readable safetensors file "
                                  f"(truncated or corrupted?): {e}") from e
    elif suffix in TORCH_SUFFIXES:
        _check_zip_records(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # The restricted unpickler met something other than tensors and plain containers:
            # loading it would mean running code from the file. Refuse; never retry unsafely.
            raise CheckpointError(
                f"{path}: refused to load: the file needs pickle to run code or build objects "
                f"that are not tensors (only weights are accepted; convert it to safetensors "
                f"from a trusted environment). Detail: {str(e).splitlines()[0]}") from e
        except Exception as e:  # RuntimeError (bad zip), EOFError, KeyError... on damaged files
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                                  f"(truncated or corrupted?): {type(e).__name__}: {e}") from e
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r}; expected "
                              f"{SAFETENSORS_SUFFIX} or one of {', '.join(TORCH_SUFFIXES)}")
    return _as_tensor_dict(state, path)


def _check_zip_records(path: Path) -> None:
    """Verify the CRC-32 of every record of a zip-format `torch.save` file (torch.load does not).

    Streams each record once (1 MiB at a time). Records whose stored CRC is 0 are skipped:
    `torch.serialization.set_crc32_options(False)` saves files that way. Legacy (non-zip) files
    carry no checksum and pass unchecked; a file that is not a valid zip is left to torch.load,
    which reports it.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as record:  # raises BadZipFile at EOF on a CRC mismatch
                    while record.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from e


def _as_tensor_dict(state: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap a training-checkpoint wrapper and check the result maps str -> Tensor."""
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), Mapping):
                logger.debug("%s: using the %r entry of the checkpoint", path, wrapper)
                state = state[wrapper]
                break
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, "
                                  f"not a tensor")
        out[key] = value
    return out


def write_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write `{name: tensor}` to `path`: safetensors for `.safetensors`, torch.save for
    `.pth/.pt/.bin`. Written to a temporary file first so a crash never leaves half a file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
        raise CheckpointError(f"{path}: cannot write format {suffix!r}; use {SAFETENSORS_SUFFIX} "
                              f"(recommended) or .pth")
    # safetensors wants contiguous CPU tensors that share no storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(tensors, tmp)
    os.replace(tmp, path)
    logger.info("wrote %d tensors to %s", len(tensors), path)
    return path


def _check_values(t: torch.Tensor, source: object, key: str) -> None:
    if not t.is_floating_point():
        raise CheckpointError(f"{source}: key {key!r} has dtype {t.dtype}, expected a float tensor")
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{source}: key {key!r} contains NaN or Inf values")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (`model.model.layers`) or base model."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise CheckpointError(f"{type(model).__name__} has no decoder layers at model.model.layers")


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        hidden = getattr(getattr(config, "get_text_config", lambda: None)(), "hidden_size", None)
    if hidden is None:
        raise CheckpointError(f"{type(model).__name__} has no config.hidden_size")
    return int(hidden)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- routers

@dataclass
class RouterCheckpoint:
    """Validated router weights.

    tensors: stage-1 style keys -> tensors, e.g. `model.layers.0.router_mlp.weight_predictor.bias`.
        Linear: weight `[2, H]`, bias `[2]`. MLP: 0.weight `[H/4, H]`, 0.bias `[H/4]`,
        2.weight `[2, H/4]`, 2.bias `[2]`.
    """

    tensors: dict[str, torch.Tensor]
    kind: str  # "linear" or "mlp"
    num_layers: int
    hidden_size: int
    source: str = "<state dict>"

    def router_state(self, layer: int, router: str) -> dict[str, torch.Tensor]:
        """The state dict of one `Router` (keys `weight_predictor.*`)."""
        prefix = f"model.layers.{layer}.{router}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def is_router_key(key: str) -> bool:
    return _ROUTER_KEY.match(key) is not None


def _expected_router_shapes(kind: str, hidden: int) -> dict[str, tuple[int, ...]]:
    if kind == "linear":
        return {"weight": (2, hidden), "bias": (2,)}
    inner = hidden // 4
    return {"0.weight": (inner, hidden), "0.bias": (inner,), "2.weight": (2, inner), "2.bias": (2,)}


def routers_from_state_dict(state: Mapping[str, torch.Tensor],
                            source: str = "<state dict>") -> RouterCheckpoint:
    """Validate router tensors in either key style and normalize them to stage-1 keys.

    Every key must be a router key; every layer `0..N-1` needs both routers, all of one kind,
    with consistent shapes and finite float values.
    """
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # normalized key -> key in the file, for messages
    kind_seen: dict[str, str] = {}  # kind -> an example key
    for key, t in state.items():
        m = _ROUTER_KEY.match(key)
        if m is None or m["param"] not in _PARAM_KIND:
            raise CheckpointError(
                f"{source}: unexpected key {key!r} in a router checkpoint (expected "
                f"[base_model.model.]model.layers.N.router_{{attention,mlp}}.weight_predictor."
                f"{{weight,bias}} or ...weight_predictor.{{0,2}}.{{weight,bias}})")
        norm = f"model.layers.{int(m['layer'])}.{m['router']}.weight_predictor.{m['param']}"
        if norm in tensors:
            raise CheckpointError(f"{source}: keys {origin[norm]!r} and {key!r} hold the same router "
                                  f"parameter")
        tensors[norm], origin[norm] = t, key
        kind_seen.setdefault(_PARAM_KIND[m["param"]], key)
    if not tensors:
        raise CheckpointError(f"{source}: no router keys found")
    if len(kind_seen) > 1:
        raise CheckpointError(f"{source}: mixes router kinds: {kind_seen['linear']!r} belongs to a "
                              f"Linear router, {kind_seen['mlp']!r} to an MLP router")
    (kind,) = kind_seen

    num_layers = 1 + max(int(_ROUTER_KEY.match(k)["layer"]) for k in tensors)
    first = "model.layers.0.router_attention.weight_predictor." + _ROUTER_PARAMS[kind][0]
    if first not in tensors:
        raise CheckpointError(f"{source}: missing key {first!r}")
    hidden = tensors[first].shape[-1]
    expected = _expected_router_shapes(kind, hidden)
    for layer in range(num_layers):
        for router in ROUTER_NAMES:
            for param, shape in expected.items():
                norm = f"model.layers.{layer}.{router}.weight_predictor.{param}"
                if norm not in tensors:
                    raise CheckpointError(f"{source}: missing key {norm!r} (the checkpoint has "
                                          f"router keys for layers up to {num_layers - 1})")
                t = tensors[norm]
                if tuple(t.shape) != shape:
                    raise CheckpointError(
                        f"{source}: key {origin[norm]!r} has shape {tuple(t.shape)}, expected "
                        f"{shape} for a {kind} router of hidden size {hidden}")
                _check_values(t, source, origin[norm])
    return RouterCheckpoint(tensors, kind, num_layers, hidden, str(source))


def load_routers(path: str | os.PathLike) -> RouterCheckpoint:
    """Read and validate a router checkpoint (`.pth/.pt/.bin` or `.safetensors`, either style)."""
    ckpt = routers_from_state_dict(read_state_dict(path), str(path))
    logger.info("read %s routers for %d layers (hidden %d) from %s",
                ckpt.kind, ckpt.num_layers, ckpt.hidden_size, path)
    return ckpt


def check_routers_fit(model: nn.Module, ckpt: RouterCheckpoint) -> None:
    """Raise CheckpointError, naming the file and a key, unless the routers of `ckpt` match the
    model's hidden size and layer count (a checkpoint saved for another model)."""
    layers = decoder_layers(model)
    hidden = _hidden_size(model)
    first_param = _ROUTER_PARAMS[ckpt.kind][0]
    if ckpt.hidden_size != hidden:
        raise CheckpointError(
            f"{ckpt.source}: routers have hidden size {ckpt.hidden_size} (key "
            f"'model.layers.0.router_attention.weight_predictor.{first_param}'), but the model has "
            f"hidden size {hidden}: the checkpoint was saved for another model")
    if ckpt.num_layers != len(layers):
        raise CheckpointError(
            f"{ckpt.source}: routers cover {ckpt.num_layers} layers (last key "
            f"'model.layers.{ckpt.num_layers - 1}.router_mlp.weight_predictor.{first_param}'), but "
            f"the model has {len(layers)} layers: the checkpoint was saved for another model")


def attach_routers(model: nn.Module, routers: str | os.PathLike | RouterCheckpoint,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Set `router_attention` and `router_mlp` (`Router` modules in `dtype`, on each layer's
    device) on every decoder layer `model.model.layers[i]`, loaded from `routers`.

    The checkpoint must match the model's hidden size and layer count. Returns `model`.
    """
    ckpt = routers if isinstance(routers, RouterCheckpoint) else load_routers(routers)
    check_routers_fit(model, ckpt)
    layers = decoder_layers(model)
    hidden = _hidden_size(model)
    for i, layer in enumerate(layers):
        device = _device_of(layer)
        for name in ROUTER_NAMES:
            router = Router(hidden, ckpt.kind, dtype=dtype, device=device)
            router.load_state_dict(ckpt.router_state(i, name), strict=True)  # copies and casts
            setattr(layer, name, router)
    logger.info("attached %s routers (%s) to %d layers from %s",
                ckpt.kind, dtype, len(layers), ckpt.source)
    return model


def save_routers(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write every layer's routers in the stage-1 key style. The extension picks the format:
    `.safetensors` (recommended) or `.pth/.pt/.bin`."""
    state = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name in ROUTER_NAMES:
            router = getattr(layer, name, None)
            if not isinstance(router, nn.Module):
                raise CheckpointError(f"cannot save routers to {path}: layer {i} has no {name}")
            for key, value in router.state_dict().items():
                state[f"model.layers.{i}.{name}.{key}"] = value
    return write_state_dict(state, path)


# ----------------------------------------------------------------------------- LoRA

@dataclass
class LoraSummary:
    """What `merge_lora` did: `merged` weight matrices got `(B @ A) * scale` added."""

    merged: int
    alpha: float
    r: int
    scale: float
    source: str
    modules: list[str] = field(default_factory=list)


def is_lora_key(key: str) -> bool:
    return _LORA_KEY.match(key) is not None


def normalize_lora_key(key: str) -> str:
    """`[base_model.model.]model.layers.{i}[.block].{m}.{p}.lora_{A|B}[.default].weight`
    -> `model.layers.{i}.{m}.{p}.lora_{A|B}.weight` (the flat style merge_lora reads)."""
    m = _LORA_KEY.match(key)
    if m is None:
        raise CheckpointError(f"not a LoRA key: {key!r}")
    return f"model.layers.{int(m['layer'])}.{m['module']}.{m['proj']}.lora_{m['ab']}.weight"


def _lora_pairs(state: Mapping[str, torch.Tensor], source: str, r: int | None
                ) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """Group LoRA tensors by target module path (`model.layers.{i}.{m}.{p}`) and check them.

    Returns `{module_path: {"A": (key, A [rank, in]), "B": (key, B [out, rank])}}`.
    With `r` given, the rank in the file must equal it (a different rank would scale wrongly).
    """
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in state.items():
        m = _LORA_KEY.match(key)
        if m is None:
            hint = (" (router weights go in the router file; split a full checkpoint with "
                    "`skipgpt convert`)" if is_router_key(key) else "")
            raise CheckpointError(f"{source}: unexpected key {key!r} in a LoRA checkpoint{hint}")
        module = f"model.layers.{int(m['layer'])}.{m['module']}.{m['proj']}"
        entry = pairs.setdefault(module, {})
        if m["ab"] in entry:
            raise CheckpointError(f"{source}: keys {entry[m['ab']][0]!r} and {key!r} hold the same "
                                  f"LoRA matrix")
        entry[m["ab"]] = (key, t)
    if not pairs:
        raise CheckpointError(f"{source}: no LoRA keys found")
    for module, entry in pairs.items():
        for have, need in (("A", "B"), ("B", "A")):
            if need not in entry:
                raise CheckpointError(f"{source}: key {entry[have][0]!r} has no matching "
                                      f"lora_{need} ('{module}.lora_{need}.weight' is missing)")
        (key_a, a), (key_b, b) = entry["A"], entry["B"]
        for key, t in ((key_a, a), (key_b, b)):
            if t.dim() != 2:
                raise CheckpointError(f"{source}: key {key!r} has shape {tuple(t.shape)}, "
                                      f"expected a matrix")
            _check_values(t, source, key)
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{source}: rank mismatch: {key_a!r} has shape {tuple(a.shape)}"
                                  f" but {key_b!r} has shape {tuple(b.shape)}")
        if r is not None and a.shape[0] != r:
            raise CheckpointError(f"{source}: key {key_a!r} has rank {a.shape[0]}, but r={r} was "
                                  f"given (pass the r the adapter was trained with)")
    return pairs


def _read_adapter_dir(path: Path) -> tuple[dict[str, torch.Tensor], float, int, float, object]:
    """A PEFT adapter directory -> (state, alpha, r, scale, target_modules)."""
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: a LoRA directory needs adapter_config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not readable JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    for key in ("lora_alpha", "r"):
        if key not in config:
            raise CheckpointError(f"{config_path}: missing key {key!r}")
    # Options that change what a merge means; merging as plain LoRA would be silently wrong.
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise CheckpointError(f"{config_path}: {key}=true is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise CheckpointError(f"{config_path}: per-module {key} is not supported")
    alpha, r = config["lora_alpha"], config["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointError(f"{config_path}: key 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{config_path}: key 'lora_alpha' must be a number, got {alpha!r}")
    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r.
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return read_state_dict(path / name), float(alpha), r, scale, config.get("target_modules")
    raise CheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


def _targeted(module: str, proj: str, target_modules: object) -> bool:
    """Whether PEFT's `target_modules` (a list of names, a regex, or "all-linear") covers it."""
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return proj == target_modules or re.fullmatch(target_modules, module) is not None
    return proj in target_modules


def merge_lora(model: nn.Module, path: str | os.PathLike, alpha: float = 32, r: int = 16
               ) -> LoraSummary:
    """Merge LoRA weights into the model in place: `W += (B @ A) * alpha / r`.

    path: a flat state dict (`.pth/.pt/.bin` or `.safetensors`, training-code or PEFT keys), or
    a PEFT adapter directory, whose `adapter_config.json` supplies alpha and r (overriding the
    arguments). Shapes: A `[r, in]`, B `[out, r]`, W `[out, in]`. The product is formed in
    float32 and the sum cast back to W's dtype. Everything is checked before any weight
    changes, so an error leaves the model untouched.
    """
    path = Path(path)
    target_modules = None
    if path.is_dir():
        state, alpha, r, scale, target_modules = _read_adapter_dir(path)
    else:
        state, scale = read_state_dict(path), alpha / r
    source = str(path)
    pairs = _lora_pairs(state, source, r)
    layers = decoder_layers(model)

    plan = []  # (module path, weight parameter, A, B)
    for module_path, entry in sorted(pairs.items()):
        key_a, a = entry["A"]
        _, b = entry["B"]
        _, _, layer_idx, module_name, proj = module_path.split(".")
        if not _targeted(module_path, proj, target_modules):
            raise CheckpointError(f"{source}: key {key_a!r} targets {proj!r}, which "
                                  f"adapter_config.json's target_modules ({target_modules!r}) "
                                  f"does not list")
        if int(layer_idx) >= len(layers):
            raise CheckpointError(f"{source}: key {key_a!r} names layer {layer_idx}, but the model "
                                  f"has {len(layers)} layers")
        target = getattr(getattr(layers[int(layer_idx)], module_name, None), proj, None)
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise CheckpointError(f"{source}: key {key_a!r} names an unknown module "
                                  f"{module_path!r} (no 2-D weight in the model)")
        if tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise CheckpointError(
                f"{source}: key {key_a!r}: lora_B @ lora_A has shape {(b.shape[0], a.shape[1])} "
                f"but {module_path}.weight has shape {tuple(weight.shape)}")
        plan.append((module_path, weight, a, b))

    with torch.no_grad():
        for _, weight, a, b in plan:
            delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * scale
            weight.copy_((weight.float() + delta).to(weight.dtype))
    logger.info("merged %d LoRA matrices from %s (alpha=%s, r=%d, scale=%g)",
                len(plan), source, alpha, r, scale)
    return LoraSummary(len(plan), float(alpha), r, scale, source, [p[0] for p in plan])


# ----------------------------------------------------------------------------- conversion

def split_finetuned(state: Mapping[str, torch.Tensor], stage: str, source: str = "<state dict>"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Split a finetuned full state dict into (router tensors, LoRA tensors, count of other keys).

    Router keys come back in the stage-1 style, LoRA keys in the flat style
    `model.layers.{i}.{m}.{p}.lora_{A|B}.weight`; both are validated. stage is "stage1" (routers
    only; LoRA keys are ignored) or "stage2" (routers and LoRA, both required). Base weights are
    counted and dropped.
    """
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {stage!r}")
    router_state = {k: v for k, v in state.items() if is_router_key(k)}
    lora_state = {k: v for k, v in state.items() if is_lora_key(k)}
    others = len(state) - len(router_state) - len(lora_state)
    if not router_state:
        raise CheckpointError(f"{source}: no router keys (model.layers.N.router_attention/"
                              f"router_mlp.weight_predictor...): not a SkipGPT checkpoint?")
    routers = routers_from_state_dict(router_state, source)
    lora = {}
    if stage == "stage2":
        if not lora_state:
            raise CheckpointError(f"{source}: stage2 checkpoint has no LoRA keys "
                                  f"(...layers.N.self_attn.q_proj.lora_A.weight etc.)")
        _lora_pairs(lora_state, source, r=None)
        lora = {normalize_lora_key(k): v for k, v in lora_state.items()}
    elif lora_state:
        logger.warning("%s: ignoring %d LoRA tensors in a stage1 conversion",
                       source, len(lora_state))
    logger.info("%s: %d router tensors (%s, %d layers), %d LoRA tensors, %d other tensors dropped",
                source, len(routers.tensors), routers.kind, routers.num_layers, len(lora), others)
    return routers.tensors, lora, others
