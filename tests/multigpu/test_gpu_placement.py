"""One model's layers split over two GPUs (skipgpt.load(device_map=...)) compute what the same
model computes on one GPU: logits, realized routes and generate() (dynamic and static KV
cache), in the dense, torch-sparse and triton-sparse pipelines, with real (random) routers and
with forced routes. SmolLM2-135M in float32, so the comparison is tight.

Needs two CUDA devices and `skipgpt setup`. Layers on cuda:1 launch the skipgpt Triton kernels
while cuda:0 is the current device, so triton-sparse here also checks that the ops launch on
their tensors' device (the device guard inside ops/)."""
from __future__ import annotations

import pytest
import torch

import skipgpt
from skipgpt import assets
from skipgpt.model import model_devices
from tests.helpers import rel_err
from tests.model.tiny import cache_kw

from .placement import layer_split_map, misplaced, random_router_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

# The two devices of the split (module constants, so the test body can be dry-run elsewhere).
FIRST, SECOND = torch.device("cuda:0"), torch.device("cuda:1")

TEXTS = [
    "The river flows through the old city and under seven bridges before it reaches the sea.",
    "In 1887 the village school",
    "Music",
]


@pytest.fixture(scope="module")
def smollm2():
    try:
        return assets.model_path()
    except assets.AssetMissingError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def router_file(smollm2, tmp_path_factory):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2)
    return random_router_file(tmp_path_factory.mktemp("routers") / "random.safetensors",
                              config.num_hidden_layers, config.hidden_size)


@pytest.fixture(scope="module")
def batch(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"].to(FIRST), enc["attention_mask"].to(FIRST), tok.pad_token_id


def _load(path, routes, router_file, pipeline, **placement):
    model = skipgpt.load(path, router=router_file if routes == "routers" else None, pipeline="dense",
                         dtype=torch.float32, **placement)
    if routes == "forced":
        skipgpt.force_routes(model, skip=0.25, seed=1)
    return skipgpt.set_pipeline(model, pipeline)


@pytest.mark.parametrize("pipeline,routes", [
    ("dense", None), ("torch-sparse", "routers"), ("triton-sparse", "routers"),
    ("torch-sparse", "forced"), ("triton-sparse", "forced"),
])
def test_layers_split_over_two_gpus_match_one_gpu(smollm2, router_file, batch, pipeline, routes):
    ids, mask, pad = batch
    one = _load(smollm2, routes, router_file, pipeline, device=FIRST)
    n = one.config.num_hidden_layers
    placement = layer_split_map(n, str(FIRST), str(SECOND))
    two = _load(smollm2, routes, router_file, pipeline, device_map=placement)
    assert misplaced(two, placement) == []
    assert model_devices(two) == list(dict.fromkeys([FIRST, SECOND]))

    with torch.no_grad():
        want = one(ids, attention_mask=mask).logits
        got = two(ids, attention_mask=mask).logits.to(want.device)
    valid = mask.bool()
    assert rel_err(got[valid], want[valid]) < 1e-5
    s1, s2 = skipgpt.sparsity(one), skipgpt.sparsity(two)
    assert s2 == s1
    if routes is not None:
        assert 0.05 < s1["attention"] < 0.95 and 0.05 < s1["mlp"] < 0.95, s1  # routes really vary

    for cache in ({}, {"cache_implementation": "static"}):  # the seq-first cache, dynamic and static
        out = [m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad,
                          **cache).to(FIRST) for m in (one, two)]
        assert torch.equal(out[1], out[0]), cache
    # The K/V of each layer stayed on that layer's GPU.
    from skipgpt.cache import SeqFirstCache

    cache = SeqFirstCache(n)
    with torch.no_grad():
        two(ids, attention_mask=mask, use_cache=True, **cache_kw(two, cache))
    assert [cache.layers[i].keys.device for i in (0, n - 1)] == [FIRST, SECOND]


def test_device_map_auto_spreads_and_matches(smollm2, batch):
    ids, mask, _ = batch
    one = skipgpt.load(smollm2, pipeline="dense", dtype=torch.float32, device=FIRST)
    auto = skipgpt.load(smollm2, pipeline="dense", dtype=torch.float32, device_map="auto")
    devices = {p.device for p in auto.parameters()}
    # "auto" balances memory over the visible GPUs (accelerate's get_balanced_memory), even for
    # a model that would fit one.
    assert len(devices) >= 2, f"device_map='auto' put everything on {devices}: {auto.hf_device_map}"
    with torch.no_grad():
        want = one(ids, attention_mask=mask).logits
        got = auto(ids, attention_mask=mask).logits.to(want.device)
    assert rel_err(got[mask.bool()], want[mask.bool()]) < 1e-5
