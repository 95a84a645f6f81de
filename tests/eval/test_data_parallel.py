"""`skipgpt eval --data-parallel N` and `--device-map`, and SkipGPTLM's accounting over ranks, on
the CPU without launching processes: the launcher command is checked by accelerate's and
lm-eval's own argument parsers, the rest of the data-parallel path runs with that command's
lm-eval part in this process. tests/eval/test_gpu_data_parallel.py runs the real launch."""
from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'skipgpt[eval]')")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")

import torch  # noqa: E402
from accelerate.commands.launch import launch_command_parser  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import skipgpt.lm_eval_model  # noqa: E402
from skipgpt import lm_eval as skipgpt_lm_eval  # noqa: E402
from skipgpt.cli import main  # noqa: E402
from skipgpt.commands import eval as eval_cmd  # noqa: E402
from skipgpt.lm_eval_model import SkipGPTLM  # noqa: E402

from .test_eval_cli import _fails, eval_cmd_args, no_model_load  # noqa: E402,F401


def _plan(tiny_llama, tmp_path, *argv):
    return eval_cmd.plan(eval_cmd_args(["--model", str(tiny_llama), "--output", str(tmp_path / "out"), *argv]))


def _parse_lm_eval(argv, monkeypatch):
    """lm-eval's own CLI parser over what `python -m skipgpt.lm_eval` would hand it."""
    from lm_eval._cli.harness import HarnessCLI

    monkeypatch.setattr(sys, "argv", ["lm-eval", *skipgpt_lm_eval.lm_eval_argv(list(argv))])
    return HarnessCLI().parse_args()


def test_launch_command_for_gpus(tiny_llama, tmp_path, monkeypatch):
    router = tmp_path / "router.safetensors"
    router.write_bytes(b"x")
    include = tmp_path / "my-tasks"
    include.mkdir()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    p = _plan(tiny_llama, tmp_path, "--router", str(router), "--skip", "0.25", "--seed", "3", "--compile",
              "--tasks", "wikitext,hellaswag", "--batch-size", "8", "--limit", "0.5", "--dtype", "bf16",
              "--include-path", str(include), "--data-parallel", "2")
    assert p.data_parallel == 2 and p.device == "cuda" and not p.cpu_processes
    argv, env = eval_cmd.launch_argv(p, "/scratch/results.json", port=29611, python="/venv/bin/python")
    assert env == {}
    assert argv[:3] == ["/venv/bin/python", "-m", "accelerate.commands.launch"]

    # accelerate's own parser reads the launcher part as intended.
    launch = launch_command_parser().parse_args(argv[3:])
    assert launch.multi_gpu and launch.num_processes == 2 and launch.num_machines == 1
    assert launch.mixed_precision == "no" and launch.dynamo_backend == "no" and launch.main_process_port == 29611
    assert launch.module and launch.training_script == "skipgpt.lm_eval" and not launch.cpu

    # ... and lm-eval's parser the evaluation part.
    args = _parse_lm_eval(launch.training_script_args, monkeypatch)
    assert args.model == "skipgpt"
    assert args.model_args == {
        "pretrained": os.path.abspath(tiny_llama), "pipeline": "triton-sparse", "dtype": "bf16",
        "router": os.path.abspath(router), "skip": 0.25, "seed": 3, "compile": True,
    }
    assert args.tasks == ["wikitext", "hellaswag"] and args.batch_size == "8" and args.limit == 0.5
    assert args.device == "cuda" and args.output_path == "/scratch/results.json"
    assert args.include_path == str(include)  # the user's folder; skipgpt's is not added then
    assert eval_cmd.launch_display(argv, env).startswith(
        "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 ")


