"""Router training (SkipGPT stage 1) and LoRA finetuning under frozen routers (stage 2).

The base model stays frozen; only the routers (stage 1) or the LoRA adapters (stage 2) learn.

Training forward. Each Hugging Face decoder layer is temporarily replaced by a
`TrainingDecoderLayer` that calls the layer's own submodules (input_layernorm, self_attn with
the model's position embeddings and attention mask, post_attention_layernorm, mlp) without any
KV cache, and gates the module outputs:

    h = x + g_attn * attn(input_layernorm(x))
    y = h + g_mlp  * mlp(post_attention_layernorm(h))

where both gates come from routers reading the layer input `x` (DESIGN.md section 1: the MLP
router does not see the attention output). Every token computes every module (dense compute;
the gates only decide whether the output is added), which is what makes it differentiable.
With g in {0, 1} this is exactly the routed layer's function: a skipping token keeps its
residual, K/V come from every token. The inference pipelines (skipgpt/layer.py) stay untouched.

Gates. Router logits `z = router(x)` ([.., 2], fp32; index 0 EXECUTE, 1 SKIP):
- "gumbel" (stage-1 training): straight-through Gumbel-softmax. With Gumbel noise `n`,
  `s = softmax((z + n) / tau)`; the forward pass uses the hard decision
  `e = [argmax(s) == EXECUTE]` (a tie executes), the backward pass the gradient of the soft
  `s[EXECUTE]`: `g = e + s - stop_gradient(s)`. The temperature tau is annealed *linearly* from
  `tau_start` (5) to `tau_end` (1) over the steps (`tau_schedule="exp"` anneals geometrically).
  The decision is a sample: argmax(z + n) is EXECUTE with probability softmax(z)[EXECUTE],
  whatever tau (tau only shapes the gradient).
- "argmax" (evaluation, stage 2): `g = [argmax(z) == EXECUTE]`, the decision inference makes
  (`Router.execute`), no noise.
- "dense": no routers, g = 1 (the base model; used by the static-pruning scores).
Padding tokens (attention mask 0) never execute (g = 0), as at inference.

Loss (stage 1):

    loss = CE + lambda * | P - (1 - target_skip) |

CE is the next-token cross-entropy of the model's logits, averaged over predicted tokens (the
Hugging Face `labels` loss). P is the mean execute probability `softmax(z)[EXECUTE]` (noise-free,
so its value is the expected execute rate of the sampled decisions) over every router (the
attention and the MLP router of every layer, all weighted equally) and every non-padding token
of the batch: P = sum_{layer, module, token} p / (2 * num_layers * non_padding_tokens). One
global rate: the routers may skip attention more than MLP or the reverse; the realized rate of
each module type is reported separately. lambda defaults to 20.

Router input scaling. The residual stream of a trained model is far from unit scale (SmolLM2:
per-token L1 norms from ~50 at layer 0 to ~9000 at layer 29, single features up to ~25000), so
one AdamW step of 2e-3 on raw-input router weights would move the logits by tens. By default
(`standardize=True`) each layer's routers therefore train on `(x - mean) / std`, with the
per-feature mean and std of that layer's input measured once on the dense model over the
first `eval_batches * batch_size` training rows; at the end `fold_standardization` folds the
affine map into the first Linear (`W' = W / std`, `b' = b - W' @ mean`), so the saved routers
read raw `x` in the published format and make the same decisions.

Routers are fp32 (Router casts its input), whatever the base model dtype; the gate is cast to
the model dtype before it multiplies the module output. The optimizer is AdamW over router
parameters only, learning rate 2e-3 by default, with an optional linear warmup and constant
learning rate after it. Initialization: the last Linear of each router gets zero weights and a
bias giving every token the same execute probability `init_execute` (0.95 by default), so
training starts close to the dense model, where the LM loss still says which skips are cheap:
random skips wreck a small model (SmolLM2-135M, wiki validation, 2k tokens: perplexity 24 with
0.1% random skips, 89 with 5%, 401 with 10%, ~19000 with 25%). The penalty then pulls the rate
down to the target; with lr 2e-3 a router's bias alone moves its logit margin by 0.004 a step.

Stage 2 (`train_lora`): routers loaded from a file and frozen, decisions by argmax (the
inference decisions), LoRA adapters of rank r on q,k,v,o,gate,up,down trained with the same
loss (the penalty still acts: LoRA changes the router inputs and so the rates), saved as a
PEFT-style adapter directory that `skipgpt.checkpoint.merge_lora` reads.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .checkpoint import ROUTER_NAMES, decoder_layers, load_routers, save_routers, write_state_dict
from .router import ROUTER_KINDS, Router

logger = logging.getLogger("skipgpt")

EXECUTE, SKIP = 0, 1
MODES = ("gumbel", "argmax", "dense")
TAU_SCHEDULES = ("linear", "exp")
LORA_TARGETS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
ROUTER_FILE = "router.safetensors"
LORA_DIR = "lora"
CONFIG_FILE = "train_config.json"


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (stage 1, or stage 2 with `lora_rank`)."""

    target_skip: float = 0.25
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    router_kind: str = "linear"
    lam: float = 20.0  # weight of the sparsity penalty ("lambda")
    tau_start: float = 5.0
    tau_end: float = 1.0
    tau_schedule: str = "linear"
    init_execute: float = 0.95
    seed: int = 0
    eval_every: int = 0  # validation perplexity every N steps; 0: only at the end
    eval_batches: int = 8  # held-out batches for validation and the final skip measurement
    time_limit: Optional[float] = None  # seconds of training after which to stop early
    standardize: bool = True  # routers train on standardized inputs, folded into the weights at the end
    lora_rank: Optional[int] = None  # stage 2 when set
    lora_alpha: float = 32.0

    def check(self) -> None:
        """Raise ValueError naming the first bad value."""
        def bad(name, why):
            raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        if not 0.0 <= self.target_skip < 1.0:
            bad("target_skip", "expected a rate in [0, 1)")
        for name in ("steps", "batch_size", "eval_batches"):
            if int(getattr(self, name)) < 1:
                bad(name, "expected a positive integer")
        if self.seq_len < 2:
            bad("seq_len", "expected at least 2 tokens")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "expected a positive number")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.eval_every < 0:
            bad("weight_decay" if self.weight_decay < 0 else
                "warmup_steps" if self.warmup_steps < 0 else "eval_every", "expected >= 0")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            bad("lam", "expected a number >= 0")
        if self.router_kind not in ROUTER_KINDS:
            bad("router_kind", f"expected one of {ROUTER_KINDS}")
        if not (self.tau_start > 0 and self.tau_end > 0):
            bad("tau_start" if not self.tau_start > 0 else "tau_end", "expected a temperature > 0")
        if self.tau_schedule not in TAU_SCHEDULES:
            bad("tau_schedule", f"expected one of {TAU_SCHEDULES}")
        if not 0.0 < self.init_execute < 1.0:
            bad("init_execute", "expected a probability in (0, 1)")
        if self.time_limit is not None and not self.time_limit > 0:
            bad("time_limit", "expected a positive number of seconds")
        if self.lora_rank is not None and self.lora_rank < 1:
            bad("lora_rank", "expected a positive integer")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            bad("lora_alpha", "expected a positive number")


