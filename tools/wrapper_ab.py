"""Inductor's Python wrapper against its C++ wrapper (`options={"cpp_wrapper": True}`), device
machine: compile time and host/wall time per step of the compiled providers, next to hf and the
eager pipelines, at host-bound prefill points, one layer (`--scope layer`) or a model of
`--layers` 8B-geometry layers (`--scope model`).

At model scope the C++ wrapper fails to compile compiled-sparse (a C++ compile error naming
custom_op_wrapper: host-side ops in the torch.cond branches of more than one layer), which is why
compile_model refuses it; compiled-dense with it has not been run at model scope.

Each wrapper runs in a child process of its own with empty Inductor and Triton caches, so the
first compiled provider's compile time is a cold one (a user's first compile; the next provider
shares the child's caches) and neither wrapper reuses the other's kernels. The compiled model is compile_model's single graph (torch.cond), as in the benchmark.

    python tools/wrapper_ab.py --scope model --layers 8 --points 1:512,1:1024,4:512 --skip 0.25
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WRAPPERS = {"python": None, "cpp": {"cpp_wrapper": True}}


def child(args) -> None:
    """One wrapper: print one JSON line per measurement."""
    import torch
    from profile_host import host_and_wall_us  # tools/ is on the path of a script run from it

    from skipgpt.benchmark import LayerBench, ModelBench, compile_module

    options = WRAPPERS[args.child]
    device = torch.device("cuda")
    if args.scope == "layer":
        bench = LayerBench("llama-3.1-8b", torch.bfloat16, device)
    else:
        bench = ModelBench("llama-3.1-8b", torch.bfloat16, device, layers=args.layers, fp32_reference=False)
    points = [tuple(int(v) for v in p.split(":")) for p in args.points.split(",")]

    def emit(**row):
        print(json.dumps(dict(wrapper=args.child, **row)), flush=True)

    eager = {}
    for provider in args.eager.split(","):
        for B, L in points:
            fn = bench.step(provider, "prefill", B, L, args.skip)
            eager[(provider, B, L)] = fn()
            host, wall = host_and_wall_us(fn, n=args.steps)
            emit(provider=provider, B=B, L=L, host_us=host, wall_us=wall)
    for provider in args.compiled.split(","):
        torch._dynamo.reset()
        compiled = compile_module(bench.routed if args.scope == "layer" else bench.routed.model, options=options)
        if args.scope == "layer":
            bench._compiled_layer = compiled
        else:
            bench._compiled_model = compiled
        twin = "dense" if provider == "compiled-dense" else "triton-sparse"
        for i, (B, L) in enumerate(points):
            fn = bench.step(provider, "prefill", B, L, args.skip)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            first_call_s = time.perf_counter() - t0  # the compile at the first point; ~0 after
            ref = eager.get((twin, B, L))
            diff = None if ref is None else (out.float() - ref.float()).abs().max().item()
            host, wall = host_and_wall_us(fn, n=args.steps)
            emit(provider=provider, B=B, L=L, host_us=host, wall_us=wall, first_call_s=first_call_s,
                 max_abs_diff_vs_eager=diff)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scope", choices=("layer", "model"), default="layer")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers at --scope model")
    parser.add_argument("--points", default="1:512,1:1024,1:2048,8:512", help="comma-separated B:L prefill points")
    parser.add_argument("--skip", type=float, default=0.25)
    parser.add_argument("--wrappers", default="python,cpp", help=f"comma-separated, of {','.join(WRAPPERS)}")
    parser.add_argument("--eager", default="hf,dense,triton-sparse", help="eager providers timed in each child")
    parser.add_argument("--compiled", default="compiled-dense,compiled-sparse")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per point")
    parser.add_argument("--child", choices=tuple(WRAPPERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    rows = []
    for wrapper in args.wrappers.split(","):
        if wrapper not in WRAPPERS:
            parser.error(f"--wrappers: unknown wrapper {wrapper!r}; choose from {', '.join(WRAPPERS)}")
        caches = tempfile.mkdtemp(prefix=f"wrapper-ab-{wrapper}-")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor", TRITON_CACHE_DIR=f"{caches}/triton")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", wrapper], env=env,
                              stdout=subprocess.PIPE, text=True)
        print(f"{wrapper} wrapper: child took {time.perf_counter() - t0:.0f} s, exit {proc.returncode}", flush=True)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
            else:
                print(line)
    hf = {(r["wrapper"], r["B"], r["L"]): r["wall_us"] for r in rows if r["provider"] == "hf"}
    print(f"\n{'wrapper':7s} {'provider':16s} {'B':>2s} {'L':>5s} {'host us':>9s} {'wall us':>9s} {'vs hf':>6s} "
          f"{'1st call s':>10s} {'max|diff|':>9s}")
    for r in rows:
        ratio = hf.get((r["wrapper"], r["B"], r["L"]))
        ratio = f"{ratio / r['wall_us']:5.2f}x" if ratio else ""
        first = f"{r['first_call_s']:10.2f}" if "first_call_s" in r else ""
        diff = r.get("max_abs_diff_vs_eager")
        print(f"{r['wrapper']:7s} {r['provider']:16s} {r['B']:2d} {r['L']:5d} {r['host_us']:9.1f} {r['wall_us']:9.1f} "
              f"{ratio:>6s} {first:>10s} {'' if diff is None else f'{diff:9.3g}'}")


if __name__ == "__main__":
    main()
