"""skipgpt.compile: torch.compile for routed models.

`compile_model(model)` compiles the model's forward so that one graph serves every batch size,
sequence length (1 included) and route pattern:
- `dynamic=True` makes batch and sequence dims symbolic from the first call;
- tracing runs with `backed_size_oblivious`, so those dims are not specialised on 0 and 1
  (plain `torch.compile` compiles a second graph the first time a batch or a step of size 1
  arrives). Unbacked marks (`mark_unbacked`) would do the same but break on Hugging Face's own
  shape checks in its masking code;
- without duck sizing (`use_duck_shape=False`): dims of equal value at the first call
  (batch == length, or a length equal to the hidden size) keep separate symbols instead of
  being tied, which would recompile once they differ;
- tensor inputs that are views or not contiguous are copied first: Dynamo guards on strides
  and view bases, so position_ids expanded from one row would recompile at the first batch > 1;
- the routed layers pick the capacity or exact form with `torch.cond` (RoutingState.single_graph,
  which compile_model sets unless its mode captures CUDA graphs), and the forced-route parameters
  are tensors, so neither token counts nor skip rates recompile.
Plain `torch.compile(model)` also works, with at most those size-1 recompiles and one more graph
the first time a step crosses 2048 tokens (RoutingState.capacity_max_tokens): without compile_model the layers branch in Python, which
keeps decode graphs CUDA-graph capturable (below).

What Inductor sees of the ops: on CUDA, most skipgpt ops trace into their ATen ops and Triton
kernels (skipgpt.ops._common.decompose_under_compile), so the compiled code launches the kernels
itself. These stay op calls through the dispatcher (70-200 us of host time each): exact_rows and
counts_to_host (host reads of the exact form); attention where the step length is symbolic and
no kernel is named (decode or prefill kernel picked by it); and the capacity-form projections where the
token count is symbolic and no tile_rows is given. Under torch.cond (compile_model without CUDA
graphs) the capacity form calls none of these: counts_to_host runs in a torch.cond of its own,
taken only where the exact form will run; the GEMMs take tile_rows
(the first of skipgpt.layer.COND_PREFILL_TILE_ROWS that holds the step, by torch.conds on the token count;
single-token steps, by a torch.cond on L == 1, DECODE_TILE_ROWS);
and attention names its kernel by L == 1 too (split-KV decode, else prefill). Inductor captures no
graph holding a torch.cond in CUDA graphs, so that graph's decode steps are bound by host time
(compile_model warns the first time one arrives). In CUDA-graph-captured decode the dispatcher
costs nothing, and there the projections keep their per-size tiles.

Compiled generation: CUDA graphs for the decode step. Use a static cache, and one of:

    # 1. transformers' own (recommended): on CUDA, generate() compiles the decode step with its
    #    CompileConfig (Inductor, mode="reduce-overhead": CUDA graphs); the prefill runs eagerly.
    out = model.generate(ids, attention_mask=mask, max_new_tokens=128, cache_implementation="static")
    #    Optional: compile_config=transformers.CompileConfig(fullgraph=True) makes a graph break an
    #    error (skipgpt's layers have none). Serving many calls: pass one cache and reset it,
    #    cache = transformers.StaticCache(config=model.config, max_cache_len=4096), then per call
    #    cache.reset(); model.generate(..., past_key_values=cache) (newer transformers: cache=cache).

    # 2. skipgpt's: prefill and decode both compiled, dynamic shapes from the first call.
    compile_model(model, mode="reduce-overhead")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=128, cache_implementation="static")

Recompiles (checked on CPU by tests/compile/test_generate.py; fail_on_recompile after warm-up):
- both: new prompts of the same length and batch never recompile;
- 1: the decode graph is static-shaped. generate() sizes a new cache each call as the largest
  prompt + max_new_tokens so far, so the first call that grows it, and the first with another
  batch size, recompile once; torch then makes that dim symbolic and later calls do not (batch
  1 gets its own graph). With one reused cache: no recompile for any prompt that fits. Each
  new cache also has new addresses, so its CUDA graphs are recorded again (once per call);
- 2: after the first generate(), no recompile for other prompt lengths or batch sizes > 1;
  batch 1 gets its own pair of graphs once, and a prefill of more than 2048 tokens (batch x
  length) a graph of its own the first time. The compiled prefill is CUDA-graphed too where
  it can be (dense; triton-sparse up to 2048 tokens): one recording per prompt shape.
The decode graph holds no torch.cond, host sync or data-dependent shape, so Inductor captures
it: `CudaGraphCheck` applies Inductor's tests on any device, tests/compile/test_gpu_compile.py
checks on CUDA that no graph is skipped. Not captured, by design: triton-sparse's exact-form
prefill (more than 2048 tokens: one host sync per layer to size cuBLAS GEMMs) and every step of
torch-sparse (the plain-PyTorch reference gathers rows with data-dependent shapes); recipe 2
logs which (INFO for the former, WARNING for anything else Inductor declines). `compile_model`
sets `generation_config.disable_compile`, so generate() does not compile the compiled forward
again. Plain `torch.compile(model, mode="reduce-overhead")` captures decode steps called on the
compiled module, but its `.generate()` runs the uncompiled model (transformers calls `self`).

compile_model's default (one graph, no CUDA graphs) also generates with generate()'s default
dynamic cache: its entry grows the seq-first cache in eager code before a step that would
overflow it (a reallocation the graph cannot trace). Those decode steps are bound by host time.

`explain(model, inputs)` reports graphs, graph breaks and recompiles in plain words.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

__all__ = ["compile_model", "explain", "CompileReport", "CudaGraphCheck", "CUDA_GRAPH_MODES"]

logger = logging.getLogger("skipgpt")

# Symbolic-shape settings in force while compile_model's forward is traced (see the module
# docstring): no 0/1 specialisation, no tying of dims that happen to be equal.
TRACING_CONFIG = dict(backed_size_oblivious=True, use_duck_shape=False)

# TRACING_CONFIG is put in force by Dynamo's compile-start hook, and only while a frame is traced
# inside a call of `with_compile_settings`: patching the config around every call instead cost
# 700 us of host time a call on the device machine (compiled layer step, B=1 L=512: 1640 -> 922 us),
# more than the step's launches, since calls that hit the compiled code paid it too.
_tracing_scope = threading.local()


def _enter_tracing_config(_args) -> None:
    if getattr(_tracing_scope, "calls", 0):
        _tracing_scope.patch = fx_config.patch(**TRACING_CONFIG)
        _tracing_scope.patch.__enter__()


def _exit_tracing_config(_args) -> None:
    patch = getattr(_tracing_scope, "patch", None)
    if patch is not None:
        _tracing_scope.patch = None
        patch.__exit__(None, None, None)


def _install_tracing_hooks() -> None:
    # Checked on every call: torch._dynamo.reset() drops all compile hooks.
    hooks = torch._dynamo.callback_handler
    if _enter_tracing_config not in hooks.start_callbacks:
        hooks.register_start_callback(_enter_tracing_config)
        hooks.register_end_callback(_exit_tracing_config)


def with_compile_settings(compiled):
    """`compiled` (a torch.compile'd callable) with TRACING_CONFIG in force whenever Dynamo
    compiles inside one of its calls (the first call, a recompile), and its tensor arguments
    (top level: not those inside tuples or caches) made contiguous non-views (see
    `_contiguous`). Calls that run compiled code leave the config alone; so does every other
    torch.compile in the process."""

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        _install_tracing_hooks()
        _tracing_scope.calls = getattr(_tracing_scope, "calls", 0) + 1
        try:
            return compiled(*map(_contiguous, args), **{k: _contiguous(v) for k, v in kwargs.items()})
        finally:
            _tracing_scope.calls -= 1

    return call


def _contiguous(value):
    """A tensor argument as a contiguous tensor that is not a view: a copy if it is either.
    Dynamo guards on an input's strides and, for a view, on its base: position_ids [B, L]
    expanded from one row, first called at batch 1 (where the expand keeps stride L, and the
    result is a contiguous view), would recompile at the first larger batch (stride 0) and again
    where a caller passes a fresh tensor. Tokenizer outputs pass through as they are; views
    (generate()'s sliced input_ids and position_ids of each decode step) cost one small copy each
    per call."""
    if isinstance(value, torch.Tensor) and (value._base is not None or not value.is_contiguous()):
        return value.clone(memory_format=torch.contiguous_format)
    return value


# torch.compile modes under which Inductor captures CUDA graphs (cudagraph trees).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _routing_state(model: nn.Module):
    return getattr(getattr(model, "model", None), "skipgpt_routing", None)


def compile_model(
    model: nn.Module,
    mode: Optional[str] = None,
    dynamic: bool = True,
    fullgraph: Optional[bool] = None,
    backend="inductor",
    options: Optional[dict] = None,
    cuda_graphs: Optional[bool] = None,
) -> nn.Module:
    """Compile a routed (or plain) Hugging Face causal LM's forward in place and return the model.

    `generate()` and every other caller of `model(...)` then run the compiled forward. `mode`
    is torch.compile's: "reduce-overhead" (or "max-autotune") captures CUDA graphs, and then the
    routed layers branch on the step's token count in Python (a decode graph and a prefill
    graph, the decode one capturable) instead of using torch.cond (one graph, never captured).
    `fullgraph=True` (the default) turns any graph break into an error instead of a silent
    slowdown. A model placed with a device_map is the exception: accelerate moves activations
    between devices in hooks that run outside torch.compile (`torch.compiler.disable`), so the
    graph breaks at each hooked module; by default such a model compiles with fullgraph=False
    (and a warning), and fullgraph=True raises ValueError.
    `options` go to Inductor. Inductor's C++ wrapper (options={"cpp_wrapper": True}) fails to
    compile the single graph of a routed model of more than one layer (torch 2.11-2.13: a C++
    compile error naming custom_op_wrapper, the caller of the exact form's host-side ops in
    torch.cond branches); compile_model refuses it there.
    `cuda_graphs` (default: from `mode`) says whether compiled code must be CUDA-graph
    capturable; pass True with `backend=CudaGraphCheck()` to check what reduce-overhead gets.
    transformers' own auto-compile in generate() is turned off for this model: it would wrap
    the compiled forward in a second torch.compile.
    """
    from skipgpt.model import routed_layers

    if getattr(model, "_skipgpt_compiled", False):
        raise ValueError("model is already compiled by skipgpt.compile.compile_model")
    hooked = sorted(name for name, m in model.named_modules() if hasattr(m, "_hf_hook"))
    if hooked and fullgraph:
        raise ValueError(
            f"fullgraph=True: this model was placed with a device_map, and accelerate's hooks on {len(hooked)} "
            f"modules (first: {hooked[0] or 'the model'}) run outside torch.compile, so the graph breaks at "
            "each of them; pass fullgraph=False (or leave it out) to compile the pieces between them"
        )
    if fullgraph is None:
        fullgraph = not hooked
        if hooked:
            logger.warning("skipgpt: compile_model: this model was placed with a device_map; accelerate's hooks "
                           "on %d modules run outside torch.compile, so it compiles as several graphs "
                           "(fullgraph=False)", len(hooked))
    if cuda_graphs is None:
        cuda_graphs = mode in CUDA_GRAPH_MODES or bool((options or {}).get("triton.cudagraphs"))
    if cuda_graphs and mode is not None and not any(p.is_cuda for p in model.parameters()):
        logger.warning("skipgpt: mode=%r captures CUDA graphs, and this model is not on a CUDA device: "
                       "Inductor compiles it without them", mode)
    state = _routing_state(model)
    cpp_wrapper = (options or {}).get("cpp_wrapper", torch._inductor.config.cpp_wrapper)
    if state is not None and not cuda_graphs and cpp_wrapper and len(routed_layers(model)) > 1:
        raise ValueError(
            "cpp_wrapper (options or torch._inductor.config): Inductor's C++ wrapper fails to compile the single "
            "graph of a routed model of more than one layer (the exact form's host-side ops, called from torch.cond "
            "branches, are left undeclared in its C++ code: a compile error naming custom_op_wrapper); leave it out"
        )
    if state is not None:
        state.single_graph = not cuda_graphs
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.disable_compile = True
    compiled = with_compile_settings(torch.compile(model.forward, mode=mode, dynamic=dynamic, fullgraph=fullgraph,
                                                 backend=backend, options=options))
    warned = set()

    def on_cuda() -> bool:  # Inductor counts every CPU graph as skipped too
        return model.get_input_embeddings().weight.is_cuda

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        step = _prepare_cache(model, args, kwargs)
        if step is not None and step[1] == 1 and state is not None and state.single_graph and "decode" not in warned \
                and on_cuda() and _runs_skipgpt_attention(model):
            warned.add("decode")
            logger.warning("skipgpt: compile_model without CUDA graphs runs every step in one graph (torch.cond "
                           "between forms and kernels), and no CUDA graph replays it: single-token (decode) steps are "
                           "bound by host time. For generation, mode='reduce-overhead' captures decode steps in CUDA "
                           "graphs")
        _logits_positions(args, kwargs)
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] if cuda_graphs else 0
        out = compiled(*args, **kwargs)
        if cuda_graphs and torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] > skips and on_cuda():
            _report_cudagraph_skip(model, step[0] * step[1] if step else None, warned)
        return out

    model.forward = forward
    model._skipgpt_compiled = True
    return model


def _prepare_cache(model: nn.Module, args, kwargs) -> Optional[tuple[int, int]]:
    """Ready the call's cache in eager code, before the compiled forward runs (`_make_room`).
    Returns the step's (B, L), when the call shows it."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1:
        # transformers' 4-D masks broadcast over heads: [B, 1, L, S]. Under dynamic=True that
        # 1 would be symbolic, and every op on the mask would guard on it.
        torch._dynamo.mark_static(mask, 1)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if not isinstance(ids, torch.Tensor):
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(getattr(model, "model", None), "layers", None)
    if cache is not None and hasattr(cache, "layers") and layers is not None:
        _make_room(cache, layers, ids.shape[0], ids.shape[1], model.get_input_embeddings().weight.dtype)
    return ids.shape[0], ids.shape[1]


def _make_room(cache, layers, batch: int, new_tokens: int, dtype) -> None:
    """Give the routed layers' seq-first cache layers room for a step of `new_tokens`
    (SeqFirstLayer.make_room), swapping fresh transformers layers for them: static buffers
    allocated while tracing would be graph outputs, not static addresses (see
    StaticSeqFirstLayer.allocate), and a growing layer's reallocation cannot be traced at all.
    Every layer fills alike, so once a cache has been walked, the first routed layer's tells
    whether any must grow: one check per step."""
    from skipgpt.cache import SeqFirstLayer, seq_first_layer
    from skipgpt.layer import RoutedDecoderLayer

    routed = [layer for layer in layers if isinstance(layer, RoutedDecoderLayer)]
    if not routed:
        return
    if getattr(cache, "_skipgpt_prepared", False):
        kv = seq_first_layer(cache, routed[0].layer_idx)
        if type(kv) is not SeqFirstLayer or (kv.is_initialized and kv.length + new_tokens <= kv.keys.shape[1]):
            return
    for layer in routed:
        g = layer.geometry
        seq_first_layer(cache, layer.layer_idx).make_room(batch, new_tokens, g.num_kv_heads, g.head_dim, dtype,
                                                          layer.input_layernorm.weight.device)
    cache._skipgpt_prepared = True


def _logits_positions(args, kwargs) -> None:
    """Replace an int `logits_to_keep` (generate() passes 1) by the positions it keeps, a 1-D
    tensor (transformers' other accepted form), in place in `kwargs`. Under dynamic=True the int
    is symbolic, and the open-ended slice `h[:, -k:]` gets a data-dependent length, which keeps
    the graph out of CUDA graphs; indexing positions has a plain size."""
    keep = kwargs.get("logits_to_keep")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if isinstance(keep, int) and not isinstance(keep, bool) and keep > 0 and isinstance(ids, torch.Tensor):
        length = ids.shape[1]
        kwargs["logits_to_keep"] = _positions(max(length - keep, 0), length, ids.device)


@functools.lru_cache(maxsize=16)
def _positions(start: int, stop: int, device: torch.device) -> torch.Tensor:
    # Cached: a decode step asks for the same [0] every time (no new tensor, no launch).
    return torch.arange(start, stop, device=device)


def _runs_skipgpt_attention(model: nn.Module) -> bool:
    from skipgpt.layer import RoutedDecoderLayer

    return any(isinstance(m, RoutedDecoderLayer) and m.pipeline != "torch-sparse" for m in model.modules())


def _report_cudagraph_skip(model: nn.Module, tokens: Optional[int], warned: set) -> None:
    """Inductor declined to capture a graph this call compiled; say so once per kind (its own
    message goes to the `cudagraphs` log artifact, off by default)."""
    from skipgpt.layer import RoutedDecoderLayer

    layers = [m for m in model.modules() if isinstance(m, RoutedDecoderLayer)]
    pipelines = {m.pipeline for m in layers}
    limit = layers[0].state.capacity_max_tokens if layers else 0
    if pipelines == {"triton-sparse"} and tokens is not None and tokens > limit:
        kind, level = "exact", logging.INFO
        text = (f"skipgpt: steps of more than {limit} tokens (prefill) take the exact form, one host "
                "sync per layer, which CUDA graphs cannot hold: Inductor runs that graph without one")
    else:
        kind, level = "other", logging.WARNING
        text = ("skipgpt: Inductor did not capture a compiled step in a CUDA graph"
                + (" (torch-sparse, the plain-PyTorch reference, gathers rows with data-dependent shapes; "
                   "use triton-sparse)" if "torch-sparse" in pipelines else "")
                + "; TORCH_LOGS=cudagraphs prints its reason")
    if kind not in warned:
        warned.add(kind)
        logger.log(level, text)


class CudaGraphCheck:
    """A torch.compile backend that reports what would keep Inductor from capturing each graph
    in a CUDA graph under mode="reduce-overhead", on any device (CPU included), and then runs
    the graph as traced (no Inductor).

    It runs the tests Inductor runs on the graph Inductor would receive (after AOT autograd):
    Inductor's own function for ops it refuses to capture or with data-dependent shapes
    (`.item()`, `nonzero`, unbacked sizes), and equivalents of its other tests: control flow
    (torch.cond, while_loop), inputs the graph mutates that are not static addresses
    (parameters, buffers, `mark_static_address`), and on CUDA, CPU tensors in the graph. A
    CUDA run with mode="reduce-overhead" remains the final word (Inductor's skip counter,
    `torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]`). Use it as `torch.compile(fn, backend=check)` or through
    generate's `compile_config=CompileConfig(backend=check, mode=None)`. `blockers` lists the
    reasons of every graph compiled so far; `graphs` counts them.
    """

    def __init__(self):
        self.reasons: list[list[str]] = []

    def __deepcopy__(self, memo):
        # transformers deep-copies its CompileConfig (backend included) before compiling; the
        # copy must record into this object.
        return self

    @property
    def graphs(self) -> int:
        return len(self.reasons)

    @property
    def blockers(self) -> list[str]:
        return [r for graph in self.reasons for r in graph]

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        names = [n.name for n in gm.graph.find_nodes(op="placeholder")]

        def inspect(graph: torch.fx.GraphModule, inputs):
            # Recorded here, once AOT has produced the graph: dynamo may restart an analysis
            # (and call the backend again) before that.
            self.reasons.append(_cudagraph_blockers(graph, names))
            return make_boxed_func(graph.forward)

        # keep_inference_input_mutations: mutations stay in the graph as Inductor sees them.
        return aot_autograd(fw_compiler=inspect, keep_inference_input_mutations=True)(gm, example_inputs)


def _where(node: torch.fx.Node) -> str:
    """`, at FILE:LINE: code` of the user code that produced `node`, when traced with it."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [i for i, line in enumerate(trace) if line.lstrip().startswith("File ")]
    if not frames:
        return ""
    last = frames[-1]
    code = trace[last + 1].strip() if last + 1 < len(trace) else ""
    return f", at {trace[last].strip()}: {code}"


def _cudagraph_blockers(graph: torch.fx.GraphModule, dynamo_names: list) -> list[str]:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    reasons = []
    placeholders = graph.graph.find_nodes(op="placeholder")
    names = dynamo_names if len(dynamo_names) == len(placeholders) else [n.name for n in placeholders]
    context = torch._guards.TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None)
    if meta is not None:
        static = set(meta.static_input_indices or ())
        for i, info in enumerate(meta.input_info):
            if info.mutates_data and i not in static:
                reasons.append(f"mutated input {names[i] if i < len(names) else i} (not a static address)")
    try:  # Inductor's own test: forbidden ops, cudagraph_unsafe tags, unbacked (data-dependent) sizes
        from torch._inductor.utils import get_first_incompatible_cudagraph_node as first_incompatible
    except ImportError:  # pragma: no cover - older torch: the unbacked-size part only
        def first_incompatible(gm):
            return next((n for n in gm.graph.nodes if free_unbacked_symbols(n.meta.get("val"))), None)
    node = first_incompatible(graph)
    if node is not None:
        data_dependent = bool(free_unbacked_symbols(node.meta.get("val")))
        reasons.append(f"incompatible op {node.target}" + (" (data-dependent shape)" if data_dependent else "")
                       + _where(node))
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.higher_order.cond, torch.ops.higher_order.while_loop):
            reasons.append(f"control flow operator {node.target.__name__}")
    # Inductor refuses a CUDA graph that touches a CPU tensor anywhere (input or intermediate).
    tensors = [n for n in graph.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    if any(n.meta["val"].device.type == "cuda" for n in tensors):
        cpu = next((n for n in tensors if n.meta["val"].device.type == "cpu"), None)
        if cpu is not None:
            name = names[placeholders.index(cpu)] if cpu.op == "placeholder" and cpu in placeholders else cpu.name
            reasons.append(f"cpu tensor {name}" + _where(cpu))
    return reasons


@dataclass
class CompileReport:
    graphs: int = 0
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)
    calls: int = 0
    compilations: int = 0
    recompile_reasons: list[str] = field(default_factory=list)
    cuda_graphs: bool = False  # whether the report was made for a CUDA-graph mode
    cudagraph_blockers: list[str] = field(default_factory=list)  # see CudaGraphCheck

    @property
    def recompiles(self) -> int:
        return max(0, self.compilations - self.graphs)

    def __str__(self) -> str:
        lines = [
            f"First call: {self.graphs} graph(s), {self.graph_breaks} graph break(s).",
        ]
        for reason in self.break_reasons:
            lines.append(f"  break: {reason}")
        lines.append(f"{self.calls} call(s) compiled {self.compilations} graph(s) in all: "
                     f"{self.recompiles} recompilation(s) after the first call.")
        for reason in self.recompile_reasons:
            lines.append(f"  recompiled because: {reason}")
        if self.cuda_graphs:
            if self.cudagraph_blockers:
                lines.append("Not capturable in a CUDA graph:")
                lines += [f"  {reason}" for reason in dict.fromkeys(self.cudagraph_blockers)]
            else:
                lines.append("Every graph is capturable in a CUDA graph.")
        if not self.graph_breaks and not self.recompiles and not self.cudagraph_blockers:
            lines.append("One graph serves every input given: nothing to fix.")
        return "\n".join(lines)


class _RecompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "triggered by the following guard failure" in text:
            self.reasons.append(" ".join(text.split("\n")[2:4]).strip() or text.strip())


def explain(model: nn.Module, inputs: Iterable[dict], dynamic: bool = True, mode: Optional[str] = None) -> CompileReport:
    """Compile a fresh view of `model.forward` and run it on each dict of keyword inputs (their
    tensors copied where compile_model's entry would copy them).

    Reports graphs and graph breaks of the first call (torch._dynamo.explain), then how many
    graphs all calls compiled, with the guard that failed for each recompilation. `mode` is
    compile_model's: the routed layers trace as they would under it, and for a CUDA-graph mode
    ("reduce-overhead") the report also lists what would keep each graph out of a CUDA graph
    (CudaGraphCheck). Runs under no_grad; the model itself is left uncompiled.
    """
    # Each call's tensors as compile_model's entry passes them (contiguous non-views).
    inputs = [{k: _contiguous(v) for k, v in kwargs.items()} for kwargs in inputs]
    if not inputs:
        raise ValueError("inputs: give at least one dict of keyword arguments for model(...)")
    cuda_graphs = mode in CUDA_GRAPH_MODES
    report = CompileReport(calls=len(inputs), cuda_graphs=cuda_graphs)
    state = _routing_state(model)
    saved = state.single_graph if state is not None else None
    if state is not None:
        state.single_graph = not cuda_graphs
    torch._dynamo.reset()
    # explain() traces without fullgraph, where an op with a data-dependent output shape (the
    # exact-form row narrowing) needs this switch to stay in the graph.
    try:
        with torch.no_grad(), fx_config.patch(**TRACING_CONFIG), \
                torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            first = torch._dynamo.explain(model.forward)(**inputs[0])
            report.graphs = first.graph_count
            report.graph_breaks = first.graph_break_count
            report.break_reasons = [str(b.reason) for b in first.break_reasons]
            torch._dynamo.reset()

            check = CudaGraphCheck()  # also counts the graphs compiled
            compiled = torch.compile(model.forward, backend=check, dynamic=dynamic)
            log = _RecompileLog()
            guards_logger = logging.getLogger("torch._dynamo")
            guards_logger.addHandler(log)
            torch._logging.set_logs(recompiles=True)
            try:
                for kwargs in inputs:
                    compiled(**kwargs)
            finally:
                torch._logging.set_logs()
                guards_logger.removeHandler(log)
    finally:
        if state is not None:
            state.single_graph = saved
        torch._dynamo.reset()
    report.compilations = check.graphs
    report.recompile_reasons = log.reasons
    if cuda_graphs:
        report.cudagraph_blockers = check.blockers
    return report
