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

Beyond one GPU (both are lm-eval's and accelerate's machinery, not skipgpt's own):
- data parallel: under `accelerate launch --num_processes N -m skipgpt.lm_eval --model skipgpt
  ...` every process loads its own copy of the model on cuda:LOCAL_RANK and lm-eval's evaluator
  gives each rank 1/N of the requests, then gathers the metrics on rank 0. HFLM does this set-up
  only for models it loads itself, so this class does it for the routed model it loads. Route
  counts and timings are gathered over the ranks as well (see `accounting`).
- placement: `device_map=auto` (or HFLM's `parallelize=True`) spreads one model's layers over the
  visible GPUs through `skipgpt.load(device_map=...)`; inputs go to the device of the first
  module (the embedding).

Importing this module registers the name `skipgpt` in lm-eval's model registry. lm-eval 0.4.13
does not look for models outside its own package, so plain `lm_eval --model skipgpt` needs this
import first: `python -m skipgpt.lm_eval ...` (or the `skipgpt-lm-eval` script) does it, then
runs lm-eval's CLI. Later lm-eval releases discover models through the `lm_eval.models`
entry-point group, which skipgpt's pyproject.toml declares, so there plain `lm_eval` works.
"""
from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
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
    device: cpu, cuda, cuda:N; default cuda when available. Ignored under a data-parallel launch
        (each rank runs on its accelerate device, cuda:LOCAL_RANK) and with device_map.
    device_map: spread the model over several devices (`skipgpt.load(device_map=...)`): "auto",
        "balanced", "sequential" or a dict. parallelize=True (HFLM's spelling) means "auto".
        Not combinable with a data-parallel launch.
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
        device_map: Union[str, dict, None] = None,
        parallelize: bool = False,
        tokenizer=None,
        **kwargs,
    ) -> None:
        t_start = time.perf_counter()
        pipeline = pipeline or default_pipeline(router, skip)
        if skip is not None:
            skip = float(skip)  # "0.25" from a model_args string arrives as a float already, "1" as an int
        if parallelize and device_map is None:
            device_map = "auto"
        accelerator = _launched_accelerator()
        if accelerator is not None:
            if device_map is not None:
                raise ValueError(
                    f"device_map={device_map!r} (or parallelize=True) under a data-parallel launch of "
                    f"{accelerator.num_processes} processes: skipgpt runs one whole copy of the model per rank "
                    "(on cuda:LOCAL_RANK); use either data parallelism or a device_map, not both"
                )
            if not isinstance(pretrained, (str, os.PathLike)):
                raise ValueError(
                    "a data-parallel launch needs pretrained=PATH: each rank loads its own copy onto its own device"
                )
            if device is not None and torch.device(device) != accelerator.device:
                logger.info("skipgpt: rank %d runs on %s (its accelerate device), not on device=%s",
                            accelerator.process_index, accelerator.device, device)
            device = accelerator.device
        if isinstance(pretrained, (str, os.PathLike)):
            path = os.fspath(pretrained)
            if device_map is not None:
                if device is not None:
                    logger.info("skipgpt: device_map=%r places the model; device=%s is ignored", device_map, device)
                placement = dict(device=None, device_map=device_map)
            else:
                placement = dict(device=_resolve_device(device))
            model = skipgpt_model.load(
                path, router=router, lora=lora, pipeline="dense", dtype=_resolve_dtype(dtype),
                lora_alpha=lora_alpha, lora_r=lora_r, **placement,
            )
            tokenizer = tokenizer or path
        else:
            if device_map is not None:
                raise ValueError("device_map/parallelize: the model passed is loaded already; place it when loading it")
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
            "device_map": device_map, "data_parallel": accelerator.num_processes if accelerator is not None else 1,
        }
        self._compile_seconds = 0.0
        if compile:
            # In place: one graph for every batch shape lm-eval sends (compile_model's dynamic,
            # size-oblivious tracing), compiled here by a warm-up call so that the evaluation's
            # time and tokens/s measure the compiled model, not the compiler.
            compile_model(model)
            self._compile_seconds = _warm_up(model)
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
        if accelerator is not None:
            # What HFLM sets up for the models it loads itself under `accelerate launch`: its
            # evaluator splits requests by rank and world size, and gathers through accelerator.
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
            self._device = accelerator.device
        # Devices to synchronize before reading a clock: every device a layer runs on.
        self._sync_devices = [d for d in skipgpt_model.model_devices(model) if d.type == "cuda"]
        self._load_seconds = time.perf_counter() - t_start - self._compile_seconds
        self._requests_seconds = 0.0
        self._in_request = False
        self._all_ranks = None  # [world_size, 3 * layers + 3] float64, gathered at lm-eval's barrier
        self._requests_since_gather = False

    # -- lm-eval's request methods, timed ---------------------------------------------------
    def loglikelihood(self, requests, *args, **kwargs):
        return self._timed(super().loglikelihood, requests, *args, **kwargs)

    def loglikelihood_rolling(self, requests, *args, **kwargs):
        return self._timed(super().loglikelihood_rolling, requests, *args, **kwargs)

    def generate_until(self, requests, *args, **kwargs):
        return self._timed(super().generate_until, requests, *args, **kwargs)

    def _timed(self, method, *args, **kwargs):
        """Run a request method, adding its wall time (GPU work included) to requests_seconds."""
        if self._in_request:  # a request method calling another: time the outer one only
            return method(*args, **kwargs)
        self._sync()
        start = time.perf_counter()
        self._in_request = True
        try:
            return method(*args, **kwargs)
        finally:
            self._in_request = False
            self._sync()
            self._requests_seconds += time.perf_counter() - start
            self._requests_since_gather = True

    def _sync(self) -> None:
        for device in self._sync_devices:
            torch.cuda.synchronize(device)

    def barrier(self) -> None:
        """lm-eval's evaluator calls this on every rank after each request type (and only when
        world_size > 1). All ranks are here together, so this is where their route counts and
        timings are gathered: a collective anywhere else could wait forever for ranks that never
        come (get_model_info, for one, runs on rank 0 alone)."""
        super().barrier()
        if self.world_size > 1:
            self._all_ranks = self._gather_accounting()
            self._requests_since_gather = False

    @property
    def compile_seconds(self) -> float:
        """This process's warm-up call that compiled the model (0 without compile=True)."""
        return self._compile_seconds

    def _times(self) -> list:
        return [self._load_seconds, self._compile_seconds, self._requests_seconds]

    def _gather_accounting(self) -> torch.Tensor:
        """[world_size, 3 * layers + 3] float64 on the CPU: each rank's flattened route counts
        (see skipgpt.model.route_counts), load, compile and request seconds. float64 holds counts
        exactly up to 2**53."""
        counts = skipgpt_model.route_counts(self.skipgpt_model).to(self.device, torch.float64).flatten()
        times = torch.tensor(self._times(), dtype=torch.float64, device=self.device)
        row = torch.cat([counts, times])
        return self.accelerator.gather(row).view(self.world_size, -1).cpu()

    # -- accounting ---------------------------------------------------------------------------
    def sparsity(self) -> dict:
        """Realized skip rates of this process since the last `reset_sparsity` (see
        `skipgpt.sparsity`); `accounting()["sparsity"]` has them over all data-parallel ranks."""
        return skipgpt_model.sparsity(self.skipgpt_model)

    def reset_sparsity(self) -> None:
        skipgpt_model.reset_sparsity(self.skipgpt_model)
        self._requests_seconds = 0.0
        self._all_ranks = None

    def accounting(self) -> dict:
        """Tokens, skip rates and timings of the evaluation, over every data-parallel rank.

        Returns {"ranks", "scope", "tokens", "load_seconds", "compile_seconds", "requests_seconds",
        "per_rank", "sparsity"}: tokens and sparsity sum the route counts of all ranks (the requests lm-eval
        duplicates so that ranks run equal numbers of batches included); load_seconds,
        compile_seconds (the warm-up call that compiles, with compile=True) and requests_seconds
        are the slowest rank's (ranks run side by side); per_rank lists each
        rank's tokens and seconds. requests_seconds is the time spent inside loglikelihood,
        loglikelihood_rolling and generate_until, device work included. "scope" says what was
        summed: one process, all ranks, or (when requests ran after the last gather, which
        lm-eval's evaluator never does) rank 0 alone.
        """
        layers = skipgpt_model.routed_layers(self.skipgpt_model)
        n = len(layers)
        if self.world_size > 1 and self._all_ranks is not None and not self._requests_since_gather:
            rows = self._all_ranks
            scope = f"all {self.world_size} ranks"
        else:
            counts = skipgpt_model.route_counts(self.skipgpt_model).to("cpu", torch.float64).flatten()
            rows = torch.cat([counts, torch.tensor(self._times(), dtype=torch.float64)])[None]
            scope = "one process" if self.world_size == 1 else f"rank {self.rank} of {self.world_size} only"
        counts = rows[:, : 3 * n].sum(0).view(n, 3).round().long().tolist()
        sparsity = skipgpt_model.sparsity_from_counts([layer.layer_idx for layer in layers], counts)
        ranks = range(rows.shape[0]) if rows.shape[0] > 1 else [self.rank]
        per_rank = [
            {"rank": r, "tokens": int(row[2]), "load_seconds": float(row[-3]), "compile_seconds": float(row[-2]),
             "requests_seconds": float(row[-1])}
            for r, row in zip(ranks, rows.tolist())
        ]
        return {
            "ranks": self.world_size,
            "scope": scope,
            "tokens": sparsity["tokens"],
            "load_seconds": max(r["load_seconds"] for r in per_rank),
            "compile_seconds": max(r["compile_seconds"] for r in per_rank),
            "requests_seconds": max(r["requests_seconds"] for r in per_rank),
            "per_rank": per_rank,
            "sparsity": sparsity,
        }

    def get_model_info(self) -> dict:
        # HFLM's version asks the Hugging Face Hub for a commit hash, which for a local folder
        # only costs network time-outs; report the routing setup instead, and the run's
        # accounting (lm-eval calls this on rank 0 once the requests are done; results JSON
        # files carry it under config.skipgpt_run, which is where `skipgpt eval
        # --data-parallel` reads it).
        model = self.skipgpt_model
        return {
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(model.dtype),
            "skipgpt": dict(self.skipgpt_config),
            "skipgpt_run": self.accounting(),
        }


def _warm_up(model: nn.Module) -> float:
    """Seconds of one forward of a [2, 80] batch without an attention mask (how lm-eval's
    loglikelihood requests call the model), which compiles a model just compiled lazily. The
    route counters are reset afterwards, so the warm-up tokens are not counted. Requests with
    another call signature (generate_until passes a mask) still compile at their first call."""
    device = model.get_input_embeddings().weight.device
    ids = torch.zeros(2, 80, dtype=torch.long, device=device)
    start = time.perf_counter()
    with torch.no_grad():
        model(ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    skipgpt_model.reset_sparsity(model)
    return seconds


def _launched_accelerator():
    """An accelerate `Accelerator` when this process is one of several started by `accelerate
    launch` (or torchrun), else None. Its device is this rank's (cuda:LOCAL_RANK; accelerate
    also makes it the current CUDA device, where Triton launches kernels)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator, InitProcessGroupKwargs

    # Ranks wait for each other at lm-eval's barriers while the slowest finishes its share of
    # requests; the default collective time-out (10 to 30 minutes) would end long evaluations.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(days=7))])
    return accelerator if accelerator.num_processes > 1 else None


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
