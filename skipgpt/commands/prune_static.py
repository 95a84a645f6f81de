"""`skipgpt prune-static`: the ShortGPT-style static baseline as a router file.

    skipgpt prune-static --model PATH --skip 0.25 [--mlp-skip RATE] [--data wiki] --output FILE

Scores every attention and MLP module on calibration text, drops the least important ones and
writes forced routers that skip exactly those modules for every token (skipgpt/static_pruning.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import positive_int, rate

DESCRIPTION = """\
Build the static-pruning baseline (ShortGPT-style) at a given compute: score each module by
1 - mean cosine similarity between the residual stream before and after it (dense model,
calibration text), drop the round(SKIP * layers) lowest-scoring attention modules and likewise
MLP modules, and write FILE: forced routers (zero weights, bias (0, 1) = always skip or
(1, 0) = always execute) that any pipeline, `skipgpt.load(router=FILE)` and
`skipgpt eval --router FILE` run unchanged. A report with the scores and the dropped layers
goes next to it (FILE with suffix .json).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune-static",
        help="write router files that realize the static-pruning (ShortGPT-style) baseline",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="PATH", help="Hugging Face model folder")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="router file to write (.safetensors, or .pth); the report goes to FILE with suffix .json")
    p.add_argument("--skip", type=rate, default=0.25,
                   help="share of attention modules to drop (and of MLP modules, unless --mlp-skip) (default 0.25)")
    p.add_argument("--mlp-skip", type=rate, default=None, metavar="RATE",
                   help="share of MLP modules to drop (default: --skip)")
    p.add_argument("--data", default="wiki", metavar="FILE_OR_wiki",
                   help="calibration text: a .txt or .jsonl file, or `wiki` (offline Wikipedia train split; default)")
    p.add_argument("--samples", type=positive_int, default=16, help="calibration rows (default 16)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration row (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="model dtype (default auto: bf16 on CUDA, fp32 on CPU)")
    p.set_defaults(func=run)
    return p


def _check(args: argparse.Namespace) -> str | None:
    """The first problem with the flags, or None; checked before any model loads."""
    if not (Path(args.model) / "config.json").is_file():
        return f"--model: {args.model} is not a Hugging Face model folder (no config.json)"
    if args.data == "wiki":
        from skipgpt import assets

        try:
            assets.wiki_path()
        except assets.AssetMissingError as e:
            return f"--data wiki: {e}"
    elif not Path(args.data).is_file():
        return f"--data: file not found: {args.data} (or pass `wiki`)"
    if Path(args.output).suffix.lower() not in (".safetensors", ".pth", ".pt", ".bin"):
        return f"--output: {args.output}: expected a .safetensors (or .pth) file name"
    if Path(args.output).is_dir():
        return f"--output: {args.output} is a directory; give a file name"
    from skipgpt.training import resolve_device

    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        return f"--device: {e}"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"skipgpt prune-static: error: {problem}", file=sys.stderr)
        return 2
    from skipgpt.static_pruning import prune_static

    report = prune_static(args.model, args.output, skip=args.skip, mlp_skip=args.mlp_skip, data=args.data,
                          samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                          device=args.device, dtype=args.dtype)
    for module in ("attention", "mlp"):
        print(f"{module}: dropped layers {report['dropped'][module]} "
              f"(skip {report['realized_skip'][module]:.3f} of the modules)")
    print(report["router_file"])
    print(Path(report["router_file"]).with_suffix(".json"))
    return 0
