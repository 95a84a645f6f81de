"""The routed model computes what it promises: dense equals Hugging Face, the sparse pipelines
equal each other, with and without padding and KV cache (DESIGN.md section 1)."""
import copy

import pytest
import torch

import skipgpt
from skipgpt.routing import RoutingState
from tests.model.tiny import FAMILIES, cache_kw, make_hf, make_pair, random_batch, stepwise_logits

PADDINGS = ["none", "left", "right"]


def valid_close(a, b, mask, atol, rtol=0.0):
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=atol, rtol=rtol)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding", PADDINGS)
def test_dense_equals_hugging_face(family, padding):
    hf, routed = make_pair(family)
    ids, mask = random_batch(hf.config.vocab_size, 3, 11, padding)
    with torch.no_grad():
        valid_close(routed(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("skip", [0.3, 0.7])
@pytest.mark.parametrize("form", RoutingState.FORMS)
def test_sparse_pipelines_agree(family, padding, skip, form):
    _, model = make_pair(family)
    # triton-sparse picks its form by token count; move the switch so this batch takes `form`.
    model.model.skipgpt_routing.use_form(form)
    skipgpt.force_routes(model, skip=skip, seed=3)
    ids, mask = random_batch(model.config.vocab_size, 3, 13, padding)
    with torch.no_grad():
        skipgpt.set_pipeline(model, "torch-sparse")
        ref = model(ids, attention_mask=mask).logits
        skipgpt.set_pipeline(model, "triton-sparse")
        out = model(ids, attention_mask=mask).logits
        skipgpt.set_pipeline(model, "dense")
        dense = model(ids, attention_mask=mask).logits
    valid_close(out, ref, mask, atol=1e-5)
    # Skipping must change something, or this test proves nothing.
    assert (ref - dense)[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("form", RoutingState.FORMS)
@pytest.mark.parametrize("length", [5, 40])
@pytest.mark.parametrize("cap", [None, 79, 80])
def test_capacity_form_fuses_the_attention_input(monkeypatch, family, form, length, cap):
    """Eager capacity steps of FUSED_QKV_MIN_TOKENS to FUSED_QKV_MAX_TOKENS tokens project Q/K/V
    in one qkv_rope_write call per layer, except where the family normalises q/k per head
    (Qwen3); the exact form and decode-sized steps never do."""
    import skipgpt.layer

    if cap is not None:  # at the 80-token steps' edge: 80 fuses them, 79 does not
        monkeypatch.setattr(skipgpt.layer, "FUSED_QKV_MAX_TOKENS", cap)
    min_tokens, max_tokens = skipgpt.layer.FUSED_QKV_MIN_TOKENS, skipgpt.layer.FUSED_QKV_MAX_TOKENS
    _, model = make_pair(family)
    model.model.skipgpt_routing.use_form(form)
    skipgpt.force_routes(model, skip=0.3, seed=3)
    skipgpt.set_pipeline(model, "triton-sparse")
    calls = []
    fused = skipgpt.ops.qkv_rope_write
    monkeypatch.setattr(skipgpt.ops, "qkv_rope_write", lambda *a: calls.append(1) or fused(*a))
    ids, mask = random_batch(model.config.vocab_size, 2, length, "left")
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        skipgpt.set_pipeline(model, "torch-sparse")
        ref = model(ids, attention_mask=mask).logits
    fuses = form == "capacity" and family != "qwen3" and min_tokens <= 2 * length <= max_tokens
    assert len(calls) == (model.config.num_hidden_layers if fuses else 0)
    valid_close(out, ref, mask, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("pipeline", ["dense", "torch-sparse", "triton-sparse"])
def test_cached_decode_equals_full_forward(family, padding, pipeline):
    _, model = make_pair(family)
    skipgpt.force_routes(model, skip=0.4, seed=1)
    skipgpt.set_pipeline(model, pipeline)
    ids, mask = random_batch(model.config.vocab_size, 2, 12, padding)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        steps = stepwise_logits(model, ids, mask, prefill=5)
    valid_close(steps, full, mask, atol=1e-5)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_decode_triton_sparse_equals_torch_sparse(padding):
    _, model = make_pair("llama")
    skipgpt.force_routes(model, skip=0.5, seed=2)
    ids, mask = random_batch(model.config.vocab_size, 3, 10, padding)
    with torch.no_grad():
        skipgpt.set_pipeline(model, "torch-sparse")
        ref = stepwise_logits(model, ids, mask, prefill=4)
        skipgpt.set_pipeline(model, "triton-sparse")
        out = stepwise_logits(model, ids, mask, prefill=4)
    valid_close(out, ref, mask, atol=1e-5)


@pytest.mark.parametrize("pipeline", ["torch-sparse", "triton-sparse"])
def test_all_execute_equals_dense(pipeline):
    hf, model = make_pair("qwen2")
    skipgpt.force_routes(model, skip=0.0)
    skipgpt.set_pipeline(model, pipeline)
    ids, mask = random_batch(model.config.vocab_size, 2, 9, "left")
    with torch.no_grad():
        valid_close(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask, atol=1e-5)


@pytest.mark.parametrize("pipeline", ["dense", "triton-sparse"])
def test_greedy_generate_with_cache_equals_recompute(pipeline):
    _, model = make_pair("llama")
    skipgpt.force_routes(model, skip=0.3, seed=5)
    skipgpt.set_pipeline(model, pipeline)
    ids, mask = random_batch(model.config.vocab_size, 2, 6, "left")
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        seq, am = ids, mask
        for _ in range(6):
            logits = model(seq, attention_mask=am).logits[:, -1]
            logits[:, model.config.eos_token_id] = -float("inf")  # as min_new_tokens does
            nxt = logits.argmax(-1, keepdim=True)
            seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    assert torch.equal(generated, seq)


def test_dense_generate_equals_hugging_face():
    hf, model = make_pair("mistral")
    ids, mask = random_batch(model.config.vocab_size, 2, 5, "left")
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), hf.generate(ids, **kw))


def test_sampling_generate_runs_batched():
    _, model = make_pair("llama", pipeline="dense")
    skipgpt.force_routes(model, skip=0.25)
    skipgpt.set_pipeline(model, "triton-sparse")
    ids, mask = random_batch(model.config.vocab_size, 3, 4, "left")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=10)
    assert out.shape == (3, 9)


def test_sparsity_counts_non_padding_tokens():
    _, model = make_pair("llama")
    skipgpt.force_routes(model, skip=0.25, seed=0)
    skipgpt.set_pipeline(model, "triton-sparse")
    ids, mask = random_batch(model.config.vocab_size, 4, 64, "left")
    with torch.no_grad():
        model(ids, attention_mask=mask)
    report = skipgpt.sparsity(model)
    assert report["tokens"] == int(mask.sum())
    assert len(report["per_layer"]) == model.config.num_hidden_layers
    assert 0.15 < report["attention"] < 0.35 and 0.15 < report["mlp"] < 0.35
    skipgpt.reset_sparsity(model)
    assert skipgpt.sparsity(model)["tokens"] == 0


def test_padding_never_executes():
    _, model = make_pair("llama")
    skipgpt.force_routes(model, skip=0.0)
    skipgpt.set_pipeline(model, "torch-sparse")
    ids, mask = random_batch(model.config.vocab_size, 3, 8, "left")
    layer = model.model.layers[0]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    n_valid = int(mask.sum())
    assert layer.route_counts.tolist() == [n_valid, n_valid, n_valid]  # [attn executed, mlp executed, tokens]


def test_sparse_pipeline_without_routers_fails_clearly():
    hf = make_hf("llama")
    with pytest.raises(ValueError, match="no routers"):
        skipgpt.wrap(copy.deepcopy(hf))
    model = skipgpt.wrap(copy.deepcopy(hf), pipeline="dense")
    with pytest.raises(ValueError, match="force_routes"):
        skipgpt.set_pipeline(model, "triton-sparse")


def test_bad_arguments_fail_clearly():
    hf = make_hf("llama")
    with pytest.raises(ValueError, match="pipeline: expected one of"):
        skipgpt.wrap(copy.deepcopy(hf), pipeline="sparse")
    model = skipgpt.wrap(copy.deepcopy(hf), pipeline="dense")
    with pytest.raises(ValueError, match="already wrapped"):
        skipgpt.wrap(model)
    with pytest.raises(ValueError, match="skip: expected a rate"):
        skipgpt.force_routes(model, skip=1.5)
    ids = torch.randint(3, 90, (1, 4))
    with pytest.raises(ValueError, match="2-D"):
        model(ids, attention_mask=torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        model(ids, attention_mask=torch.ones(2, 4))


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="llama"):
        skipgpt.wrap(model, pipeline="dense")


def test_sliding_window_is_refused_when_exceeded():
    model = skipgpt.wrap(make_hf("mistral", sliding_window=8), pipeline="dense")
    ids, mask = random_batch(model.config.vocab_size, 1, 12)
    with pytest.raises(NotImplementedError, match="sliding window"):
        model(ids, attention_mask=mask)


def test_head_first_cache_with_content_is_refused():
    from transformers import DynamicCache

    hf, model = make_pair("llama")
    ids, mask = random_batch(model.config.vocab_size, 1, 4)
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        hf(ids, attention_mask=mask, use_cache=True, **cache_kw(hf, cache))
        with pytest.raises(ValueError, match="seq-first"):
            model(ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache))


