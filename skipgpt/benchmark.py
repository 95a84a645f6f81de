"""Benchmarks of the routed pipelines: one decoder layer (`LayerBench`) or a whole multi-layer
model (`ModelBench`), random weights and seeded random routes at a forced skip rate.

Providers:
  hf               the Hugging Face layer/model (cuBLAS + SDPA): the dense baseline
  dense            the routed pipeline with every token executing (skipgpt ops)
  torch-sparse     the routed plain-PyTorch pipeline (the reference semantics)
  triton-sparse    the routed custom-op pipeline
  compiled-dense   dense under torch.compile (one graph for every shape, see skipgpt.compile)
  compiled-sparse  triton-sparse under torch.compile
  published-triton-sparse  the published SkipGPT code's Triton layer, with --baseline-published
                   (skipgpt/published_baseline.py; layer scope only)

Modes: prefill (one forward), decode (`decode_steps` one-token steps over a cached context), and
generate (`model.generate()`, greedy, a whole model: `ModelBench.generation`). In generate mode
the compiled providers are transformers' own compiled generation, which skipgpt.compile
documents: a static cache, with generate() compiling the decode step (mode "reduce-overhead":
CUDA graphs on CUDA) while the prefill runs eagerly; the eager providers use the default
(dynamic) cache.

Before it is timed, every provider's output is compared with torch-sparse run in float32 on an
fp32 copy of the weights (the ground truth) under the same routes; hf, dense and compiled-dense
only at skip 0, where they compute the same function. In generate mode the check is on the
generated tokens (`ModelBench.greedy_gap`): each must be the ground truth's greedy choice given
the sequence so far, up to rounding; dense providers are checked against the ground truth run
with every token executing, at every skip rate. A provider whose relative error exceeds
the tolerance is reported as wrong and not timed. The tolerance is `tolerance` or, in a
low-precision run, three times the error of torch-sparse in that precision, whichever is larger
(rounding grows with depth; a broken kernel is off by far more). Each point records its error.

`run_grid` measures a grid and reports every failure per point (out of memory, not capturable
in a CUDA graph, a provider that raised, e.g. torch.compile without a working compiler) instead
of stopping. The command line is `skipgpt bench` (skipgpt/commands/bench.py); `python -m
skipgpt.benchmark` runs the same command with its original flag spellings.
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .cache import SeqFirstCache, SeqFirstLayer
from .layer import RoutedDecoderLayer
from .model import routed_layers
from .routing import RoutingState

log = logging.getLogger(__name__)

GEOMETRIES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         rope_theta=500000.0, rms_norm_eps=1e-5, vocab_size=128256, max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                 rope_theta=10000.0, rms_norm_eps=1e-5, vocab_size=256, max_position_embeddings=4096),
}
PROVIDERS = ("hf", "dense", "torch-sparse", "triton-sparse", "compiled-dense", "compiled-sparse")
PUBLISHED = "published-triton-sparse"
COMPILED = ("compiled-dense", "compiled-sparse")
# compiled-sparse is triton-sparse under torch.compile (one graph for every shape: see skipgpt.compile).
DENSE_PROVIDERS = ("hf", "dense", "compiled-dense")  # every token executes: checked at skip 0 only
# A decode point times this many consecutive steps (one token each, at successive cache slots),
# so a batch-1 run sees many route decisions rather than one fixed pattern; times are per step.
DECODE_STEPS = 16  # the default number of one-token steps a decode point runs (bench --decode-steps)
# The random model of `--scope model` gets a small vocabulary: the embedding and the head are not
# what is measured, and 128K rows would cost 1 GB each at the 8B geometry.
MODEL_VOCAB = 1024


@dataclass
class Point:
    provider: str
    mode: str
    batch: int
    seqlen: int  # prefill: tokens per sequence; decode: KV length before the step
    skip: float
    ms: Optional[float] = None  # median time (per step at decode): the median of the timing rounds' medians
    ms_q20: Optional[float] = None
    ms_q80: Optional[float] = None
    ms_rounds: Optional[list] = None  # the median of each interleaved timing round (run_grid)
    tflops: Optional[float] = None  # dense-equivalent FLOPs / median time
    speedup: Optional[float] = None  # hf time / this time, same run and point
    rel_err: Optional[float] = None  # vs the fp32 torch-sparse ground truth (None: not compared)
    tolerance: Optional[float] = None  # the error allowed at this point
    # sparse providers: the fraction of (non-padding token, module) pairs the point's forced routes
    # skipped, counted on the device during the reference run (the same routes): at batch 1 a
    # decode point draws only a few decisions per layer, so this can stray from `skip`
    realized_skip: Optional[float] = None
    status: str = "ok"  # ok | wrong | out of memory | not capturable | failed
    note: str = ""  # why a point failed or was not checked
    scope: str = "layer"
    # generate mode: seqlen is the prompt length and ms the median time of one generate() call
    new_tokens: Optional[int] = None  # tokens generated per sequence
    tokens_per_s: Optional[float] = None  # batch * new_tokens / median generate time
    prefill_ms: Optional[float] = None  # median time of generate(max_new_tokens=1): prefill + first token
    decode_step_ms: Optional[float] = None  # (ms - prefill_ms) / (new_tokens - 1): one decode step


def dense_flops(geometry, mode: str, batch: int, seqlen: int, layers: int = 1) -> float:
    """Dense-equivalent FLOPs of one step (a prefill, or one decode token per sequence) through
    `layers` decoder layers of `geometry` (a `families.Geometry`): projections (q, k, v, o), the
    attention products (QK^T and PV over the causal keys) and the gated MLP, 2 FLOPs per
    multiply-add. Norms, rotary, routers, embeddings and the LM head are left out, as in the
    published benchmark. A decode token attends to the KV context plus itself."""
    g = geometry
    q_out, kv_out = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    tokens = batch * (seqlen if mode == "prefill" else 1)
    proj = 2 * tokens * g.hidden_size * (2 * q_out + 2 * kv_out)
    mlp = 2 * tokens * g.hidden_size * g.intermediate_size * 3
    pairs = batch * seqlen * (seqlen + 1) / 2 if mode == "prefill" else batch * (seqlen + 1)
    attn = 4 * pairs * g.num_heads * g.head_dim
    return layers * (proj + mlp + attn)


def compile_module(module: torch.nn.Module, options: Optional[dict] = None) -> Callable:
    """`module` under torch.compile with dynamic shapes and compile_model's settings
    (size-oblivious tracing, no duck sizing, view and non-contiguous tensor inputs copied),
    without replacing the module's forward (the eager providers keep using it). `options` go to
    Inductor. Compilation happens on the first call."""
    from .compile import with_compile_settings

    return with_compile_settings(torch.compile(module, dynamic=True, fullgraph=True, options=options))


def _cache_kwarg(forward) -> str:
    # transformers renamed the `past_key_values` argument to `cache` in 5.2x.
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _llama_config(name: str, **overrides):
    from transformers import LlamaConfig

    config = LlamaConfig(**{**GEOMETRIES[name], **overrides})
    config._attn_implementation = "sdpa"
    return config


class LayerBench:
    """An HF decoder layer and a routed layer sharing its weights, plus an fp32 routed copy.

    geometry: a name in GEOMETRIES (a Llama layer), or a transformers config (one layer of that
    model's family, random weights: the geometry of `--model PATH` at layer scope)."""

    scope = "layer"
    num_layers = 1
    decode_steps = DECODE_STEPS

    def __init__(self, geometry, dtype: torch.dtype, device: torch.device, seed: int = 0):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        torch.manual_seed(seed)
        if isinstance(geometry, str):
            self.config = _llama_config(geometry, num_hidden_layers=1)
            with torch.device(device):
                self.hf = LlamaDecoderLayer(self.config, layer_idx=0).to(dtype).eval()
                self.rotary = LlamaRotaryEmbedding(self.config)
        else:
            from transformers import AutoModelForCausalLM

            self.config = copy.deepcopy(geometry)
            self.config.num_hidden_layers = 1
            if getattr(self.config, "layer_types", None):
                self.config.layer_types = self.config.layer_types[:1]
            self.config.vocab_size = min(self.config.vocab_size, MODEL_VOCAB)
            self.config._attn_implementation = "sdpa"
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
            self.hf = model.model.layers[0].eval()
            self.rotary = model.model.rotary_emb
        # Its compiled providers mirror compile_model's default: one graph for every point.
        self.state = RoutingState(single_graph=True)
        self.routed = RoutedDecoderLayer(self.hf, 0, self.config, self.state).eval()
        self.reference = RoutedDecoderLayer(copy.deepcopy(self.hf).float(), 0, self.config, self.state).eval()
        self.reference.pipeline = "torch-sparse"
        self.reference_note = "torch-sparse in float32 on an fp32 copy of the weights"
        self.dtype, self.device = dtype, device
        self.geometry = self.routed.geometry
        self.published = None  # a published_baseline.PublishedLayer, set by the command

    def dense_flops(self, mode: str, batch: int, seqlen: int) -> float:
        """Dense-equivalent FLOPs of one layer step: projections, attention and MLP."""
        return dense_flops(self.geometry, mode, batch, seqlen)

    def inputs(self, mode: str, batch: int, seqlen: int):
        """The step's inputs, the same for every provider: x [B, new, H], the rotary (cos, sin)
        of each step, the cached context's keys and values [B, past, Hk, D], and (new, steps,
        past)."""
        g = self.geometry
        gen = torch.Generator(device=self.device).manual_seed(1)
        new, steps, past = (seqlen, 1, 0) if mode == "prefill" else (1, self.decode_steps, seqlen)
        x = torch.randn(batch, new, g.hidden_size, generator=gen, device=self.device, dtype=self.dtype)
        past_kv = [torch.randn(batch, past, g.num_kv_heads, g.head_dim, generator=gen, device=self.device, dtype=self.dtype)
                   for _ in range(2)]
        pos = torch.arange(past, past + new * steps, device=self.device)[None].expand(batch, -1)
        cos, sin = self.rotary(x, pos)
        rope = [(cos[:, i * new:(i + 1) * new].contiguous(), sin[:, i * new:(i + 1) * new].contiguous())
                for i in range(steps)]
        return x, rope, past_kv, (new, steps, past)

    def step(self, provider: str, mode: str, batch: int, seqlen: int, skip: float) -> Callable[[], torch.Tensor]:
        """A closure running one prefill, or `decode_steps` decode steps after a context of `seqlen`
        cached tokens; repeated calls recompute the same work. Provider "reference" is
        torch-sparse in float32 on the same (upcast) inputs."""
        g = self.geometry
        x, rope, past_kv, (new, steps, past) = self.inputs(mode, batch, seqlen)
        if provider == "reference":
            x, past_kv = x.float(), [t.float() for t in past_kv]
            rope = [(c.float(), s_.float()) for c, s_ in rope]
        # Set once here: creating the parameter tensor inside run() would copy host to device
        # on every call, and could not be captured in a CUDA graph.
        self.state.force(skip, seed=0, device=self.device)
        if provider == "hf":
            return self._hf_steps(x, rope, past_kv, past, steps)
        if provider == PUBLISHED:
            if self.published is None:
                raise ValueError(f"provider {PUBLISHED} needs --baseline-published PATH")
            return self.published.step(self, x, rope, past_kv, past, steps)
        layer, pipeline = (self.reference, None) if provider == "reference" else (self.routed, _pipeline(provider))
        if provider in COMPILED:
            layer = self._compiled()
        kv = SeqFirstLayer()
        kv.reserve(batch, past + new * steps, g.num_kv_heads, g.head_dim, x.dtype, self.device)
        if past:
            kv.keys[:, :past], kv.values[:, :past] = past_kv
        cache = _OneLayerCache(kv)

        def run():
            # The providers share the routed layer and run_grid interleaves them: each step sets
            # its pipeline when it runs.
            if pipeline is not None:
                self.routed.pipeline = pipeline
            kv.length = past
            with torch.no_grad():
                outs = [layer(x, position_embeddings=cs, cache=cache) for cs in rope]
            # A prefill is one step: no concatenating copy, which hf does not pay either.
            return torch.cat(outs, dim=1) if steps > 1 else outs[0]

        return run

    def _compiled(self):
        """The routed layer under torch.compile, compiled once and reused across points and both
        pipelines (the pipeline attribute is guarded on: one graph each)."""
        if not hasattr(self, "_compiled_layer"):
            self._compiled_layer = compile_module(self.routed)
        return self._compiled_layer

    def _hf_steps(self, x, rope, past_kv, past: int, steps: int):
        """The Hugging Face layer: a plain forward at prefill; at decode, the first step repeated
        `steps` times over a static cache holding exactly the context plus that token. (Dense work
        is the same at every step; a longer static cache would need an explicit mask, which sends
        SDPA to a much slower kernel: 21 ms instead of ~1 ms at B=64, KV 16384 on an H200.)"""
        if past == 0:
            return torch.no_grad()(lambda: self.hf(x, attention_mask=None, position_embeddings=rope[0]))
        cache = _static_cache(self.config, [past_kv], past)
        cache_kw = _cache_kwarg(type(self.hf).forward)

        @torch.no_grad()
        def run():
            for _ in range(steps):
                _rewind(cache, past)
                out = self.hf(x, attention_mask=None, position_embeddings=rope[0], **{cache_kw: cache})
            return out

        return run


class ModelBench:
    """A whole causal LM: routed (skipgpt.wrap), the Hugging Face model sharing its weights (the
    hf provider), and the ground truth (an fp32 copy in torch-sparse, or, where that copy would
    not fit on the device, the routed model itself in torch-sparse in the run's dtype).

    Default: `layers` decoder layers of a named geometry with random weights and a small
    vocabulary (MODEL_VOCAB). With `model_path`: that model, loaded with skipgpt.load (its first
    `layers` layers if given). Routes are always forced (seeded, random, at the point's rate),
    so no routers are needed.

    A step is what generation runs: the decoder stack with a KV cache (skipgpt.SeqFirstCache for
    the routed model; transformers' own for hf), then the LM head on the last position. Outputs
    compared are the final hidden states of every position (logits of a random model say less).
    Generate mode (`generation`, `greedy_gap`) runs `model.generate()` itself and checks tokens."""

    scope = "model"
    decode_steps = DECODE_STEPS

    def __init__(self, geometry: str, dtype: torch.dtype, device: torch.device, layers: Optional[int] = 4,
                 model_path: Optional[str] = None, seed: int = 0, fp32_reference: Optional[bool] = None):
        import skipgpt

        torch.manual_seed(seed)
        if model_path is not None:
            # Only the first `layers` layers are read (a config override), so a slice of a model
            # too big for the device still loads.
            overrides = {"num_hidden_layers": layers} if layers else {}
            self.routed = skipgpt.load(model_path, pipeline="dense", dtype=dtype, device=device, **overrides)
            self.name = str(model_path)
        else:
            from transformers import AutoModelForCausalLM

            config = _llama_config(geometry, num_hidden_layers=layers or 4,
                                   vocab_size=min(GEOMETRIES[geometry]["vocab_size"], MODEL_VOCAB))
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            self.routed = skipgpt.wrap(model, pipeline="dense")
            self.name = geometry
        self.routed.eval()
        self.config = self.routed.config
        self.num_layers = len(self.routed.model.layers)
        self.dtype, self.device = dtype, device
        self.geometry = self.routed.model.layers[0].geometry
        self.hf = _hf_twin(self.routed)
        if fp32_reference is None:
            fp32_reference = dtype == torch.float32 or _fp32_copy_fits(self.routed, device)
        if fp32_reference:
            self.reference = copy.deepcopy(self.routed).float()
            self.reference_note = "torch-sparse in float32 on an fp32 copy of the weights"
        else:
            self.reference = None
            self.reference_note = (f"torch-sparse in {str(dtype).replace('torch.', '')} (an fp32 copy of the model "
                                   "would not fit on the device)")
        self.published = None
        self._compiled_model = None

    def dense_flops(self, mode: str, batch: int, seqlen: int) -> float:
        return dense_flops(self.geometry, mode, batch, seqlen, self.num_layers)

    def step(self, provider: str, mode: str, batch: int, seqlen: int, skip: float) -> Callable[[], torch.Tensor]:
        """A closure running one prefill of `seqlen` tokens, or `decode_steps` one-token steps after
        a cached context of `seqlen` tokens (random keys and values in every layer)."""
        import skipgpt

        if provider == PUBLISHED:
            raise ValueError(f"provider {PUBLISHED} times one layer: use --scope layer")
        g = self.geometry
        gen = torch.Generator(device=self.device).manual_seed(1)
        new, steps, past = (seqlen, 1, 0) if mode == "prefill" else (1, self.decode_steps, seqlen)
        ids = torch.randint(0, self.config.vocab_size, (batch, new * steps), generator=gen, device=self.device)
        context = [[torch.randn(batch, past, g.num_kv_heads, g.head_dim, generator=gen, device=self.device,
                                dtype=self.dtype) for _ in range(2)] for _ in range(self.num_layers)]
        # Each step's ids and positions as fresh contiguous tensors: compiled code copies views
        # first (skipgpt.compile), which the compiled providers' times would otherwise include.
        ids = [ids[:, i * new:(i + 1) * new].clone() for i in range(steps)]
        positions = [torch.arange(past + i * new, past + (i + 1) * new, device=self.device)[None].repeat(batch, 1)
                     for i in range(steps)]
        if provider == "hf":
            return self._hf_steps(ids[0], positions[0], context, past, steps)
        model = self.routed
        if provider == "reference":
            if self.reference is not None:
                model = self.reference
                context = [[t.float() for t in kv] for kv in context]
            pipeline = "torch-sparse"
        else:
            pipeline = _pipeline(provider)
        skipgpt.force_routes(model, skip=skip, seed=0)
        skipgpt.set_pipeline(model, pipeline)
        layers = routed_layers(model)
        forward = model.model
        if provider in COMPILED:
            # As compile_model's default: one graph for every point (torch.cond).
            model.model.skipgpt_routing.single_graph = True
            if self._compiled_model is None:
                self._compiled_model = compile_module(self.routed.model)
            forward = self._compiled_model
        dtype = context[0][0].dtype
        cache = SeqFirstCache(self.num_layers)
        for layer, (k, v) in zip(cache.layers, context):
            layer.reserve(batch, past + new * steps, g.num_kv_heads, g.head_dim, dtype, self.device)
            layer.keys[:, :past], layer.values[:, :past] = k, v
            layer.length = past
        kwargs = dict(use_cache=True, **{_cache_kwarg(type(model.model).forward): cache})

        def run():
            # The providers share the routed model and run_grid interleaves them: each step sets
            # its pipeline when it runs.
            for layer in layers:
                layer.pipeline = pipeline
            for layer in cache.layers:
                layer.length = past
            outs = []
            with torch.no_grad():
                for i in range(steps):
                    h = forward(input_ids=ids[i], position_ids=positions[i], **kwargs).last_hidden_state
                    model.lm_head(h[:, -1:])
                    outs.append(h)
            return torch.cat(outs, dim=1) if steps > 1 else outs[0]

        return run

    def _hf_steps(self, ids, positions, context, past: int, steps: int):
        """The Hugging Face model on the first step's ids and positions [B, new]: a plain forward
        (with its own fresh cache) at prefill; at decode, that step repeated over a static cache
        holding exactly the context plus its token (see LayerBench._hf_steps for why)."""
        base = self.hf.model
        if past == 0:
            def run():
                with torch.no_grad():
                    h = base(input_ids=ids, position_ids=positions, use_cache=True).last_hidden_state
                    self.hf.lm_head(h[:, -1:])
                return h

            return run
        cache = _static_cache(self.hf.config, context, past)
        kwargs = dict(use_cache=True, **{_cache_kwarg(type(base).forward): cache})
        if "cache_position" in inspect.signature(type(base).forward).parameters:
            # Older transformers derive it from the static cache's fill level, which the
            # repeated step would push past the end.
            kwargs["cache_position"] = positions[0]

        def run():
            with torch.no_grad():
                for _ in range(steps):
                    _rewind(cache, past)
                    h = base(input_ids=ids, position_ids=positions, **kwargs).last_hidden_state
                    self.hf.lm_head(h[:, -1:])
            return h

        return run

    # -- generate mode ----------------------------------------------------------------------
    def prompts(self, batch: int, prompt_len: int) -> torch.Tensor:
        """[batch, prompt_len] random token ids (seeded, the same for every provider), no padding."""
        gen = torch.Generator(device=self.device).manual_seed(1)
        return torch.randint(0, self.config.vocab_size, (batch, prompt_len), generator=gen, device=self.device)

    def generation(self, provider: str, batch: int, prompt_len: int, skip: float, new_tokens: int):
        """A closure `run(n=new_tokens)` returning `model.generate()`'s ids [batch, prompt_len + n]:
        greedy, exactly n new tokens (min_new_tokens = max_new_tokens, so EOS never stops it early).

        hf: the Hugging Face model (dense), eager, transformers' default cache. dense,
        torch-sparse, triton-sparse: the routed model, eager, its default (seq-first dynamic)
        cache. compiled-dense, compiled-sparse: the routed model with a static cache, generate()
        compiling the decode step (transformers' CompileConfig: Inductor, "reduce-overhead",
        fullgraph here so a graph break fails the point); the prefill stays eager."""
        import skipgpt

        if provider == PUBLISHED:
            raise ValueError(f"provider {PUBLISHED} times one layer: use --scope layer --mode prefill|decode")
        if provider == "hf":
            model = self.hf
        else:
            model = self.routed
            skipgpt.force_routes(model, skip=skip, seed=0)
            skipgpt.set_pipeline(model, _pipeline(provider))
            # generate()'s decode step must stay CUDA-graph capturable when the batch becomes
            # symbolic: a Python branch on the step's token count, not torch.cond.
            model.model.skipgpt_routing.single_graph = False
        ids = self.prompts(batch, prompt_len)
        eos = self.config.eos_token_id
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False,
                      pad_token_id=(eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0)
        if provider in COMPILED:
            kwargs.update(cache_implementation="static", compile_config=self._compile_config())

        def run(n: int = new_tokens) -> torch.Tensor:
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

        return run

    def _compile_config(self):
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=True)  # transformers' defaults otherwise: Inductor, reduce-overhead
        if self.device.type != "cuda":
            # generate() compiles on CUDA only unless told to (CPU: tests; Inductor, no CUDA graphs).
            config._compile_all_devices = True
        return config

    def greedy_gap(self, tokens: torch.Tensor, prompt_len: int, skip: float) -> float:
        """How far the generated tokens are from greedy under the ground truth.

        tokens: [B, prompt_len + N] from `generation`. The ground truth (see the class) reads the
        whole sequence in one forward, with routes forced at `skip` (0: every token executes,
        the dense function); for each generated token, the gap between the highest logit and the
        chosen token's, over the standard deviation of that position's logits. Returns the
        largest gap: 0 when every token is the greedy choice, ~0 when a near-tie flipped in
        rounding, of order 1 when tokens are wrong. EOS is left out, as min_new_tokens did."""
        import skipgpt

        model = self.reference if self.reference is not None else self.routed
        state = model.model.skipgpt_routing
        saved = (model.model.layers[0].pipeline, state.forced_skip, state.forced_params)
        new = tokens.shape[1] - prompt_len
        skipgpt.force_routes(model, skip=skip, seed=0)
        skipgpt.set_pipeline(model, "torch-sparse")
        try:
            with torch.no_grad():
                logits = model(tokens[:, :-1], attention_mask=torch.ones_like(tokens[:, :-1]),
                               logits_to_keep=new).logits.float()  # [B, N, V]: predictions of tokens[:, prompt_len:]
        finally:
            if model is self.routed:  # put the provider's routes back (the same tensor: no copy)
                state.forced_skip, state.forced_params = saved[1:]
                skipgpt.set_pipeline(model, saved[0])
        scale = logits.std(-1).clamp(min=1e-30)
        eos = self.config.eos_token_id
        for e in ([] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos]):
            logits[..., e] = -math.inf
        chosen = logits.gather(-1, tokens[:, prompt_len:, None]).squeeze(-1)
        gap = (logits.max(-1).values - chosen) / scale
        return float(gap.max()) if torch.isfinite(gap).all() else math.inf


