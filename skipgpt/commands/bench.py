"""`skipgpt bench`: time every pipeline, eager and compiled, on one decoder layer or a whole
model, check each against a float32 ground truth first, and write a table, CSV, JSON and plots.

    skipgpt bench --mode prefill|decode|generate --scope layer|model --batch-size N[,N...]
                  --sparsity S[,S...] --seqlens L[,L...] --providers P[,P...]
                  [--prompt-len L[,L...] --new-tokens N] (generate)
                  [--model PATH | --config NAME] [--layers N] [--cuda-graph]
                  [--baseline-published PATH] [--warmup MS] [--rep MS] [--rounds N] [--paired | --steady] [--output DIR]

The measuring lives in skipgpt/benchmark.py; this module checks the flags (all of them, before
any model is built), runs the grid and writes the results. `python -m skipgpt.benchmark` is the
same command (`module_main`) with no output folder unless --output is given.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .. import benchmark as B
from . import device_name, package_versions, positive_int, rate

DEFAULT_OUTPUT = "skipgpt-bench-out"
# Grids when nothing is given. GPU: the recorded grids of docs/BENCHMARKS.md. CPU: shapes that
# finish in seconds on the tiny geometry.
GPU_DEFAULTS = dict(batches=[1, 4, 8], seqlens=[512, 2048, 8192], skips=[0.0, 0.25, 0.5])
CPU_DEFAULTS = dict(batches=[1, 2], seqlens=[16, 64, 256], skips=[0.0, 0.25, 0.5])
# --mode generate: batch sizes, prompt length and tokens generated per sequence.
GPU_GENERATE = dict(batches=[1, 8], prompt_len=[128], new_tokens=128)
CPU_GENERATE = dict(batches=[1, 2], prompt_len=[16], new_tokens=16)
EAGER_PROVIDERS = ("hf", "dense", "torch-sparse", "triton-sparse")
DEFAULT_ROUNDS = 3
ALL_PROVIDERS = (*B.PROVIDERS, B.PUBLISHED)

DESCRIPTION = """\
Time SkipGPT pipelines on one decoder layer (--scope layer) or a whole model (--scope model), at
every combination of batch size, skip rate and sequence length (prefill: tokens per sequence;
decode: KV length before the step, --decode-steps consecutive one-token steps per point, time
per step). Weights are random and routes are seeded random ones at the requested skip rate, for
attention and MLP alike, so no downloaded model is needed.

Providers: hf (the Hugging Face layer/model: the dense baseline), dense, torch-sparse,
triton-sparse (skipgpt's pipelines), compiled-dense, compiled-sparse (the same under
torch.compile), and published-triton-sparse with --baseline-published.

Before timing, every provider's output is compared with torch-sparse computed in float32 (on an
fp32 copy of the weights) under the same routes; hf, dense and compiled-dense only at skip 0,
where they compute the same function. A provider that disagrees is reported as wrong and not
timed. Failures (out of memory, not capturable, no working compiler) are reported per point and
the run goes on.

Per point: median time and its 20%/80% quantiles (each the median over --rounds interleaved
timing rounds), dense-equivalent TFLOP/s (projections,
attention and MLP FLOPs of the dense layers, as the published benchmark counts them), speedup
over hf at the same point of the same run, the relative error, and for sparse providers the skip
rate the routes realized ("skipped": at batch 1 a decode point draws few decisions, so it strays
from the requested rate). Printed as a table and
written to --output as SCOPE-MODE.csv, SCOPE-MODE.json (with device, versions, git commit (or
$SKIPGPT_SOURCE_COMMIT, for a copied tree with stale git metadata), command line and date),
SCOPE-MODE-time.png and SCOPE-MODE-tflops.png (vs sequence length, one
line per provider, one panel per batch size and skip rate).

