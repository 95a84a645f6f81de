"""Render `skipgpt eval` output folders as the quality table of docs/RESULTS.md.

    python tools/results_report.py LABEL=DIR [LABEL=DIR ...]

One row per folder (its summary.json): word perplexity, bits per byte, realized skip of
attention and MLP and their mean (the share of (token, module) pairs skipped), wall time and
tokens/s. The first folder is the reference of the last column (perplexity ratio)."""
import json
import sys
from pathlib import Path


def render(pairs: list[tuple[str, str]]) -> str:
    lines = ["| model | pipeline | word ppl | bits/byte | skip attn | skip MLP | skip mean | eval s | tokens/s | ppl / first row |",
             "|" + " --- |" * 10]
    first = None
    for label, folder in pairs:
        s = json.loads((Path(folder) / "summary.json").read_text())
        (metrics,) = s["metrics"].values()
        ppl, bpb = metrics["word_perplexity,none"], metrics["bits_per_byte,none"]
        first = first or ppl
        sp = s["sparsity"]
        pipeline = s["setup"]["pipeline"] + (" compiled" if s["setup"]["compile"] else "")
        lines.append(f"| {label} | {pipeline} | {ppl:.1f} | {bpb:.4f} | {sp['attention']:.3f} | {sp['mlp']:.3f} | "
                     f"{(sp['attention'] + sp['mlp']) / 2:.3f} | {s['timings']['eval_seconds']:.1f} | "
                     f"{s['tokens_per_second']:,.0f} | {ppl / first:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render([arg.split("=", 1) for arg in sys.argv[1:]]))