def test_launch_command_cpu_test_mode(tiny_llama, tmp_path, monkeypatch):
    p = _plan(tiny_llama, tmp_path, "--device", "cpu", "--data-parallel", "3", "--tasks", "skipgpt_wiki_tiny",
              "--lora", str(tiny_llama / "config.json"), "--lora-alpha", "16", "--lora-r", "8")
    assert p.cpu_processes and any("test mode" in note for note in p.notes)
    argv, env = eval_cmd.launch_argv(p, "/s/results.json", port=1234)
    # The same launcher, told by accelerate's environment variable to start CPU processes.
    assert env == {"ACCELERATE_USE_CPU": "true"}
    launch = launch_command_parser().parse_args(argv[3:])
    assert launch.num_processes == 3 and launch.num_cpu_threads_per_process == max(1, os.cpu_count() // 3)
    args = _parse_lm_eval(launch.training_script_args, monkeypatch)
    assert args.device == "cpu" and args.model_args["pipeline"] == "dense"
    assert args.model_args["lora"] == os.path.abspath(tiny_llama / "config.json")
    assert args.model_args["lora_alpha"] == 16 and args.model_args["lora_r"] == 8
    assert args.include_path == skipgpt.tasks.task_dir()  # skipgpt's tasks come along
    assert eval_cmd.launch_display(argv, env).startswith("ACCELERATE_USE_CPU=true accelerate launch --multi_gpu")
    with pytest.raises(ValueError, match=">= 2"):
        eval_cmd.launch_argv(_plan(tiny_llama, tmp_path, "--device", "cpu"), "/s/r.json", port=1)


def test_paths_with_commas_cannot_go_into_model_args(tmp_path, tiny_llama):
    folder = tmp_path / "a,b"
    folder.symlink_to(tiny_llama)
    p = _plan(folder, tmp_path, "--device", "cpu", "--data-parallel", "2")
    with pytest.raises(eval_cmd.EvalError, match="cannot hold a comma"):
        eval_cmd.launch_argv(p, "/s/r.json", port=1)


def test_data_parallel_and_device_map_checks(tiny_llama, tmp_path, monkeypatch, capsys, no_model_load):  # noqa: F811
    model = ["--model", str(tiny_llama), "--output", str(tmp_path / "o")]
    _fails([*model, "--data-parallel", "0"], capsys, "--data-parallel: expected a number of GPUs >= 1")
    _fails([*model, "--data-parallel", "2", "--device-map", "auto"], capsys, "choose one")
    _fails([*model, "--device-map", "auto", "--device", "cpu"], capsys, "drop --device")
    _fails([*model, "--device-map", "everywhere"], capsys, "--device-map: expected auto")
    _fails([*model, "--device-map", "{model.layers.0: 1}"], capsys, "--device-map: not valid JSON")
    _fails([*model, "--device-map", '{"model.layers.0": [1]}'], capsys, "bad entries")
    _fails([*model, "--data-parallel", "2", "--device", "cuda:1"], capsys, "CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        # No GPU: refused with the way out (the explicit CPU test mode) named.
        _fails([*model, "--data-parallel", "2"], capsys, "--device cpu --data-parallel 2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    _fails([*model, "--data-parallel", "2"], capsys, "only 1 CUDA device(s) visible (CUDA_VISIBLE_DEVICES=3)")
    # A JSON map is parsed to the dict transformers takes, and the plan's command spells it back.
    p = _plan(tiny_llama, tmp_path, "--device-map", '{"model.embed_tokens": 0, "model.layers.0": "cuda:1"}')
    assert p.device_map == {"model.embed_tokens": 0, "model.layers.0": "cuda:1"} and p.device == "cuda"
    assert "--device-map '{\"model.embed_tokens\":0,\"model.layers.0\":\"cuda:1\"}'" in p.command()


def test_include_path_cannot_bring_skipgpt_tasks_to_a_launch(tiny_llama, tmp_path, capsys, no_model_load):  # noqa: F811
    mine = tmp_path / "mine"
    mine.mkdir()
    _fails(["--model", str(tiny_llama), "--device", "cpu", "--data-parallel", "2", "--include-path", str(mine),
            "--tasks", "skipgpt_wiki_tiny", "--output", str(tmp_path / "o")], capsys, "copy their YAML files")


def test_data_parallel_run_reads_back_what_the_launched_command_writes(wiki_cache, tiny_llama, tmp_path, monkeypatch,
                                                                      capsys):
    """The whole --data-parallel path but the process launch: the launcher's `-m skipgpt.lm_eval
    ARGS` part runs here (one rank), writes lm-eval's results file, and the report and outputs
    come from it; metrics equal those of the one-process run."""
    launched = []

    def run_in_process(argv, env):
        launched.append((argv, env))
        module = argv.index("skipgpt.lm_eval")
        monkeypatch.setattr(sys, "argv", list(sys.argv))  # lm-eval's CLI replaces it
        skipgpt_lm_eval.main(argv[module + 1:])
        return 0

    monkeypatch.setattr(eval_cmd, "_run_launcher", run_in_process)
    common = ["--model", str(tiny_llama), "--skip", "0.25", "--tasks", "skipgpt_wiki_tiny", "--limit", "3",
              "--batch-size", "1", "--device", "cpu", "--dtype", "fp32"]
    assert main(["eval", *common, "--data-parallel", "2", "--output", str(tmp_path / "dp")]) == 0
    printed = capsys.readouterr().out
    assert launched and launched[0][1]["ACCELERATE_USE_CPU"] == "true"
    assert "|skipgpt_wiki_tiny|" in printed and "data parallel: 2 processes" in printed and "tokens/s" in printed
    dp = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert json.loads((tmp_path / "dp" / "results.json").read_text())["results"] == dp["metrics"]
    assert dp["data_parallel"]["processes"] == 2 and dp["data_parallel"]["summed_over"] == "one process"
    assert dp["data_parallel"]["launch_command"].startswith("ACCELERATE_USE_CPU=true accelerate launch")
    assert dp["tokens"] > 0 and dp["tokens"] == dp["sparsity"]["tokens"] and 0.1 < dp["sparsity"]["mlp"] < 0.4
    assert dp["timings"]["eval_seconds"] == dp["timings"]["requests_seconds"] > 0
    assert (tmp_path / "dp" / "sparsity.png").exists()

    assert main(["eval", *common, "--output", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one["metrics"] == dp["metrics"] and one["sparsity"] == dp["sparsity"]
    assert 0 < one["timings"]["requests_seconds"] <= one["timings"]["eval_seconds"]


class _TwoRanks:
    """Stands in for accelerate's Accelerator on rank 0 of 2: gather appends rank 1's row."""

    def __init__(self, other_row: torch.Tensor):
        self.other_row = other_row
        self.waited = 0

    def wait_for_everyone(self):
        self.waited += 1

    def gather(self, row):
        return torch.cat([row, self.other_row.to(row)])

    def unwrap_model(self, model):
        return model


def test_accounting_sums_route_counts_over_ranks(tiny_llama):
    lm = SkipGPTLM(str(tiny_llama), pipeline="triton-sparse", skip=0.25, dtype="float32", device="cpu", batch_size=2)
    requests = [Instance("loglikelihood", {}, (c, " and the river"), i) for i, c in enumerate(["The city", "A king"])]
    lm.loglikelihood(requests)
    one = lm.accounting()
    assert one["ranks"] == 1 and one["scope"] == "one process" and one["requests_seconds"] > 0
    assert one["sparsity"] == lm.sparsity() and one["tokens"] == lm.sparsity()["tokens"] > 0

    # Rank 1 ran 1000 tokens through both layers, executing 600 in attention and 900 in the MLP.
    # Then its times: load 1.5 s, compile 7 s, requests 99 s.
    other = torch.tensor([600, 900, 1000] * 2 + [1.5, 7.0, 99.0], dtype=torch.float64)
    lm.accelerator, lm._world_size, lm._rank = _TwoRanks(other), 2, 0
    lm.barrier()  # what lm-eval's evaluator calls on every rank after each request type
    assert lm.accelerator.waited == 1
    both = lm.accounting()
    assert both["scope"] == "all 2 ranks" and both["ranks"] == 2
    assert both["tokens"] == one["tokens"] + 1000
    assert [r["rank"] for r in both["per_rank"]] == [0, 1] and both["per_rank"][1]["tokens"] == 1000
    assert both["requests_seconds"] == 99.0 and both["load_seconds"] == max(1.5, one["load_seconds"])
    assert both["compile_seconds"] == 7.0 and [r["compile_seconds"] for r in both["per_rank"]] == [0.0, 7.0]
    counts = skipgpt.model.route_counts(lm.skipgpt_model).tolist()
    executed_attn = sum(c[0] for c in counts) + 1200
    tokens_all = sum(c[2] for c in counts) + 2000
    assert both["sparsity"]["attention"] == pytest.approx(1 - executed_attn / tokens_all)
    assert lm.get_model_info()["skipgpt_run"] == both

    # Requests after the last gather: the other ranks' share is unknown, and the scope says so.
    lm.loglikelihood(requests[:1])
    assert lm.accounting()["scope"] == "rank 0 of 2 only"


def test_launcher_failure_and_one_process(wiki_cache, tiny_llama, tmp_path, monkeypatch, capsys):
    common = ["--model", str(tiny_llama), "--tasks", "skipgpt_wiki_tiny", "--limit", "1", "--device", "cpu"]
    monkeypatch.setattr(eval_cmd, "_run_launcher", lambda argv, env: 1)
    _fails([*common, "--data-parallel", "2", "--output", str(tmp_path / "a")], capsys, "failed (exit status 1)")
    monkeypatch.setattr(eval_cmd, "_run_launcher", lambda argv, env: 0)  # ran, but wrote nothing
    _fails([*common, "--data-parallel", "2", "--output", str(tmp_path / "b")], capsys, "wrote no results file")

    def refuse(argv, env):
        raise AssertionError("--data-parallel 1 must run in this process")

    monkeypatch.setattr(eval_cmd, "_run_launcher", refuse)
    assert main(["eval", *common, "--data-parallel", "1", "--output", str(tmp_path / "c")]) == 0
    assert "data_parallel" not in json.loads((tmp_path / "c" / "summary.json").read_text())


def test_eval_with_a_device_map(wiki_cache, tiny_llama, tmp_path):
    # On the CPU a device map can only name the CPU; what is checked is the path from the flag
    # through SkipGPTLM to skipgpt.load(device_map=...), and that metrics do not change.
    common = ["--model", str(tiny_llama), "--skip", "0.25", "--tasks", "skipgpt_wiki_tiny", "--limit", "2",
              "--batch-size", "2", "--dtype", "fp32"]
    placement = '{"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", ' \
                '"model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}'
    assert main(["eval", *common, "--device-map", placement, "--output", str(tmp_path / "map")]) == 0
    assert main(["eval", *common, "--device", "cpu", "--output", str(tmp_path / "one")]) == 0
    mapped, one = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("map", "one"))
    assert mapped["metrics"] == one["metrics"] and mapped["sparsity"] == one["sparsity"]
    assert mapped["setup"]["device_map"]["model.layers.1"] == "cpu" and mapped["devices"] == ["cpu"]
    results = json.loads((tmp_path / "map" / "results.json").read_text())
    assert results["config"]["skipgpt"]["device_map"]["lm_head"] == "cpu"


def test_parallelize_is_device_map_auto(tiny_llama):
    lm = SkipGPTLM(str(tiny_llama), dtype="float32", parallelize=True, batch_size=1)
    assert lm.skipgpt_config["device_map"] == "auto"
    with pytest.raises(ValueError, match="loaded already"):
        SkipGPTLM(lm.skipgpt_model, device_map="auto")


def test_refused_under_a_foreign_launcher(tiny_llama, tmp_path, monkeypatch, capsys, no_model_load):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", "2")
    _fails(["--model", str(tiny_llama), "--output", str(tmp_path)], capsys, "pass --data-parallel N")