def _pipeline(provider: str) -> str:
    """The routed layers' pipeline under a provider (a compiled one: the pipeline it compiles)."""
    if provider in COMPILED:
        return "dense" if provider == "compiled-dense" else "triton-sparse"
    return provider


def _hf_twin(routed: torch.nn.Module) -> torch.nn.Module:
    """The plain Hugging Face model of a wrapped one, sharing every weight: a skeleton built on
    the meta device whose modules are then replaced by the routed model's (a routed layer keeps
    the base layer's submodules under their original names)."""
    with torch.device("meta"):
        twin = type(routed)(routed.config)
    base, source = twin.model, routed.model
    for name, module in source.named_children():
        if name != "layers":
            setattr(base, name, module)
    for name, module in routed.named_children():
        if name != "model":
            setattr(twin, name, module)
    for layer, routed_layer in zip(base.layers, source.layers):
        for name, _ in list(layer.named_children()):
            setattr(layer, name, getattr(routed_layer, name))
    left = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"cannot build the Hugging Face baseline of {type(routed).__name__}: {left[:4]} not shared")
    return twin.eval()


def _fp32_copy_fits(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether an fp32 copy of `model` leaves room for activations (half of the free memory)."""
    if device.type != "cuda":
        return True
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    return fp32_bytes < free / 2


def _static_cache(config, context, past: int):
    """A transformers StaticCache of exactly `past + 1` slots, the first `past` holding
    `context` ([(keys, values)] per layer, [B, past, Hk, D])."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=past + 1)
    for layer, (k, v) in zip(cache.layers, context):
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        layer.lazy_initialization(k, v)
        layer.keys[:, :, :past] = k
        layer.values[:, :, :past] = v
    return cache


def _rewind(cache, past: int) -> None:
    """Put a StaticCache's fill level back to `past`, so the next step writes slot `past` again."""
    for layer in cache.layers:
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length.fill_(past)


class _OneLayerCache:
    """The smallest object `seq_first_layer` accepts: a `layers` list."""

    def __init__(self, layer):
        self.layers = [layer]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _short(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:300]}"


