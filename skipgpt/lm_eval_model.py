"""The `skipgpt` model for lm-evaluation-harness: lm-eval's own HFLM running a routed model.

    lm = SkipGPTLM(pretrained="path/to/hf-model", router="router.pth", pipeline="triton-sparse")
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Everything lm-eval asks of a model (batched loglikelihood, loglikelihood_rolling,
generate_until) is HFLM's code; this class only builds the model HFLM runs: it loads it with
`skipgpt.load` (or routes a model object it is given), optionally forces random routes
(`skip=`) and compiles it with `skipgpt.compile.compile_model`. The routed model honours both of lm-eval's padding
conventions: loglikelihood right-pads and passes no attention mask (causal attention keeps the
padding out of every real token's result), generate_until left-pads and passes a mask (the
routed layers read it: padding never executes and is never attended to).

Importing this module registers the name `skipgpt` in lm-eval's model registry. lm-eval 0.4.13
does not look for models outside its own package, so plain `lm_eval --model skipgpt` needs this
import first: `python -m skipgpt.lm_eval ...` (or the `skipgpt-lm-eval` script) does it, then
runs lm-eval's CLI. Later lm-eval releases discover models through the `lm_eval.models`
entry-point group, which skipgpt's pyproject.toml declares, so there plain `lm_eval` works.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM
from torch import nn

from . import model as skipgpt_model
from .compile import compile_model

logger = logging.getLogger("skipgpt")

MODEL_NAME = "skipgpt"


def _resolve_dtype(dtype) -> Optional[torch.dtype]:
    """None for "auto" (the checkpoint's own dtype); otherwise a torch.dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in skipgpt_model.DTYPES:
        raise ValueError(f"dtype: expected auto or one of {', '.join(skipgpt_model.DTYPES)}, got {dtype!r}")
    return skipgpt_model.DTYPES[dtype]


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        # lm-eval's CLI fills in cuda:0 when --device is not given; HFLM then falls back to
        # the CPU, and so does this. (`skipgpt eval` refuses an explicit --device cuda earlier.)
        logger.warning("skipgpt: device %s requested but CUDA is not available; using the CPU", device)
        return torch.device("cpu")
    return device


def default_pipeline(router, skip) -> str:
    """triton-sparse when something decides routes (a router file or forced skips), else dense."""
    return "triton-sparse" if router is not None or skip is not None else "dense"


class SkipGPTLM(HFLM):
    """lm-eval's HFLM over a skipgpt-routed model.

    pretrained: a Hugging Face model folder, or a model object (routed already, or plain: then it
        is wrapped here).
    router, lora, lora_alpha, lora_r: as for `skipgpt.load`.
    pipeline: dense | torch-sparse | triton-sparse; None picks triton-sparse when router or skip
        is given, else dense.
    skip, seed: force seeded random routes at this skip rate (`skipgpt.force_routes`), for models
        without routers.
    compile: compile the model's forward in place with `skipgpt.compile.compile_model` (one graph
        for every batch shape; the first batches wait for compilation).
    dtype: auto (the checkpoint's) or bf16/bfloat16/fp16/float16/fp32/float32.
    device: cpu, cuda, cuda:N; default cuda when available.
    Everything else (batch_size, max_length, add_bos_token, ...) goes to HFLM unchanged.
    """

    def __init__(
        self,
        pretrained: Union[str, os.PathLike, nn.Module],
        router: Optional[str] = None,
        lora: Optional[str] = None,
        pipeline: Optional[str] = None,
        skip: Optional[float] = None,
        seed: int = 0,
        lora_alpha: float = 32,
        lora_r: int = 16,
        compile: bool = False,
        dtype: Union[str, torch.dtype, None] = "auto",
        device: Optional[str] = None,
        tokenizer=None,
        **kwargs,
    ) -> None:
        pipeline = pipeline or default_pipeline(router, skip)
        if skip is not None:
            skip = float(skip)  # "0.25" from a model_args string arrives as a float already, "1" as an int
        if isinstance(pretrained, (str, os.PathLike)):
            path = os.fspath(pretrained)
            model = skipgpt_model.load(
                path, router=router, lora=lora, pipeline="dense", dtype=_resolve_dtype(dtype),
                device=_resolve_device(device), lora_alpha=lora_alpha, lora_r=lora_r,
            )
            tokenizer = tokenizer or path
        else:
            model = pretrained
            if not _is_routed(model):
                skipgpt_model.wrap(model, router=router, lora=lora, pipeline="dense", lora_alpha=lora_alpha, lora_r=lora_r)
            elif router is not None or lora is not None:
                raise ValueError("router/lora: the model passed is routed already; load its routers and LoRA before")
            tokenizer = tokenizer or model.name_or_path
        model.eval()
        # Routes first, then the pipeline: set_pipeline refuses a sparse pipeline with nothing
        # to decide routes.
        skipgpt_model.force_routes(model, skip=skip, seed=int(seed))
        skipgpt_model.set_pipeline(model, pipeline)
        self.skipgpt_model = model
        self.skipgpt_config = {
            "model": model.name_or_path, "router": _str(router), "lora": _str(lora), "pipeline": pipeline,
            "forced_skip": skip, "seed": int(seed) if skip is not None else None, "compile": bool(compile),
        }
        if compile:
            # In place: one graph for every batch shape lm-eval sends (compile_model's dynamic,
            # size-oblivious tracing); the first batches wait for compilation.
            compile_model(model)
        # HFLM takes an instantiated model as is: it keeps its device and dtype, and ignores its
        # own device/dtype/parallelize arguments. It warns that such arguments "may be ignored";
        # here they were not (they went to skipgpt.load above), so those warnings are held back.
        hf_logger = logging.getLogger(HFLM.__module__)
        level = hf_logger.level
        hf_logger.setLevel(logging.ERROR)
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        finally:
            hf_logger.setLevel(level)

    def sparsity(self) -> dict:
        """Realized skip rates since the last `reset_sparsity` (see `skipgpt.sparsity`)."""
        return skipgpt_model.sparsity(self.skipgpt_model)

    def reset_sparsity(self) -> None:
        skipgpt_model.reset_sparsity(self.skipgpt_model)

    def get_model_info(self) -> dict:
        # HFLM's version asks the Hugging Face Hub for a commit hash, which for a local folder
        # only costs network time-outs; report the routing setup instead.
        model = self.skipgpt_model
        return {
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(model.dtype),
            "skipgpt": dict(self.skipgpt_config),
        }


def _is_routed(model: nn.Module) -> bool:
    try:
        skipgpt_model.routed_layers(model)
        return True
    except ValueError:
        return False


def _str(path) -> Optional[str]:
    return None if path is None else os.fspath(path)


def register() -> None:
    """Put `skipgpt` in lm-eval's model registry (idempotent).

    Importing lm_eval.models.huggingface above has already filled the registry with lm-eval's own
    models; registering into an empty registry would stop lm-eval from loading them. A name that
    is present already (an entry-point placeholder in later lm-eval releases) is left alone.
    """
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=SkipGPTLM)


register()
