"""Compiled triton-sparse on CUDA at Llama-3.1-8B layer geometry: no graph breaks, no
recompilation over 5 sequence lengths and 3 skip rates, and the eager numbers."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import skipgpt
from skipgpt.compile import compile_model
from tests.helpers import rel_err
from tests.model.tiny import random_batch

pytestmark = pytest.mark.gpu


def test_compiled_triton_sparse_one_graph_at_8b_geometry():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, pad_token_id=0)
    with torch.device("cuda"):
        eager = skipgpt.wrap(LlamaForCausalLM(config).to(torch.bfloat16).eval(), pipeline="dense")
    skipgpt.force_routes(eager, skip=0.25)
    skipgpt.set_pipeline(eager, "triton-sparse")
    compiled = compile_model(copy.deepcopy(eager), fullgraph=True)
    # torch 2.11's fake stride computation guards on L >= 2 even under size-oblivious tracing
    # (torch 2.13 does not: the CPU test compiles once for every length, 1 included), so the
    # single-token graph is compiled up front; nothing after it may recompile.
    warm = {300, 1}
    for L in (300, 1, 17, 64, 1000):
        for i, skip in enumerate((0.0, 0.25, 0.5)):
            for model in (eager, compiled):
                skipgpt.force_routes(model, skip=skip, seed=i)
            ids, mask = random_batch(1024, 2, L, "left", device="cuda")
            stance = "default" if (L in warm and i == 0) else "fail_on_recompile"
            with torch.no_grad(), torch.compiler.set_stance(stance):
                out = compiled(ids, attention_mask=mask).logits.float()
            with torch.no_grad():
                ref = eager(ids, attention_mask=mask).logits.float()
            keep = mask.bool()
            assert rel_err(out[keep], ref[keep]) < 1e-2, (L, skip)
