"""`skipgpt eval`: run lm-evaluation-harness on a routed model and report speed and sparsity.

    skipgpt eval --model PATH [--router PATH] [--lora PATH] [--pipeline P] [--skip RATE]
                 [--compile] --tasks T[,T...] [--batch-size N] [--limit N] [--device D]
                 [--dtype auto|bf16|fp16|fp32] [--data-parallel N | --device-map MAP] [--output DIR]

With no --model: SmolLM2-135M-Instruct from `skipgpt setup` on the offline Wikipedia task.
Every argument is checked (paths, pipeline, task names, device) before a model loads.

Beyond one GPU, through accelerate (as lm-eval itself does), not a launcher of our own:
--data-parallel N runs `accelerate launch --multi_gpu --num_processes N -m skipgpt.lm_eval ...`
(one model copy per GPU, lm-eval splits the requests), then reads the results file rank 0 wrote
and reports as a one-GPU run does; --device-map spreads one model's layers over the GPUs
(`skipgpt.load(device_map=...)`).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from importlib import resources
from pathlib import Path
from typing import Optional

from . import device_name, package_versions

logger = logging.getLogger("skipgpt")

PIPELINES = ("dense", "torch-sparse", "triton-sparse")
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEFAULT_OUTPUT = "skipgpt-eval-out"
VERSIONED = ("torch", "transformers", "lm_eval", "skipgpt", "triton")  # recorded in summary.json
# The router file shipped for the default model, once router training has produced one.
DEFAULT_ROUTER = "smollm2-135m-skip25.safetensors"
TOKENS_COUNTED = (
    "token positions run through the decoder (layer 0's count of non-padding tokens): context and "
    "continuation tokens of loglikelihood requests, prompts plus one token per sequence per "
    "generation step for generate_until. lm-eval right-pads loglikelihood batches without an "
    "attention mask, so that padding is counted; masked (left) padding is not."
)
TOKENS_COUNTED_DP = (
    " With --data-parallel, the counts of all ranks are summed; they include the requests and "
    "rolling windows lm-eval repeats on ranks with less work so that every rank runs as many "
    "batches, which on a small run (a few documents) can be a large share of the total. Compare "
    "wall times, not tokens per second, between runs with different numbers of GPUs."
)
TIMINGS_MEASURED = {
    "one process": (
        "load_seconds: loading and routing the model; compile_seconds: with --compile, the warm-up call "
        "that compiles it (0 otherwise); eval_seconds: lm-eval's simple_evaluate (request building, model "
        "calls, metrics); requests_seconds: the part of it spent in the model's request methods (device "
        "work included); total_seconds: load + compile + eval."
    ),
    "data parallel": (
        "load_seconds, compile_seconds and requests_seconds: the slowest rank's (ranks run side by side); eval_seconds: "
        "requests_seconds, the time in the model's request methods (device work included); total_seconds: "
        "the whole `accelerate launch` (starting the processes, imports, task data, load, evaluation, "
        "gathering results)."
    ),
}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

DESCRIPTION = """\
Run lm-evaluation-harness on a SkipGPT-routed model, print lm-eval's table, the wall time,
tokens per second and the realized skip rates (overall and per layer), and write to --output:
results.json (lm-eval's results), summary.json (metrics, timings, tokens/s, sparsity, setup,
versions, device, command line) and sparsity.png (per-layer attention and MLP skip rates).

With no --model it runs the embedded default: SmolLM2-135M-Instruct (set up once with
`skipgpt setup`), with its shipped routers and triton-sparse if the package carries them,
else the dense pipeline, on skipgpt_wiki_tiny on CPU (a minute or so) or skipgpt_wiki on GPU.
"""

EPILOG = """\
examples:
  skipgpt eval                                        # the embedded default
  skipgpt eval --model ./llama --router router.pth --pipeline triton-sparse --tasks skipgpt_wiki
  skipgpt eval --model ./llama --skip 0.25 --tasks skipgpt_wiki_tiny --limit 2   # random routes
  skipgpt eval --model ./llama --router router.pth --tasks wikitext,hellaswag --batch-size 8
  skipgpt eval --model ./llama --router router.pth --tasks skipgpt_wiki --data-parallel 2   # 2 GPUs, a copy each
  skipgpt eval --model ./llama-70b --router router.pth --tasks skipgpt_wiki --device-map auto   # layers over the GPUs