Bench = Union[LayerBench, ModelBench]


def run_grid(bench: Bench, mode: str, batches, seqlens, skips, providers, tolerance: float, timer,
             progress: Optional[Callable[[Point], None]] = None, rounds: int = 1,
             paired_timer: Optional[Callable[[list], list]] = None) -> list[Point]:
    """Check, then time, every provider at every (batch, seqlen, skip). Returns one Point per
    (provider, point), in grid order; `progress` is called with each as its point completes.

    Timing comes in `rounds` interleaved rounds: each round times every provider of the point
    once, round i starting from the i-th provider still timed (the order rotated), so that each
    provider takes another place in the round each time and drifts over a point's timing (GPU
    clocks, host load) fall on all providers alike instead of on the same ones every round.
    (Unrotated, the five-provider grid's last provider lost ~1.5 ms in its first round at
    B=8 L=2048: docs/BENCHMARKS.md.) A point's median and quantiles are the
    medians of its rounds' (`Point.ms_rounds` keeps each round's median). Each round builds the
    provider's step afresh (the same seeded inputs), so one step's memory is held at a time.

    With `paired_timer` (see `paired_timer` and `steady_timer`), a round instead builds every
    provider's step and times them together, one call (or block of calls) of each per
    repetition: a host whose speed changes for a while (the device machine's does, ~2x) then
    slows every provider alike. It holds all the
    steps' memory at once; if a round fails so (out of memory, a failing step), that round and
    the point's later ones are timed provider by provider instead, with a logged warning and a
    note on the point."""
    if rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {rounds}")
    points = []
    broken: dict[str, str] = {}  # compiled provider -> why it failed to compile (not retried)
    low_precision = bench.dtype != torch.float32
    for batch in batches:
        for seqlen in seqlens:
            for skip in skips:
                flops = bench.dense_flops(mode, batch, seqlen)
                ref, ref_note, tol, realized = None, "", tolerance, None
                try:
                    ref, realized = _counting_skips(bench, bench.step("reference", mode, batch, seqlen, skip))
                except torch.cuda.OutOfMemoryError:
                    ref_note = "not checked: the reference ran out of memory"
                except Exception as e:  # noqa: BLE001 - the points are still timed, marked unchecked
                    ref_note = f"not checked: the reference failed ({_short(e)})"
                _free_memory()
                if ref is not None and low_precision:
                    # Rounding in the run's dtype, measured on the reference semantics itself.
                    try:
                        tol = max(tolerance, 3 * _rel_err(bench.step("torch-sparse", mode, batch, seqlen, skip)(), ref))
                    except Exception:  # noqa: BLE001 - torch-sparse's own point reports what went wrong
                        pass
                    _free_memory()
                group = []
                for provider in providers:
                    point = Point(provider, mode, batch, seqlen, skip, scope=bench.scope)
                    if provider not in DENSE_PROVIDERS:
                        point.realized_skip = realized
                    group.append(point)
                    _check(bench, point, ref, ref_note, tol, broken)
                del ref
                steps = 1 if mode == "prefill" else bench.decode_steps
                timings = {p.provider: [] for p in group if p.status == "ok"}
                paired = paired_timer
                for i in range(rounds):
                    live = [p for p in group if p.provider in timings]  # rotated among those still timed
                    start = i % max(1, len(live))
                    order = live[start:] + live[:start]
                    if paired is not None and len(order) > 1:
                        failure = _time_paired_round(bench, order, paired, steps, timings)
                        if failure is None:
                            continue
                        paired = None  # not tried again at this point: its steps would fail alike
                        for p in order:
                            p.note = f"rounds {i + 1}-{rounds} timed one by one (timing together failed: {failure})"
                    elif paired is not None and order:  # the others failed their check: none to pair it with
                        order[0].note = "timed alone (the only provider left at this point), not together"
                    for p in order:
                        if not _time_round(bench, p, timer, steps, timings, broken):
                            p.note = f"timing round {i + 1} of {rounds}: {p.note}"
                            del timings[p.provider]
                for p in group:
                    if p.provider in timings:
                        p.ms, p.ms_q20, p.ms_q80 = (statistics.median(r) for r in zip(*timings[p.provider]))
                        p.ms_rounds = [r[0] for r in timings[p.provider]]
                        p.tflops = flops / p.ms / 1e9
                # Speedups against hf from this same point, whatever the provider order.
                hf = next((p for p in group if p.provider == "hf" and p.ms), None)
                for p in group:
                    if hf and p.ms:
                        p.speedup = hf.ms / p.ms
                    if progress:
                        progress(p)
                points.extend(group)
    return points


