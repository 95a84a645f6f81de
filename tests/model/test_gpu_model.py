"""bf16 at Llama-3.1-8B layer geometry (2 layers), on the GPU. The ground truth is the same
model in float32: bf16 outputs (Hugging Face's included) are judged by their distance to it.

Compared: the first and last decoder layers' outputs (the residual stream), each against the
float32 truth, next to a bf16 baseline (Hugging Face's model, or the plain-PyTorch pipeline)
computing the same function: ours must be no less accurate than it (within 25%). An absolute
1e-2 bound is not meaningful at model level with random weights: bf16 rounding of this model
is already 1.3% after one layer and 1.8% after two (H200, 2026-11-26, ours and the baseline
alike). The 1e-2 bound is checked where inputs are controlled: per op (tests/ops/test_ops_gpu.py)
and per layer (every benchmark point: 1.7e-3 to 2.5e-3). Logits are not compared: the final
RMSNorm amplifies rounding further (~9%)."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import skipgpt
from skipgpt.routing import RoutingState
from tests.helpers import rel_err
from tests.model.tiny import random_batch, stepwise_logits

pytestmark = pytest.mark.gpu

GEOMETRY = dict(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                pad_token_id=0)


@pytest.fixture(scope="module")
def models():
    """(HF bf16, HF fp32, routed bf16, routed fp32), all with the same weights."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf32 = LlamaForCausalLM(LlamaConfig(**GEOMETRY)).eval()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    # `.to(bfloat16)` also rounds the rotary inverse frequencies, which shifts every position's
    # angle (~9% error after 300 tokens, Hugging Face's own layers included); checkpoints loaded
    # with from_pretrained keep them in float32, and so does this test.
    hf16.model.rotary_emb.inv_freq = hf32.model.rotary_emb.inv_freq.clone()
    routed16 = skipgpt.wrap(copy.deepcopy(hf16), pipeline="dense")
    routed32 = skipgpt.wrap(copy.deepcopy(hf32), pipeline="dense")
    return hf16, hf32, routed16, routed32


def layer_outputs(model, run):
    """Run `run()` and return the first and last decoder layers' outputs (float32, concatenated
    over the calls `run` makes along the sequence dim)."""
    seen = {0: [], -1: []}
    hooks = [model.model.layers[i].register_forward_hook(lambda m, a, out, i=i: seen[i].append(out)) for i in seen]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return [torch.cat([o[0] if isinstance(o, tuple) else o for o in seen[i]], dim=1).float() for i in seen]


def residual(model, ids, mask, pipeline=None, skip=None):
    """(first, last) decoder-layer outputs [B, L, H] of one forward."""
    if pipeline is not None:
        skipgpt.force_routes(model, skip=skip, seed=7)
        skipgpt.set_pipeline(model, pipeline)
    return layer_outputs(model, lambda: model(ids, attention_mask=mask))


def check(ours, bf16_baseline, truth, keep):
    """At the first and the last layer, no less accurate than the bf16 baseline (within 25%)."""
    for layer in (0, 1):
        err, base = rel_err(ours[layer][keep], truth[layer][keep]), rel_err(bf16_baseline[layer][keep], truth[layer][keep])
        assert err < 1.25 * base, (layer, err, base)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_dense_is_as_accurate_as_hugging_face(models, padding):
    hf16, hf32, routed16, _ = models
    ids, mask = random_batch(1024, 3, 300, padding, device="cuda")
    check(residual(routed16, ids, mask, "dense"), residual(hf16, ids, mask), residual(hf32, ids, mask), mask.bool())


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("skip", [0.25, 0.5])
@pytest.mark.parametrize("form", RoutingState.FORMS)
def test_sparse_pipelines_match_float32_truth(models, padding, skip, form):
    *_, routed16, routed32 = models
    ids, mask = random_batch(1024, 4, 257, padding, device="cuda")
    keep = mask.bool()
    truth = residual(routed32, ids, mask, "torch-sparse", skip)
    baseline = residual(routed16, ids, mask, "torch-sparse", skip)  # plain PyTorch in bf16
    state = routed16.model.skipgpt_routing
    try:
        state.use_form(form)
        ours = residual(routed16, ids, mask, "triton-sparse", skip)
    finally:
        state.capacity_max_tokens = RoutingState().capacity_max_tokens
    check(ours, baseline, truth, keep)
    # The routes really change the function.
    assert rel_err(residual(routed32, ids, mask, "dense")[1][keep], truth[1][keep]) > 5e-2


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_matches_float32_truth(models, batch):
    *_, routed16, routed32 = models
    ids, mask = random_batch(1024, batch, 40, "left", device="cuda")
    keep = mask.bool()
    outs = {}
    for name, model, pipeline in (("truth", routed32, "torch-sparse"), ("torch-sparse", routed16, "torch-sparse"),
                                  ("triton-sparse", routed16, "triton-sparse")):
        skipgpt.force_routes(model, skip=0.25, seed=3)
        skipgpt.set_pipeline(model, pipeline)
        outs[name] = layer_outputs(model, lambda: stepwise_logits(model, ids, mask, prefill=30))
    check(outs["triton-sparse"], outs["torch-sparse"], outs["truth"], keep)


def test_linear_routers_on_cuda_cached_eagerly_and_read_live_in_a_cuda_graph():
    """Real linear routers at 8B layer geometry: eager steps reuse the concatenated router
    weights until a router changes in place; a step captured in a CUDA graph concatenates inside
    the graph, so its replays follow the routers' current weights."""
    from skipgpt.router import Router

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)
    with torch.device("cuda"):
        model = skipgpt.wrap(LlamaForCausalLM(config).to(torch.bfloat16).eval(), pipeline="dense")
        layer = model.model.layers[0]
        layer.router_attention, layer.router_mlp = Router(4096), Router(4096)
    with torch.no_grad():  # weights that decide against the biases: negating one flips its routes
        for router in (layer.router_attention, layer.router_mlp):
            router.weight_predictor.weight.normal_(0.0, 20.0)
    skipgpt.set_pipeline(model, "triton-sparse")
    ids = torch.randint(0, 1024, (1, 256), device="cuda")
    with torch.no_grad():
        first = model(ids, use_cache=False).logits
        cached = layer._router_weights[1]
        again = model(ids, use_cache=False).logits
        assert layer._router_weights[1] is cached and torch.equal(first, again)
        weight = layer.router_mlp.weight_predictor.weight
        weight.neg_()  # every MLP decision flips
        flipped = model(ids, use_cache=False).logits
        assert layer._router_weights[1] is not cached and torch.equal(layer._router_weights[1][2:], weight)
        assert not torch.equal(flipped, first)

        static_ids = ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(static_ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static_ids, use_cache=False).logits
        weight.neg_()  # back to the first routes, after the capture
        graph.replay()
        torch.cuda.synchronize()
        # The replay took the first routes (a graph holding the flipped concatenation would give
        # `flipped`), and eager steps see the restored weights too.
        assert rel_err(captured.float(), first.float()) < rel_err(flipped.float(), first.float()) / 10
        assert torch.equal(model(ids, use_cache=False).logits, first)
