"""Router training (stage 1), LoRA (stage 2), the static-pruning baseline and their commands,
on a tiny random Llama on CPU."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import skipgpt
from skipgpt.checkpoint import load_routers, merge_lora, save_routers
from skipgpt.cli import main
from skipgpt.router import Router
from skipgpt.static_pruning import (
    apply_static_routes,
    choose_drops,
    forced_router,
    module_importance,
    static_router_state,
)
from skipgpt.training import (
    TrainConfig,
    TrainingDecoderLayer,
    attach_training_layers,
    detach_lora,
    detach_training_layers,
    evaluate,
    fold_standardization,
    pack_documents,
    read_texts,
    save_lora_adapter,
    sparsity_penalty,
    temperature,
    train_lora,
    train_routers,
)


@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def rows(tiny, text_file):
    _, tok = tiny
    ids = pack_documents(read_texts(text_file), tok, 32)
    assert len(ids) >= 40
    return ids


def _config(**kw):
    base = dict(target_skip=0.5, steps=40, batch_size=8, seq_len=32, lr=0.05, init_execute=0.9, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_training_moves_skip_toward_target_and_lowers_loss(tiny, rows):
    model, _ = tiny
    state, metrics = train_routers(model, rows[:32], _config(), progress=False)
    first, hist = metrics["first"], metrics["history"]
    first_skip = (first["skip_attention"] + first["skip_mlp"]) / 2
    final_skip = (metrics["final"]["skip_attention"] + metrics["final"]["skip_mlp"]) / 2
    assert first_skip < 0.2  # routers start executing (p = 0.9)
    assert abs(final_skip - 0.5) < abs(first_skip - 0.5) - 0.2, (first_skip, final_skip)
    assert metrics["final"]["loss"] < first["loss"] - 1.0
    assert abs(hist[-1]["mean_execute_prob"] - 0.5) < 0.15
    # Held-out argmax decisions (what inference does) move too.
    held = evaluate(model, state, rows[32:40], 8)
    assert 0.15 < (held["skip"]["attention"] + held["skip"]["mlp"]) / 2 < 0.85


def test_straight_through_trains_routers_only(tiny, rows):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state, _ = train_routers(model, rows[:16], _config(steps=3), progress=False)
    # Base weights bit for bit unchanged; only router parameters ask for gradients.
    detach_training_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    model2 = copy.deepcopy(model)
    state = attach_training_layers(model2, "linear", 0.5)
    for p in model2.parameters():
        p.requires_grad_(False)
    routers = [layer.router_attention for layer in model2.model.layers] + [layer.router_mlp for layer in model2.model.layers]
    for r in routers:
        r.requires_grad_(True)
    seen = []
    state.observer = lambda i, x, h, y: seen.append((x.detach(), h.detach(), y.detach()))
    state.mode, state.tau = "gumbel", 2.0
    state.records = []
    out = model2(input_ids=rows[:4], labels=rows[:4], use_cache=False)
    penalty, _ = sparsity_penalty(state.records, None, 0.25, 20.0)
    (out.loss + penalty).backward()
    assert all(p.grad is None for n, p in model2.named_parameters() if "router" not in n)
    assert all(r.weight_predictor.weight.grad is not None and r.weight_predictor.weight.grad.abs().sum() > 0 for r in routers)
    # Forward uses the hard decision: a skipping token's residual is untouched, exactly.
    for (x, h, y), (_, execute) in zip(seen, state.records):
        attn_exec = execute[0]
        assert torch.equal(h[~attn_exec], x[~attn_exec])
        assert (h[attn_exec] != x[attn_exec]).any(-1).all()
        assert torch.equal(y[~execute[1]], h[~execute[1]])


def test_saved_routers_load_and_decide_the_same(tiny, rows, tmp_path):
    model, _ = tiny
    base = copy.deepcopy(model)
    state, _ = train_routers(model, rows[:32], _config(steps=20), progress=False)
    trained = evaluate(model, state, rows[32:40], 8)
    path = save_routers(model, tmp_path / "router.safetensors")
    assert load_routers(path).kind == "linear"

    loaded = skipgpt.wrap(copy.deepcopy(base), router=path, pipeline="torch-sparse").eval()
    x = torch.randn(5, 17, 64) * 3
    for layer_t, layer_l in zip(model.model.layers, loaded.model.layers):
        for name in ("router_attention", "router_mlp"):
            assert torch.equal(getattr(layer_t, name).execute(x), getattr(layer_l, name).execute(x))
    skipgpt.reset_sparsity(loaded)
    with torch.no_grad():
        loaded(input_ids=rows[32:40], use_cache=False)
    got = skipgpt.sparsity(loaded)
    assert got["attention"] == pytest.approx(trained["skip"]["attention"], abs=1e-12)
    assert got["mlp"] == pytest.approx(trained["skip"]["mlp"], abs=1e-12)
    for a, b in zip(got["per_layer"], trained["skip"]["per_layer"]):
        assert a["attention"] == pytest.approx(b["attention"], abs=1e-12) and a["mlp"] == pytest.approx(b["mlp"], abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fold_standardization_keeps_logits(tiny, kind):
    model, _ = tiny
    attach_training_layers(model, kind, 0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 64, generator=g) * 50 + 7
    expected = []
    for layer in model.model.layers:
        layer.input_mean = torch.randn(64, generator=g) * 5
        layer.input_std = torch.rand(64, generator=g) * 30 + 0.5
        for r in (layer.router_attention, layer.router_mlp):
            for p in r.parameters():
                p.data.normal_(0, 0.3, generator=g)
            expected.append(r((x - layer.input_mean) / layer.input_std))
    fold_standardization(model)
    got = [r(x) for layer in model.model.layers for r in (layer.router_attention, layer.router_mlp)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(layer.input_mean is None for layer in model.model.layers)


def test_same_seed_same_routers(tiny, rows):
    model, _ = tiny
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        train_routers(m, rows[:16], _config(steps=4, router_kind="mlp"), progress=False)
        runs.append({k: v for k, v in m.state_dict().items() if "router" in k})
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 3 * 2 * 4
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_temperature_and_penalty():
    c = TrainConfig(steps=11, tau_start=5.0, tau_end=1.0)
    assert temperature(0, c) == 5.0 and temperature(10, c) == pytest.approx(1.0) and temperature(5, c) == pytest.approx(3.0)
    c.tau_schedule = "exp"
    assert temperature(0, c) == pytest.approx(5.0) and temperature(10, c) == pytest.approx(1.0)
    assert temperature(5, c) == pytest.approx(math.sqrt(5.0))
    # The mean runs over every router and non-padding token only.
    p = torch.tensor([[[[0.2, 0.4, 0.9]]] * 2])  # [1 layer, 2 modules, B=1, L=3]
    records = [(p[0], None)]
    valid = torch.tensor([[True, True, False]])
    penalty, mean = sparsity_penalty(records, valid, target_skip=0.25, lam=20.0)
    assert float(mean) == pytest.approx(0.3)
    assert float(penalty) == pytest.approx(20 * 0.45)
    with pytest.raises(ValueError, match="target_skip"):
        TrainConfig(target_skip=1.0).check()


def test_lora_adapter_merges_to_the_trained_function(tiny, rows, tmp_path):
    model, _ = tiny
    base = copy.deepcopy(model)
    train_routers(model, rows[:16], _config(steps=3), progress=False)
    router_file = save_routers(model, tmp_path / "router.safetensors")
    detach_training_layers(model)

    cfg = _config(steps=4, lr=1e-2, lora_rank=4, lora_alpha=8.0)
    state, adapters, metrics = train_lora(model, rows[:16], cfg, router_file, progress=False)
    assert metrics["steps"] == 4 and len(adapters) == 3 * 7
    assert all(m.lora_B.abs().sum() > 0 for m in adapters.values())  # B left zero: LoRA learned
    adapter_dir = save_lora_adapter(adapters, tmp_path / "lora", 4, 8.0, "tiny")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"

    with torch.no_grad():
        state.mode = "dense"
        trained = model(input_ids=rows[20:22], use_cache=False).logits
        merged = copy.deepcopy(base)
        summary = merge_lora(merged, adapter_dir)
        assert summary.merged == 21 and summary.scale == 2.0
        torch.testing.assert_close(merged(input_ids=rows[20:22], use_cache=False).logits, trained, rtol=1e-4, atol=1e-4)
    detach_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- static pruning

def test_forced_routers_ignore_their_input():
    x = torch.cat([torch.randn(50, 64) * 1e4, torch.zeros(1, 64), torch.full((1, 64), -3e4)])
    assert not forced_router(64, skip=True).execute(x).any()
    assert forced_router(64, skip=False).execute(x).all()


def test_choose_drops_takes_the_lowest_scores():
    scores = torch.tensor([[0.9, 0.1], [0.05, 0.5], [0.3, 0.2], [0.3, 0.8]], dtype=torch.float64)
    assert choose_drops(scores, 0.5) == {"attention": [1, 2], "mlp": [0, 2]}
    assert choose_drops(scores, 0.25, mlp_skip=0.0) == {"attention": [1], "mlp": []}
    assert choose_drops(scores, 0.3) == {"attention": [1], "mlp": [0]}  # round(1.2) = 1
    assert choose_drops(scores, 0.375) == {"attention": [1, 2], "mlp": [0, 2]}  # 1.5 rounds up


def test_importance_scores_match_a_direct_computation(tiny, rows):
    model, _ = tiny
    scores = module_importance(model, rows[:4], batch_size=2)
    assert scores.shape == (3, 2) and (scores > 0).all() and (scores < 2).all()
    # Independently, with hooks on the unwrapped Hugging Face layers.
    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda mod, args, kwargs, out, i=i: captured.__setitem__(("layer", i), (args[0] if args else kwargs["hidden_states"], out)),
            with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(
            lambda mod, args, kwargs, out, i=i: captured.__setitem__(("attn", i), out[0]), with_kwargs=True))
    with torch.no_grad():
        model(input_ids=rows[:4], use_cache=False)
    for h in hooks:
        h.remove()
    cos = torch.nn.functional.cosine_similarity
    for i in range(3):
        x, y = captured[("layer", i)]
        h = x + captured[("attn", i)]
        assert float(scores[i, 0]) == pytest.approx(float((1 - cos(x, h, dim=-1)).mean()), rel=1e-4)
        assert float(scores[i, 1]) == pytest.approx(float((1 - cos(h, y, dim=-1)).mean()), rel=1e-4)


@pytest.mark.parametrize("pipeline", ["torch-sparse", "triton-sparse"])
def test_static_routes_skip_exactly_the_chosen_modules(tiny, rows, tmp_path, pipeline):
    model, _ = tiny
    scores = module_importance(model, rows[:4], batch_size=4)
    drops = choose_drops(scores, 1 / 3)
    assert len(drops["attention"]) == 1 and len(drops["mlp"]) == 1
    assert drops["attention"] == [int(scores[:, 0].argmin())] and drops["mlp"] == [int(scores[:, 1].argmin())]

    from skipgpt.checkpoint import write_state_dict

    path = write_state_dict(static_router_state(3, 64, drops), tmp_path / "static.safetensors")
    for wrapped in (skipgpt.wrap(copy.deepcopy(model), router=path, pipeline=pipeline),
                    apply_static_routes(skipgpt.wrap(copy.deepcopy(model), pipeline="dense"), drops)):
        skipgpt.set_pipeline(wrapped, pipeline)
        skipgpt.reset_sparsity(wrapped)
        with torch.no_grad():
            wrapped(input_ids=rows[:2], use_cache=False)
        for entry in skipgpt.sparsity(wrapped)["per_layer"]:
            for module in ("attention", "mlp"):
                assert entry[module] == (1.0 if entry["layer"] in drops[module] else 0.0)

    # Skipping a module by its router equals removing it from the dense model.
    ref = copy.deepcopy(model)
    for i in drops["attention"]:
        ref.model.layers[i].self_attn.o_proj.weight.data.zero_()
    for i in drops["mlp"]:
        ref.model.layers[i].mlp.down_proj.weight.data.zero_()
    wrapped = skipgpt.wrap(copy.deepcopy(model), router=path, pipeline="torch-sparse")
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=rows[:2], use_cache=False).logits,
                                   ref(input_ids=rows[:2], use_cache=False).logits, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- commands

def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-router", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--target-skip", "--steps", "--batch-size", "--seq-len", "--lr", "--router-kind",
                 "--lambda", "--tau-start", "--tau-end", "--tau-schedule", "--lora", "--lora-alpha", "--router",
                 "--device", "--dtype", "--output", "--seed", "--warmup-steps", "--no-standardize", "wiki"):
        assert flag in out, flag
    with pytest.raises(SystemExit):
        main(["prune-static", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--skip", "--mlp-skip", "--data", "--samples", "--output", "cosine"):
        assert flag in out, flag


@pytest.fixture
def no_model_load(monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--target-skip", "1.5"], "--target-skip"),
    (["--lambda", "-1"], "--lambda"),
    (["--tau-end", "0"], "--tau-end"),
    (["--lora", "4"], "--router"),
    (["--router", "x.safetensors"], "--lora"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_bad_flags_fail_before_loading(tiny_model_dir, text_file, tmp_path, capsys, no_model_load, extra, message):
    code = main(["train-router", "--model", str(tiny_model_dir), "--data", str(text_file), "--steps", "2",
                 "--output", str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_paths_fail_before_loading(tiny_model_dir, text_file, tmp_path, capsys, no_model_load, monkeypatch):
    args = ["train-router", "--steps", "2", "--output", str(tmp_path / "out")]
    assert main([*args, "--model", str(tmp_path), "--data", str(text_file)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main([*args, "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path / "empty-cache"))
    assert main([*args, "--model", str(tiny_model_dir), "--data", "wiki"]) == 2
    assert "skipgpt setup" in capsys.readouterr().err
    assert main(["prune-static", "--model", str(tiny_model_dir), "--data", str(text_file),
                 "--output", str(tmp_path / "x.txt")]) == 2
    assert "--output" in capsys.readouterr().err


def test_cli_end_to_end(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "stage1"
    code = main(["train-router", "--model", str(tiny_model_dir), "--data", str(text_file), "--target-skip", "0.25",
                 "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--device", "cpu",
                 "--no-progress", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out skip" in printed and str(out / "router.safetensors") in printed
    summary = json.loads((out / "train_config.json").read_text())
    assert summary["config"]["target_skip"] == 0.25 and summary["config"]["lam"] == 20.0
    assert summary["config"]["tau_start"] == 5.0 and summary["config"]["lr"] == 2e-3
    assert summary["device"] == "cpu" and summary["dtype"] == "float32" and summary["stage"] == 1
    held = summary["metrics"]["held_out"]
    assert held["skip_agreement"]["max_abs_difference"] < 1e-9
    assert held["perplexity_dense"] > 0 and len(summary["history"]) == 6
    assert set(summary["metrics"]["train"]["final"]) >= {"loss", "lm_loss", "skip_attention", "skip_mlp"}
    model = skipgpt.load(str(tiny_model_dir), router=out / "router.safetensors", pipeline="torch-sparse")
    assert all(isinstance(layer.router_attention, Router) for layer in model.model.layers)

    # Stage 2 on top of it.
    out2 = tmp_path / "stage2"
    code = main(["train-router", "--model", str(tiny_model_dir), "--data", str(text_file), "--steps", "3",
                 "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--lora", "4",
                 "--router", str(out / "router.safetensors"), "--no-progress", "--output", str(out2)])
    assert code == 0
    summary = json.loads((out2 / "train_config.json").read_text())
    assert summary["stage"] == 2 and summary["config"]["lr"] == 2e-4 and summary["config"]["lora_alpha"] == 32.0
    assert (out2 / "lora" / "adapter_config.json").is_file() and (out2 / "router.safetensors").is_file()
    assert summary["metrics"]["held_out"]["skip_agreement"]["max_abs_difference"] < 0.05
    skipgpt.load(str(tiny_model_dir), router=out2 / "router.safetensors", lora=out2 / "lora", pipeline="torch-sparse")

    # The static baseline as a router file.
    capsys.readouterr()
    static = tmp_path / "static.safetensors"
    code = main(["prune-static", "--model", str(tiny_model_dir), "--data", str(text_file), "--skip", "0.34",
                 "--samples", "4", "--seq-len", "32", "--output", str(static)])
    assert code == 0
    report = json.loads(static.with_suffix(".json").read_text())
    assert len(report["dropped"]["attention"]) == 1 and len(report["dropped"]["mlp"]) == 1
    assert len(report["scores"]) == 3 and load_routers(static).num_layers == 3


def test_wiki_data(wiki_cache, tiny):
    _, tok = tiny
    texts = read_texts("wiki", "train")
    assert texts and all(isinstance(t, str) for t in texts)
    ids = pack_documents(texts, tok, 16)
    assert ids.shape[1] == 16 and (ids == tok.eos_token_id).any()


def test_training_layer_is_a_drop_in(tiny, rows):
    """Dense mode reproduces the Hugging Face model exactly: same submodules, same mask."""
    model, _ = tiny
    with torch.no_grad():
        ref = model(input_ids=rows[:2], use_cache=False).logits
        attach_training_layers(model, kind=None)
        assert all(isinstance(layer, TrainingDecoderLayer) for layer in model.model.layers)
        got = model(input_ids=rows[:2], use_cache=False).logits
        detach_training_layers(model)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