def _counting_skips(bench: Bench, run: Callable[[], torch.Tensor]):
    """(run's output, the fraction of (non-padding token, module) pairs its routes skipped), read
    from the reference's routed layers' device counters after the call (one sync, untimed)."""
    layers = routed_layers(bench.reference if bench.reference is not None else bench.routed)
    for layer in layers:
        layer.route_counts.zero_()
    out = run()
    attn, mlp, tokens = torch.stack([layer.route_counts for layer in layers]).sum(0).tolist()
    return out, (1 - (attn + mlp) / (2 * tokens) if tokens else None)


def _check(bench: Bench, point: Point, ref, ref_note: str, tol: float, broken: dict) -> None:
    """Build `point`'s step, compare its output with `ref` (the first call: compilation and
    allocation stay out of the timings), and drop it; a step that cannot be timed leaves
    `point` saying why."""
    p = point
    if _failed_earlier(p, broken):
        return
    fn = None
    try:
        fn = bench.step(p.provider, p.mode, p.batch, p.seqlen, p.skip)
        if ref is not None and (p.provider not in DENSE_PROVIDERS or p.skip == 0):
            out = fn()  # hf's decode repeats its first step: compare that step
            p.rel_err, p.tolerance = _rel_err(out, ref[:, : out.shape[1]]), tol
            del out
            if p.rel_err > tol:
                p.status, p.note = "wrong", f"relative error {p.rel_err:.2e} > {tol:.1e}: not timed"
        else:
            p.note = ref_note
            fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported on its point; the grid goes on
        _record_failure(p, e, broken)
    finally:
        del fn
        _free_memory()


