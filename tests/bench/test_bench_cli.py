"""`skipgpt bench` on CPU with the tiny geometry: outputs, speedups, per-point failures, flag
checking, the published-baseline hook's error path, and the FLOP count."""
import collections
import csv
import itertools
import json
import random
import time
import unittest

import pytest
import torch

from skipgpt import benchmark as B
from skipgpt import published_baseline
from skipgpt.cli import main

EAGER = "hf,dense,torch-sparse,triton-sparse"
QUICK = ["--warmup", "1", "--rep", "1"]  # a few calls per point: these tests check plumbing, not speed


def bench(tmp_path, *args):
    return main(["bench", *args, *QUICK, "--output", str(tmp_path)])


def read_outputs(tmp_path, stem):
    doc = json.loads((tmp_path / f"{stem}.json").read_text())
    with open(tmp_path / f"{stem}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return doc, rows


def check_files(tmp_path, stem, providers, batches, seqlens, skips):
    doc, rows = read_outputs(tmp_path, stem)
    keys = [(r["provider"], int(r["batch"]), int(r["seqlen"]), float(r["skip"])) for r in rows]
    expected = {(p, b, s, k) for p in providers for b in batches for s in seqlens for k in skips}
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected  # one row per (provider, point)
    assert len(doc["points"]) == len(rows)
    for key in ("device", "versions", "git", "command", "argv", "date", "dtype", "reference"):
        assert key in doc
    assert {"torch", "triton", "transformers"} <= set(doc["versions"])
    assert doc["command"].startswith("skipgpt bench ")
    for suffix in ("time", "tflops"):
        png = tmp_path / f"{stem}-{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return doc, rows


def check_speedups(points):
    """Every timed point's speedup is hf's time at the same point of the same run over its own."""
    hf = {(p["batch"], p["seqlen"], p["skip"]): p["ms"] for p in points if p["provider"] == "hf"}
    for p in points:
        if p["ms"] is not None:
            assert p["speedup"] == pytest.approx(hf[(p["batch"], p["seqlen"], p["skip"])] / p["ms"])
            assert p["ms_q20"] <= p["ms"] <= p["ms_q80"]
            assert p["tflops"] > 0


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_layer_scope(tmp_path, capsys, cpu_only, mode):
    assert bench(tmp_path, "--mode", mode, "--batch-size", "1,2", "--seqlens", "8,16", "--sparsity", "0,0.5",
                 "--providers", EAGER) == 0
    out, err = capsys.readouterr()
    assert "no CUDA device" in err and "tiny" in err
    assert "triton-sparse" in out and "vs hf" in out  # the table
    doc, _ = check_files(tmp_path, f"layer-{mode}", EAGER.split(","), [1, 2], [8, 16], [0.0, 0.5])
    assert all(p["status"] == "ok" for p in doc["points"])
    # hf and dense compute the dense function: compared at skip 0 only; the sparse ones always.
    for p in doc["points"]:
        checked = p["provider"] in ("torch-sparse", "triton-sparse") or p["skip"] == 0
        assert (p["rel_err"] is not None) == checked
        assert p["rel_err"] is None or p["rel_err"] < 1e-4
        # The realized skip rate, counted on the device: sparse providers only, and it follows
        # the requested rate (exactly 0 when nothing may skip).
        sparse = p["provider"] in ("torch-sparse", "triton-sparse")
        assert (p["realized_skip"] is not None) == sparse
        if sparse:
            assert p["realized_skip"] == 0.0 if p["skip"] == 0 else 0.2 < p["realized_skip"] < 0.8
    check_speedups(doc["points"])
    assert doc["decode_steps"] == (B.DECODE_STEPS if mode == "decode" else None)


def test_decode_steps(tmp_path, cpu_only, monkeypatch):
    """--decode-steps sets the steps each decode point runs: the cache a point reserves holds the
    context plus that many one-token steps, and the JSON and its command line record the count."""
    reserved = []
    reserve = B.SeqFirstLayer.reserve

    def spy(self, batch, new_tokens, *args, **kwargs):
        reserved.append(new_tokens)
        return reserve(self, batch, new_tokens, *args, **kwargs)

    monkeypatch.setattr(B.SeqFirstLayer, "reserve", spy)
    assert bench(tmp_path, "--mode", "decode", "--batch-size", "1", "--seqlens", "8", "--sparsity", "0.5",
                 "--providers", "triton-sparse", "--decode-steps", "5") == 0
    doc, _ = read_outputs(tmp_path, "layer-decode")
    assert doc["decode_steps"] == 5 and "--decode-steps 5" in doc["command"]
    assert 8 + 5 in reserved  # the benchmark's cache holds the context plus 5 steps


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_model_scope(tmp_path, cpu_only, mode):
    assert bench(tmp_path, "--scope", "model", "--layers", "2", "--mode", mode, "--batch-size", "2",
                 "--seqlens", "8", "--sparsity", "0,0.25", "--providers", EAGER) == 0
    doc, _ = check_files(tmp_path, f"model-{mode}", EAGER.split(","), [2], [8], [0.0, 0.25])
    assert doc["layers"] == 2 and "float32" in doc["reference"]
    assert all(p["status"] == "ok" and p["scope"] == "model" for p in doc["points"])
    assert all(p["rel_err"] < 1e-4 for p in doc["points"] if p["rel_err"] is not None)
    check_speedups(doc["points"])


@pytest.fixture
def tiny_model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=3, vocab_size=128, max_position_embeddings=256)
    torch.manual_seed(0)
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_model_flag(tmp_path, cpu_only, tiny_model_dir):
    # --scope model loads the folder (its first --layers layers); --scope layer takes its geometry.
    out = tmp_path / "out"
    assert bench(out, "--scope", "model", "--model", str(tiny_model_dir), "--layers", "2", "--mode", "decode",
                 "--batch-size", "1", "--seqlens", "8", "--sparsity", "0,0.25", "--providers", "hf,triton-sparse") == 0
    doc, _ = read_outputs(out, "model-decode")
    assert doc["model"] == str(tiny_model_dir) and doc["layers"] == 2
    assert all(p["status"] == "ok" for p in doc["points"])
    assert bench(out, "--model", str(tiny_model_dir), "--batch-size", "1", "--seqlens", "8", "--sparsity", "0.25",
                 "--providers", "hf,triton-sparse") == 0
    doc, _ = read_outputs(out, "layer-prefill")
    assert all(p["status"] == "ok" for p in doc["points"])
    assert main(["bench", "--scope", "model", "--model", str(tiny_model_dir), "--layers", "4"]) == 2


