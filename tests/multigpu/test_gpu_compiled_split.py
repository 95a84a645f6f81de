"""Compiled code on a model whose layers are split over two GPUs. Under torch.compile most ops
trace into their Triton kernels (skipgpt.ops._common.decompose_under_compile), which drops the
eager device guard: Inductor itself must launch each kernel on its inputs' GPU. A tiny random
Llama in float32 (no assets needed), forced routes, both of triton-sparse's forms, compiled on
two GPUs against eager on one."""
from __future__ import annotations

import pytest
import torch

import skipgpt
from skipgpt.compile import compile_model
from tests.helpers import rel_err
from tests.model.tiny import make_hf, random_batch

from .placement import layer_split_map, misplaced

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


def _load(path, **placement):
    model = skipgpt.load(path, pipeline="dense", dtype=torch.float32, **placement)
    model.model.skipgpt_routing.capacity_max_tokens = 32  # both forms within small steps
    skipgpt.force_routes(model, skip=0.3, seed=1)
    return skipgpt.set_pipeline(model, "triton-sparse")


def test_compiled_model_split_over_two_gpus_matches_eager_on_one(tmp_path):
    make_hf("llama").save_pretrained(tmp_path)
    one = _load(tmp_path, device="cuda:0")
    placement = layer_split_map(one.config.num_hidden_layers, "cuda:0", "cuda:1")
    two = _load(tmp_path, device_map=placement)
    assert misplaced(two, placement) == []
    # accelerate's device hooks are graph breaks: compile_model compiles the pieces between them.
    with pytest.raises(ValueError, match="device_map"):
        compile_model(two, fullgraph=True)
    compile_model(two)
    # Steps of 18, 80 and 210 tokens: the capacity form, then the exact form.
    for seed, (B, L) in enumerate([(2, 9), (2, 40), (3, 70)]):
        ids, mask = random_batch(one.config.vocab_size, B, L, "left", seed=seed, device="cuda:0")
        with torch.no_grad():
            want = one(ids, attention_mask=mask).logits
            got = two(ids, attention_mask=mask).logits.to(want.device)
        keep = mask.bool()
        assert rel_err(got[keep], want[keep]) < 1e-5, (B, L)
