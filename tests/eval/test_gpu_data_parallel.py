"""Data parallel and device-map evaluation on two GPUs, through the real commands: `skipgpt eval
--data-parallel 2` (which runs `accelerate launch --multi_gpu --num_processes 2 -m
skipgpt.lm_eval ...`) gives the perplexity of a one-GPU `skipgpt eval`, and so does `skipgpt eval
--device-map auto`. SmolLM2-135M on skipgpt_wiki_tiny in float32 at batch size 1: every rolling
window is then computed alone, with the same kernels, whichever rank gets it, and forced routes
(which depend on a token's row in its batch) are the same too."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'skipgpt[eval]')")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")

from skipgpt.cli import main  # noqa: E402

from .test_assets import needs_model  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    needs_model,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

TASK = "skipgpt_wiki_tiny"
COMMON = ["--tasks", TASK, "--batch-size", "1", "--dtype", "fp32"]


def _summary(folder):
    return json.loads((folder / "summary.json").read_text())


def _metrics(summary):
    return {k: v for k, v in summary["metrics"][TASK].items() if k != "alias" and not k.endswith("_stderr,none")}


@pytest.mark.parametrize("routes", [["--pipeline", "dense"], ["--skip", "0.25", "--pipeline", "triton-sparse"]],
                         ids=["dense", "triton-sparse-forced"])
def test_data_parallel_matches_one_gpu(tmp_path, routes):
    assert main(["eval", *COMMON, *routes, "--device", "cuda", "--output", str(tmp_path / "one")]) == 0
    # The real command, in its own process, as a user runs it.
    run = subprocess.run([sys.executable, "-m", "skipgpt", "eval", *COMMON, *routes, "--data-parallel", "2",
                          "--output", str(tmp_path / "two")], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "accelerate launch --multi_gpu --num_processes 2" in run.stderr
    assert f"|{TASK}|" in run.stdout and "data parallel: 2 processes" in run.stdout

    one, two = _summary(tmp_path / "one"), _summary(tmp_path / "two")
    m1, m2 = _metrics(one), _metrics(two)
    assert m1.keys() == m2.keys() and m1
    for key in m1:
        assert m2[key] == pytest.approx(m1[key], rel=1e-6), key
    dp = two["data_parallel"]
    assert dp["processes"] == 2 and dp["summed_over"] == "all 2 ranks"
    assert [r["rank"] for r in dp["per_rank"]] == [0, 1] and all(r["tokens"] > 0 for r in dp["per_rank"])
    assert sum(r["tokens"] for r in dp["per_rank"]) == two["tokens"] >= one["tokens"]  # + lm-eval's repeats
    assert two["devices"] == ["cuda:0", "cuda:1"]
    if "--skip" in routes:
        for s in (one["sparsity"], two["sparsity"]):
            assert 0.2 < s["attention"] < 0.3 and 0.2 < s["mlp"] < 0.3, s
    else:
        assert two["sparsity"]["attention"] == two["sparsity"]["mlp"] == 0.0


def test_device_map_matches_one_gpu(tmp_path):
    args = [*COMMON, "--skip", "0.25", "--pipeline", "triton-sparse"]
    assert main(["eval", *args, "--device", "cuda", "--output", str(tmp_path / "one")]) == 0
    assert main(["eval", *args, "--device-map", "auto", "--output", str(tmp_path / "auto")]) == 0
    one, auto = _summary(tmp_path / "one"), _summary(tmp_path / "auto")
    assert len(auto["devices"]) >= 2, auto["devices"]
    m1, m2 = _metrics(one), _metrics(auto)
    for key in m1:
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    assert auto["sparsity"] == one["sparsity"]