def temperature(step: int, config: TrainConfig) -> float:
    """Gumbel-softmax temperature at `step` (0-based): tau_start at the first step, tau_end at the
    last; linear in between, or geometric (`exp`)."""
    frac = step / max(1, config.steps - 1)
    if config.tau_schedule == "exp":
        return config.tau_start * (config.tau_end / config.tau_start) ** frac
    return config.tau_start + (config.tau_end - config.tau_start) * frac


# ----------------------------------------------------------------------------- the training layer

@dataclass
class TrainingState:
    """Shared by the training layers of one model for one forward pass.

    records: per layer, in call order, `(p_exec, execute)`: the execute probability
    softmax(z)[EXECUTE] `[2, B, L]` fp32 (row 0 attention, row 1 MLP; differentiable) and the
    hard decisions `[2, B, L]` bool (padding False). Cleared by the caller before each pass.
    observer: called as `observer(layer_idx, x, h, y)` with the layer input, the stream after
    attention and the layer output (static-pruning scores).
    """

    mode: str = "gumbel"
    tau: float = 1.0
    valid: Optional[torch.Tensor] = None  # [B, L] bool, False on padding; None: no padding
    records: list = field(default_factory=list)
    observer: Optional[Callable] = None


def _gumbel_like(z: torch.Tensor) -> torch.Tensor:
    # -log(E) with E ~ Exp(1) is Gumbel(0, 1); the clamp keeps a (vanishingly rare) E == 0 finite.
    return -torch.empty_like(z).exponential_().clamp_min(1e-20).log()