"""


class EvalError(Exception):
    """A user error found before or while running: printed as one message, exit status 2."""


@dataclass
class Plan:
    """Everything a run needs, checked. Built by `plan()` from the parsed flags."""

    model: str
    router: Optional[str]
    lora: Optional[str]
    lora_alpha: float
    lora_r: int
    pipeline: str
    skip: Optional[float]
    seed: int
    compile: bool
    tasks: list[str]
    include_path: Optional[str]
    batch_size: int
    limit: Optional[float]  # an int when whole: lm-eval reads values below 1 as a fraction
    device: str
    dtype: str
    output: str
    data_parallel: int = 1  # processes (GPUs) of an `accelerate launch`; 1 runs in this process
    device_map: Optional[object] = None  # a strategy name or a dict of module -> device
    notes: list[str] = field(default_factory=list)  # what defaults chose, printed before the run

    def command(self) -> str:
        """The equivalent explicit `skipgpt eval` command line."""
        argv = ["skipgpt", "eval", "--model", self.model]
        for flag, value in (("--router", self.router), ("--lora", self.lora)):
            if value is not None:
                argv += [flag, value]
        if self.lora is not None:
            argv += ["--lora-alpha", f"{self.lora_alpha:g}", "--lora-r", str(self.lora_r)]
        argv += ["--pipeline", self.pipeline]
        if self.skip is not None:
            argv += ["--skip", f"{self.skip:g}", "--seed", str(self.seed)]
        if self.compile:
            argv.append("--compile")
        argv += ["--tasks", ",".join(self.tasks)]
        if self.include_path is not None:
            argv += ["--include-path", self.include_path]
        argv += ["--batch-size", str(self.batch_size)]
        if self.limit is not None:
            argv += ["--limit", f"{self.limit:g}"]
        if self.device_map is not None:
            dm = self.device_map
            argv += ["--device-map", dm if isinstance(dm, str) else json.dumps(dm, separators=(",", ":"))]
        else:
            argv += ["--device", self.device]
        if self.data_parallel > 1:
            argv += ["--data-parallel", str(self.data_parallel)]
        argv += ["--dtype", self.dtype, "--output", self.output]
        return shlex.join(argv)

    @property
    def cpu_processes(self) -> bool:
        """--data-parallel on the CPU: the explicit test mode (N processes, no GPU)."""
        return self.data_parallel > 1 and self.device == "cpu"


# ---------------------------------------------------------------------------- flags


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a routed model with lm-evaluation-harness (speed, sparsity, metrics)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="PATH",
                   help="Hugging Face model folder (Llama, Mistral, Qwen2, Qwen3). Default: SmolLM2-135M-Instruct "
                        "from `skipgpt setup` ($SKIPGPT_CACHE or ~/.cache/skipgpt)")
    m.add_argument("--router", metavar="PATH",
                   help="router checkpoint: a published .pth (stage 1 or 2 key style) or .safetensors")
    m.add_argument("--lora", metavar="PATH",
                   help="LoRA weights merged into the base model at load: a flat state dict or a PEFT adapter folder")
    m.add_argument("--lora-alpha", type=float, default=32, metavar="A",
                   help="LoRA scale numerator for flat state dicts (default 32; PEFT folders carry their own)")
    m.add_argument("--lora-r", type=int, default=16, metavar="R",
                   help="LoRA rank for flat state dicts (default 16)")
    m.add_argument("--pipeline", choices=PIPELINES,
                   help="dense: every token runs every module; torch-sparse: plain-PyTorch routed reference; "
                        "triton-sparse: routed, skipgpt custom ops. Default: triton-sparse when --router or "
                        "--skip is given, else dense")
    m.add_argument("--skip", type=float, metavar="RATE",
                   help="force seeded random routes: each token skips each module with this probability "
                        "(0..1), for models without routers; overrides the routers' decisions")
    m.add_argument("--seed", type=int, default=0, help="seed of the --skip routes (default 0)")
    m.add_argument("--compile", action="store_true",
                   help="compile the model with skipgpt.compile.compile_model (one graph for every batch shape), "
                        "compiled by a warm-up call that is timed apart from the evaluation")
    m.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and activations dtype; auto keeps the checkpoint's (default auto)")
    m.add_argument("--device", metavar="DEVICE",
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g = p.add_argument_group("more than one GPU (through accelerate; choose one)")
    g.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="data parallel over N GPUs: runs `accelerate launch --multi_gpu --num_processes N -m "
                        "skipgpt.lm_eval ...`, a copy of the model per GPU (cuda:0..N-1 of the visible ones; "
                        "pick them with CUDA_VISIBLE_DEVICES), lm-eval splitting the requests; then reports as a "
                        "one-GPU run does, tokens and skip rates summed over the ranks. With --device cpu, N CPU "
                        "processes instead: a test mode of the same path, not faster. Default 1 (this process)")
    g.add_argument("--device-map", metavar="MAP",
                   help="spread one model's layers over the visible GPUs (transformers/accelerate placement, "
                        "from_pretrained(device_map=MAP)): auto, balanced, balanced_low_0, sequential, or a JSON "
                        "object of module name -> device, e.g. '{\"model.embed_tokens\":0,\"model.layers.0\":0,...}'. "
                        "For models that do not fit one GPU; replaces --device")
    e = p.add_argument_group("evaluation")
    e.add_argument("--tasks", metavar="T[,T...]",
                   help="comma-separated lm-eval task names: skipgpt_wiki and skipgpt_wiki_tiny (offline, "
                        "after `skipgpt setup`) or any lm-eval task (wikitext, hellaswag, ...; those download "
                        "from the Hugging Face Hub). Default: skipgpt_wiki_tiny on CPU, skipgpt_wiki on GPU")
    e.add_argument("--include-path", metavar="DIR",
                   help="a folder of your own lm-eval task YAML files, searched besides skipgpt's and lm-eval's")
    e.add_argument("--batch-size", type=int, default=1, metavar="N", help="requests per model call (default 1)")
    e.add_argument("--limit", type=float, metavar="N",
                   help="only the first N documents of each task (a value below 1 is a fraction of them)")
    e.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR",
                   help=f"folder for results.json, summary.json and sparsity.png (default ./{DEFAULT_OUTPUT})")


# ---------------------------------------------------------------------------- checks


def plan(args: argparse.Namespace) -> Plan:
    """Check every flag without loading a model; fill in the defaults. Raises EvalError."""
    import torch

    notes = []
    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    data_parallel = getattr(args, "data_parallel", 1)
    device_map = _device_map(getattr(args, "device_map", None))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under someone else's launcher every rank would run this whole command, each writing
        # its own report; --data-parallel starts the ranks itself, around lm-eval's CLI.
        raise EvalError(
            "skipgpt eval is running under a multi-process launcher (WORLD_SIZE is set): run it as a single "
            "process and pass --data-parallel N, which launches the N ranks itself"
        )
    if data_parallel < 1:
        raise EvalError(f"--data-parallel: expected a number of GPUs >= 1, got {data_parallel}")
    if device_map is not None:
        if data_parallel > 1:
            raise EvalError(
                "--data-parallel and --device-map: choose one; data parallel runs a whole copy of the model per "
                "GPU, --device-map spreads one copy over them"
            )
        if args.device is not None:
            raise EvalError(f"--device {args.device} and --device-map: --device-map places the model itself; drop --device")
        _need_accelerate("--device-map")
        if not cuda:
            notes.append("--device-map: no CUDA device here, so the whole model goes to the CPU")
        elif torch.cuda.device_count() == 1:
            notes.append("--device-map: one CUDA device is visible, so nothing is spread")
    if data_parallel > 1:
        _need_accelerate("--data-parallel")
        if args.device is None and not cuda:
            raise EvalError(
                f"--data-parallel {data_parallel}: this machine has no CUDA device. Data parallelism runs one process "
                f"per GPU; --device cpu --data-parallel {data_parallel} runs {data_parallel} CPU processes instead "
                "(a test mode of the same code path: it is not faster)"
            )
        if args.device is not None and re.fullmatch(r"cuda:\d+", args.device):
            raise EvalError(
                f"--device {args.device} and --data-parallel: rank r runs on cuda:r of the visible devices; "
                "choose the GPUs with CUDA_VISIBLE_DEVICES and pass --device cuda (or nothing)"
            )
        if device.startswith("cuda") and cuda and data_parallel > torch.cuda.device_count():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise EvalError(
                f"--data-parallel {data_parallel}: only {torch.cuda.device_count()} CUDA device(s) visible"
                + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            )
        if device == "cpu":
            notes.append(f"--data-parallel {data_parallel} --device cpu: {data_parallel} CPU processes (test mode)")
        if args.skip is not None and args.batch_size > 1:
            notes.append(
                "--skip with --data-parallel and --batch-size > 1: forced routes depend on a token's row in its "
                "batch, and ranks batch differently, so metrics can differ a little from a one-GPU run "
                "(trained routers and --batch-size 1 do not have this)"
            )
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise EvalError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not cuda:
            raise EvalError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise EvalError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    limit = args.limit
    if limit is not None:
        if not math.isfinite(limit) or limit <= 0 or (limit > 1 and limit != int(limit)):
            raise EvalError(f"--limit: expected a whole number of documents >= 1 or a fraction in (0, 1), got {limit:g}")
        limit = int(limit) if limit >= 1 else limit
    if args.skip is not None and not 0.0 <= args.skip <= 1.0:
        raise EvalError(f"--skip: expected a rate between 0 and 1, got {args.skip:g}")
    if args.lora_r < 1 or args.lora_alpha <= 0:
        raise EvalError("--lora-r and --lora-alpha must be positive")

    router = args.router
    if args.model is None:
        model = _default_model()
        if router is None and args.skip is None:
            router = _shipped_router()
            notes.append(f"router: {router}" if router else "no router file shipped in this installation: dense pipeline")
    else:
        model = args.model
        if not os.path.isdir(model):
            raise EvalError(f"--model: model folder not found: {model}")
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise EvalError(f"--model: {model} has no config.json; expected a Hugging Face model folder")
    for flag, path in (("--router", router), ("--lora", args.lora)):
        if path is not None and not os.path.exists(path):
            raise EvalError(f"{flag}: file not found: {path}")
    from ..lm_eval_model import default_pipeline

    pipeline = args.pipeline or default_pipeline(router, args.skip)
    if pipeline != "dense" and router is None and args.skip is None:
        raise EvalError(
            f"--pipeline {pipeline} routes tokens, but no router decides routes: pass --router PATH, "
            "--skip RATE (random routes), or use --pipeline dense"
        )
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise EvalError(f"--include-path: folder not found: {args.include_path}")
    if args.compile:
        notes.append("--compile: a warm-up call compiles the model before the evaluation, timed apart "
                     "(compile_seconds); generate_until requests compile their own graph at their first call")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not tasks:
        if args.tasks is not None:
            raise EvalError("--tasks: no task names given")
        tasks = ["skipgpt_wiki" if device.startswith("cuda") else "skipgpt_wiki_tiny"]
    return Plan(
        model=str(model), router=router, lora=args.lora, lora_alpha=args.lora_alpha, lora_r=args.lora_r,
        pipeline=pipeline, skip=args.skip, seed=args.seed, compile=args.compile, tasks=tasks,
        include_path=args.include_path,
        batch_size=args.batch_size, limit=limit, device=device, dtype=args.dtype, output=args.output,
        data_parallel=data_parallel, device_map=device_map, notes=notes,
    )


def _device_map(text: Optional[str]):
    """--device-map's value: a strategy name, or a JSON object parsed to a dict."""
    if text is None:
        return None
    if text in DEVICE_MAP_STRATEGIES:
        return text
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalError(f"--device-map: not valid JSON ({e.msg} at character {e.pos})") from None
        bad = [k for k, v in value.items() if not isinstance(v, (int, str)) or isinstance(v, bool)]
        if not value or bad:
            raise EvalError(
                "--device-map: expected a non-empty JSON object of module name -> device (a GPU index or a name "
                f"such as \"cuda:1\" or \"cpu\"){f'; bad entries: {bad[:3]}' if bad else ''}"
            )
        return value
    raise EvalError(
        f"--device-map: expected {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object of module name -> device, got {text!r}"
    )


