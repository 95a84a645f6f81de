"""The registered lm-eval model `skipgpt` (skipgpt/lm_eval_model.py) on a tiny random Llama.

Loglikelihood (right padding, no mask), rolling loglikelihood through the offline task, and
generate_until (left padding, with a mask) in the dense and sparse pipelines.
"""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'skipgpt[eval]')")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from skipgpt import tasks  # noqa: E402
from skipgpt.lm_eval_model import SkipGPTLM  # noqa: E402


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=tasks.task_dir(), include_defaults=False)


def _lm(path, **kwargs):
    kwargs.setdefault("dtype", "float32")  # fp32: the comparisons below are exact up to rounding
    kwargs.setdefault("device", "cpu")
    return SkipGPTLM(str(path), **kwargs)


def _wiki(lm, task_manager, **kwargs):
    out = simple_evaluate(model=lm, tasks=["skipgpt_wiki_tiny"], task_manager=task_manager, bootstrap_iters=0, **kwargs)
    return out["results"]["skipgpt_wiki_tiny"]


def test_registered_next_to_lm_evals_own_models():
    assert get_model("skipgpt") is SkipGPTLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours must not hide lm-eval's


def test_dense_matches_hf_and_sparse_pipelines_agree(wiki_cache, tiny_llama, task_manager):
    hf = simple_evaluate(model="hf", model_args=f"pretrained={tiny_llama},dtype=float32", tasks=["skipgpt_wiki_tiny"],
                         task_manager=task_manager, device="cpu", batch_size=2, bootstrap_iters=0)
    hf_ppl = hf["results"]["skipgpt_wiki_tiny"]["word_perplexity,none"]

    dense = _lm(tiny_llama, pipeline="dense", batch_size=2)
    res = _wiki(dense, task_manager)
    assert res["word_perplexity,none"] == pytest.approx(hf_ppl, rel=1e-4)
    s = dense.sparsity()
    assert s["attention"] == s["mlp"] == 0.0 and s["tokens"] > 100

    ppl = {}
    for pipeline in ("torch-sparse", "triton-sparse"):
        lm = _lm(tiny_llama, pipeline=pipeline, skip=0.25, batch_size=2)
        res = _wiki(lm, task_manager)
        ppl[pipeline] = res["word_perplexity,none"]
        assert math.isfinite(ppl[pipeline]) and ppl[pipeline] != pytest.approx(hf_ppl, rel=1e-3)
        s = lm.sparsity()
        assert 0.15 < s["attention"] < 0.35 and 0.15 < s["mlp"] < 0.35, s
        assert len(s["per_layer"]) == 2
        info = lm.get_model_info()["skipgpt"]
        assert info["pipeline"] == pipeline and info["forced_skip"] == 0.25
    assert ppl["triton-sparse"] == pytest.approx(ppl["torch-sparse"], rel=5e-3)


def test_compiled_model_gives_the_eager_perplexity(wiki_cache, tiny_llama, task_manager):
    """compile=True (what `skipgpt eval --compile` passes) runs lm-eval's varying batch shapes
    through one compiled forward and computes the same function."""
    ppl, run = {}, {}
    for compile in (False, True):
        lm = _lm(tiny_llama, pipeline="triton-sparse", skip=0.25, batch_size=2, compile=compile)
        ppl[compile] = _wiki(lm, task_manager, limit=3)["word_perplexity,none"]
        assert getattr(lm.skipgpt_model, "_skipgpt_compiled", False) is compile
        run[compile] = lm.accounting()
    assert ppl[True] == pytest.approx(ppl[False], rel=1e-4)
    # The warm-up call that compiles is timed apart and its tokens are not counted.
    assert run[False]["compile_seconds"] == 0 < run[True]["compile_seconds"]
    assert run[True]["tokens"] == run[False]["tokens"]
    assert run[True]["sparsity"] == run[False]["sparsity"]


def test_model_args_string_as_the_cli_passes_it(tiny_llama):
    lm = get_model("skipgpt").create_from_arg_string(
        f"pretrained={tiny_llama},pipeline=triton-sparse,skip=0.25,seed=3,dtype=float32",
        {"batch_size": 2, "device": "cuda:0" if not _has_cuda() else "cpu"},  # lm-eval's CLI default
    )
    assert str(lm.device) == "cpu" and lm.batch_size == 2
    assert lm.skipgpt_config["forced_skip"] == 0.25 and lm.skipgpt_config["seed"] == 3
    with pytest.raises(ValueError, match="routes tokens"):
        _lm(tiny_llama, pipeline="triton-sparse")  # no router, no forced routes