def _time_round(bench: Bench, point: Point, timer, steps: int, timings: dict, broken: dict) -> bool:
    """One timing round of `point`: its step built afresh, timed, and dropped; the (median,
    q20, q80) per step appended to timings[provider]. False (and `point` says why) if it failed."""
    p = point
    fn = None
    try:
        fn = bench.step(p.provider, p.mode, p.batch, p.seqlen, p.skip)
        timings[p.provider].append([t / steps for t in timer(fn)])
        return True
    except Exception as e:  # noqa: BLE001 - as in _check
        _record_failure(p, e, broken)
        return False
    finally:
        del fn
        _free_memory()


def _time_paired_round(bench: Bench, order: list, paired_timer, steps: int, timings: dict) -> Optional[str]:
    """One timing round of the points in `order` (two or more), their steps timed together by
    `paired_timer`. None if that worked; else why not, after a logged warning: the caller then
    times them one by one, where each failure is reported on its point."""
    fns = []
    try:
        fns = [bench.step(p.provider, p.mode, p.batch, p.seqlen, p.skip) for p in order]
        results = paired_timer(fns)
    except Exception as e:  # noqa: BLE001 - see above
        p = order[0]
        log.warning("B=%d L=%d skip=%g: timing the providers together failed (%s); timing them one by one",
                    p.batch, p.seqlen, p.skip, _short(e))
        return _short(e)
    finally:
        del fns
        _free_memory()
    for p, result in zip(order, results):
        timings[p.provider].append([t / steps for t in result])
    return None


