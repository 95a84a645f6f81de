"""Compiled generation with a static cache (the recipes of skipgpt.compile's docstring):
transformers' auto-compiled decode step, and compile_model(mode="reduce-overhead"). Greedy tokens
equal eager generate() token for token; new prompts do not recompile; the decode graph holds
nothing that keeps Inductor from capturing it in a CUDA graph (checked on CPU by CudaGraphCheck,
which applies Inductor's own tests; tests/compile/test_gpu_compile.py checks the real capture)."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import skipgpt
from skipgpt.compile import CudaGraphCheck, compile_model
from tests.model.tiny import cache_kw, make_pair, random_batch

PIPELINES = ["dense", "torch-sparse", "triton-sparse"]
GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def routed_and_eager(pipeline):
    _, model = make_pair("llama")
    model.model.skipgpt_routing.capacity_max_tokens = 64  # both forms within small prompts
    skipgpt.force_routes(model, skip=0.3, seed=5)
    skipgpt.set_pipeline(model, pipeline)
    return model, copy.deepcopy(model)


def auto_compile(**kwargs) -> CompileConfig:
    """transformers' generate() compiles the decode step on CUDA only, unless told to anywhere."""
    config = CompileConfig(fullgraph=True, **kwargs)  # fullgraph: a graph break raises
    config._compile_all_devices = True
    return config


def generate(model, batch, length, seed, **kwargs):
    ids, mask = random_batch(model.config.vocab_size, batch, length, "left", seed=seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **GREEDY, **kwargs)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_transformers_auto_compiled_generate_equals_eager(pipeline):
    model, eager = routed_and_eager(pipeline)
    config = auto_compile()  # transformers' defaults otherwise: Inductor, reduce-overhead
    # (batch, prompt length, stance): new prompts of the compiled length never recompile; the
    # first new length recompiles once (the static cache's size becomes symbolic), later ones not.
    runs = [(2, 6, "default"), (2, 6, "fail_on_recompile"), (2, 9, "default"), (2, 7, "fail_on_recompile"),
            (2, 12, "fail_on_recompile")]
    for seed, (batch, length, stance) in enumerate(runs):
        graphs = counters["stats"]["unique_graphs"]
        with torch.compiler.set_stance(stance):
            out = generate(model, batch, length, seed, cache_implementation="static", compile_config=config)
        assert torch.equal(out, generate(eager, batch, length, seed)), (batch, length)
        if seed == 0:
            assert counters["stats"]["unique_graphs"] == graphs + 1  # the decode step really was compiled


def test_reused_static_cache_never_recompiles():
    """The serving recipe: one cache, reset before each call. Any prompt that fits reuses the
    compiled decode step (and, on CUDA, its recorded graphs: the buffers keep their addresses)."""
    from transformers import StaticCache

    model, eager = routed_and_eager("triton-sparse")
    config = auto_compile()
    cache = StaticCache(config=model.config, max_cache_len=32)
    addresses = set()
    for seed, length in enumerate([6, 6, 9, 14]):
        cache.reset()
        with torch.compiler.set_stance("default" if seed == 0 else "fail_on_recompile"):
            out = generate(model, 2, length, seed, compile_config=config, **cache_kw(model, cache))
        assert torch.equal(out, generate(eager, 2, length, seed)), length
        addresses.add(cache.layers[0].keys.data_ptr())
    assert len(addresses) == 1


@pytest.mark.parametrize("pipeline,capturable", [("dense", True), ("triton-sparse", True), ("torch-sparse", False)])
def test_auto_compiled_decode_step_is_cuda_graph_capturable(pipeline, capturable):
    model, _ = routed_and_eager(pipeline)
    check = CudaGraphCheck()
    config = auto_compile(backend=check, mode=None)
    generate(model, 2, 6, 0, cache_implementation="static", compile_config=config)
    # A new batch size makes the batch symbolic: the routed layers must still branch in Python
    # (torch.cond would keep the graph out of CUDA graphs).
    generate(model, 3, 6, 1, cache_implementation="static", compile_config=config)
    assert check.graphs == 2
    if capturable:
        assert check.blockers == []
    else:  # the plain-PyTorch reference gathers rows with nonzero: a data-dependent shape
        assert check.blockers and all("data-dependent" in reason for reason in check.blockers), check.blockers


