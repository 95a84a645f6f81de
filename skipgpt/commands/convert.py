"""`skipgpt convert`: split a finetuned SkipGPT state dict into router (and LoRA) files.

    skipgpt convert --ckpt model.pth --output DIR --stage stage1|stage2 [--format safetensors|pth]

writes DIR/router.safetensors (stage1 and stage2) and DIR/lora.safetensors (stage2), or `.pth`
files with `--format pth`. Base-model weights in the checkpoint are dropped: they come from the
base model at load time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint import CheckpointError, read_state_dict, split_finetuned, write_state_dict

_SUFFIX = {"safetensors": ".safetensors", "pth": ".pth"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="split a finetuned checkpoint into router and LoRA files",
        description="Split a finetuned SkipGPT full state dict (routers, LoRA for stage 2, base "
                    "weights) into DIR/router.* and, for stage 2, DIR/lora.*. Base weights are "
                    "dropped.")
    parser.add_argument("--ckpt", required=True, type=Path,
                        help="finetuned checkpoint (.pth/.pt/.bin, loaded weights-only, or "
                             ".safetensors)")
    parser.add_argument("--output", required=True, type=Path,
                        help="output directory (created if missing)")
    parser.add_argument("--stage", required=True, choices=["stage1", "stage2"],
                        help="stage1: routers only; stage2: routers and LoRA weights")
    parser.add_argument("--format", default="safetensors", choices=sorted(_SUFFIX),
                        help="file format to write (default: safetensors)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Returns the exit status: 0 on success, 1 on a bad checkpoint (message on stderr)."""
    try:
        written = convert(args.ckpt, args.output, args.stage, args.format)
    except (CheckpointError, FileNotFoundError) as e:
        # A command's errors are its user-facing output, so they go to stderr directly rather
        # than through logging (which the caller may not have configured).
        print(f"skipgpt convert: error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def convert(ckpt: Path, output: Path, stage: str, fmt: str = "safetensors") -> list[Path]:
    """Split `ckpt` into files under `output`; returns the paths written."""
    state = read_state_dict(ckpt)
    routers, lora, _ = split_finetuned(state, stage, str(ckpt))
    output.mkdir(parents=True, exist_ok=True)
    suffix = _SUFFIX[fmt]
    written = [write_state_dict(routers, output / f"router{suffix}")]
    if stage == "stage2":
        written.append(write_state_dict(lora, output / f"lora{suffix}"))
    return written
