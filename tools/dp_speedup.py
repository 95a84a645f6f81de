"""Data-parallel evaluation speedup: the same `skipgpt eval` on 1 GPU and on N GPUs
(`--data-parallel N`), timed from outside as a user experiences it, printed as a Markdown table
row (with its header) for docs/BENCHMARKS.md.

    python tools/dp_speedup.py --gpus 2                      # SmolLM2 (skipgpt setup) on skipgpt_wiki
    python tools/dp_speedup.py --gpus 2 --model PATH --router R --tasks skipgpt_wiki --batch-size 8 --dtype bf16

Columns: wall = the whole command (process start, imports, task data, model load, evaluation,
results; what a user waits for); requests = the model's request methods only (the slowest rank's
under data parallel; summary.json timings.requests_seconds), the part that N GPUs divide. The
perplexities of both runs are shown so a speedup is never read off runs that computed different
things. Each configuration runs --repeats times; the fastest run is reported.

Extra flags after `--` go to both `skipgpt eval` runs unchanged (e.g. `-- --skip 0.25`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_eval(common: list[str], gpus: int, output: Path) -> tuple[float, dict]:
    """(wall seconds of the whole command, its summary.json)."""
    argv = [sys.executable, "-m", "skipgpt", "eval", *common, "--output", str(output)]
    argv += ["--data-parallel", str(gpus)] if gpus > 1 else ["--device", "cuda"]
    print("$ " + " ".join(argv[2:]), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=sys.stderr)
    wall = time.perf_counter() - start
    return wall, json.loads((output / "summary.json").read_text())


def first_perplexity(summary: dict) -> str:
    for task, metrics in summary["metrics"].items():
        for key in ("word_perplexity,none", "perplexity,none"):
            if key in metrics:
                return f"{metrics[key]:.4f}"
    return "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2, help="N for the data-parallel run (default 2)")
    p.add_argument("--model", help="model folder (default: SmolLM2-135M from `skipgpt setup`)")
    p.add_argument("--router", help="router checkpoint (default: none)")
    p.add_argument("--tasks", default="skipgpt_wiki")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--limit", help="documents per task (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is reported")
    p.add_argument("--header", action=argparse.BooleanOptionalAction, default=True, help="print the table header")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.gpus < 2:
        p.error("--gpus: expected at least 2")
    import torch

    if torch.cuda.device_count() < args.gpus:
        p.error(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA device(s) visible")

    common = ["--tasks", args.tasks, "--batch-size", str(args.batch_size), "--dtype", args.dtype, *extra]
    if args.model:
        common += ["--model", args.model]
    if args.router:
        common += ["--router", args.router]
    if args.limit:
        common += ["--limit", args.limit]

    best = {}
    with tempfile.TemporaryDirectory(prefix="dp-speedup-") as scratch:
        for gpus in (1, args.gpus):
            for i in range(args.repeats):
                wall, summary = run_eval(common, gpus, Path(scratch) / f"{gpus}-{i}")
                if gpus not in best or wall < best[gpus][0]:
                    best[gpus] = (wall, summary)
    (w1, s1), (wn, sn) = best[1], best[args.gpus]
    r1, rn = s1["timings"]["requests_seconds"], sn["timings"]["requests_seconds"]
    n = args.gpus
    if args.header:
        print(f"| model | tasks | pipeline | batch | dtype | GPU | wall 1 GPU s | wall {n} GPUs s | speedup | "
              f"requests 1 GPU s | requests {n} GPUs s | speedup | word ppl 1 GPU | word ppl {n} GPUs |")
        print("|" + " --- |" * 14)
    setup = s1["setup"]
    print(f"| {Path(setup['model']).name} | {','.join(setup['tasks'])} | {setup['pipeline']}"
          f"{' skip ' + format(setup['skip'], 'g') if setup['skip'] is not None else ''} | {setup['batch_size']} | "
          f"{s1['model_dtype']} | {s1['device_name']} | {w1:.1f} | {wn:.1f} | {w1 / wn:.2f}x | "
          f"{r1:.2f} | {rn:.2f} | {r1 / rn:.2f}x | {first_perplexity(s1)} | {first_perplexity(sn)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