def test_compile_model_default_is_one_graph_with_torch_cond():
    """compile_model without CUDA graphs keeps one graph for every step (torch.cond), which
    CudaGraphCheck reports as not capturable: the check can fail."""
    model, _ = routed_and_eager("triton-sparse")
    check = CudaGraphCheck()
    compile_model(model, backend=check)
    generate(model, 2, 6, 0, cache_implementation="static")
    assert check.graphs == 1
    assert any("cond" in reason for reason in check.blockers), check.blockers


def test_compile_model_default_generate_grows_the_dynamic_cache_outside_the_graph(monkeypatch):
    """generate() without a static cache on compile_model's one graph: the seq-first cache
    doubles during decoding (here from 16 slots), which compile_model's entry does in eager code;
    traced in the graph, the reallocation failed to compile. The tokens are eager's, and after
    the first call neither another batch nor a cache grown twice recompiles."""
    from skipgpt import cache

    monkeypatch.setattr(cache, "MIN_CAPACITY", 16)
    model, eager = routed_and_eager("triton-sparse")
    compile_model(model)
    # 14 + 5 tokens cross 16 slots; 30 + 5 cross 16 and 32.
    for seed, (batch, length) in enumerate([(2, 14), (3, 9), (2, 30)]):
        with torch.compiler.set_stance("default" if seed == 0 else "fail_on_recompile"):
            out = generate(model, batch, length, seed)
        assert torch.equal(out, generate(eager, batch, length, seed)), (batch, length)


@pytest.mark.parametrize("pipeline", ["dense", "triton-sparse"])
def test_compile_model_for_cuda_graphs_splits_decode_from_long_prefill(pipeline):
    model, _ = routed_and_eager(pipeline)
    check = CudaGraphCheck()
    compile_model(model, backend=check, cuda_graphs=True)
    assert model.generation_config.disable_compile  # generate() must not compile the compiled forward again
    generate(model, 2, 6, 0, cache_implementation="static")  # prefill of 12 tokens, then decode steps
    # Every graph of steps up to 64 tokens is capturable: nothing data-dependent, no torch.cond,
    # and the static cache, allocated before the compiled prefill, is a static address.
    short = list(check.reasons)
    assert short and all(reasons == [] for reasons in short), short
    generate(model, 2, 40, 1, cache_implementation="static")  # 80 tokens: the exact form for triton-sparse
    long_prefill = check.reasons[len(short):]
    if pipeline == "triton-sparse":  # a graph of its own, one host sync per layer by design: never captured
        assert len(long_prefill) == 1 and long_prefill[0], check.reasons
        assert all("data-dependent" in reason for reason in long_prefill[0]), long_prefill
    else:
        assert all(reasons == [] for reasons in long_prefill), long_prefill


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_compile_model_reduce_overhead_generate_equals_eager_without_recompiles(pipeline):
    model, eager = routed_and_eager(pipeline)
    compile_model(model, mode="reduce-overhead")
    generate(model, 2, 6, 0, cache_implementation="static")  # warm-up: prefill and decode graphs
    # Other prompts, other lengths and another batch size (> 1), up to 64 prefill tokens: no
    # recompile, the same tokens as eager.
    for seed, (batch, length) in enumerate([(2, 6), (2, 11), (3, 6), (4, 16)], start=1):
        with torch.compiler.set_stance("fail_on_recompile"):
            out = generate(model, batch, length, seed, cache_implementation="static")
        assert torch.equal(out, generate(eager, batch, length, seed)), (batch, length)
