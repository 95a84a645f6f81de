"""Fixtures for the training tests: a tiny random Llama (hidden 64, 3 layers) saved with the
offline tokenizer that tests/eval builds, and a small text file."""
from __future__ import annotations

import pytest

# tests/eval's fixtures: the byte-level BPE tokenizer trained offline lives in its tiny model
# folder; reused here rather than built a second time.
from tests.eval.conftest import synthetic_wiki_text, tiny_llama, wiki_cache  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama, tmp_path_factory):  # noqa: F811 (the imported fixture)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-64")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """About 6k tokens of synthetic article text, one document."""
    import re

    text = re.sub(r"<[^>]+>", "", synthetic_wiki_text(40, seed=3))
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(text, encoding="utf-8")
    return path
