"""`python -m skipgpt`: the `skipgpt` command line, which also accepts the published SkipGPT
project's `inference.py` flags, for people migrating:

    python -m skipgpt --model_path M --router_path R --lora_path L --save_path OUT \\
        --forward_impl torch|triton [--sparse] --task wikitext --batch_size N
    python -m skipgpt --model_path M --save_path OUT --task inference_throughput \\
        --batch_size N --sparsity 0.25 --inference_mode prefill|decode

Such a command is translated (and the translation printed, so users learn the new one):
`--task inference_throughput` runs the layer benchmark (`python -m skipgpt.benchmark`); any
other task runs `skipgpt eval` with that lm-eval task (wikitext is lm-eval's own, which needs
the Hugging Face Hub; skipgpt_wiki is the offline one). `--forward_impl torch|triton` with
`--sparse` picks torch-sparse / triton-sparse, without it dense; `--save_path` becomes
`--output`. Flags of the new command line given alongside (say `--limit 2`) pass through.
Without any published flag, this is exactly `skipgpt ...`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional

LEGACY_FLAGS = (
    "--model_path", "--router_path", "--lora_path", "--save_path", "--forward_impl", "--sparse", "--task",
    "--batch_size", "--sparsity", "--inference_mode",
)
THROUGHPUT_TASK = "inference_throughput"


def is_legacy(argv: list[str]) -> bool:
    """True when argv uses a flag of the published project (`--flag` or `--flag=value`)."""
    return any(arg.split("=", 1)[0] in LEGACY_FLAGS for arg in argv)


def _legacy_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--task` must not swallow the new command line's `--tasks`, which
    # passes through untouched.
    p = argparse.ArgumentParser(prog="python -m skipgpt", allow_abbrev=False,
                                description="The published SkipGPT inference.py flags (translated; see the module doc).")
    p.add_argument("--model_path")
    p.add_argument("--router_path")
    p.add_argument("--lora_path")
    p.add_argument("--save_path")
    p.add_argument("--forward_impl", choices=("torch", "triton"), default="torch")
    p.add_argument("--sparse", action="store_true")
    p.add_argument("--task", default="wikitext")
    p.add_argument("--batch_size", nargs="+", default=None)
    p.add_argument("--sparsity", nargs="+", default=None)
    p.add_argument("--inference_mode", choices=("prefill", "decode"), default="prefill")
    return p


def _join_values(values: Optional[list[str]]) -> Optional[str]:
    """`--batch_size 1 4` and `--batch_size 1,4` both become "1,4"."""
    if values is None:
        return None
    return ",".join(v for value in values for v in value.split(",") if v)


def translate(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """Translate published-project flags.

    Returns (target, new_argv, notes): target "skipgpt" (new_argv goes to `skipgpt.cli.main`)
    or "benchmark" (new_argv goes to `skipgpt.benchmark.main`), and notes on flags the new
    command has no use for.
    """
    args, passthrough = _legacy_parser().parse_known_args(argv)
    notes = []
    batch = _join_values(args.batch_size)
    sparsity = _join_values(args.sparsity)
    if args.task == THROUGHPUT_TASK:
        new = ["--mode", args.inference_mode]
        if batch:
            new += ["--batch-sizes", batch]
        if sparsity:
            new += ["--skips", sparsity]
        if args.save_path:
            new += ["--json", os.path.join(args.save_path, f"{THROUGHPUT_TASK}.json")]
        ignored = [flag for flag, value in (("--model_path", args.model_path), ("--router_path", args.router_path),
                                            ("--lora_path", args.lora_path)) if value]
        if ignored:
            notes.append(f"{', '.join(ignored)} not used: the layer benchmark times one decoder layer with random "
                         "weights at a named geometry (--geometry, default llama-3.1-8b) under forced routes")
        if args.sparse or any(a.split("=", 1)[0] == "--forward_impl" for a in argv):
            notes.append("--forward_impl/--sparse not used: the benchmark times every pipeline (--providers)")
        return "benchmark", new + passthrough, notes

    new = ["eval"]
    if args.model_path:
        new += ["--model", args.model_path]
    if args.router_path:
        new += ["--router", args.router_path]
    if args.lora_path:
        new += ["--lora", args.lora_path]
    new += ["--pipeline", f"{args.forward_impl}-sparse" if args.sparse else "dense", "--tasks", args.task]
    if batch:
        if "," in batch:
            raise SystemExit(f"python -m skipgpt: --batch_size: evaluation takes one batch size, got {batch}")
        new += ["--batch-size", batch]
    if args.save_path:
        new += ["--output", args.save_path]
    if sparsity:
        notes.append("--sparsity not used: it sets the benchmark's forced skip rate (--task inference_throughput); "
                     "in evaluation the routers decide (or --skip RATE forces random routes)")
    return "skipgpt", new + passthrough, notes


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import cli

    if not is_legacy(argv):
        return cli.main(argv)
    target, new, notes = translate(argv)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    shown = ["skipgpt", *new] if target == "skipgpt" else ["python", "-m", "skipgpt.benchmark", *new]
    print(f"python -m skipgpt: published-project flags translated; the same run with the current command line:\n"
          f"    {shlex.join(shown)}", file=sys.stderr)
    if target == "benchmark":
        from . import benchmark

        json_path = new[new.index("--json") + 1] if "--json" in new else None
        if json_path:
            os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
        return int(benchmark.main(new) or 0)
    return cli.main(new)


if __name__ == "__main__":
    sys.exit(main())
