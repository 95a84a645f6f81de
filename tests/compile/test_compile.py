"""torch.compile on routed models: one graph for every shape and route pattern (CPU Inductor)."""
import copy
import logging
import unittest

import pytest
import torch

import skipgpt
import skipgpt.compile as skipgpt_compile
from skipgpt.compile import TRACING_CONFIG, compile_model, explain, with_compile_settings
from tests.model.tiny import make_pair, random_batch

# (batch, length, skip): new batch sizes and lengths, single-token steps, no token and every
# token executing, and token counts on both sides of the capacity/exact switch, which `routed`
# moves to 64 tokens to keep the shapes small.
SHAPES = [(2, 9, 0.3), (3, 11, 0.3), (1, 1, 0.3), (2, 1, 0.5), (4, 40, 0.0), (4, 40, 1.0), (1, 200, 0.3), (5, 7, 0.6)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches graphs per code object, and every test here compiles the same Hugging Face
    and skipgpt forwards: without a reset, one test's graphs count towards the next one's
    recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def routed(pipeline):
    _, model = make_pair("llama")
    model.model.skipgpt_routing.capacity_max_tokens = 64
    skipgpt.force_routes(model, skip=0.3)
    return skipgpt.set_pipeline(model, pipeline)


@pytest.mark.parametrize("pipeline", ["dense", "triton-sparse"])
def test_one_graph_for_every_shape_and_route_pattern(pipeline):
    model = routed(pipeline)
    eager = copy.deepcopy(model)
    compile_model(model, fullgraph=True)  # fullgraph: any graph break raises
    for i, (B, L, skip) in enumerate(SHAPES):
        skipgpt.force_routes(model, skip=skip, seed=i)
        skipgpt.force_routes(eager, skip=skip, seed=i)
        ids, mask = random_batch(model.config.vocab_size, B, L, "left", seed=i)
        stance = "default" if i == 0 else "fail_on_recompile"
        with torch.no_grad(), torch.compiler.set_stance(stance):
            out = model(ids, attention_mask=mask).logits
        with torch.no_grad():
            ref = eager(ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=0)


def test_tracing_config_is_in_force_only_while_compiling(monkeypatch):
    """compile_model's size settings apply while Dynamo traces inside a wrapped call, and nowhere
    else: calls that run compiled code never patch the config (that cost ~700 us a call on the
    device machine), and other compiled functions keep torch's defaults."""
    import torch.fx.experimental._config as fx_config

    patches = []

    class CountingConfig:
        def patch(self, **changes):
            patches.append(changes)
            return fx_config.patch(**changes)

    monkeypatch.setattr(skipgpt_compile, "fx_config", CountingConfig())
    double = with_compile_settings(torch.compile(lambda x: x * 2, dynamic=True, fullgraph=True))
    double(torch.randn(3))
    assert patches == [TRACING_CONFIG]
    assert not fx_config.backed_size_oblivious and fx_config.use_duck_shape  # restored
    with torch.compiler.set_stance("fail_on_recompile"):
        for n in (1, 0, 7):  # sizes 0 and 1 reuse the graph: it was traced size-oblivious
            torch.testing.assert_close(double(torch.ones(n)), torch.full((n,), 2.0))
    assert len(patches) == 1

    triple = torch.compile(lambda x: x * 3, dynamic=True, fullgraph=True)  # not wrapped
    triple(torch.randn(3))
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError, match="recompile"):
        triple(torch.randn(1))  # torch's default: size 1 is specialised
    assert len(patches) == 1

    torch._dynamo.reset()  # drops Dynamo's compile hooks; the next wrapped call puts them back
    double(torch.randn(5))
    assert len(patches) == 2


@pytest.mark.parametrize("B,L", [(2, 5), (2, 2)])  # exact form, capacity form
def test_layer_step_compiles_at_a_symbolic_batch(B, L):
    """One layer step under Inductor (CPU), batch and length symbolic (the benchmark's step,
    compiled whole). The torch.cond that copies the counts to the host was once given
    seq_offsets [R, B+1], from whose size Inductor (torch 2.13) could not bind B ("expected [s]
    to have been codegen-ed")."""
    from skipgpt.benchmark import LayerBench

    bench = LayerBench("tiny", torch.float32, torch.device("cpu"))
    bench.state.capacity_max_tokens = 4
    step = bench.step("triton-sparse", "prefill", B, L, 0.25)
    ref = step().clone()
    out = with_compile_settings(torch.compile(step, dynamic=True, fullgraph=True))()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pipeline", ["dense", "triton-sparse"])
