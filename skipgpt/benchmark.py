"""Layer benchmark: one decoder layer of a given geometry, random weights, forced random routes.

Providers:
  hf             the Hugging Face layer (cuBLAS + SDPA): the dense baseline
  dense          the routed layer's dense pipeline (skipgpt ops, every token executes)
  torch-sparse   the routed layer's plain-PyTorch pipeline (the reference)
  triton-sparse  the routed layer's custom-op pipeline

Before it is timed, every provider's output is compared with torch-sparse run in float32 on an
fp32 copy of the weights (the ground truth) under the same routes; hf and dense only at skip 0,
where they compute the same function. A provider off by more than the tolerance is reported as
wrong and not timed. Each point records its relative error.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .cache import SeqFirstLayer
from .layer import RoutedDecoderLayer
from .routing import RoutingState

GEOMETRIES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         rope_theta=500000.0, rms_norm_eps=1e-5, vocab_size=128256, max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                 rope_theta=10000.0, rms_norm_eps=1e-5, vocab_size=256, max_position_embeddings=4096),
}
PROVIDERS = ("hf", "dense", "torch-sparse", "triton-sparse", "compiled-dense", "compiled-sparse")
# compiled-sparse is triton-sparse under torch.compile (one graph for every shape: see skipgpt.compile).
DENSE_PROVIDERS = ("hf", "dense", "compiled-dense")  # every token executes: checked at skip 0 only
# A decode point times this many consecutive steps (one token each, at successive cache slots),
# so a batch-1 run sees many route decisions rather than one fixed pattern; times are per step.
DECODE_STEPS = 16


@dataclass
class Point:
    provider: str
    mode: str
    batch: int
    seqlen: int  # prefill: tokens per sequence; decode: KV length before the step
    skip: float
    ms: Optional[float] = None
    ms_q20: Optional[float] = None
    ms_q80: Optional[float] = None
    tflops: Optional[float] = None
    speedup: Optional[float] = None  # hf time / this time, same run
    rel_err: Optional[float] = None  # vs the fp32 torch-sparse ground truth
    status: str = "ok"


class LayerBench:
    """An HF decoder layer and a routed layer sharing its weights."""

    def __init__(self, geometry: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.config = LlamaConfig(num_hidden_layers=1, **GEOMETRIES[geometry])
        self.config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        with torch.device(device):
            self.hf = LlamaDecoderLayer(self.config, layer_idx=0).to(dtype).eval()
            self.rotary = LlamaRotaryEmbedding(self.config)
        self.state = RoutingState()
        self.routed = RoutedDecoderLayer(self.hf, 0, self.config, self.state).eval()
        self.reference = RoutedDecoderLayer(copy.deepcopy(self.hf).float(), 0, self.config, self.state).eval()
        self.reference.pipeline = "torch-sparse"
        self.dtype, self.device = dtype, device
        g = self.routed.geometry
        self.geometry = g

    def dense_flops(self, mode: str, batch: int, seqlen: int) -> float:
        """Dense-equivalent FLOPs of one layer step: projections, attention and MLP."""
        g = self.geometry
        q_out, kv_out = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
        tokens = batch * (seqlen if mode == "prefill" else 1)
        proj = 2 * tokens * g.hidden_size * (2 * q_out + 2 * kv_out)
        mlp = 2 * tokens * g.hidden_size * g.intermediate_size * 3
        pairs = batch * seqlen * (seqlen + 1) / 2 if mode == "prefill" else batch * (seqlen + 1)
        attn = 4 * pairs * g.num_heads * g.head_dim
        return proj + mlp + attn

    def step(self, provider: str, mode: str, batch: int, seqlen: int, skip: float) -> Callable[[], torch.Tensor]:
        """A closure running one prefill, or DECODE_STEPS decode steps after a context of `seqlen`
        cached tokens; repeated calls recompute the same work. Provider "reference" is
        torch-sparse in float32 on the same (upcast) inputs."""
        g, cfg = self.geometry, self.config
        gen = torch.Generator(device=self.device).manual_seed(1)
        new, steps, past = (seqlen, 1, 0) if mode == "prefill" else (1, DECODE_STEPS, seqlen)
        x = torch.randn(batch, new, g.hidden_size, generator=gen, device=self.device, dtype=self.dtype)
        # The context already in the cache: [B, past, Hk, D] keys and values, the same for every provider.
        past_kv = [torch.randn(batch, past, g.num_kv_heads, g.head_dim, generator=gen, device=self.device, dtype=self.dtype)
                   for _ in range(2)]
        pos = torch.arange(past, past + new * steps, device=self.device)[None].expand(batch, -1)
        cos, sin = self.rotary(x, pos)
        rope = [(cos[:, i * new:(i + 1) * new].contiguous(), sin[:, i * new:(i + 1) * new].contiguous())
                for i in range(steps)]
        if provider == "reference":
            x, past_kv = x.float(), [t.float() for t in past_kv]
            rope = [(c.float(), s_.float()) for c, s_ in rope]
        if provider == "hf":
            return self._hf_steps(x, rope, past_kv, past, steps)
        layer = self.reference if provider == "reference" else self.routed
        if provider.startswith("compiled-"):
            layer.pipeline = "dense" if provider == "compiled-dense" else "triton-sparse"
            layer = self._compiled()
        elif provider != "reference":
            layer.pipeline = provider
        kv = SeqFirstLayer()
        kv.reserve(batch, past + new * steps, g.num_kv_heads, g.head_dim, x.dtype, self.device)
        if past:
            kv.keys[:, :past], kv.values[:, :past] = past_kv
        cache = _OneLayerCache(kv)

        # Set once here: creating the parameter tensor inside run() would copy host to device
        # on every call, and could not be captured in a CUDA graph.
        self.state.force(skip, seed=0, device=self.device)

        def run():
            kv.length = past
            with torch.no_grad():
                return torch.cat([layer(x, position_embeddings=cs, cache=cache) for cs in rope], dim=1)

        return run

    def _compiled(self):
        """The routed layer under torch.compile, compiled once per pipeline and reused across
        points (dynamic shapes, size-oblivious tracing, as skipgpt.compile.compile_model)."""
        if not hasattr(self, "_compiled_layer"):
            import torch.fx.experimental._config as fx_config

            compiled = torch.compile(self.routed, dynamic=True, fullgraph=True)

            def call(*args, **kwargs):
                with fx_config.patch(backed_size_oblivious=True):
                    return compiled(*args, **kwargs)

            self._compiled_layer = call
        return self._compiled_layer

    def _hf_steps(self, x, rope, past_kv, past: int, steps: int):
        """The Hugging Face layer: a plain forward at prefill; at decode, the first step repeated
        `steps` times over a static cache holding exactly the context plus that token. (Dense work
        is the same at every step; a longer static cache would need an explicit mask, which sends
        SDPA to a much slower kernel: 21 ms instead of ~1 ms at B=64, KV 16384 on an H200.)"""
        if past == 0:
            return torch.no_grad()(lambda: self.hf(x, attention_mask=None, position_embeddings=rope[0]))
        import inspect

        from transformers import StaticCache

        cache = StaticCache(config=self.config, max_cache_len=past + 1)
        k, v = (t.transpose(1, 2) for t in past_kv)
        cache.layers[0].lazy_initialization(k, v)
        cache.layers[0].keys[:, :, :past] = k
        cache.layers[0].values[:, :, :past] = v
        # transformers renamed the layer's `past_key_values` argument to `cache` in 5.2x.
        cache_kw = "cache" if "cache" in inspect.signature(type(self.hf).forward).parameters else "past_key_values"

        @torch.no_grad()
        def run():
            for _ in range(steps):
                cache.layers[0].cumulative_length.fill_(past)
                out = self.hf(x, attention_mask=None, position_embeddings=rope[0], **{cache_kw: cache})
            return out

        return run


class _OneLayerCache:
    """The smallest object `seq_first_layer` accepts: a `layers` list."""

    def __init__(self, layer):
        self.layers = [layer]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def run_grid(bench: LayerBench, mode: str, batches, seqlens, skips, providers, tolerance: float, timer) -> list[Point]:
    points = []
    for batch in batches:
        for seqlen in seqlens:
            for skip in skips:
                flops = bench.dense_flops(mode, batch, seqlen)
                try:
                    ref = bench.step("reference", mode, batch, seqlen, skip)()
                except torch.cuda.OutOfMemoryError:
                    ref = None
                    torch.cuda.empty_cache()
                hf_ms = None
                for provider in providers:
                    point = Point(provider, mode, batch, seqlen, skip)
                    points.append(point)
                    try:
                        fn = bench.step(provider, mode, batch, seqlen, skip)
                        if ref is not None and (provider not in DENSE_PROVIDERS or skip == 0):
                            out = fn()  # hf's decode repeats its first step: compare that step
                            point.rel_err = _rel_err(out, ref[:, : out.shape[1]])
                            if point.rel_err > tolerance:
                                point.status = "wrong"
                                continue
                        steps = 1 if mode == "prefill" else DECODE_STEPS
                        point.ms, point.ms_q20, point.ms_q80 = (t / steps for t in timer(fn))
                    except torch.cuda.OutOfMemoryError:
                        point.status = "out of memory"
                        torch.cuda.empty_cache()
                        continue
                    except RuntimeError as e:  # a step that syncs cannot be graph-captured
                        if "captur" not in str(e):
                            raise
                        point.status = "not capturable"
                        torch.cuda.synchronize()
                        continue
                    point.tflops = flops / point.ms / 1e9
                    if provider == "hf":
                        hf_ms = point.ms
                    if hf_ms:
                        point.speedup = hf_ms / point.ms
                del ref
    return points


def cuda_timer(fn):
    import triton

    q20, med, q80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
    return med, q20, q80


def cuda_graph_timer(fn):
    """Capture one step in a CUDA graph and time its replays: no host overhead, as in a
    graph-captured decode loop. Raises if the step cannot be captured (it syncs with the host)."""
    import triton

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up on a side stream, as capture requires
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    q20, med, q80 = triton.testing.do_bench(graph.replay, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
    return med, q20, q80


def cpu_timer(fn, reps: int = 3):
    import time

    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0], times[-1]


def format_table(points: list[Point]) -> str:
    head = (f"{'provider':<14} {'mode':<8} {'B':>3} {'L/KV':>6} {'skip':>5} {'ms':>9} {'TFLOP/s':>8} "
            f"{'vs hf':>6} {'rel err':>8}  status")
    lines = [head, "-" * len(head)]
    for p in points:
        ms = f"{p.ms:9.3f}" if p.ms is not None else f"{'-':>9}"
        tf = f"{p.tflops:8.1f}" if p.tflops is not None else f"{'-':>8}"
        sp = f"{p.speedup:6.2f}" if p.speedup is not None else f"{'-':>6}"
        err = f"{p.rel_err:8.1e}" if p.rel_err is not None else f"{'-':>8}"
        lines.append(f"{p.provider:<14} {p.mode:<8} {p.batch:>3} {p.seqlen:>6} {p.skip:>5.2f} {ms} {tf} {sp} {err}  {p.status}")
    return "\n".join(lines)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama-3.1-8b")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 4, 8], help="comma-separated batch sizes")
    parser.add_argument("--seqlens", type=_ints, default=[512, 2048, 8192],
                        help="prefill: tokens per sequence; decode: KV length (comma-separated)")
    parser.add_argument("--skips", type=_floats, default=[0.0, 0.25, 0.5], help="forced skip rates (comma-separated)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time CUDA-graph replays of each step (no host overhead; decode-style loops)")
    parser.add_argument("--json", help="also write the points to this JSON file")
    args = parser.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {', '.join(PROVIDERS)}")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and args.geometry != "tiny":
        print("no CUDA device: running the tiny geometry on the CPU paths")
        args.geometry = "tiny"
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    bench = LayerBench(args.geometry, dtype, device)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    if args.cuda_graph and not on_gpu:
        parser.error("--cuda-graph needs a CUDA device")
    timer = (cuda_graph_timer if args.cuda_graph else cuda_timer) if on_gpu else cpu_timer
    points = run_grid(bench, args.mode, args.batch_sizes, args.seqlens, args.skips, providers, tolerance, timer)
    print(format_table(points))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if on_gpu else "cpu", "geometry": args.geometry,
                       "cuda_graph": args.cuda_graph, "points": [asdict(p) for p in points]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
