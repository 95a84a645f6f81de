"""Checkpoint loading and conversion: routers, LoRA, `skipgpt convert`, and failing safe on
bad files (DESIGN.md section 1, issues 3 and 10). Tiny random Llama models built here."""
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from skipgpt.checkpoint import (CheckpointError, RouterCheckpoint, attach_routers, load_routers,
                                merge_lora, read_state_dict, save_routers, write_state_dict)
from skipgpt.cli import main
from skipgpt.router import Router

# The published routers live in the shared folder next to the repository; CI clones may lack it.
FIXTURES = (Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures"
            / "original-routers-llama3.1-8b").resolve()
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "stage1_router.pth").is_file(),
    reason=f"published router fixtures not found at {FIXTURES} (shared/ sits next to the repo)")

HIDDEN = 64


def tiny_llama(layers=2, hidden=HIDDEN, dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def router_state(layers=2, hidden=HIDDEN, kind="linear", prefix="", seed=1):
    """A synthetic router checkpoint in the published key style."""
    g = torch.Generator().manual_seed(seed)
    shapes = ({"weight": (2, hidden), "bias": (2,)} if kind == "linear" else
              {"0.weight": (hidden // 4, hidden), "0.bias": (hidden // 4,),
               "2.weight": (2, hidden // 4), "2.bias": (2,)})
    return {f"{prefix}model.layers.{i}.{r}.weight_predictor.{p}": torch.randn(s, generator=g)
            for i in range(layers) for r in ("router_attention", "router_mlp")
            for p, s in shapes.items()}


def save(state, path):
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


# ----------------------------------------------------------------------------- published files

@needs_fixtures
@pytest.mark.parametrize("name, prefix", [("stage1_router.pth", ""),
                                          ("stage2_router.pth", "base_model.model.")])
def test_published_routers_load(name, prefix):
    path = FIXTURES / name
    ckpt = load_routers(path)
    assert (ckpt.kind, ckpt.num_layers, ckpt.hidden_size) == ("linear", 32, 4096)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert len(ckpt.tensors) == len(raw) == 128
    for key, tensor in ckpt.tensors.items():
        assert torch.equal(tensor, raw[prefix + key]), key
    # A Router built from the checkpoint holds exactly the file's tensors.
    router = Router(4096)
    router.load_state_dict(ckpt.router_state(31, "router_mlp"))
    w = raw[prefix + "model.layers.31.router_mlp.weight_predictor.weight"]
    assert router.weight_predictor.weight.shape == (2, 4096)
    assert torch.equal(router.weight_predictor.weight, w)


@needs_fixtures
def test_published_routers_safetensors_round_trip(tmp_path):
    ckpt = load_routers(FIXTURES / "stage2_router.pth")
    out = write_state_dict(ckpt.tensors, tmp_path / "router.safetensors")
    again = load_routers(out)
    assert again.tensors.keys() == ckpt.tensors.keys()
    assert all(torch.equal(again.tensors[k], v) for k, v in ckpt.tensors.items())


# ----------------------------------------------------------------------------- attach / save

@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("prefix", ["", "base_model.model."])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_attach_routers(tmp_path, kind, prefix, suffix):
    state = router_state(layers=3, kind=kind, prefix=prefix)
    path = save(state, tmp_path / f"router{suffix}")
    model = tiny_llama(layers=3)
    assert attach_routers(model, path) is model
    for i, layer in enumerate(model.model.layers):
        for name in ("router_attention", "router_mlp"):
            router = getattr(layer, name)
            assert isinstance(router, Router) and router.kind == kind
            assert router.dtype == torch.float32
            for key, value in router.state_dict().items():
                assert torch.equal(value, state[f"{prefix}model.layers.{i}.{name}.{key}"])
    # The model still runs; routers accept the layer input.
    x = torch.randn(2, 5, HIDDEN)
    assert model.model.layers[0].router_mlp.execute(x).shape == (2, 5)
    model(torch.tensor([[1, 2, 3]]))


def test_attach_routers_dtype_and_checkpoint_object(tmp_path):
    ckpt = load_routers(save(router_state(), tmp_path / "r.pth"))
    assert isinstance(ckpt, RouterCheckpoint)
    model = tiny_llama(dtype=torch.bfloat16)
    attach_routers(model, ckpt, dtype=torch.bfloat16)
    assert model.model.layers[1].router_attention.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_routers_round_trip(tmp_path, kind, suffix):
    model = tiny_llama()
    attach_routers(model, save(router_state(kind=kind, prefix="base_model.model."),
                               tmp_path / "in.pth"))
    out = save_routers(model, tmp_path / f"out{suffix}")
    raw = read_state_dict(out)
    assert all(k.startswith("model.layers.") for k in raw)  # stage-1 style
    if suffix == ".safetensors":
        assert out.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    other = tiny_llama()
    attach_routers(other, out)
    for a, b in zip(model.model.layers, other.model.layers):
        for name in ("router_attention", "router_mlp"):
            sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_routers_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(CheckpointError, match="layer 0 has no router_attention"):
        save_routers(model, tmp_path / "r.safetensors")
    attach_routers(model, save(router_state(), tmp_path / "in.pth"))
    with pytest.raises(CheckpointError, match="cannot write format"):
        save_routers(model, tmp_path / "r.txt")


def test_wrapped_state_dict(tmp_path):
    path = save({"state_dict": router_state(), "epoch": torch.tensor(3)}, tmp_path / "w.pth")
    assert load_routers(path).num_layers == 2


# ----------------------------------------------------------------------------- router errors

def test_mismatched_hidden_size(tmp_path):
    path = save(router_state(hidden=32), tmp_path / "r32.pth")
    with pytest.raises(CheckpointError) as err:
        attach_routers(tiny_llama(), path)
    msg = str(err.value)
    assert "32" in msg and "64" in msg and "r32.pth" in msg and "hidden size" in msg


def test_mismatched_layer_count(tmp_path):
    path = save(router_state(layers=3), tmp_path / "r3.safetensors")
    with pytest.raises(CheckpointError) as err:
        attach_routers(tiny_llama(layers=2), path)
    msg = str(err.value)
    assert "3 layers" in msg and "2 layers" in msg and "r3.safetensors" in msg


@pytest.mark.parametrize("extra", ["lm_head.weight",
                                   "model.layers.0.router_attention.weight_predictor.extra"])
def test_unexpected_key(tmp_path, extra):
    state = router_state()
    state[extra] = torch.zeros(2)
    path = save(state, tmp_path / "r.pth")
    with pytest.raises(CheckpointError, match=rf"r\.pth.*unexpected key '{extra}'"):
        load_routers(path)


def test_missing_key(tmp_path):
    state = router_state()
    del state["model.layers.1.router_mlp.weight_predictor.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'model\.layers\.1\.router_mlp\."
                                              r"weight_predictor\.bias'"):
        load_routers(save(state, tmp_path / "r.pth"))


def test_wrong_shape(tmp_path):
    state = router_state()
    state["model.layers.1.router_attention.weight_predictor.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"router_attention.weight_predictor.bias.*\(3,\)"):
        load_routers(save(state, tmp_path / "r.pth"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_router(tmp_path, bad):
    state = router_state()
    state["model.layers.1.router_mlp.weight_predictor.weight"][0, 3] = bad
    with pytest.raises(CheckpointError, match=r"r\.safetensors.*router_mlp.*NaN or Inf"):
        load_routers(save(state, tmp_path / "r.safetensors"))


def test_mixed_kinds(tmp_path):
    state = router_state(kind="linear")
    mlp = router_state(kind="mlp")
    for k in [k for k in state if ".layers.1.router_mlp." in k]:
        del state[k]
    state.update({k: v for k, v in mlp.items() if ".layers.1.router_mlp." in k})
    with pytest.raises(CheckpointError, match="mixes router kinds"):
        load_routers(save(state, tmp_path / "r.pth"))


# ----------------------------------------------------------------------------- unsafe files

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    good = save(router_state(), tmp_path / f"good{suffix}")
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"bad\{suffix}.*truncated or corrupted"):
        load_routers(bad)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint" * 10])
def test_garbage_file(tmp_path, content):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth"):
        read_state_dict(bad)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_routers(tmp_path / "nope.pth")


class _Payload:
    """Unpickling this would create `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    state = router_state()
    state["model.layers.0.router_attention.weight_predictor.bias"] = _Payload(marker)
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused"):
        load_routers(path)
    with pytest.raises(CheckpointError, match="refused"):
        merge_lora(tiny_llama(), path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- LoRA

TARGETS = [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")]


def lora_tensors(model, rank, targets=TARGETS, seed=2):
    """{(layer, module, proj): (A [rank, in], B [out, rank])} for each layer and target."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, layer in enumerate(model.model.layers):
        for module, proj in targets:
            w = getattr(getattr(layer, module), proj).weight
            out[(i, module, proj)] = (torch.randn(rank, w.shape[1], generator=g),
                                      torch.randn(w.shape[0], rank, generator=g))
    return out


def expected_weights(model, tensors, scale):
    """The hand-computed merge: W + B @ A * scale, in float32, cast back to W's dtype."""
    out = {}
    for (i, module, proj), (a, b) in tensors.items():
        w = getattr(getattr(model.model.layers[i], module), proj).weight
        out[(i, module, proj)] = (w.detach().float() + (b @ a) * scale).to(w.dtype)
    return out


def check_merged(model, expected):
    for (i, module, proj), want in expected.items():
        got = getattr(getattr(model.model.layers[i], module), proj).weight
        assert torch.equal(got, want), (i, module, proj)


@pytest.mark.parametrize("key_style", [
    "model.layers.{i}.{m}.{p}.lora_{ab}.weight",
    "model.layers.{i}.block.{m}.{p}.lora_{ab}.weight",
    "base_model.model.model.layers.{i}.block.{m}.{p}.lora_{ab}.weight",
])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_flat_lora(tmp_path, key_style, suffix, dtype):
    model = tiny_llama(dtype=dtype)
    tensors = lora_tensors(model, rank=16)
    state = {}
    for (i, m, p), (a, b) in tensors.items():
        state[key_style.format(i=i, m=m, p=p, ab="A")] = a
        state[key_style.format(i=i, m=m, p=p, ab="B")] = b
    expected = expected_weights(model, tensors, 32 / 16)
    k_before = model.model.layers[0].self_attn.k_proj.weight.clone()
    summary = merge_lora(model, save(state, tmp_path / f"lora{suffix}"))
    assert summary.merged == len(tensors) == 6 and summary.scale == 2.0
    check_merged(model, expected)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, k_before)


def test_merge_flat_lora_custom_alpha_r(tmp_path):
    model = tiny_llama()
    tensors = lora_tensors(model, rank=4)
    state = {f"model.layers.{i}.{m}.{p}.lora_{ab}.weight": t
             for (i, m, p), (a, b) in tensors.items() for ab, t in (("A", a), ("B", b))}
    expected = expected_weights(model, tensors, 8 / 4)
    merge_lora(model, save(state, tmp_path / "lora.pth"), alpha=8, r=4)
    check_merged(model, expected)


@pytest.mark.parametrize("weights_name", ["adapter_model.safetensors", "adapter_model.bin"])
def test_merge_peft_directory(tmp_path, weights_name):
    model = tiny_llama()
    targets = [("self_attn", "q_proj"), ("self_attn", "v_proj")]
    tensors = lora_tensors(model, rank=4, targets=targets)
    state = {f"base_model.model.model.layers.{i}.{m}.{p}.lora_{ab}.weight": t
             for (i, m, p), (a, b) in tensors.items() for ab, t in (("A", a), ("B", b))}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "lora_alpha": 16, "r": 4, "target_modules": ["q_proj", "v_proj"]}))
    save(state, adapter / weights_name)
    expected = expected_weights(model, tensors, 16 / 4)
    summary = merge_lora(model, adapter)  # alpha and r come from the config, not the defaults
    assert (summary.merged, summary.alpha, summary.r, summary.scale) == (4, 16.0, 4, 4.0)
    check_merged(model, expected)


def test_peft_target_modules_checked(tmp_path):
    model = tiny_llama()
    tensors = lora_tensors(model, rank=4)
    state = {f"base_model.model.model.layers.{i}.{m}.{p}.lora_{ab}.weight": t
             for (i, m, p), (a, b) in tensors.items() for ab, t in (("A", a), ("B", b))}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"lora_alpha": 16, "r": 4, "target_modules": ["q_proj", "v_proj"]}))
    save(state, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="down_proj.*target_modules"):
        merge_lora(model, adapter)