def _has_cuda():
    import torch

    return torch.cuda.is_available()


def test_batched_loglikelihood_right_padding_matches_one_by_one(tiny_llama):
    # lm-eval right-pads the batch and passes no attention mask: the padding must not change
    # any real token's score.
    pairs = [("The history of", " the city"), ("A", " long river flows through it"), ("Water is", " wet")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    one = _lm(tiny_llama, pipeline="dense", batch_size=1).loglikelihood(requests)
    batched = _lm(tiny_llama, pipeline="dense", batch_size=3).loglikelihood(requests)
    for (a, _), (b, _) in zip(one, batched):
        assert b == pytest.approx(a, abs=1e-4)


def _gen_requests():
    # Contexts of different lengths, so a batch is left-padded.
    contexts = ["Article 1 is about", "The river and the mountain of the old city are", "In"]
    args = {"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False}
    return [Instance("generate_until", {}, (c, dict(args)), i) for i, c in enumerate(contexts)]


def test_generate_until_left_padding(tiny_llama):
    requests = _gen_requests()
    dense_one = _lm(tiny_llama, pipeline="dense", batch_size=1).generate_until(requests)
    dense_batched = _lm(tiny_llama, pipeline="dense", batch_size=3).generate_until(requests)
    assert dense_batched == dense_one
    assert all(isinstance(text, str) and "." not in text for text in dense_one)

    # Forced routes depend on a token's row and cache slot, so sparse runs compare with the
    # same batching. Padding is masked: it never executes and is not counted.
    outputs = {}
    for pipeline in ("torch-sparse", "triton-sparse"):
        lm = _lm(tiny_llama, pipeline=pipeline, skip=0.25, batch_size=3)
        outputs[pipeline] = lm.generate_until(requests)
        assert 0.1 < lm.sparsity()["attention"] < 0.4
    assert outputs["triton-sparse"] == outputs["torch-sparse"]


GEN_TASK = """\
task: tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_generate_task_through_simple_evaluate(tmp_path, tiny_llama):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in [{"prompt": "The river", "answer": " flows"},
                                                           {"prompt": "Article 2 of the city is", "answer": " old"}]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_generate.yaml").write_text(GEN_TASK.format(data=data))
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    lm = _lm(tiny_llama, pipeline="triton-sparse", skip=0.25, batch_size=2)
    out = simple_evaluate(model=lm, tasks=["tiny_generate"], task_manager=manager, bootstrap_iters=0, log_samples=True)
    assert out["results"]["tiny_generate"]["exact_match,none"] in (0.0, 0.5, 1.0)
    responses = [s["filtered_resps"][0] for s in out["samples"]["tiny_generate"]]
    assert len(responses) == 2 and all(isinstance(r, str) and "." not in r for r in responses)
    assert lm.sparsity()["tokens"] > 0


def test_wrap_a_model_object(tiny_llama, wiki_cache, task_manager):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lm = SkipGPTLM(model, tokenizer=str(tiny_llama), skip=0.5, batch_size=2)  # wrapped here, triton-sparse
    assert lm.skipgpt_config["pipeline"] == "triton-sparse"
    assert math.isfinite(_wiki(lm, task_manager, limit=2)["word_perplexity,none"])
    assert 0.35 < lm.sparsity()["mlp"] < 0.65


def test_python_m_skipgpt_lm_eval(wiki_cache, tiny_llama, monkeypatch, capsys):
    from skipgpt import lm_eval as runner

    argv = ["--model", "skipgpt", "--model_args", f"pretrained={tiny_llama},skip=0.25,dtype=float32",
            "--tasks", "skipgpt_wiki_tiny", "--limit", "2", "--device", "cpu", "--batch_size", "2"]
    assert runner.lm_eval_argv(argv)[-2:] == ["--include_path", tasks.task_dir()]
    assert runner.lm_eval_argv(argv + ["--include_path", "x"]) == argv + ["--include_path", "x"]
    assert runner.lm_eval_argv(["--help"]) == ["--help"]
    monkeypatch.setattr("sys.argv", ["python"])  # main() rewrites it for lm-eval's parser
    runner.main(argv)
    out = capsys.readouterr().out
    assert "skipgpt_wiki_tiny" in out and "word_perplexity" in out