class TrainingDecoderLayer(nn.Module):
    """A differentiable routed decoder layer for training, around a Hugging Face layer.

    Computes `h = x + g_attn * attn(x)`, `y = h + g_mlp * mlp(h)` with every token running both
    modules; the gates come from `state.mode` (see the module docstring). Holds the base layer
    as `base_layer` and the routers as `router_attention` / `router_mlp` (None in dense mode),
    so `checkpoint.save_routers` works on a model wrapped with these layers.
    """

    def __init__(self, base_layer: nn.Module, layer_idx: int, state: TrainingState,
                 router_attention: Optional[Router] = None, router_mlp: Optional[Router] = None):
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        self.state = state
        self.router_attention = router_attention
        self.router_mlp = router_mlp
        # Router input standardization during training (None: the routers read x as it is);
        # `fold_standardization` moves it into the router weights before saving.
        self.input_mean: Optional[torch.Tensor] = None  # [H] fp32
        self.input_std: Optional[torch.Tensor] = None  # [H] fp32
        # Model loops read these off their layers (Qwen2/3 pick the mask by layer type).
        for attr in ("attention_type", "layer_type"):
            if hasattr(base_layer, attr):
                setattr(self, attr, getattr(base_layer, attr))

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                **kwargs) -> torch.Tensor:
        # kwargs (position_ids, cache / past_key_values, use_cache, ...) are dropped on purpose:
        # training runs without a KV cache, and the cache kwarg's name differs across
        # transformers versions.
        base, x = self.base_layer, hidden_states
        gates = self._gates(x)
        a, _ = base.self_attn(hidden_states=base.input_layernorm(x), attention_mask=attention_mask,
                              position_embeddings=position_embeddings)
        h = x + a if gates is None else x + gates[0, ..., None] * a
        m = base.mlp(base.post_attention_layernorm(h))
        y = h + m if gates is None else h + gates[1, ..., None] * m
        if self.state.observer is not None:
            self.state.observer(self.layer_idx, x, h, y)
        return y

    def _gates(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """[2, B, L] gates in x's dtype (row 0 attention, row 1 MLP), or None in dense mode."""
        state = self.state
        if state.mode == "dense":
            return None
        if self.router_attention is None or self.router_mlp is None:
            raise RuntimeError(f"layer {self.layer_idx}: mode {state.mode!r} needs routers")
        r = x if self.input_mean is None else (x.float() - self.input_mean) / self.input_std
        z = torch.stack([self.router_attention(r), self.router_mlp(r)])  # [2, B, L, 2], fp32
        p_exec = z.softmax(-1)[..., EXECUTE]
        if state.mode == "gumbel":
            soft = ((z + _gumbel_like(z)) / state.tau).softmax(-1)
            execute = soft.argmax(-1) == EXECUTE  # argmax takes the first maximum: a tie executes
            s = soft[..., EXECUTE]
            # Straight-through: the value is the hard 0/1 decision (s - s.detach() is exactly 0),
            # the gradient that of the soft probability.
            gate = execute.to(s.dtype) + s - s.detach()
        elif state.mode == "argmax":
            execute = z.argmax(-1) == EXECUTE  # the same decision as Router.execute
            gate = execute.to(z.dtype)
        else:
            raise ValueError(f"mode: expected one of {MODES}, got {state.mode!r}")
        if state.valid is not None:
            execute = execute & state.valid
            gate = gate * state.valid
        state.records.append((p_exec, execute))
        return gate.to(x.dtype)


def attach_training_layers(model: nn.Module, kind: Optional[str] = "linear", init_execute: float = 0.95,
                           routers: Union[str, os.PathLike, None] = None) -> TrainingState:
    """Replace every decoder layer of `model` by a TrainingDecoderLayer, in place.

    Routers: loaded from the file `routers` if given (fp32, any key style `load_routers` reads),
    else new ones of `kind` (see `init_router`), or none when kind is None (dense mode only).
    They are created on each layer's device. Returns the shared state; undo with
    `detach_training_layers`.
    """
    layers = decoder_layers(model)
    if any(isinstance(layer, TrainingDecoderLayer) for layer in layers):
        raise ValueError("model already carries training layers")
    hidden = model.config.hidden_size
    ckpt = load_routers(routers) if routers is not None else None
    if ckpt is not None and (ckpt.hidden_size != hidden or ckpt.num_layers != len(layers)):
        raise ValueError(f"{routers}: routers for {ckpt.num_layers} layers of hidden size {ckpt.hidden_size}, "
                         f"but the model has {len(layers)} layers of hidden size {hidden}")
    state = TrainingState(mode="dense" if kind is None and ckpt is None else "gumbel")
    for i, layer in enumerate(layers):
        device = next(layer.parameters()).device
        pair = []
        for name in ROUTER_NAMES:
            if ckpt is not None:
                router = Router(hidden, ckpt.kind, dtype=torch.float32, device=device)
                router.load_state_dict(ckpt.router_state(i, name), strict=True)
            elif kind is not None:
                router = init_router(Router(hidden, kind, dtype=torch.float32, device=device), init_execute)
            else:
                router = None
            pair.append(router)
        layers[i] = TrainingDecoderLayer(layer, i, state, *pair)
    return state


def detach_training_layers(model: nn.Module) -> list[tuple[Optional[Router], Optional[Router]]]:
    """Put the original Hugging Face layers back; returns each layer's (attention, MLP) routers."""
    layers = decoder_layers(model)
    routers = []
    for i, layer in enumerate(layers):
        if isinstance(layer, TrainingDecoderLayer):
            routers.append((layer.router_attention, layer.router_mlp))
            layers[i] = layer.base_layer
    return routers


@torch.no_grad()
def init_router(router: Router, init_execute: float) -> Router:
    """Zero the last Linear's weight and set its bias so every token gets execute probability
    `init_execute`: the decisions start independent of the token, whatever the scale of the
    residual stream. (The first Linear of an MLP router keeps PyTorch's random init, so its
    hidden units differ.)"""
    last = router.weight_predictor if router.kind == "linear" else router.weight_predictor[2]
    last.weight.zero_()
    margin = math.log(init_execute / (1.0 - init_execute))  # logit(EXECUTE) - logit(SKIP)
    last.bias.copy_(torch.tensor([margin / 2, -margin / 2]))
    return router


@torch.no_grad()
def observe_dense(model: nn.Module, ids: torch.Tensor, batch_size: int, observe) -> int:
    """Run the dense model (every module executes) over the token rows `ids` `[N, L]` in batches,
    calling `observe(layer_idx, x, h, y)` with each layer's residual stream before attention,
    after attention and after the MLP (`[B, L, H]`). Returns the number of tokens run."""
    state = attach_training_layers(model, kind=None)
    state.observer = observe
    tokens = 0
    try:
        device = next(model.parameters()).device
        model.eval()
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            tokens += batch.numel()
    finally:
        detach_training_layers(model)
    return tokens


@torch.no_grad()
def input_statistics(model: nn.Module, ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer, per-feature mean and standard deviation `[num_layers, H]` (fp32) of the layer
    inputs of the dense model over the token rows `ids`."""
    num_layers = len(decoder_layers(model))
    hidden = model.config.hidden_size
    sums = torch.zeros(2, num_layers, hidden, dtype=torch.float64)

    def observe(layer_idx, x, h, y):
        flat = x.reshape(-1, hidden).double()
        sums[0, layer_idx] += flat.sum(0).cpu()
        sums[1, layer_idx] += (flat * flat).sum(0).cpu()

    count = observe_dense(model, ids, batch_size, observe)
    mean = sums[0] / count
    std = (sums[1] / count - mean * mean).clamp_min(0).sqrt()
    # A constant feature carries no information; a unit scale keeps the division finite.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.float(), std.float()


@torch.no_grad()
def fold_standardization(model: nn.Module) -> None:
    """Rewrite every router that reads `(x - mean) / std` into one that reads `x`, in place:
    for the first Linear, `W' = W / std` and `b' = b - W' @ mean` (float64), so the routers go
    into a file in the published format. Decisions stay the same up to fp32 rounding."""
    for layer in decoder_layers(model):
        if not isinstance(layer, TrainingDecoderLayer) or layer.input_mean is None:
            continue
        mean, std = layer.input_mean.double(), layer.input_std.double()
        for router in (layer.router_attention, layer.router_mlp):
            first = router.weight_predictor if router.kind == "linear" else router.weight_predictor[0]
            w = first.weight.double() / std
            first.bias.copy_(first.bias.double() - w @ mean)
            first.weight.copy_(w)
        layer.input_mean = layer.input_std = None


def routers_of(model: nn.Module) -> list[Router]:
    return [r for layer in decoder_layers(model) for r in (getattr(layer, n, None) for n in ROUTER_NAMES)
            if r is not None]


# ----------------------------------------------------------------------------- losses and rates

def sparsity_penalty(records: list, valid: Optional[torch.Tensor], target_skip: float, lam: float):
    """(lambda * |P - (1 - target_skip)|, P) with P the mean execute probability over every
    router and every non-padding token (module docstring)."""
    p = torch.stack([rec[0] for rec in records])  # [layers, 2, B, L]
    if valid is None:
        mean = p.mean()
    else:
        mean = (p * valid).sum() / (valid.sum() * p.shape[0] * p.shape[1])
    return lam * (mean - (1.0 - target_skip)).abs(), mean


def route_counts(records: list, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """[layers, 3] int64: tokens executing attention, executing the MLP, non-padding tokens."""
    execute = torch.stack([rec[1] for rec in records])  # [layers, 2, B, L]
    executed = execute.flatten(2).sum(-1)
    tokens = execute[0, 0].numel() if valid is None else int(valid.sum())
    return torch.cat([executed, torch.full_like(executed[:, :1], tokens)], dim=1)


def skip_rates(counts: torch.Tensor) -> dict:
    """Skip rates from summed `route_counts`: {"attention", "mlp", "per_layer"} (the layout of
    `skipgpt.sparsity`)."""
    counts = counts.double()
    tokens = counts[:, 2].clamp_min(1)
    per = 1.0 - counts[:, :2] / tokens[:, None]
    total = 1.0 - counts[:, :2].sum(0) / tokens.sum()
    return {"attention": float(total[0]), "mlp": float(total[1]),
            "per_layer": [{"layer": i, "attention": float(a), "mlp": float(m)} for i, (a, m) in enumerate(per.tolist())]}


# ----------------------------------------------------------------------------- data

def read_texts(data: Union[str, os.PathLike], split: str = "train") -> list[str]:
    """Documents of `data`: "wiki" (the offline Wikipedia corpus, `split`), a JSONL file (each
    line a string or an object with a "text" or "page" field), or a plain text file (one
    document)."""
    if str(data) == "wiki":
        from .assets import read_wiki_split

        return [doc["page"] for doc in read_wiki_split(split)]
    path = Path(data)
    if path.suffix.lower() == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                item = json.loads(line)
                if isinstance(item, dict):
                    item = item.get("text", item.get("page"))
                if not isinstance(item, str):
                    raise ValueError(f"{path}:{n}: expected a string or an object with a 'text' or 'page' string")
                texts.append(item)
        return texts
    return [path.read_text(encoding="utf-8")]


def pack_documents(texts: Sequence[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize documents, join them with the EOS token (the separator lm-eval's rolling
    windows start from) and cut the stream into `[N, seq_len]` rows; the tail shorter than a
    row is dropped. No padding, so every token counts."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batch_order(num_rows: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Row indices of every step's batch: seeded shuffles of all rows, one epoch after another."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    order = torch.cat([torch.randperm(num_rows, generator=g) for _ in range(-(-need // num_rows))])
    return list(order[:need].view(steps, batch_size))


# ----------------------------------------------------------------------------- training

def _forward(model: nn.Module, state: TrainingState, ids: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """One pass; returns (CE loss, records). `mask`: [B, L] 0/1 padding mask or None."""
    state.records = []
    state.valid = None if mask is None else mask.bool()
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    return out.loss.float(), state.records


@torch.no_grad()
def evaluate(model: nn.Module, state: TrainingState, ids: torch.Tensor, batch_size: int, mode: str = "argmax") -> dict:
    """Mean CE, perplexity and the realized skip rates of `mode` decisions over the rows of `ids`."""
    device = next(model.parameters()).device
    saved = state.mode
    state.mode = mode
    try:
        total, n, counts = 0.0, 0, None
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size].to(device)
            loss, records = _forward(model, state, batch)
            tokens = batch.numel() - len(batch)
            total, n = total + float(loss) * tokens, n + tokens
            if records:
                c = route_counts(records, None)
                counts = c if counts is None else counts + c
    finally:
        state.mode = saved
        state.records = []
    result = {"loss": total / n, "perplexity": math.exp(total / n), "tokens": n}
    if counts is not None:
        result["skip"] = skip_rates(counts.cpu())
    return result


def _optimizer(params: list[nn.Parameter], config: TrainConfig):
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm = config.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def _train_loop(model, state, train_ids, config, params, val_ids=None, progress=True, desc="routers") -> dict:
    """The shared optimisation loop; returns metrics averaged over the last 10% of the steps run.

    Stops early, after the step that crosses it, when `config.time_limit` seconds have passed
    (the temperature schedule is not stretched: it then ends above tau_end)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    opt, sched = _optimizer(params, config)
    order = batch_order(len(train_ids), config.batch_size, config.steps, config.seed)
    history, evals = [], []
    start = time.perf_counter()
    bar = tqdm(total=config.steps, desc=f"train {desc}", disable=not progress, dynamic_ncols=True)
    for step in range(config.steps):
        state.tau = temperature(step, config)
        ids = train_ids[order[step]].to(device, non_blocking=True)
        ce, records = _forward(model, state, ids)
        penalty, mean_exec = sparsity_penalty(records, None, config.target_skip, config.lam)
        loss = ce + penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # One device-to-host transfer per step for everything the bar and the history show.
        scalars = torch.stack([loss, ce, penalty, mean_exec]).detach().float()
        counts = route_counts(records, None).sum(0).float()
        state.records = []  # drop the graph's tensors before the next step
        loss_v, ce_v, penalty_v, mean_v, n_attn, n_mlp, n_tok = torch.cat([scalars, counts]).tolist()
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"step {step + 1}: loss is {loss_v} (try a lower --lr)")
        opt.step()
        sched.step()
        row = {"step": step + 1, "loss": loss_v, "lm_loss": ce_v, "penalty": penalty_v, "mean_execute_prob": mean_v,
               "skip_attention": 1.0 - n_attn / n_tok, "skip_mlp": 1.0 - n_mlp / n_tok, "tau": state.tau,
               "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - start}
        history.append(row)
        bar.set_postfix(loss=f"{loss_v:.3f}", lm=f"{ce_v:.3f}", attn_skip=f"{row['skip_attention']:.2f}",
                        mlp_skip=f"{row['skip_mlp']:.2f}", tau=f"{state.tau:.2f}", refresh=False)
        bar.update(1)
        if val_ids is not None and config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            ev = evaluate(model, state, val_ids[: config.eval_batches * config.batch_size], config.batch_size)
            evals.append({"step": step + 1, "perplexity": ev["perplexity"], "skip_attention": ev["skip"]["attention"],
                          "skip_mlp": ev["skip"]["mlp"]})
            bar.write(f"step {step + 1}: validation perplexity {ev['perplexity']:.3f}, skip attention "
                      f"{ev['skip']['attention']:.3f}, MLP {ev['skip']['mlp']:.3f} (argmax)")
        if config.time_limit and time.perf_counter() - start > config.time_limit and step + 1 < config.steps:
            bar.write(f"time limit of {config.time_limit} s reached after {step + 1} of {config.steps} steps")
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    bar.close()
    done = len(history)
    last = history[-max(1, done // 10):]
    final = {k: sum(r[k] for r in last) / len(last)
             for k in ("loss", "lm_loss", "penalty", "mean_execute_prob", "skip_attention", "skip_mlp")}
    return {"final": final, "averaged_over_last_steps": len(last), "first": history[0], "last": history[-1],
            "history": history, "validation": evals, "steps": done, "stopped_early": done < config.steps,
            "train_seconds": wall, "seconds_per_step": wall / done,
            "tokens_per_second": done * config.batch_size * config.seq_len / wall}


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def train_routers(model: nn.Module, train_ids: torch.Tensor, config: TrainConfig,
                  val_ids: Optional[torch.Tensor] = None, progress: bool = True) -> tuple[TrainingState, dict]:
    """Stage 1: attach new routers to the (frozen) model and train them.

    train_ids / val_ids: `[N, seq_len]` token rows (`pack_documents`). Leaves the model wrapped
    with TrainingDecoderLayers (so `save_routers(model, path)` writes the routers); returns the
    training state and the metrics (`_train_loop`).
    """
    config.check()
    torch.manual_seed(config.seed)
    model.eval()  # no dropout anywhere: the base model is frozen, not trained
    _freeze(model)
    init = config.init_execute
    stats = None
    if config.standardize:
        rows = train_ids[: config.eval_batches * config.batch_size]
        stats = input_statistics(model, rows, config.batch_size)
    state = attach_training_layers(model, config.router_kind, init)
    if stats is not None:
        device = next(model.parameters()).device
        for layer, mean, std in zip(decoder_layers(model), *stats):
            layer.input_mean, layer.input_std = mean.to(device), std.to(device)
    params = [p for r in routers_of(model) for p in r.parameters()]
    for p in params:
        p.requires_grad_(True)
    state.mode = "gumbel"
    metrics = _train_loop(model, state, train_ids, config, params, val_ids, progress, desc="routers")
    fold_standardization(model)
    return state, metrics


# ----------------------------------------------------------------------------- stage 2: LoRA

class LoRALinear(nn.Module):
    """`base(x) + (x @ A^T @ B^T) * alpha / r`, A `[r, in]`, B `[out, r]` in fp32; B starts at 0,
    so training starts from the base model. Merging `W += B @ A * alpha / r` gives the same map."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init for the down-projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + (delta * self.scale).to(x.dtype)


def attach_lora(model: nn.Module, r: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap q,k,v,o,gate,up,down of every layer in LoRALinear; returns {PEFT module path: module}.
    Works on plain or training-wrapped layers."""
    added = {}
    for i, layer in enumerate(decoder_layers(model)):
        base = getattr(layer, "base_layer", layer)
        for module_name, proj in LORA_TARGETS:
            parent = getattr(base, module_name)
            lora = LoRALinear(getattr(parent, proj), r, alpha)
            setattr(parent, proj, lora)
            added[f"model.layers.{i}.{module_name}.{proj}"] = lora
    return added


def detach_lora(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        base = getattr(layer, "base_layer", layer)
        for module_name, proj in LORA_TARGETS:
            parent = getattr(base, module_name)
            if isinstance(getattr(parent, proj), LoRALinear):
                setattr(parent, proj, getattr(parent, proj).base)


def save_lora_adapter(adapters: dict[str, LoRALinear], out_dir: Union[str, os.PathLike], r: int, alpha: float,
                      base_model: str = "") -> Path:
    """Write a PEFT-style adapter directory: adapter_config.json and adapter_model.safetensors
    with keys `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for path, module in adapters.items():
        state[f"base_model.model.{path}.lora_A.weight"] = module.lora_A
        state[f"base_model.model.{path}.lora_B.weight"] = module.lora_B
    write_state_dict(state, out_dir / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "target_modules": sorted({proj for _, proj in LORA_TARGETS}),
              "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "base_model_name_or_path": base_model}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def train_lora(model: nn.Module, train_ids: torch.Tensor, config: TrainConfig, router_file: Union[str, os.PathLike],
               val_ids: Optional[torch.Tensor] = None, progress: bool = True
               ) -> tuple[TrainingState, dict[str, LoRALinear], dict]:
    """Stage 2: load routers from `router_file` (frozen, argmax decisions), add LoRA of rank
    `config.lora_rank` and train it with the stage-1 loss. Leaves the model wrapped (training
    layers and LoRALinear modules); returns (state, adapters, metrics)."""
    config.check()
    if config.lora_rank is None:
        raise ValueError("lora_rank: stage 2 needs a LoRA rank")
    torch.manual_seed(config.seed)
    model.eval()
    _freeze(model)
    state = attach_training_layers(model, routers=router_file)
    for router in routers_of(model):
        router.requires_grad_(False)
    adapters = attach_lora(model, config.lora_rank, config.lora_alpha)
    params = [p for m in adapters.values() for p in (m.lora_A, m.lora_B)]
    state.mode = "argmax"
    metrics = _train_loop(model, state, train_ids, config, params, val_ids, progress, desc="LoRA")
    return state, adapters, metrics


# ----------------------------------------------------------------------------- checks after saving

@torch.no_grad()
def inference_skip(model: nn.Module, router_file: Union[str, os.PathLike], ids: torch.Tensor, batch_size: int,
                   lora: Union[str, os.PathLike, None] = None, lora_alpha: float = 32, lora_r: int = 16) -> dict:
    """Realized skip of `skipgpt.wrap(model, router=router_file, pipeline="torch-sparse")` over the
    rows of `ids`, exactly as inference routes (argmax of the saved routers). Wraps `model` in
    place: pass a fresh copy of the base model."""
    from .model import reset_sparsity, sparsity, wrap

    wrap(model, router=router_file, lora=lora, pipeline="torch-sparse", lora_alpha=lora_alpha, lora_r=lora_r)
    model.eval()
    reset_sparsity(model)
    device = next(model.parameters()).device
    for start in range(0, len(ids), batch_size):
        model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
    return sparsity(model)


def compare_skip(trained: dict, loaded: dict) -> dict:
    """Largest absolute difference between two skip-rate dicts, overall and per layer."""
    diffs = [abs(trained[m] - loaded[m]) for m in ("attention", "mlp")]
    for a, b in zip(trained["per_layer"], loaded["per_layer"]):
        diffs += [abs(a["attention"] - b["attention"]), abs(a["mlp"] - b["mlp"])]
    return {"max_abs_difference": max(diffs)}


# ----------------------------------------------------------------------------- the whole run

def resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here")
    return dev


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (the base model's compute dtype at inference), fp32 on CPU (bf16 matmuls
    are slow there)."""
    from .model import DTYPES

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _data_rows(data, tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train rows, held-out rows, where the held-out rows come from)."""
    if str(data) == "wiki":
        train = pack_documents(read_texts("wiki", "train"), tokenizer, seq_len)
        held = pack_documents(read_texts("wiki", "validation"), tokenizer, seq_len)
        source = "wiki validation split"
    else:
        rows = pack_documents(read_texts(data), tokenizer, seq_len)
        if len(rows) < 2:
            raise ValueError(f"{data}: only {len(rows)} row(s) of {seq_len} tokens; need at least 2 "
                             "(one to train on, one held out): give more text or a smaller --seq-len")
        n_held = max(1, len(rows) // 10)  # the last 10% of the rows, never trained on
        train, held, source = rows[:-n_held], rows[-n_held:], f"last {n_held} rows of {data}"
    if len(train) == 0 or len(held) == 0:
        raise ValueError(f"{data}: not enough text for rows of {seq_len} tokens")
    return train, held, source


def run_training(model_path: Union[str, os.PathLike], data: Union[str, os.PathLike], output: Union[str, os.PathLike],
                 config: TrainConfig, router: Union[str, os.PathLike, None] = None, device: Optional[str] = None,
                 dtype: Optional[str] = None, progress: bool = True, fmt: str = "safetensors") -> dict:
    """Load the model, train (stage 1, or stage 2 when `config.lora_rank` is set, with `router`),
    save, check the saved files through `skipgpt.wrap` on a fresh copy, and write
    `train_config.json`. Returns its content.

    Output: `router.safetensors` (stage 1: the trained routers; stage 2: a copy of `router`),
    `lora/` (stage 2: PEFT-style adapter directory) and `train_config.json`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config.check()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    stage = 1 if config.lora_rank is None else 2

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_ids, held_ids, held_source = _data_rows(data, tokenizer, config.seq_len)
    held_ids = held_ids[: config.eval_batches * config.batch_size]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(dev)
    pristine = copy.deepcopy(model)  # the fresh copy the saved files are checked on
    logger.info("stage %d on %s (%s): %d training rows of %d tokens, %d held-out rows (%s)",
                stage, dev, torch_dtype, len(train_ids), config.seq_len, len(held_ids), held_source)
    load_seconds = time.perf_counter() - t0

    dense = None
    if stage == 1:
        dense_state = attach_training_layers(model, kind=None)
        dense = evaluate(model, dense_state, held_ids, config.batch_size, mode="dense")
        detach_training_layers(model)
        state, metrics = train_routers(model, train_ids, config, held_ids, progress)
    else:
        state, adapters, metrics = train_lora(model, train_ids, config, router, held_ids, progress)
    held = evaluate(model, state, held_ids, config.batch_size, mode="argmax")

    router_file = output / ROUTER_FILE if fmt == "safetensors" else output / "router.pth"
    lora_dir = None
    if stage == 1:
        save_routers(model, router_file)
    else:
        lora_dir = save_lora_adapter(adapters, output / LORA_DIR, config.lora_rank, config.lora_alpha, str(model_path))
        if Path(router).resolve() != router_file.resolve():
            shutil.copyfile(router, router_file)
    del model, state

    loaded = inference_skip(pristine, router_file, held_ids, config.batch_size, lora=lora_dir,
                            lora_alpha=config.lora_alpha, lora_r=config.lora_rank or 16)
    agreement = compare_skip(held["skip"], loaded)
    if agreement["max_abs_difference"] > 0.01:
        logger.warning("the saved files route differently from the trained model: skip rates differ by up to "
                       "%.4f (held-out, argmax); bf16 rounding differences flip near-tie decisions",
                       agreement["max_abs_difference"])

    metrics_out = {
        "train": {k: v for k, v in metrics.items() if k != "history"},
        "held_out": {
            "source": held_source, "rows": len(held_ids), "tokens": held["tokens"],
            "perplexity_routed_argmax": held["perplexity"],
            "perplexity_dense": dense["perplexity"] if dense else None,
            "skip_training_argmax": held["skip"],
            "skip_inference_torch_sparse": {k: loaded[k] for k in ("attention", "mlp", "per_layer")},
            "skip_agreement": agreement,
        },
    }
    summary = {
        "stage": stage,
        "config": asdict(config),
        "model": str(model_path),
        "data": str(data),
        "router_file": str(router_file),
        "lora_dir": str(lora_dir) if lora_dir else None,
        "router_source": str(router) if router else None,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "train_rows": len(train_ids),
        "wall_seconds": time.perf_counter() - t0,
        "load_seconds": load_seconds,
        "metrics": metrics_out,
        "history": metrics["history"],
        "versions": _versions(),
    }
    (output / CONFIG_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"skipgpt": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
