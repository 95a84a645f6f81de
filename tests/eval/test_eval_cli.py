"""`skipgpt eval` and the `python -m skipgpt` migration entry point, on a tiny random Llama."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'skipgpt[eval]')")

import skipgpt.lm_eval_model  # noqa: E402
from skipgpt import __main__ as migration  # noqa: E402
from skipgpt import assets  # noqa: E402
from skipgpt.cli import main  # noqa: E402
from skipgpt.commands import eval as eval_cmd  # noqa: E402

from .test_assets import needs_model  # noqa: E402

SUMMARY_KEYS = {"metrics", "timings", "tokens", "tokens_per_second", "tokens_counted", "sparsity", "setup",
                "versions", "device_name", "command", "argv", "model_dtype"}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model starts loading: errors must come before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(skipgpt.lm_eval_model.SkipGPTLM, "__init__", refuse)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--router", "--lora", "--pipeline", "--skip", "--compile", "--tasks", "--batch-size",
                 "--limit", "--device", "--dtype", "--output", "--include-path", "skipgpt setup",
                 "--data-parallel", "--device-map", "accelerate launch"):
        assert flag in out, flag


def test_eval_end_to_end(wiki_cache, tiny_llama, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code = main(["eval", "--model", str(tiny_llama), "--skip", "0.25", "--tasks", "skipgpt_wiki_tiny", "--limit", "2",
                 "--batch-size", "2", "--device", "cpu", "--dtype", "fp32", "--output", str(out_dir)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "|skipgpt_wiki_tiny|" in printed and "word_perplexity" in printed  # lm-eval's table
    assert "tokens/s" in printed and "wall time" in printed and "attention" in printed

    results = json.loads((out_dir / "results.json").read_text())
    assert "word_perplexity,none" in results["results"]["skipgpt_wiki_tiny"]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["setup"]["pipeline"] == "triton-sparse" and summary["setup"]["skip"] == 0.25
    assert summary["metrics"] == results["results"]
    assert summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    assert summary["timings"]["eval_seconds"] > 0 and summary["timings"]["load_seconds"] > 0
    assert len(summary["sparsity"]["per_layer"]) == 2 and 0.1 < summary["sparsity"]["mlp"] < 0.4
    assert {"torch", "transformers", "lm_eval", "skipgpt"} <= set(summary["versions"])
    assert summary["command"].startswith("skipgpt eval --model ")
    assert (out_dir / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fails(argv, capsys, match):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert "skipgpt eval: error:" in err and match in err, err


def test_fail_fast(tiny_llama, tmp_path, monkeypatch, capsys, no_model_load):
    model = ["--model", str(tiny_llama), "--output", str(tmp_path / "o")]
    _fails(["--model", str(tmp_path / "nope")], capsys, "model folder not found")
    _fails([*model, "--router", str(tmp_path / "r.pth")], capsys, "--router: file not found")
    _fails([*model, "--lora", str(tmp_path / "l.pth")], capsys, "--lora: file not found")
    _fails([*model, "--pipeline", "triton-sparse"], capsys, "no router decides routes")
    _fails([*model, "--batch-size", "0"], capsys, "--batch-size")
    _fails([*model, "--limit", "0"], capsys, "--limit")
    _fails([*model, "--limit", "2.5"], capsys, "--limit")
    _fails([*model, "--skip", "1.5"], capsys, "--skip")
    _fails([*model, "--device", "tpu"], capsys, "--device")
    _fails([*model, "--include-path", str(tmp_path / "none")], capsys, "--include-path")
    import torch

    if not torch.cuda.is_available():
        _fails([*model, "--device", "cuda"], capsys, "CUDA is not available")
    with pytest.raises(SystemExit):  # argparse rejects unknown pipelines itself
        main(["eval", *model, "--pipeline", "sparse"])
    assert "invalid choice" in capsys.readouterr().err
    # No --model and no `skipgpt setup`: the message says what to run.
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path / "empty"))
    _fails([], capsys, "skipgpt setup")


def test_unknown_task_is_refused_before_loading(tiny_llama, tmp_path, capsys, no_model_load):
    # Indexes lm-eval's own task list (~10 s) to be sure the name is nowhere.
    _fails(["--model", str(tiny_llama), "--tasks", "skipgpt_wiki_tiny,wikitext_nonexistent", "--output", str(tmp_path)],
           capsys, "unknown task 'wikitext_nonexistent'")


def test_task_without_corpus_and_unreachable_hub(tiny_llama, tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path / "empty"))
    _fails(["--model", str(tiny_llama), "--tasks", "skipgpt_wiki_tiny"], capsys, "skipgpt setup --data")

    class OfflineManager:  # what datasets raises for a Hub dataset without network
        def load(self, names):
            raise ConnectionError("Couldn't reach 'EleutherAI/wikitext_document_level' on the Hub (LocalEntryNotFoundError)")

    with pytest.raises(eval_cmd.EvalError, match="use the offline task instead: --tasks skipgpt_wiki"):
        eval_cmd.build_tasks(OfflineManager(), ["wikitext"])


def test_defaults_without_model(monkeypatch, tmp_path):
    # The embedded default: SmolLM2 from the cache with the shipped 25% routers, triton-sparse,
    # the tiny task on CPU; dense when the package carries no router file.
    folder = tmp_path / assets.MODEL_DIRNAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assets._write_marker(folder, assets.SMOLLM2_GGUF_SHA256, "test")
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path))
    p = eval_cmd.plan(eval_cmd_args([]))
    assert p.model == str(folder) and p.router.endswith("smollm2-135m-skip25.safetensors")
    assert p.pipeline == "triton-sparse"
    assert p.tasks == ["skipgpt_wiki_tiny"] and p.device == "cpu" and p.output == "skipgpt-eval-out"
    monkeypatch.setattr(eval_cmd, "_shipped_router", lambda: None)
    p = eval_cmd.plan(eval_cmd_args([]))
    assert p.router is None and p.pipeline == "dense"
    # Another shipped file is picked up as it is.
    router = tmp_path / "router.safetensors"
    router.write_bytes(b"x")
    monkeypatch.setattr(eval_cmd, "_shipped_router", lambda: str(router))
    p = eval_cmd.plan(eval_cmd_args([]))
    assert p.router == str(router) and p.pipeline == "triton-sparse"


def eval_cmd_args(argv):
    import argparse

    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- python -m skipgpt


def test_translate_published_flags():
    assert not migration.is_legacy(["eval", "--model", "m", "--tasks", "wikitext"])
    assert migration.is_legacy(["--model_path", "m", "--task", "wikitext"])
    assert migration.is_legacy(["--task=wikitext"])

    base = ["--model_path", "M", "--router_path", "R", "--lora_path", "L", "--save_path", "S", "--task", "wikitext",
            "--batch_size", "4"]
    target, argv, _ = migration.translate([*base, "--forward_impl", "triton", "--sparse"])
    assert target == "skipgpt"
    assert argv == ["eval", "--model", "M", "--router", "R", "--lora", "L", "--pipeline", "triton-sparse",
                    "--tasks", "wikitext", "--batch-size", "4", "--output", "S"]
    assert migration.translate([*base, "--forward_impl", "torch", "--sparse"])[1][8] == "torch-sparse"
    assert migration.translate([*base, "--forward_impl", "triton"])[1][8] == "dense"  # no --sparse: dense
    # New flags pass through; --sparsity has no meaning for evaluation and is reported.
    _, argv, notes = migration.translate([*base, "--sparsity", "0.25", "--limit", "2"])
    assert argv[-2:] == ["--limit", "2"] and any("--sparsity" in n for n in notes)

    target, argv, notes = migration.translate(["--model_path", "M", "--save_path", "S", "--task", "inference_throughput",
                                               "--batch_size", "1", "4", "--sparsity", "0.25", "--inference_mode", "decode"])
    assert target == "benchmark"
    assert argv == ["--mode", "decode", "--batch-sizes", "1,4", "--skips", "0.25", "--json", "S/inference_throughput.json"]
    assert any("--model_path" in n for n in notes)


def test_python_m_skipgpt_runs_the_translation(wiki_cache, tiny_llama, tmp_path, capsys):
    out_dir = tmp_path / "saved"
    code = migration.main(["--model_path", str(tiny_llama), "--save_path", str(out_dir), "--forward_impl", "torch",
                           "--task", "skipgpt_wiki_tiny", "--batch_size", "2", "--limit", "1", "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert f"skipgpt eval --model {tiny_llama} --pipeline dense --tasks skipgpt_wiki_tiny" in captured.err
    assert "|skipgpt_wiki_tiny|" in captured.out
    assert json.loads((out_dir / "summary.json").read_text())["setup"]["pipeline"] == "dense"


def test_python_m_skipgpt_without_published_flags_is_the_cli(capsys):
    with pytest.raises(SystemExit):
        migration.main(["eval", "--help"])
    assert "--pipeline" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the real default


@needs_model
def test_default_run_on_smollm2(tmp_path, capsys):
    # The README's main command, cut to one article: the shipped 25% routers on real weights.
    assert main(["eval", "--limit", "1", "--device", "cpu", "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["setup"]["tasks"] == ["skipgpt_wiki_tiny"]
    assert summary["setup"]["pipeline"] == "triton-sparse"
    assert summary["setup"]["router"].endswith("smollm2-135m-skip25.safetensors")
    # Routed SmolLM2 scores word perplexity in the low thousands on this text (docs/RESULTS.md:
    # 2373 on the whole test split, dense 107); random weights would be in the millions.
    assert 100 < summary["metrics"]["skipgpt_wiki_tiny"]["word_perplexity,none"] < 20000
    sparsity = summary["sparsity"]
    assert len(sparsity["per_layer"]) == 30 and 0.15 < (sparsity["attention"] + sparsity["mlp"]) / 2 < 0.35