def _failed_earlier(p: Point, broken: dict) -> bool:
    """A compiled provider that failed to compile is not retried: mark `p` and say so."""
    if p.provider not in broken:
        return False
    p.status, p.note = "failed", f"failed at an earlier point: {broken[p.provider]}"
    return True


def _record_failure(p: Point, error: Exception, broken: dict) -> None:
    """Report on `p` why it has no time; a compiled provider's failure marks it broken."""
    p.ms = p.ms_q20 = p.ms_q80 = None
    if isinstance(error, torch.cuda.OutOfMemoryError):
        p.status, p.note = "out of memory", ""
    elif isinstance(error, RuntimeError) and "captur" in str(error):  # a step that syncs cannot be graph-captured
        p.status, p.note = "not capturable", _short(error)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        p.status, p.note = "failed", _short(error)
        if p.provider in COMPILED:
            broken[p.provider] = p.note


def run_generate_grid(bench: "ModelBench", batches, prompt_lens, skips, providers, new_tokens: int, tolerance: float,
                      warmup_ms: float = 25, rep_ms: float = 100,
                      progress: Optional[Callable[[Point], None]] = None) -> list[Point]:
    """Generate mode: check, then time, `model.generate()` of every provider at every (batch,
    prompt length, skip). Per point: the median (20/80% quantiles) time of one generate() of
    `new_tokens` tokens, tokens/s, the prefill time (generate() of one token) and from both the
    time of one decode step, timed by `wall_timer` with these budgets. The check:
    `ModelBench.greedy_gap` of the tokens of the first call (which also compiles, and counts as
    warm-up) must not exceed `tolerance`; for sparse providers in a low-precision dtype, nor
    3x the gap of torch-sparse (the reference semantics) run in that dtype, as the layer
    benchmark bounds errors: a routed model's rounding alone flips near-tied tokens (SmolLM2 at
    25% skip in bf16: torch-sparse's own gap is 0.6 at batch 1). Failures are reported per
    point."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens: expected at least 2 (a decode step after the prefill's token), got {new_tokens}")
    points = []
    broken: dict[str, str] = {}
    for batch in batches:
        for prompt_len in prompt_lens:
            for skip in skips:
                sparse_tol = tolerance
                if bench.dtype != torch.float32 and any(p not in DENSE_PROVIDERS for p in providers):
                    try:
                        own = bench.greedy_gap(bench.generation("torch-sparse", batch, prompt_len, skip, new_tokens)(),
                                               prompt_len, skip)
                        sparse_tol = max(tolerance, 3 * own)
                    except Exception:  # noqa: BLE001 - torch-sparse's own point reports what went wrong
                        pass
                    _free_memory()
                group = []
                for provider in providers:
                    point = Point(provider, "generate", batch, prompt_len, skip, scope="model", new_tokens=new_tokens)
                    group.append(point)
                    tol = tolerance if provider in DENSE_PROVIDERS else sparse_tol
                    _measure_generate(bench, point, tol, warmup_ms, rep_ms, broken)
                    if progress:
                        progress(point)
                hf = next((p for p in group if p.provider == "hf" and p.ms), None)
                for p in group:
                    if hf and p.ms:
                        p.speedup = hf.ms / p.ms
                points.extend(group)
    return points


def _measure_generate(bench: "ModelBench", point: Point, tol: float, warmup_ms: float, rep_ms: float,
                      broken: dict) -> None:
    p = point
    if _failed_earlier(p, broken):
        return
    run = None
    try:
        run = bench.generation(p.provider, p.batch, p.seqlen, p.skip, p.new_tokens)
        t0 = time.perf_counter()
        tokens = run()  # compiles, for the compiled providers
        first_ms = (time.perf_counter() - t0) * 1e3
        if tuple(tokens.shape) != (p.batch, p.seqlen + p.new_tokens):
            raise RuntimeError(f"generate() returned shape {tuple(tokens.shape)}, expected "
                               f"{(p.batch, p.seqlen + p.new_tokens)}")
        # Dense providers compute the dense function: judged by the ground truth with every token executing.
        p.rel_err = bench.greedy_gap(tokens, p.seqlen, 0.0 if p.provider in DENSE_PROVIDERS else p.skip)
        p.tolerance = tol
        del tokens
        if p.rel_err > tol:
            p.status, p.note = "wrong", f"greedy gap {p.rel_err:.2e} > {tol:.2e}: not timed"
            return
        # The checked call was the first warm-up call: the warm-up budget counts it.
        p.ms, p.ms_q20, p.ms_q80 = wall_timer(run, max(0.0, warmup_ms - first_ms), rep_ms)
        p.prefill_ms = wall_timer(functools.partial(run, 1), warmup_ms, rep_ms)[0]
        p.tokens_per_s = p.batch * p.new_tokens / (p.ms / 1e3)
        p.decode_step_ms = (p.ms - p.prefill_ms) / (p.new_tokens - 1)
    except Exception as e:  # noqa: BLE001 - every failure is reported on its point; the grid goes on
        _record_failure(p, e, broken)
    finally:
        del run
        _free_memory()


# ---------------------------------------------------------------------------- timers
# Each takes a step closure and returns (median, 20% quantile, 80% quantile) in milliseconds.


QUANTILES = (0.2, 0.5, 0.8)


def cuda_timer(fn, warmup_ms: float = 25, rep_ms: float = 100):
    """triton.testing.do_bench: `warmup_ms` of warm-up, then repeats for about `rep_ms` (the
    L2 cache flushed before each)."""
    import triton

    q20, med, q80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return med, q20, q80


def cuda_graph_timer(fn, warmup_ms: float = 25, rep_ms: float = 100):
    """Capture one step in a CUDA graph and time its replays: no host overhead, as in a
    graph-captured decode loop. Raises if the step cannot be captured (it syncs with the host)."""
    import triton

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up on a side stream, as capture requires
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    q20, med, q80 = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return med, q20, q80


def cpu_timer(fn, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3):
    """Wall-clock timing on the host, with do_bench's budgets: calls for `warmup_ms` (at least
    one), then timed calls for `rep_ms` (at least `min_reps`)."""
    end = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < end:
        fn()
    times = []
    end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q20, med, q80 = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return med, q20, q80


def paired_timer(fns: list, warmup_ms: float = 25, rep_ms: float = 100, cuda: bool = True,
                 min_reps: int = 3, rng: Optional[random.Random] = None) -> list:
    """Time several steps together: each repetition calls every fn once, in an order shuffled
    each time (`_each_in_shuffled_order`), each between two CUDA events with the L2 cache
    flushed before it (as do_bench), or on the host's clock with `cuda` False. A host or GPU
    whose speed changes during the timing slows every fn alike, where timing one fn after
    another puts a slow spell on some of them only. The budgets are per fn, as for cuda_timer:
    warm-up, then about len(fns) * rep_ms of repetitions (at least `min_reps`). `rng` shuffles
    (by default a generator seeded from the OS, so that no two calls share their orders). Returns
    one (median, q20, q80) in ms per fn."""
    if cuda:
        flush = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")  # 256 MB, do_bench's size

        def timed(fn):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return lambda: start.elapsed_time(end)

        sync = torch.cuda.synchronize
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            return lambda: ms

        def sync():
            pass

    rng = rng if rng is not None else random.Random()

    def repetitions(n: int) -> list:
        pending = [_each_in_shuffled_order(fns, timed, rng) for _ in range(n)]
        sync()
        return [[reading() for reading in rep] for rep in pending]

    repetitions(1)
    per_rep = sum(map(sum, repetitions(3))) / 3
    return _budgeted(repetitions, per_rep, len(fns), warmup_ms, rep_ms, min_reps)


def _each_in_shuffled_order(items: list, run: Callable, rng: random.Random) -> list:
    """[run(item) for item in items], the calls made in an order `rng` shuffles, so that in the
    timers' repetitions no step always follows the same one. A step pays for what ran before it:
    after a block of compiled dense layers at 8192 tokens (the grid's highest FLOP rate, likely its
    highest power), the next block, whichever it was, took 2-5% longer on an H200
    (docs/BENCHMARKS.md). The grid's rotated rounds keep each provider's predecessor, so they do
    not spread this, nor do shuffles seeded alike in every call: applied to the rotated lists,
    they repeat one imbalance round after round (of hf, triton-sparse and compiled-sparse, the
    third followed hf as often as the second or more in each of nine rounds). Hence each timer
    call draws orders of its own."""
    order = list(range(len(items)))
    rng.shuffle(order)
    out = [None] * len(items)
    for i in order:
        out[i] = run(items[i])
    return out


def _budgeted(repetitions: Callable[[int], list], per_rep_ms: float, fns: int, warmup_ms: float, rep_ms: float,
              min_reps: int) -> list:
    """The repetitions of a timer of `fns` steps together, one of which takes about `per_rep_ms`:
    warm-up for `warmup_ms` per fn, then timed ones for about `rep_ms` per fn (at least
    `min_reps`). Returns one (median, q20, q80) per fn of the timed repetitions' readings."""
    per_rep_ms = max(1e-3, per_rep_ms)
    repetitions(max(1, math.ceil(warmup_ms * fns / per_rep_ms)))
    times = torch.tensor(repetitions(max(min_reps, math.ceil(rep_ms * fns / per_rep_ms))), dtype=torch.float64)
    q20, med, q80 = times.quantile(torch.tensor(QUANTILES, dtype=torch.float64), dim=0).tolist()
    return list(zip(med, q20, q80))


