"""Render benchmark JSON files (`skipgpt bench`'s SCOPE-MODE.json, or `python -m skipgpt.benchmark
--json`) as Markdown tables for docs/BENCHMARKS.md:
one row per (mode, B, L/KV, skip), one column per provider (ms, and speedup vs hf)."""
import json
import sys
from collections import defaultdict


def render(path: str) -> str:
    data = json.load(open(path))
    rows = defaultdict(dict)
    providers = []
    for p in data["points"]:
        key = (p["mode"], p["batch"], p["seqlen"], p["skip"])
        rows[key][p["provider"]] = p
        if p["provider"] not in providers:
            providers.append(p["provider"])
    head = "| mode | B | L/KV | skip | " + " | ".join(f"{prov} ms (vs hf)" for prov in providers) + " |"
    lines = [head, "|" + " --- |" * (4 + len(providers))]
    for (mode, b, seq, skip), by_provider in rows.items():
        cells = []
        for prov in providers:
            p = by_provider.get(prov)
            if p is None or p["ms"] is None:
                cells.append(p["status"] if p else "-")
            else:
                cells.append(f"{p['ms']:.3f} ({p['speedup']:.2f}x)" if p["speedup"] else f"{p['ms']:.3f}")
        lines.append(f"| {mode} | {b} | {seq} | {skip:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(render(path))
        print()