@pytest.mark.parametrize("cls,scope", [(B.LayerBench, "layer"), (B.ModelBench, "model")])
def test_wrong_provider_is_reported_and_not_timed(tmp_path, monkeypatch, cpu_only, cls, scope):
    step = cls.step

    def broken_step(self, provider, *args):
        fn = step(self, provider, *args)
        if provider == "triton-sparse":
            return lambda: fn() * 1.01  # a 1% error: far above float32 rounding
        return fn

    monkeypatch.setattr(cls, "step", broken_step)
    extra = ["--layers", "1"] if scope == "model" else []
    assert bench(tmp_path, "--scope", scope, *extra, "--batch-size", "1", "--seqlens", "8", "--sparsity", "0,0.25",
                 "--providers", EAGER) == 0
    doc, _ = read_outputs(tmp_path, f"{scope}-prefill")
    for p in doc["points"]:
        if p["provider"] == "triton-sparse":
            assert p["status"] == "wrong" and p["ms"] is None and p["speedup"] is None
            assert p["rel_err"] == pytest.approx(0.01, rel=1e-3)
        else:
            assert p["status"] == "ok" and p["ms"] is not None


@pytest.fixture
def pipelines_run(monkeypatch):
    """The pipelines of the routed layer calls made since the list was last cleared."""
    ran = []
    forward = B.RoutedDecoderLayer.forward

    def recording_forward(self, *args, **kwargs):
        ran.append(self.pipeline)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(B.RoutedDecoderLayer, "forward", recording_forward)
    return ran


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_timing_rounds_interleave_the_providers(cpu_only, pipelines_run, scope):
    """Each round times every provider of the point once, in turn, round i starting from the
    i-th provider: a timer whose readings grow call by call (a drifting clock) gives each
    provider one reading a round, each at another place in the round; a point's time is the
    median of its rounds'. The providers' steps share the routed layers: each must run its own
    pipeline whenever it is timed."""
    readings = iter(range(1, 100))
    ran = pipelines_run
    timed = []

    def drifting_timer(fn):
        ran.clear()
        fn()
        timed.append(set(ran))
        t = next(readings)
        return t, t - 0.5, t + 0.5

    cpu = torch.device("cpu")
    bench = B.LayerBench("tiny", torch.float32, cpu) if scope == "layer" else B.ModelBench("tiny", torch.float32, cpu, 2)
    points = B.run_grid(bench, "prefill", [1], [8], [0.25], ["dense", "hf", "triton-sparse"], 1e-4, drifting_timer,
                        rounds=3)
    dense, hf, sparse = points
    # Rounds: dense hf sparse (1 2 3), hf sparse dense (4 5 6), sparse dense hf (7 8 9).
    assert (dense.ms_rounds, hf.ms_rounds, sparse.ms_rounds) == ([1, 6, 8], [2, 4, 9], [3, 5, 7])
    assert (sparse.ms, sparse.ms_q20, sparse.ms_q80) == (5, 4.5, 5.5)
    assert sparse.speedup == pytest.approx(4 / 5)
    dense_, hf_, sparse_ = {"dense"}, set(), {"triton-sparse"}
    assert timed == [dense_, hf_, sparse_, hf_, sparse_, dense_, sparse_, dense_, hf_]


