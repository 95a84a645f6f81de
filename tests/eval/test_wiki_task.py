"""The offline lm-eval tasks `skipgpt_wiki` / `skipgpt_wiki_tiny`, on a synthetic corpus."""
from __future__ import annotations

import math
import re

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'skipgpt[eval]')")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from skipgpt import assets, tasks  # noqa: E402


@pytest.fixture(scope="module")
def task_manager():
    # Without lm-eval's own thousands of tasks, indexing takes milliseconds instead of ~10 s.
    return TaskManager(include_path=tasks.task_dir(), include_defaults=False)


def test_tasks_are_found_through_the_include_path(task_manager):
    assert set(tasks.TASKS) <= set(task_manager.all_tasks)


def test_tasks_load_the_test_split(wiki_cache, task_manager):
    loaded = task_manager.load(list(tasks.TASKS))["tasks"]
    full, tiny = loaded["skipgpt_wiki"], loaded["skipgpt_wiki_tiny"]
    expected = assets.read_wiki_split("test")
    assert full.OUTPUT_TYPE == "loglikelihood_rolling"
    assert [d["page"] for d in full.test_docs()] == [d["page"] for d in expected]
    assert full.has_training_docs() and not tiny.has_training_docs()
    tiny_docs = list(tiny.test_docs())
    assert len(tiny_docs) == min(5, len(expected))
    for doc, ref in zip(tiny_docs, expected):
        assert len(doc["page"]) <= 2000 and ref["page"].startswith(doc["page"])
    assert full.doc_to_target(expected[0]) == expected[0]["page"]


def test_task_without_corpus_names_the_setup_command(tmp_path, monkeypatch, task_manager):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path))
    with pytest.raises(Exception, match="skipgpt setup --data"):
        task_manager.load(["skipgpt_wiki_tiny"])


def test_simple_evaluate_tiny_task_on_tiny_llama(wiki_cache, tiny_llama, task_manager):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_llama},dtype=float32",
        tasks=["skipgpt_wiki_tiny"],
        task_manager=task_manager,
        batch_size=2,
        device="cpu",
    )
    res = out["results"]["skipgpt_wiki_tiny"]
    assert math.isfinite(res["word_perplexity,none"]) and res["word_perplexity,none"] > 1
    assert math.isfinite(res["bits_per_byte,none"]) and res["bits_per_byte,none"] > 0

    # The same number by hand: each article fits one window, scored after the BOS token,
    # and lm-eval's weighted perplexity is exp(-sum of log-likelihoods / sum of words).
    docs = list(task_manager.load(["skipgpt_wiki_tiny"])["tasks"]["skipgpt_wiki_tiny"].test_docs())
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    total_ll, total_words = 0.0, 0
    for doc in docs:
        ids = torch.tensor([[tok.bos_token_id] + tok(doc["page"], add_special_tokens=False).input_ids])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        total_ll += logp.gather(-1, ids[0, 1:, None]).sum().item()
        total_words += len(re.split(r"\s+", doc["page"]))
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_words), rel=1e-3)