def _flat_lora(model, rank=16):
    tensors = lora_tensors(model, rank=rank)
    return {f"model.layers.{i}.{m}.{p}.lora_{ab}.weight": t
            for (i, m, p), (a, b) in tensors.items() for ab, t in (("A", a), ("B", b))}


def _break_unknown(state):
    state["model.layers.0.self_attn.foo_proj.lora_A.weight"] = torch.zeros(16, HIDDEN)
    state["model.layers.0.self_attn.foo_proj.lora_B.weight"] = torch.zeros(HIDDEN, 16)
    return "unknown module 'model.layers.0.self_attn.foo_proj'"


def _break_shape(state):
    state["model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.zeros(16, HIDDEN + 1)
    return r"model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight.*shape"


def _break_orphan(state):
    del state["model.layers.1.mlp.down_proj.lora_B.weight"]
    return r"'model\.layers\.1\.mlp\.down_proj\.lora_A\.weight' has no matching lora_B"


def _break_nan(state):
    state["model.layers.0.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    return r"'model\.layers\.0\.self_attn\.v_proj\.lora_B\.weight' contains NaN"


def _break_rank(state):
    state["model.layers.0.self_attn.v_proj.lora_A.weight"] = torch.zeros(8, HIDDEN)
    state["model.layers.0.self_attn.v_proj.lora_B.weight"] = torch.zeros(HIDDEN // 2, 8)
    return "rank 8, but r=16"


def _break_layer(state):
    state["model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(16, HIDDEN)
    state["model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(HIDDEN, 16)
    return "names layer 7, but the model has 2 layers"


def _break_router(state):
    state["model.layers.0.router_mlp.weight_predictor.bias"] = torch.zeros(2)
    return "unexpected key 'model.layers.0.router_mlp.weight_predictor.bias'.*skipgpt convert"


@pytest.mark.parametrize("breaker", [_break_unknown, _break_shape, _break_orphan, _break_nan,
                                     _break_rank, _break_layer, _break_router])
def test_lora_errors_leave_model_untouched(tmp_path, breaker):
    model = tiny_llama()
    state = _flat_lora(model)
    pattern = breaker(state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save(state, tmp_path / "bad_lora.safetensors")
    with pytest.raises(CheckpointError, match=rf"bad_lora\.safetensors.*{pattern}"):
        merge_lora(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_directory_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        merge_lora(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16, "r": 4}))
    with pytest.raises(CheckpointError, match="no adapter_model"):
        merge_lora(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(CheckpointError, match="lora_alpha"):
        merge_lora(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"lora_alpha": 16, "r": 4, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        merge_lora(model, tmp_path)


# ----------------------------------------------------------------------------- skipgpt convert

def finetuned_state(model, stage):
    """A full finetuned state dict as training saves it: base weights, routers, stage-2 LoRA
    (PEFT-wrapped: `base_model.model.` prefix, `.block`, `.default` adapter name)."""
    prefix = "base_model.model." if stage == "stage2" else ""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    state.update(router_state(prefix=prefix))
    if stage == "stage2":
        for (i, m, p), (a, b) in lora_tensors(model, rank=16).items():
            state[f"{prefix}model.layers.{i}.block.{m}.{p}.lora_A.default.weight"] = a
            state[f"{prefix}model.layers.{i}.block.{m}.{p}.lora_B.default.weight"] = b
    return state


@pytest.mark.parametrize("fmt", [None, "safetensors", "pth"])
def test_convert_stage2(tmp_path, capsys, fmt):
    model = tiny_llama()
    ckpt = save(finetuned_state(model, "stage2"), tmp_path / "model.pth")
    out = tmp_path / "out"
    argv = ["convert", "--ckpt", str(ckpt), "--output", str(out), "--stage", "stage2"]
    assert main(argv + (["--format", fmt] if fmt else [])) == 0
    suffix = ".pth" if fmt == "pth" else ".safetensors"
    assert sorted(p.name for p in out.iterdir()) == [f"lora{suffix}", f"router{suffix}"]
    assert str(out / f"router{suffix}") in capsys.readouterr().out

    routers = load_routers(out / f"router{suffix}")
    for k, v in router_state().items():
        assert torch.equal(routers.tensors[k], v)
    expected = expected_weights(model, lora_tensors(model, rank=16), 2.0)
    assert merge_lora(model, out / f"lora{suffix}").merged == 6
    check_merged(model, expected)


def test_convert_stage1(tmp_path):
    model = tiny_llama()
    ckpt = save(finetuned_state(model, "stage1"), tmp_path / "model.safetensors")
    out = tmp_path / "out"
    assert main(["convert", "--ckpt", str(ckpt), "--output", str(out), "--stage", "stage1"]) == 0
    assert [p.name for p in out.iterdir()] == ["router.safetensors"]
    attach_routers(tiny_llama(), out / "router.safetensors")


def test_convert_errors(tmp_path, capsys):
    model = tiny_llama()
    out = str(tmp_path / "out")
    missing = tmp_path / "missing.pth"
    assert main(["convert", "--ckpt", str(missing), "--output", out, "--stage", "stage1"]) == 1
    assert "missing.pth" in capsys.readouterr().err

    base_only = save(dict(model.state_dict()), tmp_path / "base.pth")
    assert main(["convert", "--ckpt", str(base_only), "--output", out, "--stage", "stage1"]) == 1
    err = capsys.readouterr().err
    assert "base.pth" in err and "no router keys" in err

    stage1 = save(finetuned_state(model, "stage1"), tmp_path / "s1.pth")
    assert main(["convert", "--ckpt", str(stage1), "--output", out, "--stage", "stage2"]) == 1
    assert "no LoRA keys" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "convert" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    assert all(flag in text for flag in ("--ckpt", "--output", "--stage", "--format"))


# ----------------------------------------------------------------------------- corrupted files (issue 10)

def _record_data_offset(path: Path, suffix: str) -> tuple[str, int]:
    """(name, byte offset of the data) of the zip record of a torch.save file ending in `suffix`."""
    import struct
    import zipfile

    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.filename, info.header_offset + 30 + name_len + extra_len


def _flip_byte(src: Path, dst: Path, offset: int) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset] ^= 0x40
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.parametrize("record", ["data/0", "data.pkl"])
def test_corrupted_pth_record_fails_its_crc(tmp_path, record):
    # torch.load itself ignores the zip CRCs: a flipped bit in tensor bytes would load silently.
    good = save(router_state(), tmp_path / "good.pth")
    name, offset = _record_data_offset(good, record)
    bad = _flip_byte(good, tmp_path / "bad.pth", offset + 5)
    with pytest.raises(CheckpointError, match=rf"bad\.pth.*corrupted.*CRC-32.*{re.escape(name)}"):
        load_routers(bad)
    model = tiny_llama()
    lora = save(_flat_lora(model), tmp_path / "lora.pth")
    name, offset = _record_data_offset(lora, "data/3")
    bad_lora = _flip_byte(lora, tmp_path / "bad_lora.pth", offset + 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"bad_lora\.pth.*CRC-32.*{re.escape(name)}"):
        merge_lora(model, bad_lora)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pth_saved_without_crcs_still_loads(tmp_path):
    # torch.save can skip CRCs (records then store 0); those files stay readable.
    torch.serialization.set_crc32_options(False)
    try:
        path = save(router_state(), tmp_path / "nocrc.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_routers(path).num_layers == 2


def test_corrupted_safetensors_header(tmp_path):
    good = save(router_state(), tmp_path / "good.safetensors")
    # The header's length field, then the JSON header's opening brace.
    for offset, name in ((3, "len.safetensors"), (8, "json.safetensors")):
        bad = _flip_byte(good, tmp_path / name, offset)
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*truncated or corrupted"):
            load_routers(bad)
    # A flip inside a key name reads as a key that does not belong, named with the file.
    header = good.read_bytes()[:2000]
    bad = _flip_byte(good, tmp_path / "key.safetensors", header.index(b"model.layers.1") + 5)
    with pytest.raises(CheckpointError, match=r"key\.safetensors: unexpected key 'model.layers.1.router_"):
        load_routers(bad)


def test_corrupted_safetensors_data_is_caught_as_nan(tmp_path):
    # safetensors has no checksum; damage that turns a weight into NaN is still refused, naming
    # the key it hit.
    key = "model.layers.1.router_mlp.weight_predictor.bias"
    state = {key: torch.ones(2)}
    state.update({k: v for k, v in router_state().items() if k != key})
    good = save(state, tmp_path / "good.safetensors")
    raw = bytearray(good.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    begin, _ = json.loads(raw[8: 8 + header_len])[key]["data_offsets"]
    raw[8 + header_len + begin: 8 + header_len + begin + 4] = b"\x00\x00\xc0\x7f"  # float32 NaN
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: key '{re.escape(key)}' contains NaN"):
        load_routers(bad)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_lora_leaves_model_untouched(tmp_path, suffix):
    model = tiny_llama()
    good = save(_flat_lora(model), tmp_path / f"good{suffix}")
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"bad\{suffix}.*truncated or corrupted"):
        merge_lora(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- malicious pickles (issue 10)

class _RunsCode:
    """Unpickling this calls `_write_marker`, a function (not a class) that writes a file: the
    stand-in for arbitrary code a .pth could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def _write_marker(path):
    Path(path).write_text("code ran")
    return torch.zeros(2)


def _evil_state(marker):
    state = router_state()
    state["model.layers.0.router_attention.weight_predictor.bias"] = _RunsCode(marker)
    return state


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_pickle_function_call_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(_evil_state(marker), path, _use_new_zipfile_serialization=(fmt == "zip"))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load"):
        load_routers(path)
    assert not marker.exists()


def test_malicious_pickle_refused_everywhere(tmp_path, capsys):
    """The PEFT adapter's .bin, `skipgpt convert` and `skipgpt.wrap` all refuse it unrun."""
    import skipgpt

    marker = tmp_path / "pwned"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16, "r": 4}))
    torch.save(_evil_state(marker), adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: refused"):
        merge_lora(tiny_llama(), adapter)

    evil = tmp_path / "evil.bin"
    torch.save(_evil_state(marker), evil)
    assert main(["convert", "--ckpt", str(evil), "--output", str(tmp_path / "out"), "--stage", "stage1"]) == 1
    assert "evil.bin: refused" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"evil\.bin: refused"):
        skipgpt.wrap(tiny_llama(), router=evil)
    assert not marker.exists()


# ----------------------------------------------------------------------------- malformed contents (issue 10)

def test_non_tensor_entry(tmp_path):
    state = router_state()
    state["model.layers.0.router_mlp.weight_predictor.bias"] = [0.0, 1.0]
    with pytest.raises(CheckpointError, match=r"r\.pth: entry 'model\.layers\.0\.router_mlp\.weight_predictor"
                                              r"\.bias' is a list, not a tensor"):
        load_routers(save(state, tmp_path / "r.pth"))


def test_integer_router_tensor(tmp_path):
    state = router_state()
    key = "model.layers.1.router_attention.weight_predictor.weight"
    state[key] = torch.ones(2, HIDDEN, dtype=torch.int64)
    with pytest.raises(CheckpointError, match=rf"r\.safetensors: key '{re.escape(key)}' has dtype torch\.int64"):
        load_routers(save(state, tmp_path / "r.safetensors"))


@pytest.mark.parametrize("kind, key, bad", [
    ("linear", "model.layers.1.router_mlp.weight_predictor.weight", torch.zeros(2, HIDDEN // 2)),
    ("linear", "model.layers.0.router_mlp.weight_predictor.weight", torch.zeros(2 * HIDDEN)),
    ("linear", "model.layers.1.router_attention.weight_predictor.bias", torch.tensor(0.0)),
    ("mlp", "model.layers.1.router_mlp.weight_predictor.0.weight", torch.zeros(HIDDEN // 2, HIDDEN)),
    ("mlp", "model.layers.0.router_attention.weight_predictor.2.weight", torch.zeros(3, HIDDEN // 4)),
])
def test_wrong_router_shapes(tmp_path, kind, key, bad):
    state = router_state(kind=kind)
    state[key] = bad
    with pytest.raises(CheckpointError, match=rf"r\.pth: key '{re.escape(key)}' has shape {re.escape(str(tuple(bad.shape)))}"):
        load_routers(save(state, tmp_path / "r.pth"))


@pytest.mark.parametrize("kind, key, where", [
    ("linear", "model.layers.0.router_attention.weight_predictor.bias", (1,)),
    ("mlp", "model.layers.1.router_mlp.weight_predictor.0.weight", (3, 5)),
    ("mlp", "model.layers.0.router_attention.weight_predictor.2.bias", (0,)),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_router_values(tmp_path, kind, key, where, bad):
    state = router_state(kind=kind, prefix="base_model.model.")
    state["base_model.model." + key][where] = bad
    with pytest.raises(CheckpointError, match=rf"r\.pth: key 'base_model\.model\.{re.escape(key)}' contains NaN or Inf"):
        load_routers(save(state, tmp_path / "r.pth"))


@pytest.mark.parametrize("matrix", ["lora_A", "lora_B"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_lora_values(tmp_path, matrix, bad):
    model = tiny_llama()
    state = _flat_lora(model)
    key = f"model.layers.1.mlp.down_proj.{matrix}.weight"
    state[key][0, 1] = bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"l\.pth: key '{re.escape(key)}' contains NaN or Inf"):
        merge_lora(model, save(state, tmp_path / "l.pth"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- another model's routers (issue 10)

@pytest.mark.parametrize("other, what", [(dict(hidden=32), "hidden size 32"), (dict(layers=3), "cover 3 layers")])
def test_routers_of_another_model_leave_it_untouched(tmp_path, other, what):
    """skipgpt.wrap checks the routers before it merges LoRA or wraps a layer: a router file of
    another model fails, naming the file and a key, and the model is as it was."""
    import skipgpt
    from skipgpt.layer import RoutedDecoderLayer

    model = tiny_llama()
    routers = save(router_state(**other), tmp_path / "other.pth")
    lora = save(_flat_lora(model), tmp_path / "lora.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        skipgpt.wrap(model, router=routers, lora=lora, pipeline="torch-sparse")
    msg = str(err.value)
    assert "other.pth" in msg and what in msg and "model.layers." in msg and "weight_predictor.weight" in msg
    assert "saved for another model" in msg
    assert not any(isinstance(layer, RoutedDecoderLayer) for layer in model.model.layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # The same files fit the model they were made for.
    skipgpt.wrap(tiny_llama(**other), router=routers, pipeline="torch-sparse")