def _need_accelerate(flag: str) -> None:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise EvalError(f"{flag} needs the accelerate package: pip install accelerate (or pip install 'skipgpt[eval]')")


def _default_model() -> Path:
    from .. import assets

    try:
        return assets.model_path()
    except assets.AssetMissingError as e:
        raise EvalError(f"the default model is not set up.\n{e}\nor pass --model PATH") from None


def _shipped_router() -> Optional[str]:
    """The router file shipped inside the package for the default model, if there is one."""
    try:
        path = resources.files("skipgpt").joinpath("routers", DEFAULT_ROUTER)
    except (ModuleNotFoundError, FileNotFoundError):  # pragma: no cover
        return None
    return str(path) if path.is_file() else None


def task_manager_for(names: list[str], include_path: Optional[str] = None):
    """A TaskManager that knows every name in `names`, or EvalError naming the unknown ones.

    Indexing lm-eval's own thousands of task files takes ~10 s, so skipgpt's tasks (and the
    user's --include-path) are looked up alone first, and lm-eval's are indexed only when a
    name is not found there.
    """
    from lm_eval.tasks import TaskManager

    from .. import tasks as skipgpt_tasks

    paths = [skipgpt_tasks.task_dir()] + ([include_path] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    print("Indexing lm-eval's task list (about 10 s)...", file=sys.stderr)
    manager = TaskManager(include_path=paths)
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = get_close_matches(name, known, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise EvalError(
            f"--tasks: unknown task {', '.join(hints)}. skipgpt's offline tasks: skipgpt_wiki, skipgpt_wiki_tiny; "
            "list lm-eval's with `lm-eval ls tasks`"
        )
    return manager


def build_tasks(manager, names: list[str]) -> list:
    """Build the task objects (this reads their data) before any model loads.

    Returns the top-level Task/Group objects to hand to simple_evaluate, so nothing loads twice.
    A task whose data is on the Hugging Face Hub fails here when the Hub is out of reach.
    """
    from .. import assets

    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except assets.AssetMissingError as e:
            raise EvalError(f"task {name}: {e}") from None
        except Exception as e:  # datasets raises ConnectionError, OSError or its own classes
            if _looks_offline(e):
                raise EvalError(
                    f"task {name}: its dataset could not be downloaded ({type(e).__name__}: {_first_line(e)}). "
                    "The Hugging Face Hub seems unreachable; use the offline task instead: "
                    "--tasks skipgpt_wiki (or skipgpt_wiki_tiny), after `skipgpt setup`"
                ) from None
            raise
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag: it stands for its tasks
            built.extend(loaded["tasks"].values())
    return built


def _looks_offline(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        s in text for s in ("couldn't reach", "offline", "connection", "name or service not known", "localentrynotfound")
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 on success, 2 on a user error (message on stderr)."""
    _show_progress_messages()
    try:
        p = plan(args)
        evaluate(p)
    except EvalError as e:
        print(f"skipgpt eval: error: {e}", file=sys.stderr)
        return 2
    return 0


def evaluate(p: Plan) -> dict:
    """Run the evaluation described by `p`, print the report, write the output files.

    Returns the summary (what summary.json holds).
    """
    for note in p.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"running: {p.command()}", file=sys.stderr)
    manager = task_manager_for(p.tasks, p.include_path)
    if not _has_matplotlib():
        print("warning: matplotlib is not installed, so sparsity.png will not be written "
              "(pip install matplotlib, or pip install 'skipgpt[eval]')", file=sys.stderr)
    if p.data_parallel > 1 and p.include_path is not None:
        _check_include_path_with_launch(p.tasks)
    # Built here also under --data-parallel, where the ranks build their own: a task whose data is
    # missing fails now, with the message below, instead of in N processes at once.
    task_objects = build_tasks(manager, p.tasks)
    output = Path(p.output)
    output.mkdir(parents=True, exist_ok=True)
    if p.data_parallel > 1:
        return evaluate_data_parallel(p, output)

    from lm_eval import simple_evaluate

    from ..lm_eval_model import SkipGPTLM

    t_start = time.perf_counter()
    placement = dict(device=p.device) if p.device_map is None else dict(device_map=p.device_map)
    try:
        lm = SkipGPTLM(
            p.model, router=p.router, lora=p.lora, pipeline=p.pipeline, skip=p.skip, seed=p.seed,
            lora_alpha=p.lora_alpha, lora_r=p.lora_r, compile=p.compile,
            dtype=p.dtype, batch_size=p.batch_size, **placement,
        )
    except (ValueError, FileNotFoundError) as e:  # bad checkpoints, unsupported architectures
        raise EvalError(f"loading the model: {e}") from None
    compile_s = lm.compile_seconds
    load_s = time.perf_counter() - t_start - compile_s
    lm.reset_sparsity()
    _sync(p.device)
    t_eval = time.perf_counter()
    results = simple_evaluate(
        model=lm, tasks=task_objects, task_manager=manager, limit=p.limit,
        log_samples=False, bootstrap_iters=0,
    )
    _sync(p.device)
    eval_s = time.perf_counter() - t_eval
    run = lm.accounting()
    tokens = run["tokens"]
    devices = sorted({str(t.device) for t in lm.skipgpt_model.parameters()})
    summary = {
        "metrics": results["results"],
        "groups": results.get("groups", {}),
        "timings": {"load_seconds": load_s, "compile_seconds": compile_s, "eval_seconds": eval_s,
                    "total_seconds": load_s + compile_s + eval_s, "requests_seconds": run["requests_seconds"]},
        "timings_measured": TIMINGS_MEASURED["one process"],
        "tokens": tokens,
        "tokens_per_second": tokens / eval_s if eval_s > 0 else None,
        "tokens_counted": TOKENS_COUNTED,
        "sparsity": run["sparsity"],
        "setup": {k: v for k, v in asdict(p).items() if k != "notes"},
        "model_dtype": str(lm.skipgpt_model.dtype).replace("torch.", ""),
        "versions": package_versions(*VERSIONED),
        "device_name": _devices_name(p.device, len(devices)),
        "devices": devices,
        "command": p.command(),
        "argv": sys.argv,
    }
    _write(output, results, summary)
    _print_report(results, summary)
    return summary


def _sync(device: str) -> None:
    # Timings must include the GPU work queued by the last batch, on every GPU (a device_map
    # model runs on several).
    if device.startswith("cuda"):
        import torch

        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def _devices_name(device: str, count: int) -> str:
    name = device_name(device)
    return f"{count} x {name}" if count > 1 else name


# ---------------------------------------------------------------------------- data parallel


def launch_argv(p: Plan, results_path: str, port: int, python: str = sys.executable) -> tuple[list[str], dict]:
    """The data-parallel command for `p`: (argv, environment variables to add).

    argv is `accelerate launch` run by `python` (so the launcher and its ranks use this
    interpreter's packages, whatever is on PATH): --multi_gpu --num_processes N around
    `-m skipgpt.lm_eval` (lm-eval's own CLI with the skipgpt model registered; rank 0 writes
    `results_<date>.json` next to `results_path`). Explicit launcher settings (one machine, no
    mixed precision, no dynamo, this port) keep a user's `accelerate config` file from changing
    the run. The CPU test mode (--device cpu) adds ACCELERATE_USE_CPU=true, which makes the
    same launcher start N CPU processes (gloo), each with its share of the cores.
    """
    n = p.data_parallel
    if n < 2:
        raise ValueError(f"launch_argv: data_parallel must be >= 2, got {n}")
    model_args = {"pretrained": _model_arg_path(p.model), "pipeline": p.pipeline, "dtype": p.dtype}
    if p.router is not None:
        model_args["router"] = _model_arg_path(p.router)
    if p.lora is not None:
        model_args.update(lora=_model_arg_path(p.lora), lora_alpha=f"{p.lora_alpha:g}", lora_r=str(p.lora_r))
    if p.skip is not None:
        model_args.update(skip=f"{p.skip:g}", seed=str(p.seed))
    if p.compile:
        model_args["compile"] = "True"
    argv = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    env = {}
    if p.cpu_processes:
        env["ACCELERATE_USE_CPU"] = "true"
        argv += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or n) // n))]
    argv += ["-m", "skipgpt.lm_eval", "--model", "skipgpt",
             "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
             "--tasks", ",".join(p.tasks), "--batch_size", str(p.batch_size),
             "--device", "cpu" if p.cpu_processes else "cuda", "--output_path", results_path]
    if p.limit is not None:
        argv += ["--limit", str(p.limit)]
    if p.include_path is not None:
        argv += ["--include_path", p.include_path]
    return argv, env


def launch_display(argv: list[str], env: dict) -> str:
    """`launch_argv`'s command as a user would type it: `accelerate launch ...`."""
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
    return prefix + shlex.join(["accelerate", "launch", *argv[3:]])


def _model_arg_path(path: str) -> str:
    """An absolute path for lm-eval's key=value,... model_args string, which splits on commas and
    would read a relative name such as `1` as a number."""
    if "," in path:
        raise EvalError(
            f"{path}: --data-parallel passes paths to lm-eval as key=value,... model arguments, which cannot hold "
            "a comma; rename or link the file or folder"
        )
    return os.path.abspath(path)


def _free_port() -> int:
    # The launcher's rendezvous port: a free one, so two evaluations can run side by side
    # (accelerate's default, 29500, would collide).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_include_path_with_launch(tasks: list[str]) -> None:
    """lm-eval's CLI takes one --include_path; with the user's there, skipgpt's own task folder
    cannot be passed to the ranks as well."""
    from lm_eval.tasks import TaskManager

    from .. import tasks as skipgpt_tasks

    ours = set(TaskManager(include_path=skipgpt_tasks.task_dir(), include_defaults=False).all_tasks)
    clash = [t for t in tasks if t in ours]
    if clash:
        raise EvalError(
            f"--include-path with --data-parallel: lm-eval's command line takes one task folder, so skipgpt's "
            f"tasks ({', '.join(clash)}) cannot come along with yours; copy their YAML files (from "
            f"{skipgpt_tasks.task_dir()}) into your folder, or run them in a separate evaluation"
        )


def evaluate_data_parallel(p: Plan, output: Path) -> dict:
    """Run `p` as an `accelerate launch` of p.data_parallel processes, then report as `evaluate`.

    Only this process writes to `output`; the ranks' lm-eval writes its results file (rank 0
    only) to a temporary folder, read back here. Tokens, skip rates and timings come from that
    file's config.skipgpt_run, which SkipGPTLM gathers over all ranks.
    """
    with tempfile.TemporaryDirectory(prefix="skipgpt-dp-") as scratch:
        argv, env = launch_argv(p, os.path.join(scratch, "results.json"), _free_port())
        display = launch_display(argv, env)
        print(f"launching: {display}", file=sys.stderr)
        t_start = time.perf_counter()
        returncode = _run_launcher(argv, env)
        launch_s = time.perf_counter() - t_start
        if returncode != 0:
            raise EvalError(f"the data-parallel run failed (exit status {returncode}); its messages are above")
        found = sorted(Path(scratch).glob("results_*.json"))
        if not found:
            raise EvalError(f"the data-parallel run wrote no results file (expected results_*.json in {scratch})")
        results = json.loads(found[-1].read_text(encoding="utf-8"))
    run = results.get("config", {}).get("skipgpt_run")
    if run is None:
        raise EvalError("the data-parallel results carry no config.skipgpt_run (was the model not `skipgpt`?)")
    eval_s = run["requests_seconds"]
    summary = {
        "metrics": results["results"],
        "groups": results.get("groups", {}),
        "timings": {"load_seconds": run["load_seconds"], "compile_seconds": run.get("compile_seconds", 0.0),
                    "eval_seconds": eval_s, "total_seconds": launch_s, "requests_seconds": eval_s},
        "timings_measured": TIMINGS_MEASURED["data parallel"],
        "tokens": run["tokens"],
        "tokens_per_second": run["tokens"] / eval_s if eval_s > 0 else None,
        "tokens_counted": TOKENS_COUNTED + TOKENS_COUNTED_DP,
        "sparsity": run["sparsity"],
        "data_parallel": {"processes": p.data_parallel, "summed_over": run["scope"], "per_rank": run["per_rank"],
                          "launch_command": display},
        "setup": {k: v for k, v in asdict(p).items() if k != "notes"},
        "model_dtype": str(results["config"].get("model_dtype", "")).replace("torch.", ""),
        "versions": package_versions(*VERSIONED),
        "device_name": _devices_name(p.device, p.data_parallel),
        "devices": ["cpu"] * p.data_parallel if p.cpu_processes else [f"cuda:{i}" for i in range(p.data_parallel)],
        "command": p.command(),
        "argv": sys.argv,
    }
    _write(output, results, summary)
    _print_report(results, summary)
    return summary


def _run_launcher(argv: list[str], env: dict) -> int:
    """Run the launcher, wait for it, return its exit status. The ranks' stdout (lm-eval prints
    its table there) goes to stderr, so stdout carries the same report as a one-GPU run."""
    return subprocess.run(argv, env={**os.environ, **env}, stdout=_stderr_fd(), check=False).returncode


def _stderr_fd():
    """This process's stderr as a file descriptor for a child's output, or None (inherit stdout)
    where stderr is not a real file (captured by a test runner)."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- output


def _write(output: Path, results: dict, summary: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    (output / "results.json").write_text(
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n", encoding="utf-8")
    (output / "summary.json").write_text(
        json.dumps(summary, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n", encoding="utf-8")
    if _has_matplotlib():
        title = f"{Path(summary['setup']['model']).name} · {summary['setup']['pipeline']}"
        plot_sparsity(summary["sparsity"], output / "sparsity.png", title=title)


def _print_report(results: dict, summary: dict) -> None:
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    t, s = summary["timings"], summary["sparsity"]
    tps = summary["tokens_per_second"]
    compiled = f", compilation {t['compile_seconds']:.1f} s" if t.get("compile_seconds") else ""
    print(f"wall time: {t['total_seconds']:.1f} s (model load {t['load_seconds']:.1f} s{compiled}, "
          f"evaluation {t['eval_seconds']:.1f} s)")
    print(f"tokens: {summary['tokens']} in {t['eval_seconds']:.1f} s = {tps:.1f} tokens/s "
          "(non-padding token positions through the decoder; see summary.json 'tokens_counted')"
          if tps is not None else f"tokens: {summary['tokens']}")
    dp = summary.get("data_parallel")
    if dp:
        print(f"data parallel: {dp['processes']} processes (accelerate launch); tokens and skip rates summed over "
              f"{dp['summed_over']}; wall time includes starting them")
    print(f"realized skip rate ({summary['setup']['pipeline']}): attention {s['attention']:.1%}, MLP {s['mlp']:.1%}")
    rows = s["per_layer"]
    for i in range(0, len(rows), 16):  # 16 layers a line keeps it under 100 columns
        chunk = rows[i:i + 16]
        print("layer      " + " ".join(f"{row['layer']:>5}" for row in chunk))
        print("attention  " + " ".join(f"{row['attention']:>5.2f}" for row in chunk))
        print("mlp        " + " ".join(f"{row['mlp']:>5.2f}" for row in chunk))
    print(f"output: {summary['setup']['output']}/ (results.json, summary.json"
          + (", sparsity.png)" if _has_matplotlib() else ")"))


def plot_sparsity(sparsity: dict, path: Path, title: str = "") -> None:
    """Per-layer skip rates as a heatmap: 2 rows (attention, MLP) x one column per layer."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    rows = sparsity["per_layer"]
    grid = [[r["attention"] for r in rows], [r["mlp"] for r in rows]]
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * n + 2.0), 2.4))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(0.5, max(max(g) for g in grid)))
    ax.set_yticks([0, 1], labels=["attention", "MLP"])
    ax.set_xticks(range(n), labels=[str(r["layer"]) for r in rows], fontsize=7 if n > 24 else 9)
    ax.set_xlabel("layer")
    ax.set_title(f"{title}  (skip rate: attention {sparsity['attention']:.1%}, MLP {sparsity['mlp']:.1%})".strip(),
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="skip rate", pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _show_progress_messages() -> None:
    # skipgpt's messages at INFO, everyone else's warnings, unless the user configured logging
    # already. lm-eval's INFO lines are many; its progress bars (tqdm) show regardless.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("skipgpt").setLevel(logging.INFO)