def test_a_provider_failing_in_a_later_round_is_reported_and_the_rest_timed(cpu_only, pipelines_run):
    sparse_calls = []

    def flaky_timer(fn):
        pipelines_run.clear()
        fn()
        if "triton-sparse" in pipelines_run:
            sparse_calls.append(1)
            if len(sparse_calls) == 2:
                raise RuntimeError("device lost (simulated)")
        return 1.0, 0.5, 1.5

    bench = B.LayerBench("tiny", torch.float32, torch.device("cpu"))
    hf, sparse = B.run_grid(bench, "prefill", [1], [8], [0.25], ["hf", "triton-sparse"], 1e-4, flaky_timer, rounds=3)
    assert sparse.status == "failed" and sparse.ms is None and sparse.ms_rounds is None and sparse.speedup is None
    assert sparse.note.startswith("timing round 2 of 3: RuntimeError: device lost")
    assert len(sparse_calls) == 2  # not timed again after it failed
    assert hf.status == "ok" and hf.ms_rounds == [1.0, 1.0, 1.0]


def test_rounds_flag_is_recorded(tmp_path, cpu_only):
    assert bench(tmp_path, "--batch-size", "1", "--seqlens", "8", "--sparsity", "0.5", "--providers",
                 "hf,triton-sparse", "--rounds", "2") == 0
    doc, rows = read_outputs(tmp_path, "layer-prefill")
    assert doc["timing"]["rounds"] == 2 and "--rounds 2" in doc["command"]
    assert all(len(p["ms_rounds"]) == 2 for p in doc["points"])
    assert all(len(r["ms_rounds"].split()) == 2 for r in rows)


def sleepers(calls: list, **ms_by_name) -> list:
    """Steps that sleep their milliseconds, each appending its name to `calls` when called."""
    def sleeper(name, ms):
        def step():
            calls.append(name)
            time.sleep(ms / 1e3)
        return step
    return [sleeper(name, ms) for name, ms in ms_by_name.items()]


def predecessors(order_per_repetition: list) -> dict:
    """name -> the names that ran right before it (itself too, across two repetitions)."""
    flat = [name for order in order_per_repetition for name in order]
    seen = collections.defaultdict(set)
    for before, name in zip(flat, flat[1:]):
        seen[name].add(before)
    return seen


def test_paired_timer_calls_every_step_once_per_repetition():
    """Host clock: each repetition calls every step once, in a shuffled order, so no step always
    follows the same one; each step's time is its own (2, 4 and 6 ms steps)."""
    calls = []
    times = B.paired_timer(sleepers(calls, fast=2, mid=4, slow=6), warmup_ms=5, rep_ms=30, cuda=False,
                           rng=random.Random(0))
    repetitions = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert all(sorted(r) == ["fast", "mid", "slow"] for r in repetitions)
    assert len(repetitions) >= 1 + 3 + 1 + 3  # first calls, the estimate, warm-up, at least min_reps
    assert len({tuple(r) for r in repetitions}) > 1
    assert all(before >= {"fast", "mid", "slow"} - {name} for name, before in predecessors(repetitions).items())
    (fast, *_), (mid, *_), (slow, *_) = times
    assert fast >= 2 and mid >= 4 and slow >= 6 and fast < mid < slow  # sleep() lasts at least as asked