--mode generate times model.generate() on a whole model (--scope model): greedy, --new-tokens
tokens after a random prompt of --prompt-len tokens (min_new_tokens = max_new_tokens, so EOS
never stops it early). Eager providers use the default cache; compiled-dense and compiled-sparse
are transformers' compiled generation: a static cache, the decode step compiled by generate()
(mode "reduce-overhead": CUDA graphs), the prefill eager (see skipgpt.compile). Per point:
tokens/s (batch * new tokens / median generate time), generate time, prefill time (generate() of
one token) and one decode step ((generate - prefill) / (new tokens - 1)), speedup over hf. The
check before timing: every generated token must be the float32 ground truth's greedy choice
given the sequence so far, up to rounding ("greedy gap": logit margin to the best token over the
logits' standard deviation; at most 0.5, or for sparse providers in bf16/fp16 3x the gap of
torch-sparse run in that dtype, since a routed model's own rounding flips near-tied tokens: the
check is weak where that gap is large, as the JSON's tolerance shows). Files: model-generate.csv/.json, -tokens.png (tokens/s) and
-step.png (decode step ms), one panel per skip rate, batch sizes on the x axis.

On a CUDA device: bfloat16, timed with triton.testing.do_bench (--paired: CUDA events around each
step; --steady: the host's clock around blocks of back-to-back steps). Without CUDA it says so and runs
the tiny geometry in float32 on the CPU paths (a small grid, eager providers, wall-clock timing)
unless told otherwise.
"""

EPILOG = """\
examples:
  skipgpt bench --mode prefill --batch-size 1,4,8 --seqlens 512,2048,8192 --sparsity 0,0.25,0.5
  skipgpt bench --mode decode --cuda-graph --batch-size 1,8,64 --seqlens 2048,16384 --providers hf,dense,triton-sparse
  skipgpt bench --scope model --layers 4 --mode decode --batch-size 1,8 --seqlens 2048 --sparsity 0.25
  skipgpt bench --scope model --model ./llama-3.1-8b --mode prefill --batch-size 1 --seqlens 2048
  skipgpt bench --mode generate --batch-size 1,8 --prompt-len 128 --new-tokens 128 --sparsity 0.25 \
      --providers hf,dense,triton-sparse,compiled-dense,compiled-sparse
"""


class BenchError(Exception):
    """A user error found before any model is built: one message, exit status 2."""


# ---------------------------------------------------------------------------- flags


def _list_of(item_type):
    """argparse type: comma-separated values of `item_type` (which checks each one), in the
    order given, without repeats."""

    def parse(text: str):
        values = [item_type(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        return list(dict.fromkeys(values))

    return parse


_positive_ints = _list_of(positive_int)
_rates = _list_of(rate)


def _providers(text: str) -> list[str]:
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [n for n in names if n not in B.PROVIDERS]
    if B.PUBLISHED in unknown:
        raise argparse.ArgumentTypeError(f"{B.PUBLISHED} is added by --baseline-published PATH")
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown provider(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(B.PROVIDERS)}")
    return names


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of milliseconds, got {value:g}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark the pipelines on a layer or a model (table, CSV, JSON, plots)",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, default_output=DEFAULT_OUTPUT)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser, default_output: Optional[str]) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--mode", choices=("prefill", "decode", "generate"), default="prefill",
                   help="prefill: one forward over SEQLEN new tokens per sequence; decode: "
                        "--decode-steps one-token steps after a cached context of SEQLEN tokens; generate: "
                        "model.generate() of --new-tokens tokens after --prompt-len (whole model) (default prefill)")
    w.add_argument("--scope", choices=("layer", "model"), default=None,
                   help="layer: one decoder layer; model: a whole forward/decode step of a multi-layer model "
                        "(decoder stack, KV cache, LM head on the last position) (default layer; model for generate)")
    w.add_argument("--batch-size", "--batch-sizes", dest="batches", type=_positive_ints, metavar="N[,N...]",
                   help="batch sizes (default 1,4,8 on CUDA, 1,2 on CPU)")
    w.add_argument("--sparsity", "--skips", dest="skips", type=_rates, metavar="S[,S...]",
                   help="forced skip rates in [0, 1], for attention and MLP alike (default 0,0.25,0.5)")
    w.add_argument("--seqlens", type=_positive_ints, metavar="L[,L...]",
                   help="prefill: tokens per sequence; decode: KV length before the step "
                        "(default 512,2048,8192 on CUDA, 16,64,256 on CPU)")
    w.add_argument("--prompt-len", dest="prompt_len", type=_positive_ints, metavar="L[,L...]",
                   help="--mode generate: prompt tokens per sequence (default 128 on CUDA, 16 on CPU)")
    w.add_argument("--new-tokens", dest="new_tokens", type=positive_int, metavar="N",
                   help="--mode generate: tokens generated per sequence, at least 2 (default 128 on CUDA, 16 on CPU)")
    w.add_argument("--decode-steps", dest="decode_steps", type=positive_int, metavar="N",
                   help=f"--mode decode: one-token steps per point, each with its own route decisions; at batch "
                        f"1 more steps bring the realized skip rate closer to --sparsity (default {B.DECODE_STEPS})")
    w.add_argument("--providers", type=_providers, metavar="P[,P...]",
                   help=f"any of {', '.join(B.PROVIDERS)} (default: all on CUDA, the eager ones on CPU); "
                        "speedups need hf")
    model_group = p.add_argument_group("model")
    m = model_group.add_mutually_exclusive_group()
    m.add_argument("--config", "--geometry", dest="config", choices=sorted(B.GEOMETRIES), default=None,
                   help="named geometry with random weights (default llama-3.1-8b on CUDA, tiny on CPU)")
    m.add_argument("--model", metavar="PATH",
                   help="a Hugging Face model folder (Llama, Mistral, Qwen2, Qwen3). --scope model loads it with "
                        "skipgpt.load; --scope layer times one layer of its geometry with random weights")
    model_group.add_argument(
        "--layers", type=positive_int, metavar="N",
        help="--scope model: decoder layers (default 4 for a named geometry; all of --model's, or its first N)")
    t = p.add_argument_group("timing")
    t.add_argument("--cuda-graph", action="store_true",
                   help="capture each step in a CUDA graph and time its replays (no host overhead, as a "
                        "graph-captured decode loop); steps that sync with the host are reported not capturable")
    t.add_argument("--warmup", type=_milliseconds, default=25, metavar="MS",
                   help="warm-up time per provider and timing round in ms, as triton.testing.do_bench (default 25; "
                        "generate: per point, and the checked first call counts)")
    t.add_argument("--rep", type=_milliseconds, default=100, metavar="MS",
                   help="timed repeats per provider and timing round for about this many ms (default 100; at least "
                        "3 calls on CPU and in generate mode, where it is per point)")
    t.add_argument("--rounds", type=positive_int, metavar="N",
                   help=f"interleaved timing rounds per point (default {DEFAULT_ROUNDS}): each round times every "
                        "provider once, in turn, round i starting from the i-th provider, so each provider takes "
                        "another place in the round each time and clock or host drift during a point falls on all "
                        "providers alike; a point's time is the median of its rounds' medians (prefill and decode)")
    t.add_argument("--paired", action="store_true",
                   help="time a round's providers together, one step of each per repetition (in an order "
                        "shuffled each time, so no provider always runs right after the same one), instead of one "
                        "provider after another: a host whose speed changes for a while then slows every "
                        "provider alike (for host-bound points, such as batch 1 at a few hundred tokens). Holds "
                        "every provider's step in memory at once; if a round fails so, the point is timed one "
                        "provider after another, with a warning and a note. Needs two or more providers; not with "
                        "--steady, --cuda-graph (no host in the timing) or --mode generate")
    t.add_argument("--steady", action="store_true",
                   help="time a round's providers together as --paired does, but each in blocks of back-to-back "
                        "steps (about 40 ms a block and at least 8 steps: a model's forward pays a block's start "
                        "once for all its layers) with a synchronize around each block, the blocks in a shuffled "
                        "order (a block right after a power-hungry one runs slower), on the host's clock and "
                        "without flushing the L2 cache: per step max(host, GPU) time, the rate at which a model's "
                        "consecutive layers run. --paired's CUDA events with a flush before each step give the "
                        "host a head start, so a host-bound step reads between its host and GPU times there. "
                        "Needs two or more providers; not with --paired, --cuda-graph or --mode generate")
    x = p.add_argument_group("baseline")
    x.add_argument("--baseline-published", metavar="PATH",
                   help="a checkout of the published SkipGPT inference code: its Triton layer is timed as provider "
                        f"{B.PUBLISHED} (--scope layer, CUDA; see skipgpt/published_baseline.py for what it expects)")
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="DIR", default=default_output,
                   help=f"folder for SCOPE-MODE.csv/.json/-time.png/-tflops.png (created if missing; default "
                        f"{default_output or 'none: table only'})")
    o.add_argument("--json", metavar="FILE", help="also write the JSON to this file")


# ---------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Everything a run needs, checked by `plan()` before any model is built."""

    scope: str
    mode: str
    batches: list
    seqlens: list
    skips: list
    providers: list
    config: Optional[str]
    model: Optional[str]
    layers: Optional[int]
    cuda_graph: bool
    warmup: float
    rep: float
    rounds: Optional[int]  # None in generate mode
    paired: bool
    steady: bool
    baseline_published: Optional[str]
    output: Optional[str]
    json: Optional[str]
    device: str
    dtype: str
    notes: list = field(default_factory=list)
    published: object = None  # the imported published classes (published_baseline.load)
    model_config: object = None  # --model's transformers config
    new_tokens: Optional[int] = None  # generate mode (seqlens then holds the prompt lengths)
    decode_steps: Optional[int] = None  # decode mode

    def command(self) -> str:
        """The canonical `skipgpt bench` command line of this run, every choice explicit."""
        lengths = (["--prompt-len", _join(self.seqlens), "--new-tokens", str(self.new_tokens)]
                   if self.mode == "generate" else ["--seqlens", _join(self.seqlens)])
        if self.mode == "decode":
            lengths += ["--decode-steps", str(self.decode_steps)]
        argv = ["skipgpt", "bench", "--scope", self.scope, "--mode", self.mode,
                "--batch-size", _join(self.batches), "--sparsity", _join(self.skips), *lengths,
                "--providers", ",".join(p for p in self.providers if p != B.PUBLISHED)]
        argv += ["--model", self.model] if self.model else ["--config", self.config]
        if self.layers and self.scope == "model":
            argv += ["--layers", str(self.layers)]
        if self.cuda_graph:
            argv.append("--cuda-graph")
        argv += ["--warmup", f"{self.warmup:g}", "--rep", f"{self.rep:g}"]
        if self.rounds is not None:
            argv += ["--rounds", str(self.rounds)]
        if self.paired:
            argv.append("--paired")
        if self.steady:
            argv.append("--steady")
        if self.baseline_published:
            argv += ["--baseline-published", self.baseline_published]
        if self.output:
            argv += ["--output", self.output]
        return shlex.join(argv)


def _join(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def plan(args: argparse.Namespace) -> Plan:
    import torch

    cuda = torch.cuda.is_available()
    notes = []
    generate = args.mode == "generate"
    if args.scope is None:
        args.scope = "model" if generate else "layer"
    if generate:
        if args.scope != "model":
            raise BenchError("--mode generate runs model.generate() on a whole model: use --scope model (the default)")
        if args.seqlens:
            raise BenchError("--seqlens: with --mode generate, give the prompt length as --prompt-len")
        if args.cuda_graph:
            raise BenchError("--cuda-graph captures one step; in --mode generate the compiled providers capture "
                             "CUDA graphs themselves (mode reduce-overhead)")
        if args.rounds is not None:
            raise BenchError("--rounds applies to --mode prefill and decode: generate mode times whole generate() "
                             "calls, one provider after another")
        if args.paired or args.steady:
            raise BenchError(f"{'--paired' if args.paired else '--steady'} applies to --mode prefill and decode: "
                             "generate mode times whole generate() calls, one provider after another")
        if args.new_tokens is not None and args.new_tokens < 2:
            raise BenchError("--new-tokens: at least 2 (the decode step time needs one step after the prefill's token)")
    elif args.prompt_len or args.new_tokens:
        raise BenchError("--prompt-len and --new-tokens apply to --mode generate")
    if args.decode_steps is not None and args.mode != "decode":
        raise BenchError("--decode-steps applies to --mode decode")
    if args.paired and args.steady:
        raise BenchError("--paired and --steady are two ways to time a round's providers together: use one")
    together = "--paired" if args.paired else "--steady" if args.steady else None
    if together and args.cuda_graph:
        raise BenchError(f"{together} times steps as their host launches them; --cuda-graph replays captured steps, "
                         "which leaves the host's speed out of the timing: use one or the other")
    if together and args.providers is not None and len(args.providers) < 2:
        raise BenchError(f"{together} times two or more providers together; --providers names one")
    if args.cuda_graph and not cuda:
        raise BenchError("--cuda-graph needs a CUDA device, and none is available")
    model_config = None
    if args.model:
        model_config = _read_model_config(args.model)
    if args.layers and args.scope != "model":
        raise BenchError("--layers applies to --scope model")
    if args.layers and model_config is not None and args.layers > model_config.num_hidden_layers:
        raise BenchError(f"--layers {args.layers}: {args.model} has {model_config.num_hidden_layers} layers")
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise BenchError(f"--output: {args.output} exists and is not a folder")
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    if generate:
        gen = GPU_GENERATE if cuda else CPU_GENERATE
        defaults = {**defaults, "batches": gen["batches"], "seqlens": gen["prompt_len"]}
    config = args.config
    if not cuda:
        what = f"--model {args.model}" if args.model else "the tiny geometry"
        notes.append(f"no CUDA device: running {what} in float32 on the CPU paths")
        if config and config != "tiny":
            notes.append(f"--config {config} replaced by tiny on CPU")
        config = None if args.model else "tiny"
        if args.providers is None:
            notes.append(f"CPU: default providers are the eager ones ({','.join(EAGER_PROVIDERS)}); "
                         "name compiled-dense/compiled-sparse in --providers to time them")
    elif not args.model:
        config = config or "llama-3.1-8b"
    providers = list(args.providers or (B.PROVIDERS if cuda else EAGER_PROVIDERS))
    published = None
    if args.baseline_published:
        from .. import published_baseline

        if args.scope != "layer":
            raise BenchError("--baseline-published times the published code's layer: use --scope layer")
        try:
            published_baseline.locate(args.baseline_published)
            if not cuda:
                raise BenchError("--baseline-published: the published kernels need a CUDA device (Triton, flash-attn)")
            published = published_baseline.load(args.baseline_published)
        except published_baseline.PublishedError as e:
            raise BenchError(str(e)) from None
        providers.append(B.PUBLISHED)
    if args.model and args.scope == "layer":
        notes.append(f"--scope layer: one decoder layer with {args.model}'s geometry and random weights")
    return Plan(
        scope=args.scope, mode=args.mode,
        batches=args.batches or defaults["batches"], seqlens=args.prompt_len or args.seqlens or defaults["seqlens"],
        skips=args.skips if args.skips is not None else defaults["skips"], providers=providers,
        config=config, model=args.model, layers=args.layers, cuda_graph=args.cuda_graph,
        warmup=args.warmup, rep=args.rep, rounds=None if generate else (args.rounds or DEFAULT_ROUNDS),
        paired=args.paired, steady=args.steady,
        baseline_published=args.baseline_published,
        output=args.output, json=args.json, device="cuda" if cuda else "cpu",
        dtype="bfloat16" if cuda else "float32", notes=notes, published=published, model_config=model_config,
        new_tokens=(args.new_tokens or (GPU_GENERATE if cuda else CPU_GENERATE)["new_tokens"]) if generate else None,
        decode_steps=(args.decode_steps or B.DECODE_STEPS) if args.mode == "decode" else None,
    )


def _read_model_config(path: str):
    """--model's config (config.json only: the weights load later), or BenchError."""
    from ..families import family_for

    folder = Path(path)
    if not folder.is_dir():
        raise BenchError(f"--model: {path} is not a folder (expected a Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise BenchError(f"--model: {path} has no config.json (expected a Hugging Face model folder)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
        family_for(config)
    except (ValueError, OSError) as e:
        raise BenchError(f"--model: {e}") from None
    return config


# ---------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, prog: str = "skipgpt bench") -> int:
    """Exit status: 0 when the run completed (failed points included), 2 on a user error."""
    try:
        execute(plan(args))
    except BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def module_main(argv=None) -> int:
    """`python -m skipgpt.benchmark`."""
    parser = argparse.ArgumentParser(prog="python -m skipgpt.benchmark", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, default_output=None)
    return run(parser.parse_args(argv), prog="python -m skipgpt.benchmark")


def build_bench(p: Plan):
    import torch

    dtype = getattr(torch, p.dtype)
    device = torch.device(p.device)
    if p.scope == "layer":
        bench = B.LayerBench(p.model_config if p.model else p.config, dtype, device)
        if p.published is not None:
            from ..published_baseline import PublishedError, PublishedLayer

            try:
                bench.published = PublishedLayer(p.published, bench)
            except PublishedError as e:
                bench.published = _Unusable(str(e))
    else:
        try:
            bench = B.ModelBench(p.config, dtype, device, layers=p.layers, model_path=p.model)
        except torch.cuda.OutOfMemoryError:
            raise BenchError(f"the model does not fit on {p.device}: try --layers N") from None
        except (ValueError, OSError) as e:  # unreadable weights, unsupported checkpoints
            if not p.model:
                raise
            raise BenchError(f"--model: loading {p.model} failed: {e}") from None
    if p.decode_steps is not None:
        bench.decode_steps = p.decode_steps
    return bench


class _Unusable:
    """Stands in for a published layer that could not be built: each of its points fails with why."""

    def __init__(self, why: str):
        self.why = why

    def step(self, *args, **kwargs):
        raise RuntimeError(self.why)


def execute(p: Plan) -> dict:
    """Run the grid of `p`, print the table, write the files. Returns the JSON document."""
    import torch

    for note in p.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"running: {p.command()}", file=sys.stderr)
    bench = build_bench(p)
    generate = p.mode == "generate"
    if generate:
        # On the greedy gap (logit margin over the logits' standard deviation): float32 runs
        # pick the ground truth's tokens; in bf16 a dense model's rounding flips only near-ties
        # (a few 1e-2), while a broken kernel's tokens sit of order 1 below the best. Sparse
        # providers get a bound calibrated per point on torch-sparse (run_generate_grid).
        tolerance = 1e-3 if p.dtype == "float32" else 0.5
    elif p.dtype == "float32":
        tolerance = 1e-4
    else:
        # Against a same-precision reference (a model too big for an fp32 copy) only broken
        # kernels are caught: rounding of the two runs differs by up to a few 1e-2 deep down.
        tolerance = 1e-2 if bench.reference is not None else 5e-2
    if bench.reference is None:
        print(f"note: correctness reference: {bench.reference_note}; tolerance {tolerance:g}", file=sys.stderr)
    if "hf" not in p.providers:
        print("note: hf is not in --providers: no speedups", file=sys.stderr)
    on_gpu = p.device == "cuda"
    timer_fn = (B.cuda_graph_timer if p.cuda_graph else B.cuda_timer) if on_gpu else B.cpu_timer
    timer = functools.partial(timer_fn, warmup_ms=p.warmup, rep_ms=p.rep)
    together = B.steady_timer if p.steady else B.paired_timer if p.paired else None
    paired = functools.partial(together, warmup_ms=p.warmup, rep_ms=p.rep, cuda=on_gpu) if together else None
    total = len(p.batches) * len(p.seqlens) * len(p.skips) * len(p.providers)
    done = [0]
    finished: list = []
    partial = Path(p.output) / f"{p.scope}-{p.mode}.csv" if p.output else None

    def progress(point: B.Point) -> None:
        done[0] += 1
        if partial is not None:
            # Written as points complete, so a run stopped by a time limit keeps what it measured
            # (prefill and decode points arrive with their speedups; generate points get theirs in
            # the final file).
            finished.append(point)
            partial.parent.mkdir(parents=True, exist_ok=True)
            write_csv(finished, partial)
        what = f"{point.ms:.3f} ms" if point.ms is not None else point.status
        if point.tokens_per_s is not None:
            what += f", {point.tokens_per_s:.1f} tokens/s"
        extra = f" ({point.note})" if point.note and point.status != "ok" else ""
        print(f"[{done[0]}/{total}] {point.provider} B={point.batch} L={point.seqlen} skip={point.skip:g}: {what}{extra}",
              file=sys.stderr, flush=True)

    if generate:
        points = B.run_generate_grid(bench, p.batches, p.seqlens, p.skips, p.providers, p.new_tokens, tolerance,
                                     p.warmup, p.rep, progress)
    else:
        points = B.run_grid(bench, p.mode, p.batches, p.seqlens, p.skips, p.providers, tolerance, timer, progress,
                            rounds=p.rounds, paired_timer=paired)
    if generate:
        method = ("wall clock around whole generate() calls" + (" (torch.cuda.synchronize)" if on_gpu else "")
                  + "; the checked first call counts as warm-up")
        reference = (f"greedy gap of the generated tokens under {bench.reference_note} "
                     "(dense providers: with every token executing)")
    else:
        method = ("CUDA graph replay, " if p.cuda_graph else "") + (
            "triton.testing.do_bench" if on_gpu else "wall clock (time.perf_counter)")
        if p.paired:
            method = ("paired (skipgpt.benchmark.paired_timer): each repetition one step of every provider, "
                      "in a shuffled order, " + ("CUDA events, L2 flushed before each" if on_gpu else "wall clock (time.perf_counter)"))
        if p.steady:
            method = ("steady (skipgpt.benchmark.steady_timer): each repetition a block of back-to-back steps of "
                      f"every provider (about {B.STEADY_BLOCK_MS:g} ms, at least {B.STEADY_MIN_CALLS} steps), "
                      "the blocks in a shuffled order, wall clock (time.perf_counter) around each block"
                      + (", synchronized, no L2 flush" if on_gpu else ""))
        reference = bench.reference_note
    document = {
        "scope": p.scope,
        "mode": p.mode,
        "device": device_name(p.device),
        "dtype": p.dtype,
        "geometry": p.model or p.config,  # the name older report tools read
        "model": p.model,
        "config": p.config,
        "layers": bench.num_layers,
        "cuda_graph": p.cuda_graph,
        "decode_steps": p.decode_steps,
        "prompt_len": p.seqlens if generate else None,
        "new_tokens": p.new_tokens,
        "timing": {"method": method, "warmup_ms": p.warmup, "rep_ms": p.rep, "quantiles": list(B.QUANTILES),
                   "rounds": p.rounds, "paired": p.paired, "steady": p.steady},
        "reference": reference,
        "tolerance": tolerance,
        "flops": None if generate else
        "dense-equivalent: projections, attention and MLP of every layer (skipgpt.benchmark.dense_flops)",
        "versions": package_versions("torch", "triton", "transformers", "skipgpt"),
        "git": _git_commit(),
        "command": p.command(),
        "argv": sys.argv,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": p.notes,
        "points": [asdict(pt) for pt in points],
    }
    print((format_generate_table if generate else format_table)(points, title=_title(document)))
    written = []
    if p.output:
        out = Path(p.output)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{p.scope}-{p.mode}"
        written.append(_write_json(document, stem.with_suffix(".json")))
        written.append(write_csv(points, stem.with_suffix(".csv")))
        written += (plot_generate if generate else plot)(points, stem, _title(document))
    if p.json:
        written.append(_write_json(document, Path(p.json)))
    if written:
        print("wrote: " + ", ".join(str(w) for w in written), file=sys.stderr)
    del bench
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return document


def _title(doc: dict) -> str:
    what = doc["model"] or doc["config"]
    layers = f", {doc['layers']} layers" if doc["scope"] == "model" else ""
    graph = ", CUDA graph" if doc["cuda_graph"] else ""
    tokens = f" · {doc['new_tokens']} new tokens" if doc.get("new_tokens") else ""
    return f"{doc['scope']} {doc['mode']} · {what}{layers}{tokens} · {doc['dtype']} · {doc['device']}{graph}"


# ---------------------------------------------------------------------------- output


def format_table(points: list, title: str = "") -> str:
    head = (f"{'provider':<24} {'B':>4} {'L/KV':>6} {'skip':>5} {'skipped':>7} {'ms':>9} {'q20-q80 ms':>19} "
            f"{'TFLOP/s':>9} {'vs hf':>6} {'rel err':>8}  status")
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for p in points:
        ms = f"{p.ms:9.3f}" if p.ms is not None else f"{'-':>9}"
        spread = f"{p.ms_q20:9.3f}-{p.ms_q80:<9.3f}" if p.ms is not None else f"{'-':>19}"
        tf = f"{p.tflops:9.3g}" if p.tflops is not None else f"{'-':>9}"
        sp = f"{p.speedup:6.2f}" if p.speedup is not None else f"{'-':>6}"
        err = f"{p.rel_err:8.1e}" if p.rel_err is not None else f"{'-':>8}"
        done = f"{p.realized_skip:7.3f}" if p.realized_skip is not None else f"{'-':>7}"
        status = p.status + (f": {p.note}" if p.note and p.status != "ok" else "")
        lines.append(f"{p.provider:<24} {p.batch:>4} {p.seqlen:>6} {p.skip:>5.2f} {done} {ms} {spread} {tf} {sp} {err}  {status}")
    return "\n".join(lines)


def format_generate_table(points: list, title: str = "") -> str:
    head = (f"{'provider':<16} {'B':>3} {'prompt':>6} {'new':>4} {'skip':>5} {'tokens/s':>9} {'generate ms':>11} "
            f"{'q20-q80 ms':>19} {'prefill ms':>10} {'step ms':>8} {'vs hf':>6} {'gap':>8}  status")
    lines = ([title] if title else []) + [head, "-" * len(head)]

    def num(value, width, fmt):
        return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"

    for p in points:
        spread = f"{p.ms_q20:9.1f}-{p.ms_q80:<9.1f}" if p.ms is not None else f"{'-':>19}"
        status = p.status + (f": {p.note}" if p.note and p.status != "ok" else "")
        lines.append(f"{p.provider:<16} {p.batch:>3} {p.seqlen:>6} {p.new_tokens:>4} {p.skip:>5.2f} "
                     f"{num(p.tokens_per_s, 9, '.1f')} {num(p.ms, 11, '.1f')} {spread} {num(p.prefill_ms, 10, '.2f')} "
                     f"{num(p.decode_step_ms, 8, '.3f')} {num(p.speedup, 6, '.2f')} {num(p.rel_err, 8, '.1e')}  {status}")
    return "\n".join(lines)


def write_csv(points: list, path: Path) -> Path:
    names = [f.name for f in fields(B.Point)]
    order = ["scope", "mode", "provider"] + [n for n in names if n not in ("scope", "mode", "provider")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=order)
        writer.writeheader()
        for p in points:
            row = asdict(p)
            if row["ms_rounds"]:
                row["ms_rounds"] = " ".join(f"{ms:.6g}" for ms in row["ms_rounds"])
            writer.writerow(row)
    return path


def _write_json(document: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # An infinite error (a provider returning NaN/inf) is written as the string "inf": JSON has
    # no infinity, and strict parsers reject Python's `Infinity`.
    points = [{k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in pt.items()}
              for pt in document["points"]]
    text = json.dumps({**document, "points": points}, indent=1, default=str)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a warning) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("warning: matplotlib is not installed, so no plots (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def plot(points: list, stem: Path, title: str) -> list:
    """Two PNGs, `STEM-time.png` (median ms, log-log) and `STEM-tflops.png`: vs sequence length
    (log x), one line per provider, one panel per (batch size, skip rate). Points without a time
    (wrong, failed) are left out."""
    plt = _pyplot()
    if plt is None:
        return []
    import matplotlib.ticker

    batches = sorted({p.batch for p in points})
    skips = sorted({p.skip for p in points})
    seqlens = sorted({p.seqlen for p in points})
    providers = list(dict.fromkeys(p.provider for p in points))
    colors = {prov: plt.get_cmap("tab10")(i % 10) for i, prov in enumerate(providers)}
    xlabel = "KV length" if points and points[0].mode == "decode" else "sequence length"
    written = []
    for metric, ylabel, suffix, log_y in (("ms", "median time per step (ms)", "time", True),
                                          ("tflops", "dense-equivalent TFLOP/s", "tflops", False)):
        fig, axes = plt.subplots(len(batches), len(skips), squeeze=False, sharex=True,
                                 figsize=(3.4 * len(skips) + 0.6, 2.6 * len(batches) + 0.9))
        for r, batch in enumerate(batches):
            for c, skip in enumerate(skips):
                ax = axes[r][c]
                for prov in providers:
                    rows = sorted((p for p in points if p.provider == prov and p.batch == batch and p.skip == skip
                                   and getattr(p, metric) is not None), key=lambda p: p.seqlen)
                    if rows:
                        ax.plot([p.seqlen for p in rows], [getattr(p, metric) for p in rows], marker="o",
                                markersize=3, color=colors[prov], label=prov)
                ax.set_xscale("log", base=2)
                ax.set_xticks(seqlens, labels=[str(s) for s in seqlens], fontsize=7)
                ax.minorticks_off()
                if log_y and ax.has_data():
                    ax.set_yscale("log")
                    # Plain numbers (0.2, 1, 5) rather than powers of ten: a panel often spans
                    # less than a decade.
                    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.tick_params(axis="y", labelsize=7)
                ax.set_title(f"B={batch}, skip {skip:.0%}", fontsize=9)
                ax.grid(True, alpha=0.3)
                if r == len(batches) - 1:
                    ax.set_xlabel(xlabel, fontsize=8)
                if c == 0:
                    ax.set_ylabel(ylabel, fontsize=8)
        handles = [plt.Line2D([], [], color=colors[prov], marker="o", markersize=3, label=prov) for prov in providers]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(providers), 4), fontsize=8, frameon=False)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(providers) - 1) // 4), 1, 0.97))
        path = Path(f"{stem}-{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_generate(points: list, stem: Path, title: str) -> list:
    """Two PNGs for --mode generate: `STEM-tokens.png` (tokens/s) and `STEM-step.png` (decode
    step ms): grouped bars, batch sizes on the x axis, one bar per provider, one panel per
    (prompt length, skip rate). Points without a time are left out."""
    plt = _pyplot()
    if plt is None:
        return []

    batches = sorted({p.batch for p in points})
    panels = sorted({(p.seqlen, p.skip) for p in points})
    providers = list(dict.fromkeys(p.provider for p in points))
    colors = {prov: plt.get_cmap("tab10")(i % 10) for i, prov in enumerate(providers)}
    width = 0.8 / max(len(providers), 1)
    written = []
    for metric, ylabel, suffix in (("tokens_per_s", "generated tokens/s", "tokens"),
                                   ("decode_step_ms", "decode step (ms)", "step")):
        fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(1.2 + 0.9 * len(batches) * len(panels)
                                                                         + 0.3 * len(providers), 3.6))
        for c, (prompt_len, skip) in enumerate(panels):
            ax = axes[0][c]
            for i, prov in enumerate(providers):
                xs, ys = [], []
                for j, batch in enumerate(batches):
                    point = next((p for p in points if (p.provider, p.batch, p.seqlen, p.skip) == (prov, batch, prompt_len, skip)
                                  and getattr(p, metric) is not None), None)
                    if point is not None:
                        xs.append(j + (i - (len(providers) - 1) / 2) * width)
                        ys.append(getattr(point, metric))
                ax.bar(xs, ys, width=width, color=colors[prov], label=prov)
            ax.set_xticks(range(len(batches)), labels=[f"B={b}" for b in batches], fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(f"prompt {prompt_len}, skip {skip:.0%}", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
            if c == 0:
                ax.set_ylabel(ylabel, fontsize=8)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[prov]) for prov in providers]
        fig.legend(handles, providers, loc="lower center", ncol=min(len(providers), 3), fontsize=8, frameon=False)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0.08 + 0.05 * ((len(providers) - 1) // 3), 1, 0.95))
        path = Path(f"{stem}-{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------- provenance


def _git_commit() -> Optional[dict]:
    """The commit of the checkout skipgpt runs from, and whether tracked files differ from it;
    None outside a git checkout (an installed wheel). A copied working tree whose git metadata is
    stale (the device machine's copy) names its commit in SKIPGPT_SOURCE_COMMIT instead."""
    given = os.environ.get("SKIPGPT_SOURCE_COMMIT")
    if given:
        return {"commit": given, "dirty": None, "from": "SKIPGPT_SOURCE_COMMIT"}
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": bool(dirty)}


