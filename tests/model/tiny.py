"""Tiny random models of every supported family, built in the test (no downloads)."""
import copy

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import skipgpt

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig(
        **COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=16)),
}


def make_hf(family: str, dtype=torch.float32, device="cpu", seed=0, **overrides):
    cls, config = FAMILIES[family]
    config = copy.deepcopy(config)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = cls(config).to(device=device, dtype=dtype).eval()
    # Random biases and norm weights, so a forgotten bias or norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def make_pair(family: str, pipeline="dense", **kw):
    """(Hugging Face original, routed copy sharing nothing with it)."""
    hf = make_hf(family, **kw)
    return hf, skipgpt.wrap(copy.deepcopy(hf), pipeline=pipeline)


def random_batch(vocab: int, batch: int, length: int, padding: str = "none", seed: int = 0, device="cpu"):
    """input_ids [B, L] and attention_mask [B, L] (left or right padding on some rows)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        pad = min(length - 1, 2 * b + 1)
        if padding == "left":
            mask[b, :pad] = 0
        elif padding == "right":
            mask[b, length - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def cache_kw(model, cache) -> dict:
    """transformers renamed `past_key_values` to `cache` in 5.2x; pass whichever this one takes."""
    import inspect

    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return {name: cache}


def stepwise_logits(model, ids, mask, prefill: int):
    """Logits of every position computed as one prefill of `prefill` tokens, then one token at a
    time through a seq-first cache: [B, L, V]."""
    cache = skipgpt.SeqFirstCache(model.config.num_hidden_layers)
    outs = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True, **cache_kw(model, cache)).logits]
    for t in range(prefill, ids.shape[1]):
        step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True, **cache_kw(model, cache))
        outs.append(step.logits)
    return torch.cat(outs, dim=1)