def test_steady_timer_times_blocks_of_back_to_back_calls_in_turn():
    """Host clock: after a first and a calibrating call of each, each repetition runs a block of
    back-to-back calls of every step (about 40 ms a block, at least 8 calls), the same block size
    every time, the blocks in a shuffled order; each step's time is per call (2, 4 and 6 ms)."""
    calls = []
    times = B.steady_timer(sleepers(calls, fast=2, mid=4, slow=6), warmup_ms=5, rep_ms=30, cuda=False,
                           rng=random.Random(0))
    assert calls[:6] == ["fast", "mid", "slow"] * 2  # an untimed first call of each, then one that sizes its blocks
    runs = [(name, len(list(group))) for name, group in itertools.groupby(calls[6:])]
    sizes = {name: min(n for other, n in runs if other == name) for name in ("fast", "mid", "slow")}
    assert 8 <= sizes["fast"] <= 20 and sizes["slow"] == 8  # ceil(40 ms / the first call's time), at least 8
    # A step's block can end one repetition and open the next: a run of two blocks.
    assert all(n in (sizes[name], 2 * sizes[name]) for name, n in runs)
    blocks = [name for name, n in runs for _ in range(n // sizes[name])]
    repetitions = [blocks[i:i + 3] for i in range(0, len(blocks), 3)]
    assert all(sorted(r) == ["fast", "mid", "slow"] for r in repetitions)
    assert len(repetitions) >= 1 + 1 + 3  # the estimate, warm-up, at least min_reps
    assert len({tuple(r) for r in repetitions}) > 1
    assert all(before >= {"fast", "mid", "slow"} - {name} for name, before in predecessors(repetitions).items())
    (fast, *_), (mid, *_), (slow, *_) = times
    assert fast >= 2 and mid >= 4 and slow >= 6 and fast < mid < slow


@pytest.mark.parametrize("timer", [B.paired_timer, B.steady_timer])
def test_timer_calls_draw_orders_of_their_own(timer):
    """A grid's rounds call the timer once each: calls that shuffled alike would put the same
    providers after the same ones in every round (the rounds rotate the list, which keeps the
    imbalance). Three calls of 3 ms steps, each with at least five shuffled repetitions: all three
    alike by chance is less than 1 in 10^7."""
    orders = []
    for _ in range(3):
        calls = []
        timer(sleepers(calls, a=3, b=3, c=3), warmup_ms=1, rep_ms=10, cuda=False)
        orders.append(tuple(calls))
    assert len(set(orders)) > 1


def test_paired_rounds_time_the_providers_together(cpu_only, pipelines_run):
    """With a paired timer, a round hands every provider's step to it at once, in the round's
    rotated order, and each step still runs its own pipeline; the one-by-one timer is unused."""
    rounds = []

    def recording_paired_timer(fns):
        ran = []
        for fn in fns:
            pipelines_run.clear()
            fn()
            ran.append(set(pipelines_run))
        rounds.append(ran)
        base = 10 * len(rounds)
        return [(base + i, base + i - 0.5, base + i + 0.5) for i in range(len(fns))]

    def unused_timer(fn):
        raise AssertionError("a paired round timed a provider on its own")

    bench = B.LayerBench("tiny", torch.float32, torch.device("cpu"))
    dense, hf, sparse = B.run_grid(bench, "prefill", [1], [8], [0.25], ["dense", "hf", "triton-sparse"], 1e-4,
                                   unused_timer, rounds=3, paired_timer=recording_paired_timer)
    dense_, hf_, sparse_ = {"dense"}, set(), {"triton-sparse"}
    assert rounds == [[dense_, hf_, sparse_], [hf_, sparse_, dense_], [sparse_, dense_, hf_]]
    assert (dense.ms_rounds, hf.ms_rounds, sparse.ms_rounds) == ([10, 22, 31], [11, 20, 32], [12, 21, 30])
    assert all(p.status == "ok" for p in (dense, hf, sparse))


def test_a_failing_paired_round_is_timed_one_by_one_with_a_warning(cpu_only):
    def failing_paired_timer(fns):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    one_by_one = []

    def timer(fn):
        fn()
        one_by_one.append(1)
        return 1.0, 0.5, 1.5

    bench = B.LayerBench("tiny", torch.float32, torch.device("cpu"))
    with unittest.TestCase().assertLogs("skipgpt.benchmark", "WARNING") as logs:
        hf, sparse = B.run_grid(bench, "prefill", [1], [8], [0.25], ["hf", "triton-sparse"], 1e-4, timer, rounds=2,
                                paired_timer=failing_paired_timer)
    # Tried once: the point's later rounds go one by one straight away, and its points say so.
    assert len(logs.records) == 1 and "timing the providers together failed (OutOfMemoryError" in logs.output[0]
    assert len(one_by_one) == 4 and hf.ms_rounds == sparse.ms_rounds == [1.0, 1.0]
    assert hf.note == sparse.note == "rounds 1-2 timed one by one (timing together failed: OutOfMemoryError: CUDA out of memory (simulated))"


def test_paired_rounds_need_two_providers_left(cpu_only, monkeypatch):
    """A point whose providers failed their check but one is timed on its own; one where all
    failed is reported, not timed (the paired timer never sees fewer than two steps)."""
    step = B.LayerBench.step

    def failing_hf(self, provider, *args):
        if provider == "hf":
            raise RuntimeError("hf broke (simulated)")
        return step(self, provider, *args)

    monkeypatch.setattr(B.LayerBench, "step", failing_hf)

    def paired_timer(fns):
        raise AssertionError(f"paired timing of {len(fns)} step(s)")

    timer = lambda fn: (fn(), (1.0, 0.5, 1.5))[1]  # noqa: E731
    bench = B.LayerBench("tiny", torch.float32, torch.device("cpu"))
    hf, sparse = B.run_grid(bench, "prefill", [1], [8], [0.25], ["hf", "triton-sparse"], 1e-4, timer, rounds=2,
                            paired_timer=paired_timer)
    assert hf.status == "failed" and sparse.status == "ok" and sparse.ms_rounds == [1.0, 1.0]
    assert sparse.note == "timed alone (the only provider left at this point), not together"
    (only,) = B.run_grid(bench, "prefill", [1], [8], [0.25], ["hf"], 1e-4, timer, rounds=2, paired_timer=paired_timer)
    assert only.status == "failed" and only.ms is None


def test_paired_flag_is_recorded(tmp_path, cpu_only):
    assert bench(tmp_path, "--batch-size", "1", "--seqlens", "8", "--sparsity", "0.5", "--providers",
                 "hf,triton-sparse", "--rounds", "2", "--paired") == 0
    doc, _ = read_outputs(tmp_path, "layer-prefill")
    assert doc["timing"]["paired"] is True and "--paired" in doc["command"]
    assert doc["timing"]["method"].startswith("paired") and "in a shuffled order" in doc["timing"]["method"]
    assert all(p["status"] == "ok" and len(p["ms_rounds"]) == 2 for p in doc["points"])


def test_steady_flag_is_recorded(tmp_path, cpu_only):
    assert bench(tmp_path, "--batch-size", "1", "--seqlens", "8", "--sparsity", "0.5", "--providers",
                 "hf,triton-sparse", "--rounds", "2", "--steady") == 0
    doc, _ = read_outputs(tmp_path, "layer-prefill")
    assert doc["timing"]["steady"] is True and doc["timing"]["paired"] is False and "--steady" in doc["command"]
    assert doc["timing"]["method"].startswith("steady") and "about 40 ms, at least 8 steps), the blocks in a shuffled order" in doc["timing"]["method"]
    assert all(p["status"] == "ok" and len(p["ms_rounds"]) == 2 for p in doc["points"])


def test_out_of_memory_at_one_point(tmp_path, monkeypatch, cpu_only, capsys):
    step = B.LayerBench.step

    def step_or_oom(self, provider, mode, batch, seqlen, skip):
        if provider == "dense" and batch == 2 and seqlen == 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return step(self, provider, mode, batch, seqlen, skip)

    monkeypatch.setattr(B.LayerBench, "step", step_or_oom)
    assert bench(tmp_path, "--batch-size", "1,2", "--seqlens", "8,16", "--sparsity", "0", "--providers",
                 "hf,dense,triton-sparse") == 0
    doc, _ = read_outputs(tmp_path, "layer-prefill")
    assert len(doc["points"]) == 12
    for p in doc["points"]:
        if (p["provider"], p["batch"], p["seqlen"]) == ("dense", 2, 8):
            assert p["status"] == "out of memory" and p["ms"] is None
        else:
            assert p["status"] == "ok" and p["ms"] is not None  # the run went on
    assert "out of memory" in capsys.readouterr().out


def test_compiled_provider_without_a_compiler_fails_per_point(tmp_path, monkeypatch, cpu_only):
    def no_compiler(module):
        def call(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found")

        return call

    monkeypatch.setattr(B, "compile_module", no_compiler)
    assert bench(tmp_path, "--batch-size", "1", "--seqlens", "8,16", "--sparsity", "0",
                 "--providers", "hf,compiled-sparse,triton-sparse") == 0
    doc, _ = read_outputs(tmp_path, "layer-prefill")
    compiled = [p for p in doc["points"] if p["provider"] == "compiled-sparse"]
    assert [p["status"] for p in compiled] == ["failed", "failed"]
    assert "no working C++ compiler" in compiled[0]["note"] and "earlier point" in compiled[1]["note"]
    assert all(p["status"] == "ok" for p in doc["points"] if p["provider"] != "compiled-sparse")


def test_python_m_skipgpt_benchmark_keeps_its_flags(tmp_path, cpu_only):
    # The spelling docs/BENCHMARKS.md records and `python -m skipgpt --task inference_throughput`
    # translates to; no output folder unless asked.
    out = tmp_path / "sub" / "x.json"
    assert B.main(["--mode", "decode", "--geometry", "tiny", "--batch-sizes", "1", "--seqlens", "8",
                   "--skips", "0.25", "--providers", "hf,triton-sparse", *QUICK, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [p["provider"] for p in doc["points"]] == ["hf", "triton-sparse"]
    assert sorted(q.name for q in tmp_path.rglob("*") if q.is_file()) == ["x.json"]


@pytest.mark.parametrize("args,message", [
    (["--providers", "hf,fast"], "unknown provider(s) fast"),
    (["--providers", "published-triton-sparse"], "--baseline-published"),
    (["--batch-size", "1,0"], "positive integer"),
    (["--batch-size", "x"], "expected an integer"),
    (["--sparsity", "0.25,1.5"], "rate in [0, 1]"),
    (["--seqlens", "512,-1"], "positive integer"),
    (["--layers", "0", "--scope", "model"], "positive integer"),
    (["--rep", "0"], "positive number"),
    (["--rounds", "0"], "positive integer"),
    (["--mode", "train"], "invalid choice"),
    (["--config", "llama-70b"], "invalid choice"),
    (["--config", "tiny", "--model", "m"], "not allowed with"),
])
def test_bad_flags_fail_in_argparse(capsys, nothing_built, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "--model: /no/such/model is not a folder"),
    (["--layers", "2"], "--layers applies to --scope model"),
    (["--decode-steps", "4"], "--decode-steps applies to --mode decode"),
    (["--mode", "generate", "--rounds", "2"], "--rounds applies to --mode prefill and decode"),
    (["--mode", "generate", "--paired"], "--paired applies to --mode prefill and decode"),
    (["--paired", "--cuda-graph"], "--paired times steps as their host launches them"),
    (["--mode", "generate", "--steady"], "--steady applies to --mode prefill and decode"),
    (["--steady", "--cuda-graph"], "--steady times steps as their host launches them"),
    (["--steady", "--paired"], "two ways to time a round's providers together"),
    (["--steady", "--providers", "hf"], "--steady times two or more providers together"),
    (["--paired", "--providers", "triton-sparse"], "--paired times two or more providers together"),
    (["--scope", "model", "--baseline-published", "."], "use --scope layer"),
])
def test_bad_input_fails_before_building(tmp_path, capsys, nothing_built, args, message):
    assert main(["bench", *args, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_model_folder_without_config(tmp_path, capsys, nothing_built):
    assert main(["bench", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_cuda_graph_needs_cuda(capsys, nothing_built, cpu_only):
    assert main(["bench", "--cuda-graph"]) == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for flag in ("--mode", "--scope", "--batch-size", "--sparsity", "--seqlens", "--providers", "--config", "--model",
                 "--layers", "--cuda-graph", "--warmup", "--rep", "--baseline-published", "--output", "--json"):
        assert flag in text
    assert "published-triton-sparse" in text and "float32" in text


# ---------------------------------------------------------------------------- --baseline-published


def write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_published_path_missing(tmp_path):
    with pytest.raises(published_baseline.PublishedError, match="does not exist"):
        published_baseline.load(tmp_path / "nope")


def test_published_path_without_the_code(tmp_path, capsys, nothing_built):
    write(tmp_path / "README.md", "something else")
    with pytest.raises(published_baseline.PublishedError, match="inference/wrapper/model/llama.py"):
        published_baseline.load(tmp_path)
    assert main(["bench", "--baseline-published", str(tmp_path)]) == 2
    assert "does not look like a checkout of the published SkipGPT" in capsys.readouterr().err


def test_published_code_without_the_layer_class(tmp_path, capsys, nothing_built, cpu_only):
    write(tmp_path / "inference" / "wrapper" / "model" / "llama.py", "from .cache import DynamicCacheSeqFirst\n")
    write(tmp_path / "inference" / "wrapper" / "model" / "cache.py", "class DynamicCacheSeqFirst:\n    pass\n")
    with pytest.raises(published_baseline.PublishedError, match="defines no class LlamaMoDDecoderLayer"):
        published_baseline.load(tmp_path)
    # The command says so before building anything; on a machine without CUDA it says that first.
    assert main(["bench", "--baseline-published", str(tmp_path)]) == 2
    assert "the published kernels need a CUDA device" in capsys.readouterr().err


def test_published_code_that_fails_to_import(tmp_path):
    write(tmp_path / "wrapper" / "model" / "llama.py", "import flash_attn_is_not_installed_here\n")
    write(tmp_path / "wrapper" / "model" / "cache.py")
    # PATH may also be the inference/ folder itself.
    with pytest.raises(published_baseline.PublishedError,
                       match="importing .*llama.py failed: ModuleNotFoundError.*flash_attn_is_not_installed_here"):
        published_baseline.load(tmp_path)


# ---------------------------------------------------------------------------- FLOPs


def test_dense_flops_hand_count():
    bench = B.LayerBench("tiny", torch.float32, torch.device("cpu"))
    # tiny: hidden 64, 4 query heads and 2 KV heads of 16, MLP 160. Prefill B=2, L=8: 16 tokens.
    tokens = 16
    q = o = 2 * tokens * 64 * 64
    k = v = 2 * tokens * 64 * 32
    mlp = 3 * 2 * tokens * 64 * 160
    pairs = 2 * (8 * 9 // 2)  # causal (query, key) pairs of both sequences
    attn = pairs * 4 * 2 * (2 * 16)  # 4 heads, 2 products (QK^T, PV), 16-dim dot products at 2 FLOPs each
    assert bench.dense_flops("prefill", 2, 8) == q + k + v + o + mlp + attn
    # Decode: one token per sequence attending to KV 8 + itself.
    assert bench.dense_flops("decode", 2, 8) == (q + k + v + o + mlp) / 8 + 2 * 9 * 4 * 2 * (2 * 16)
    assert B.dense_flops(bench.geometry, "prefill", 2, 8, layers=3) == 3 * bench.dense_flops("prefill", 2, 8)


def test_provenance_takes_the_commit_a_copied_tree_names(monkeypatch):
    from skipgpt.commands.bench import _git_commit

    monkeypatch.setenv("SKIPGPT_SOURCE_COMMIT", "0123abc")
    assert _git_commit() == {"commit": "0123abc", "dirty": None, "from": "SKIPGPT_SOURCE_COMMIT"}
    monkeypatch.delenv("SKIPGPT_SOURCE_COMMIT")
    found = _git_commit()
    assert found is None or (len(found["commit"]) == 40 and "from" not in found)