def test_deepcopy_of_a_wrapped_model_is_independent():
    _, model = make_pair("llama")
    skipgpt.force_routes(model, skip=0.4)
    skipgpt.set_pipeline(model, "triton-sparse")
    twin = copy.deepcopy(model)
    ids, mask = random_batch(model.config.vocab_size, 3, 9, "left")
    with torch.no_grad():
        valid_close(twin(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, mask, atol=1e-6)
    skipgpt.set_pipeline(twin, "dense")
    assert model.model.layers[0].pipeline == "triton-sparse"


@pytest.mark.parametrize("pipeline", ["dense", "triton-sparse"])
def test_static_cache_decode_equals_full_forward(pipeline):
    _, model = make_pair("qwen3")
    skipgpt.force_routes(model, skip=0.4, seed=4)
    skipgpt.set_pipeline(model, pipeline)
    ids, mask = random_batch(model.config.vocab_size, 2, 12, "left")
    cache = skipgpt.SeqFirstCache(model.config.num_hidden_layers, max_cache_len=16)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True, **cache_kw(model, cache)).logits]
        for t in range(5, 12):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True,
                               **cache_kw(model, cache)).logits)
    valid_close(torch.cat(steps, 1), full, mask, atol=1e-5)
    assert int(cache.get_seq_length()) == 12