def test_first_call_with_equal_sizes_does_not_tie_them(pipeline):
    """Duck sizing gives input dims of equal value one symbol: a first call with batch == length
    would tie the two (a recompile when they differ), and a first length equal to the hidden
    size once specialised the length, leaving torch.cond an int operand that Inductor fails to
    lower (H100, L = 4096 at the 8B geometry). compile_model traces without duck sizing."""
    model = routed(pipeline)
    compile_model(model, fullgraph=True)
    for i, (B, L) in enumerate([(3, 3), (3, 11), (5, 3)]):
        ids, mask = random_batch(model.config.vocab_size, B, L, "none", seed=i)
        with torch.no_grad(), torch.compiler.set_stance("default" if i == 0 else "fail_on_recompile"):
            model(ids, attention_mask=mask)


def test_position_ids_of_any_layout_do_not_recompile():
    """Dynamo guards on an input's strides and, for a view, on its base. position_ids expanded
    from one row are a contiguous view at batch 1 (stride L) and a stride-0 view above it;
    compile_model's entry copies such inputs, so the layouts callers pass share one graph."""
    model = routed("triton-sparse")
    eager = copy.deepcopy(model)
    compile_model(model, fullgraph=True)
    calls = [
        (1, 9, lambda B, L: torch.arange(L)[None].expand(B, -1)),  # a contiguous view
        (4, 9, lambda B, L: torch.arange(L)[None].expand(B, -1)),  # stride 0 over the batch
        (3, 7, lambda B, L: torch.arange(L).repeat(B, 1)),  # a fresh tensor
        (2, 5, lambda B, L: torch.arange(L).repeat(B, 2)[:, :L]),  # a non-contiguous view
    ]
    for i, (B, L, position_ids) in enumerate(calls):
        ids, _ = random_batch(model.config.vocab_size, B, L, "none", seed=i)
        pos = position_ids(B, L)
        with torch.no_grad(), torch.compiler.set_stance("default" if i == 0 else "fail_on_recompile"):
            out = model(ids, position_ids=pos).logits
        with torch.no_grad():
            ref = eager(ids, position_ids=pos).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pipeline", ["torch-sparse", "triton-sparse"])
def test_plain_torch_compile_of_the_whole_model(pipeline):
    """What users type: torch.compile(model), no options. Dynamo would break the graph at the
    exact form's data-dependent row counts (and fail inside torch.cond); set_pipeline turns on
    capturing such ops, so the model compiles and computes what eager does."""
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(capture_dynamic_output_shape_ops=False):
        model = routed(pipeline)
        assert dynamo_config.capture_dynamic_output_shape_ops
        eager = copy.deepcopy(model)
        compiled = torch.compile(model)
        for i, (B, L, _) in enumerate(SHAPES[:3]):
            ids, mask = random_batch(model.config.vocab_size, B, L, "left", seed=i)
            keep = mask.bool()
            with torch.no_grad():
                torch.testing.assert_close(compiled(ids, attention_mask=mask).logits[keep],
                                           eager(ids, attention_mask=mask).logits[keep], atol=1e-5, rtol=0)


def test_torch_sparse_compiles_without_breaks():
    """The plain-PyTorch reference compiles whole with plain torch.compile, which specialises
    batch and length on 1: at most one graph per (B == 1, L == 1) combination. (Under
    compile_model's size-oblivious tracing, Inductor's CPU lowering of its data-dependent
    gather fails an internal bound check in torch 2.13, so the reference is left to plain
    torch.compile.)"""
    model = routed("torch-sparse")
    eager = copy.deepcopy(model)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=True)
    from torch._dynamo.utils import counters

    counters.clear()
    for i, (B, L, skip) in enumerate(SHAPES):
        skipgpt.force_routes(model, skip=skip, seed=i)
        skipgpt.force_routes(eager, skip=skip, seed=i)
        ids, mask = random_batch(model.config.vocab_size, B, L, "left", seed=i)
        with torch.no_grad():
            keep = mask.bool()
            torch.testing.assert_close(model(ids, attention_mask=mask).logits[keep],
                                       eager(ids, attention_mask=mask).logits[keep], atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] <= 4


