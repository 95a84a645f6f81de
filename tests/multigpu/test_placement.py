"""Placement on the CPU: `skipgpt.load(device_map=...)` and routed layers whose inputs come from
another device. The GPU tests (test_gpu_placement.py) split real models over two GPUs; here a
device map can only name the CPU, so the cross-device paths are checked with the meta device
standing in for a second device (placement only: meta tensors carry no values)."""
from __future__ import annotations

import pytest
import torch

import skipgpt
from skipgpt.routing import RoutingState
from tests.model.tiny import make_hf, make_pair, random_batch

from .placement import expected_device, layer_split_map, misplaced, random_router_file


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-3-layers")
    make_hf("llama").save_pretrained(path)
    random_router_file(path / "router.safetensors", num_layers=3, hidden=64)
    return path


def test_expected_device_reads_the_longest_prefix():
    placement = {"": "cpu", "model.layers.1": 1, "model.layers.10": "cuda:0"}
    assert expected_device("model.layers.1.mlp.up_proj.weight", placement) == torch.device("cuda:1")
    assert expected_device("model.layers.10.mlp.up_proj.weight", placement) == torch.device("cuda:0")
    assert expected_device("model.layers.11.mlp.up_proj.weight", placement) == torch.device("cpu")


@pytest.mark.parametrize("pipeline", ["dense", "torch-sparse", "triton-sparse"])
def test_explicit_device_map_places_every_layer_and_matches_one_device(tiny_folder, pipeline):
    placement = layer_split_map(3, "cpu", "cpu", split=2)
    router = None if pipeline == "dense" else tiny_folder / "router.safetensors"
    ref = skipgpt.load(tiny_folder, router=router, pipeline=pipeline, dtype=torch.float32)
    placed = skipgpt.load(tiny_folder, router=router, pipeline=pipeline, dtype=torch.float32, device_map=placement)
    assert misplaced(placed, placement) == []
    assert all(type(layer).__name__ == "RoutedDecoderLayer" for layer in placed.model.layers)

    ids, mask = random_batch(97, 3, 12, padding="left", seed=1)
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, placed(ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    if pipeline != "dense":
        assert skipgpt.sparsity(placed) == skipgpt.sparsity(ref)
        assert 0.05 < skipgpt.sparsity(placed)["mlp"] < 0.95  # the routers really route
    new = [m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0) for m in (ref, placed)]
    assert torch.equal(new[0], new[1])


def test_device_map_auto_without_gpus_keeps_the_model_on_the_cpu(tiny_folder):
    ref = skipgpt.load(tiny_folder, pipeline="dense", dtype=torch.float32)
    placed = skipgpt.load(tiny_folder, pipeline="dense", dtype=torch.float32, device_map="auto")
    if torch.cuda.is_available():
        pytest.skip("with GPUs, 'auto' places on them (tests/multigpu/test_gpu_placement.py)")
    assert {p.device for p in placed.parameters()} == {torch.device("cpu")}
    ids, mask = random_batch(97, 2, 9, padding="right")
    with torch.no_grad():
        assert torch.equal(placed(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)


def test_bad_placements_are_refused(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match="pass one"):
        skipgpt.load(tiny_folder, pipeline="dense", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="device_map: expected"):
        skipgpt.load(tiny_folder, pipeline="dense", device_map=["cpu"])
    # A layer offloaded to disk would be streamed in by accelerate's hooks at each forward; the
    # routed layers read weights directly, so this must fail at load, naming the cause.
    offload = layer_split_map(3, "cpu", "cpu")
    offload["model.layers.1"] = "disk"
    with pytest.raises(ValueError, match=r"offloaded to disk.*model.layers.1|model.layers.1.*offloaded to disk"):
        skipgpt.load(tiny_folder, pipeline="dense", device_map=offload, offload_folder=str(tmp_path / "off"))


def test_forced_params_get_a_copy_per_device():
    state = RoutingState()
    state.force(0.25, seed=3, device=["cpu", "meta"])
    assert state.forced_params.device.type == "cpu"
    assert state.forced_params_on(torch.device("cpu")) is state.forced_params
    on_meta = state.forced_params_on(torch.device("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (2,)
    assert state.forced_params_on(torch.device("meta")) is on_meta  # made once, at force()
    state.force(None, seed=0, device="cpu")
    assert state.forced_params is None and state.forced_copies == {}
    with pytest.raises(RuntimeError, match="force_routes"):
        state.forced_params_on(torch.device("cpu"))


@pytest.mark.parametrize("pipeline", ["dense", "triton-sparse"])
def test_a_layer_runs_on_its_own_device_whatever_its_inputs(pipeline):
    # What a device_map asks of a routed layer: the previous layer's output, the model's RoPE
    # tables and padding mask arrive from another device; K/V, route decisions, counts and the
    # output must be on the layer's own. Layer 1 goes to the meta device, its inputs stay on the
    # CPU. (torch-sparse is left out: torch.nonzero has no meta implementation.)
    _, model = make_pair("llama")
    skipgpt.force_routes(model, skip=0.25, seed=0)
    skipgpt.set_pipeline(model, pipeline)
    layer = model.model.layers[1].to("meta")
    skipgpt.force_routes(model, skip=0.25, seed=0)  # the meta layer's copy of the route parameters
    assert "meta" in model.model.skipgpt_routing.forced_copies
    B, L = 2, 6
    x = torch.randn(B, L, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(L)[None].expand(B, -1))
    model.model.skipgpt_routing.padding_mask = torch.ones(B, L, dtype=torch.long)
    cache = skipgpt.SeqFirstCache(3)
    out = layer(x, position_embeddings=(cos, sin), past_key_values=cache)
    assert out.device.type == "meta" and out.shape == (B, L, 64)
    assert cache.layers[1].keys.device.type == "meta"
    assert layer.route_counts.device.type == "meta"