def test_generate_with_transformers_static_cache():
    _, model = make_pair("llama")
    skipgpt.force_routes(model, skip=0.3, seed=6)
    skipgpt.set_pipeline(model, "triton-sparse")
    ids, mask = random_batch(model.config.vocab_size, 2, 6, "left")
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        dynamic = model.generate(ids, **kw)
        static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)


def test_static_cache_overflow_is_an_error():
    _, model = make_pair("llama")
    ids, mask = random_batch(model.config.vocab_size, 1, 6)
    cache = skipgpt.SeqFirstCache(model.config.num_hidden_layers, max_cache_len=4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="overflow"):
        model(ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_sparse_pipelines_agree_with_real_routers(kind):
    from skipgpt.router import Router

    _, model = make_pair("llama")
    torch.manual_seed(1)
    for layer in model.model.layers:
        for name in ("router_attention", "router_mlp"):
            router = Router(model.config.hidden_size, kind=kind)
            with torch.no_grad():  # weights large against the tiny model's residual stream
                for p in router.parameters():
                    p.normal_(0.0, 20.0 if p.dim() == 2 else 0.0)
            setattr(layer, name, router)
    ids, mask = random_batch(model.config.vocab_size, 3, 13, "left")
    with torch.no_grad():
        skipgpt.set_pipeline(model, "torch-sparse")
        ref = model(ids, attention_mask=mask).logits
        skipgpt.reset_sparsity(model)
        skipgpt.set_pipeline(model, "triton-sparse")
        out = model(ids, attention_mask=mask).logits
    valid_close(out, ref, mask, atol=1e-5)
    report = skipgpt.sparsity(model)
    assert 0.05 < report["attention"] < 0.95 and 0.05 < report["mlp"] < 0.95, report


def test_linear_routers_concatenated_once_until_they_change():
    """Eager steps reuse the concatenated router weights, and make them anew when a router
    changes: in place (load_state_dict), replaced, or converted. Each time triton-sparse must
    route as torch-sparse does with the current weights."""
    from skipgpt.router import Router

    _, model = make_pair("llama")
    torch.manual_seed(2)
    layers = model.model.layers
    for layer in layers:
        for name in ("router_attention", "router_mlp"):
            router = Router(model.config.hidden_size)
            with torch.no_grad():
                router.weight_predictor.weight.normal_(0.0, 20.0)
            setattr(layer, name, router)
    ids, mask = random_batch(model.config.vocab_size, 2, 9, "left")

    def agree():
        with torch.no_grad():
            skipgpt.set_pipeline(model, "torch-sparse")
            ref = model(ids, attention_mask=mask).logits
            skipgpt.set_pipeline(model, "triton-sparse")
            out = model(ids, attention_mask=mask).logits
        valid_close(out, ref, mask, atol=1e-5)
        return [layer._router_weights[1] for layer in layers]

    first = agree()
    assert all(a is b for a, b in zip(first, agree())), "unchanged routers were concatenated again"
    router = layers[0].router_mlp
    flipped = {k: -v for k, v in router.state_dict().items()}  # executes where it skipped
    router.load_state_dict(flipped)
    after_load = agree()
    assert torch.equal(after_load[0][2:], flipped["weight_predictor.weight"])
    layers[1].router_attention = Router(model.config.hidden_size)
    after_new = agree()
    assert torch.equal(after_new[1][:2], layers[1].router_attention.weight_predictor.weight)
    layers[0].router_attention.half(), layers[0].router_mlp.half()
    assert agree()[0].dtype == torch.float16


def test_routers_built_under_inference_mode_are_concatenated_every_step():
    """Inference tensors have no version counter to key the cache on: no cache, same routes."""
    from skipgpt.router import Router

    _, model = make_pair("llama")
    torch.manual_seed(4)
    with torch.inference_mode():
        for layer in model.model.layers:
            for name in ("router_attention", "router_mlp"):
                router = Router(model.config.hidden_size)
                router.weight_predictor.weight.normal_(0.0, 20.0)
                setattr(layer, name, router)
        ids, mask = random_batch(model.config.vocab_size, 2, 9, "left")
        skipgpt.set_pipeline(model, "torch-sparse")
        ref = model(ids, attention_mask=mask).logits
        skipgpt.set_pipeline(model, "triton-sparse")
        out = model(ids, attention_mask=mask).logits
    valid_close(out, ref, mask, atol=1e-5)
    assert all(layer._router_weights is None for layer in model.model.layers)


@pytest.mark.parametrize("pipeline", ["dense", "torch-sparse", "triton-sparse"])
def test_nan_activations_propagate_like_the_dense_model(pipeline):
    """A NaN in one token's embedding is neither hidden nor a crash. As in Hugging Face's model,
    every position that attends to it turns NaN and other sequences stay finite. (Earlier
    positions of the same sequence may turn NaN too, in HF's SDPA as in ours: masked-out keys
    still enter the products; which ones depends on the kernel's key blocks.)"""
    hf, model = make_pair("llama")
    skipgpt.force_routes(model, skip=0.0)  # every token attends, as in the dense model
    skipgpt.set_pipeline(model, pipeline)
    ids, mask = random_batch(model.config.vocab_size, 2, 8)
    poisoned = ids[1, 3].item()
    assert poisoned not in ids[0].tolist()
    for m in (hf, model):
        with torch.no_grad():
            m.model.embed_tokens.weight[poisoned] = float("nan")
    for m in (hf, model):
        with torch.no_grad():
            nan = m(ids, attention_mask=mask).logits.isnan().any(-1)
        assert nan[1, 3:].all() and not nan[0].any(), (type(m).__name__, nan)
