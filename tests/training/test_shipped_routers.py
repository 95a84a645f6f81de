"""The routers shipped in skipgpt/routers/ (trained on the device machine, docs/RESULTS.md):
they load for SmolLM2-135M and skip what they were trained to skip on held-out text."""
from __future__ import annotations

from importlib import resources

import pytest
import torch

import skipgpt
from skipgpt import assets
from skipgpt.commands.eval import _shipped_router
from tests.eval.test_assets import needs_model

SHIPPED = {"smollm2-135m-skip25.safetensors": 0.25, "smollm2-135m-skip40.safetensors": 0.40}


def test_eval_defaults_to_the_shipped_25_percent_routers():
    assert _shipped_router().endswith("smollm2-135m-skip25.safetensors")


@needs_model
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_routers_realize_their_target_on_the_test_split(name):
    from transformers import AutoTokenizer

    path = resources.files("skipgpt").joinpath("routers", name)
    model = skipgpt.load(str(assets.model_path()), router=str(path), pipeline="torch-sparse", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(assets.model_path())
    skipgpt.reset_sparsity(model)
    with torch.no_grad():
        for doc in assets.read_wiki_split("test")[:3]:
            model(torch.tensor([tok(doc["page"]).input_ids[:512]]))
    s = skipgpt.sparsity(model)
    # The target is the share of (token, module) pairs skipped; the routers split it unevenly
    # between attention and MLP, so the mean of the two is what must match.
    overall = (s["attention"] + s["mlp"]) / 2
    assert abs(overall - SHIPPED[name]) <= 0.05, s
    assert len(s["per_layer"]) == 30
