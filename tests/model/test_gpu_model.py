"""bf16 equivalences at Llama-3.1-8B layer geometry (2 layers), on the GPU."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import skipgpt
from tests.helpers import rel_err
from tests.model.tiny import random_batch, stepwise_logits

pytestmark = pytest.mark.gpu

GEOMETRY = dict(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                pad_token_id=0)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(LlamaConfig(**GEOMETRY)).to(torch.bfloat16).eval()
    routed = LlamaForCausalLM(hf.config).to(device="cuda", dtype=torch.bfloat16).eval()
    routed.load_state_dict(hf.state_dict())
    return hf, skipgpt.wrap(routed, pipeline="dense")


def logits(model, ids, mask, pipeline):
    skipgpt.set_pipeline(model, pipeline)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_dense_matches_hugging_face(models, padding):
    hf, routed = models
    ids, mask = random_batch(1024, 3, 300, padding, device="cuda")
    keep = mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits.float()
    assert rel_err(logits(routed, ids, mask, "dense")[keep], ref[keep]) < 1e-2


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("skip", [0.25, 0.5])
def test_triton_sparse_matches_torch_sparse(models, padding, skip):
    _, routed = models
    skipgpt.force_routes(routed, skip=skip, seed=7)
    ids, mask = random_batch(1024, 4, 257, padding, device="cuda")
    keep = mask.bool()
    ref = logits(routed, ids, mask, "torch-sparse")
    out = logits(routed, ids, mask, "triton-sparse")
    dense = logits(routed, ids, mask, "dense")
    skipgpt.force_routes(routed, skip=None)
    assert rel_err(out[keep], ref[keep]) < 1e-2
    assert rel_err(dense[keep], ref[keep]) > 5e-2  # the routes really change the function


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_matches_torch_sparse(models, batch):
    _, routed = models
    skipgpt.force_routes(routed, skip=0.25, seed=3)
    ids, mask = random_batch(1024, batch, 40, "left", device="cuda")
    keep = mask.bool()
    skipgpt.set_pipeline(routed, "torch-sparse")
    with torch.no_grad():
        ref = stepwise_logits(routed, ids, mask, prefill=30).float()
    skipgpt.set_pipeline(routed, "triton-sparse")
    with torch.no_grad():
        out = stepwise_logits(routed, ids, mask, prefill=30).float()
    skipgpt.force_routes(routed, skip=None)
    assert rel_err(out[keep], ref[keep]) < 1e-2