# steady_timer's blocks: about this long, and at least this many calls (see its docstring).
STEADY_BLOCK_MS, STEADY_MIN_CALLS = 40.0, 8


def steady_timer(fns: list, warmup_ms: float = 25, rep_ms: float = 100, cuda: bool = True, min_reps: int = 3,
                 block_ms: float = STEADY_BLOCK_MS, min_calls: int = STEADY_MIN_CALLS,
                 rng: Optional[random.Random] = None) -> list:
    """Time several steps as a model's consecutive layers run them: each repetition runs a block of
    back-to-back calls of every fn, in an order shuffled each time (`_each_in_shuffled_order`),
    synchronized before and after each block, on the host's clock. Per call that is max(host, GPU)
    time: a host-bound step costs its host time, a GPU-bound one its GPU time (no L2 flush between
    calls, unlike paired_timer's), plus the block's start and drain (about min(host, GPU) of one
    call) shared by its calls. The blocks interleave the fns, so a host whose speed changes slows
    them alike. A block holds enough calls for about `block_ms`, and at least `min_calls`, sized by
    one call of each after a first, untimed one. A model's forward pays the start once for all its
    layers (Llama-3.1-8B: 32, ~40 ms at 512-2048 tokens); in blocks of 2-4 calls the start's host
    time, longer for a compiled call (guards, the wrapper's prologue) than for an eager one, counted
    1-5% of a step, and in blocks of 8 calls of ~5 ms still 0.6-0.8% where 32-call blocks put it
    at 0.2% or less (H200, docs/BENCHMARKS.md). Budgets per fn and `rng`, as paired_timer's.
    Returns one (median, q20, q80) in ms per call, per fn."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def block(fn, calls: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - t0) * 1e3 / calls

    for fn in fns:  # first calls (allocations, caches) do not size the blocks
        fn()
    calls = [max(min_calls, math.ceil(block_ms / max(1e-3, block(fn, 1)))) for fn in fns]

    rng = rng if rng is not None else random.Random()

    def repetitions(n: int) -> list:
        return [_each_in_shuffled_order(list(zip(fns, calls)), lambda fc: block(*fc), rng) for _ in range(n)]

    per_rep = sum(t * c for t, c in zip(repetitions(1)[0], calls))
    return _budgeted(repetitions, per_rep, len(fns), warmup_ms, rep_ms, min_reps)


def wall_timer(fn, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3):
    """For calls that take long and sync with the host anyway (whole generate() calls), where
    do_bench would first run 5 of them just to estimate their time: warm-up calls until
    `warmup_ms` have passed (none if it is 0), then timed calls for `rep_ms` (at least
    `min_reps`), each between two torch.cuda.synchronize() when there is a CUDA device."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < end:
        fn()
    times = []
    end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < end:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    q20, med, q80 = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return med, q20, q80


def main(argv=None) -> int:
    """`python -m skipgpt.benchmark`: `skipgpt bench` with the original flag spellings
    (--batch-sizes, --skips, --geometry, --json) and no output folder unless --output is given."""
    from .commands import bench

    return bench.module_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
