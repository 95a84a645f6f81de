"""Host and wall time per layer step (device machine): hf, eager triton-sparse, and compiled
triton-sparse (compile_model's settings: one graph, torch.cond) with Inductor's Python wrapper and
with its C++ wrapper (`options={"cpp_wrapper": True}`), at host-bound prefill points.

    python tools/wrapper_ab.py --points 1:512,1:1024,1:2048,8:512 --skip 0.25
"""
import argparse
import time

import torch
from profile_host import host_and_wall_us  # tools/ is on the path of a script run from it

from skipgpt.benchmark import LayerBench
from skipgpt.compile import with_tracing_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="1:512,1:1024,1:2048,8:512", help="comma-separated B:L prefill points")
    parser.add_argument("--skip", type=float, default=0.25)
    args = parser.parse_args()
    points = [tuple(int(v) for v in p.split(":")) for p in args.points.split(",")]
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    rows = {}
    for B, L in points:
        for provider in ("hf", "triton-sparse"):
            rows[(provider, B, L)] = host_and_wall_us(bench.step(provider, "prefill", B, L, args.skip))
    for wrapper, options in (("python", None), ("cpp", {"cpp_wrapper": True})):
        torch._dynamo.reset()
        bench._compiled_layer = with_tracing_config(
            torch.compile(bench.routed, dynamic=True, fullgraph=True, options=options))
        t0 = time.perf_counter()
        for B, L in points:
            fn = bench.step("compiled-sparse", "prefill", B, L, args.skip)
            fn()
            torch.cuda.synchronize()
            if (B, L) == points[0]:
                print(f"compile ({wrapper} wrapper): {time.perf_counter() - t0:.1f} s", flush=True)
            rows[(f"compiled-sparse, {wrapper} wrapper", B, L)] = host_and_wall_us(fn)
        out = bench.step("compiled-sparse", "prefill", *points[0], args.skip)()
        ref = bench.step("triton-sparse", "prefill", *points[0], args.skip)()
        print(f"max |compiled - eager| ({wrapper} wrapper): {(out.float() - ref.float()).abs().max().item():.3g}")
        del bench._compiled_layer
    print(f"{'provider':34s} {'B':>2s} {'L':>5s} {'host us':>9s} {'wall us':>9s} {'vs hf':>6s}")
    for (provider, B, L), (host, wall) in rows.items():
        print(f"{provider:34s} {B:2d} {L:5d} {host:9.1f} {wall:9.1f} {rows[('hf', B, L)][1] / wall:5.2f}x")


if __name__ == "__main__":
    main()
