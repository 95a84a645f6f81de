"""`python -m skipgpt.lm_eval ARGS` (or the `skipgpt-lm-eval` script): lm-eval's own command
line, with the `skipgpt` model registered and skipgpt's tasks on the include path.

    python -m skipgpt.lm_eval --model skipgpt \\
        --model_args pretrained=PATH,router=PATH,pipeline=triton-sparse,dtype=bfloat16 \\
        --tasks skipgpt_wiki --batch_size 8

Why a wrapper: lm-eval 0.4.13 (the newest release) finds models only in its own registry, and
has no flag to import a user module first; so `lm_eval --model skipgpt` fails unless
`skipgpt.lm_eval_model` was imported. This module imports it, then hands ARGS to lm-eval's CLI
unchanged, adding `--include_path <skipgpt tasks>` when ARGS has no --include_path (pass
`--include_path "$(python -c 'import skipgpt.tasks as t; print(t.task_dir())')"` yourself
together with your own path otherwise). lm-eval releases with entry-point plugins read
skipgpt's `lm_eval.models` entry point, and there plain `lm_eval --model skipgpt` works too.

Data parallel over N GPUs is accelerate's launcher around this same module; each rank loads
the model on its own GPU, lm-eval splits the requests and rank 0 prints and writes the results:

    accelerate launch --multi_gpu --num_processes N -m skipgpt.lm_eval --model skipgpt \
        --model_args pretrained=PATH,... --tasks skipgpt_wiki --batch_size 8 --output_path out/
"""
from __future__ import annotations

import sys
from typing import Optional


def lm_eval_argv(argv: list[str]) -> list[str]:
    """ARGS with skipgpt's task folder added as --include_path when an evaluation run has none."""
    from .tasks import task_dir

    subcommands = ("run", "ls", "validate")
    wants_help = any(a in ("-h", "--help") for a in argv)
    has_include = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    if argv and not wants_help and not has_include and (argv[0] in subcommands or argv[0].startswith("-")):
        return argv + ["--include_path", task_dir()]
    return argv


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import lm_eval_model  # noqa: F401  (registers the `skipgpt` model)

    # lm-eval's CLI parses sys.argv itself.
    sys.argv = ["lm-eval", *lm_eval_argv(argv)]
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    _end_process_group()


def _end_process_group() -> None:
    """Take down the process group a data-parallel launch set up (SkipGPTLM's Accelerator).
    Left to the interpreter's exit, its teardown can abort the process after a successful run
    (seen with gloo: "terminate called without an active exception"), which accelerate's
    launcher then reports as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still needs the group
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