def test_explain_reports_graphs_breaks_and_recompiles():
    model = routed("triton-sparse")
    inputs = []
    for B, L in [(2, 9), (3, 1), (1, 70)]:
        ids, mask = random_batch(model.config.vocab_size, B, L, "left")
        inputs.append(dict(input_ids=ids, attention_mask=mask))
    report = explain(model, inputs)
    assert (report.graphs, report.graph_breaks, report.compilations, report.recompiles) == (1, 0, 1, 0)
    assert "One graph serves every input" in str(report)


def test_explain_names_the_cause_of_a_recompile():
    model = routed("dense")
    inputs = [dict(input_ids=random_batch(97, 2, 5)[0]), dict(input_ids=random_batch(97, 2, 5)[0].to(torch.int32))]
    report = explain(model, inputs)
    assert report.recompiles == 1
    assert "int32" in " ".join(report.recompile_reasons) or "dtype" in " ".join(report.recompile_reasons)


def test_compile_model_refuses_twice():
    model = compile_model(routed("dense"))
    with pytest.raises(ValueError, match="already compiled"):
        compile_model(model)


def test_compile_model_refuses_the_cpp_wrapper_for_a_routed_single_graph():
    """Inductor's C++ wrapper fails to compile a routed model of two layers or more in one graph
    (a C++ error naming custom_op_wrapper, the caller of host-side ops in torch.cond branches;
    torch 2.13 here, 2.11 on the device): refused up front, with the model left uncompiled."""
    model = routed("triton-sparse")
    assert len(model.model.layers) > 1
    with pytest.raises(ValueError, match="C\\+\\+ wrapper fails to compile the single graph of a routed model"):
        compile_model(model, options={"cpp_wrapper": True})
    with torch._inductor.config.patch(cpp_wrapper=True), pytest.raises(ValueError, match="C\\+\\+ wrapper"):
        compile_model(model)  # turned on in Inductor's config rather than in options
    assert not getattr(model, "_skipgpt_compiled", False)
    # Not refused (nothing is compiled before the first call): CUDA graphs, under which the
    # layers branch in Python instead of torch.cond, and a model of one routed layer.
    compile_model(routed("triton-sparse"), options={"cpp_wrapper": True, "triton.cudagraphs": True})
    _, one_layer = make_pair("llama", num_hidden_layers=1)
    compile_model(one_layer, options={"cpp_wrapper": True})


def test_compile_model_of_a_device_map_model_compiles_between_accelerate_hooks():
    """accelerate's device hooks (device_map placement) run under torch.compiler.disable, a graph
    break: fullgraph=True says so up front, the default compiles the pieces and warns."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    def placed():
        model = routed("triton-sparse")
        for module in (model.model.embed_tokens, model.model.norm):
            add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))
        return model

    with pytest.raises(ValueError, match="device_map.*fullgraph=False"):
        compile_model(placed(), fullgraph=True)
    model = placed()
    eager = copy.deepcopy(model)
    # assertLogs rather than caplog: CI runs pytest without its logging plugin.
    with unittest.TestCase().assertLogs(logging.getLogger("skipgpt"), "WARNING") as logs:
        compile_model(model, backend="eager")
    assert "several graphs" in " ".join(logs.output)
    ids, mask = random_batch(97, 2, 9, "left")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)


def test_explain_reports_what_cuda_graphs_cannot_hold():
    """With a CUDA-graph mode, explain() traces as compile_model would (a Python branch on the
    token count) and lists the blockers: none up to 64 tokens per step, the exact form's
    data-dependent sizes above."""
    model = routed("triton-sparse")
    def step(B, L):
        ids, mask = random_batch(97, B, L, "left")
        return dict(input_ids=ids, attention_mask=mask)

    short = [step(2, 9), step(3, 1)]
    report = explain(model, short, mode="reduce-overhead")
    assert report.cudagraph_blockers == [] and report.recompiles == 0
    assert "Every graph is capturable in a CUDA graph" in str(report)
    report = explain(model, short + [step(1, 70)], mode="reduce-overhead")
    assert report.recompiles == 1 and "<= 64" in " ".join(report.recompile_reasons)
    assert report.cudagraph_blockers and all("data-dependent" in r for r in report.cudagraph_blockers)
    assert "Not capturable in a CUDA graph" in str(report)
    assert model.model.skipgpt_routing.single_graph is False  # explain restores the model's setting
