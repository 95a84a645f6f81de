"""Fixtures for evaluation tests: a synthetic Wikipedia cache and a tiny random Llama model,
both built offline in a temporary directory (no Hub, no PyPI)."""
from __future__ import annotations

import random

import pytest

from skipgpt import assets

_WORDS = (
    "the a of and river city king war year first north small old new music team station "
    "village school church game album river bridge island party film song born served "
    "population built known called located played released became named during after"
).split()


def synthetic_wiki_text(n_articles: int = 60, seed: int = 0) -> str:
    """Text in wiki.utf8's format: `<doc ...>` blocks, some holding only their title."""
    rng = random.Random(seed)
    blocks = []
    for i in range(n_articles):
        title = f"Article {i} &amp; co"  # the extractor escapes HTML in titles and text
        body = f"{title}\n\n"
        if i % 7 != 3:  # every seventh article is title-only, as many are in wiki.utf8
            for _ in range(rng.randint(1, 4)):
                words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 80))]
                body += " ".join(words).capitalize() + ".\n"
        blocks.append(f'<doc id="{i}" url="https://en.wikipedia.org/wiki?curid={i}" title="{title}">\n{body}\n</doc>\n')
    return "".join(blocks)


@pytest.fixture
def wiki_cache(tmp_path, monkeypatch):
    """A cache root holding a synthetic corpus; SKIPGPT_CACHE points at it."""
    root = tmp_path / "cache"
    assets.build_wiki(synthetic_wiki_text(), root / assets.WIKI_DIRNAME, source="synthetic")
    monkeypatch.setenv("SKIPGPT_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer random LlamaForCausalLM with a byte-level BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Byte-level: every string encodes, whatever the training text held.
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([synthetic_wiki_text(20, seed=1)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(path)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path
