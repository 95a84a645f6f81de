"""Does the steady timer's block start cost a compiled step more than an eager one? (device machine)

`skipgpt bench --steady` times blocks of at least 8 back-to-back calls between two synchronizes,
so each call carries an eighth of the block's start: the host's time from the synchronize to the
first kernel, longer for a compiled call (guards, the wrapper's prologue). A model's forward pays
that once for all its layers (32 in Llama-3.1-8B). This times eager and compiled triton-sparse
together (`steady_timer`, orders shuffled) with blocks of 8 and of 32 calls, the two block sizes
alternating round by round. If the start is what puts the graph behind, the eager / compiled
ratio rises toward 1 or above with 32 calls a block.

    python tools/steady_block_ab.py --points 1:8192,4:2048 --skip 0.25 --rounds 9
"""
import argparse
import statistics

import torch

from skipgpt.benchmark import LayerBench, steady_timer

PROVIDERS = ("triton-sparse", "compiled-sparse")
BLOCKS = (8, 32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="1:8192,4:2048", help="comma-separated B:L prefill points")
    parser.add_argument("--skip", type=float, default=0.25, help="forced skip rate of both modules")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per block size")
    args = parser.parse_args()
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    for point in args.points.split(","):
        batch, seqlen = map(int, point.split(":"))
        fns = [bench.step(p, "prefill", batch, seqlen, args.skip) for p in PROVIDERS]
        ratios = {calls: [] for calls in BLOCKS}
        for i in range(args.rounds):
            for calls in (BLOCKS if i % 2 == 0 else BLOCKS[::-1]):
                (eager, *_), (compiled, *_) = steady_timer(fns, block_ms=0, min_calls=calls)
                ratios[calls].append(eager / compiled)
        for calls, r in ratios.items():
            print(f"B={batch} L={seqlen} skip={args.skip:g}, {calls:2d} calls a block: eager / compiled "
                  f"median {statistics.median(r):.4f}, rounds {' '.join(f'{x:.3f}' for x in r)}", flush=True)
        del fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
