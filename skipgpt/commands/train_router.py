"""`skipgpt train-router`: train SkipGPT routers (stage 1) or LoRA under frozen routers (stage 2).

    skipgpt train-router --model PATH --data FILE_OR_wiki --target-skip 0.25 --steps N
                         --batch-size B --seq-len L [--lr 2e-3] [--router-kind linear|mlp]
                         [--lambda 20] [--tau-start 5 --tau-end 1] [--lora R --router PATH]
                         [--device D] [--dtype D] --output DIR

Every flag is checked (paths, ranges, device) before the model loads. The method is described
in skipgpt/training.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import positive_int, show_progress_messages

DESCRIPTION = """\
Train SkipGPT routers for a Hugging Face Llama-family model whose weights stay frozen.

Stage 1 (default): two routers per layer (attention, MLP), both reading the layer input, make
straight-through Gumbel-softmax decisions (hard 0/1 forward, soft gradient), temperature
annealed from --tau-start to --tau-end. Loss: next-token cross-entropy
+ LAMBDA * |mean execute probability - (1 - TARGET_SKIP)|, the mean taken over every router
and token. Writes DIR/router.safetensors (what `skipgpt.load(router=...)` and
`skipgpt eval --router` read) and DIR/train_config.json (config, final metrics, per-step
history). After saving, the routers are loaded into a fresh copy of the model with
skipgpt.wrap (torch-sparse) and the realized skip on held-out rows is compared with the
trained model's argmax decisions; both are reported.

Stage 2 (--lora R --router FILE): LoRA adapters of rank R on q,k,v,o,gate,up,down trained with
the routers of FILE frozen (argmax decisions); writes DIR/lora/ (a PEFT-style adapter
directory for `--lora`) and a copy of the routers.

Data: a text file (one document), a JSONL file (one document a line: a string or an object
with "text" or "page"), or `wiki` (the offline Wikipedia train split from `skipgpt setup`;
the validation split is then the held-out set, else the last 10% of the rows).
"""

EPILOG = """\
examples:
  skipgpt train-router --model PATH --data wiki --target-skip 0.25 --steps 1000 \\
      --batch-size 16 --seq-len 512 --output routers/skip25
  skipgpt train-router --model PATH --data wiki --target-skip 0.25 --steps 300 \\
      --lora 16 --router routers/skip25/router.safetensors --output routers/skip25-lora
