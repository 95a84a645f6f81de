"""Where a compiled generate() step's time goes (device machine): for compiled-dense and
compiled-sparse on the 4-layer Llama-3.1-8B geometry, Inductor's CUDA-graph and recompile logs,
then a torch.profiler table of one generate() call and the count of host-device syncs, graph
replays and kernel launches in it.

Usage: python tools/profile_generate.py [--batch 1] [--new-tokens 32]
"""
import argparse
import collections

import torch

from skipgpt.benchmark import ModelBench

EVENTS = ("cudaGraphLaunch", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
          "cudaMemcpyAsync", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--new-tokens", type=int, default=32)
args = parser.parse_args()

torch._logging.set_logs(cudagraphs=True, recompiles=True, graph_breaks=True)
bench = ModelBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"), layers=4)
for provider in ("compiled-dense", "compiled-sparse"):
    run = bench.generation(provider, args.batch, 128, 0.25, args.new_tokens)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    counts = collections.Counter(e.name for e in prof.events() if e.name in EVENTS)
    print(f"== {provider} B={args.batch}, {args.new_tokens} new tokens: {dict(counts)}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