"""


class UsageError(Exception):
    """A bad flag value, found before any model loads: one message, exit status 2."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-router",
        help="train SkipGPT routers (stage 1) or LoRA with frozen routers (stage 2)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="PATH",
                   help="Hugging Face model folder (Llama, Mistral, Qwen2, Qwen3); its weights stay frozen")
    p.add_argument("--data", required=True, metavar="FILE_OR_wiki",
                   help="training text: a .txt file, a .jsonl file, or `wiki` (offline Wikipedia train split)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--target-skip", type=float, default=0.25, metavar="RATE",
                   help="target share of (token, module) pairs that skip, in [0, 1) (default 0.25)")
    p.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per step (default 8)")
    p.add_argument("--seq-len", type=positive_int, default=512,
                   help="tokens per row; documents are joined with EOS and cut into rows (default 512)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default 2e-3 for routers, 2e-4 for --lora)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="linear learning-rate warmup steps, then constant (default 0)")
    p.add_argument("--router-kind", choices=["linear", "mlp"], default="linear",
                   help="linear: Linear(H, 2), the published format; mlp: Linear(H, H/4)-ReLU-Linear(H/4, 2) "
                        "(default linear)")
    p.add_argument("--lambda", dest="lam", type=float, default=20.0, metavar="LAMBDA",
                   help="weight of the sparsity penalty |mean execute probability - (1 - target)| (default 20)")
    p.add_argument("--tau-start", type=float, default=5.0, help="Gumbel-softmax temperature at the first step (default 5)")
    p.add_argument("--tau-end", type=float, default=1.0, help="temperature at the last step (default 1)")
    p.add_argument("--tau-schedule", choices=["linear", "exp"], default="linear",
                   help="temperature annealing: linear or exponential (geometric) (default linear)")
    p.add_argument("--init-execute", type=float, default=0.95, metavar="P",
                   help="initial execute probability of every token (zero router weights, bias set) (default 0.95)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop training after this many seconds (then save and check as usual; the temperature "
                        "schedule still follows --steps)")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="train routers on the raw residual stream instead of per-feature standardized inputs "
                        "(the standardization is folded into the saved weights either way)")
    p.add_argument("--seed", type=int, default=0, help="seed of router init, data order and Gumbel noise (default 0)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="held-out perplexity and skip (argmax decisions) every N steps; 0: at the end only")
    p.add_argument("--eval-batches", type=positive_int, default=8,
                   help="held-out batches used for validation and the final checks (default 8)")
    p.add_argument("--lora", type=positive_int, default=None, metavar="R",
                   help="stage 2: train LoRA adapters of rank R with the routers of --router frozen")
    p.add_argument("--lora-alpha", type=float, default=32.0,
                   help="LoRA alpha; the update is scaled by alpha / R (default 32)")
    p.add_argument("--router", metavar="FILE", default=None,
                   help="stage-1 router file (.safetensors or .pth) for --lora")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="base model dtype; routers and LoRA always train in fp32 (default auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--format", choices=["safetensors", "pth"], default="safetensors",
                   help="router file format (default safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


_FLAG = {"lam": "--lambda", "lora_rank": "--lora"}


def config_from_args(args: argparse.Namespace):
    """The checked TrainConfig, or UsageError."""
    from skipgpt.training import TrainConfig

    lr = args.lr if args.lr is not None else (2e-4 if args.lora else 2e-3)
    config = TrainConfig(
        target_skip=args.target_skip, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, router_kind=args.router_kind, lam=args.lam,
        tau_start=args.tau_start, tau_end=args.tau_end, tau_schedule=args.tau_schedule,
        init_execute=args.init_execute, standardize=args.standardize, seed=args.seed, time_limit=args.time_limit,
        eval_every=args.eval_every, eval_batches=args.eval_batches,
        lora_rank=args.lora, lora_alpha=args.lora_alpha,
    )
    try:
        config.check()
    except ValueError as e:
        # TrainConfig names the field first ("lam: ..."); say it with the flag's name.
        name, why = str(e).split(":", 1)
        raise UsageError(f"{_FLAG.get(name, '--' + name.replace('_', '-'))}:{why}") from None
    return config


def check_paths(args: argparse.Namespace) -> None:
    """Model folder, data, router and output: all checked before anything loads."""
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise UsageError(f"--model: {model} is not a Hugging Face model folder (no config.json)")
    if args.data == "wiki":
        from skipgpt import assets

        try:
            assets.wiki_path()
        except assets.AssetMissingError as e:
            raise UsageError(f"--data wiki: {e}") from None
    elif not Path(args.data).is_file():
        raise UsageError(f"--data: file not found: {args.data} (or pass `wiki`)")
    if args.lora is not None:
        if args.router is None:
            raise UsageError("--lora: stage 2 needs the stage-1 routers: --router FILE")
        if not Path(args.router).is_file():
            raise UsageError(f"--router: file not found: {args.router}")
        from skipgpt.checkpoint import CheckpointError, load_routers

        try:
            load_routers(args.router)
        except CheckpointError as e:
            raise UsageError(f"--router: {e}") from None
    elif args.router is not None:
        raise UsageError("--router is the frozen stage-1 routers of stage 2: use it with --lora R")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output: {output} exists and is not a directory")
    from skipgpt.training import resolve_device, resolve_dtype

    try:
        resolve_dtype(args.dtype, resolve_device(args.device))
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--device: {e}") from None


def run(args: argparse.Namespace) -> int:
    show_progress_messages()
    try:
        config = config_from_args(args)
        check_paths(args)
    except UsageError as e:
        print(f"skipgpt train-router: error: {e}", file=sys.stderr)
        return 2

    from skipgpt.training import CONFIG_FILE, run_training

    summary = run_training(args.model, args.data, args.output, config, router=args.router, device=args.device,
                           dtype=args.dtype, progress=not args.no_progress, fmt=args.format)
    _report(summary, Path(args.output) / CONFIG_FILE)
    return 0


def _report(summary: dict, config_path: Path) -> None:
    train = summary["metrics"]["train"]
    held = summary["metrics"]["held_out"]
    final = train["final"]
    print(f"stage {summary['stage']} on {summary['device']} ({summary['device_name']}, {summary['dtype']}): "
          f"{train['steps']} steps in {train['train_seconds']:.1f} s ({train['seconds_per_step']:.3f} s/step, "
          f"{train['tokens_per_second']:.0f} tokens/s)" + (" (stopped by --time-limit)" if train["stopped_early"] else ""))
    print(f"final (mean of the last {train['averaged_over_last_steps']} steps): loss {final['loss']:.4f}, "
          f"LM loss {final['lm_loss']:.4f}, skip attention {final['skip_attention']:.3f}, "
          f"MLP {final['skip_mlp']:.3f} (Gumbel samples)")
    trained, loaded = held["skip_training_argmax"], held["skip_inference_torch_sparse"]
    dense = held["perplexity_dense"]
    print(f"held-out ({held['source']}, {held['tokens']} tokens): perplexity {held['perplexity_routed_argmax']:.3f}"
          + (f" (dense {dense:.3f})" if dense else ""))
    print(f"held-out skip, argmax: trained attention {trained['attention']:.3f} MLP {trained['mlp']:.3f}; "
          f"loaded with skipgpt.wrap (torch-sparse) attention {loaded['attention']:.3f} MLP {loaded['mlp']:.3f} "
          f"(max difference {held['skip_agreement']['max_abs_difference']:.4f})")
    print(summary["router_file"])
    if summary["lora_dir"]:
        print(summary["lora_dir"])
    print(config_path)
