"""Render benchmark JSON files (`skipgpt bench`'s SCOPE-MODE.json, or `python -m skipgpt.benchmark
--json`) as Markdown tables for docs/BENCHMARKS.md: one row per (mode, B, L/KV, skip), with the
skip rate the routes realized, and one column per provider (ms, and speedup against the
baseline provider of the same row, hf unless --against names another).

Usage: python tools/bench_report.py [--against PROVIDER] FILE.json...
"""
import argparse
import json
from collections import defaultdict


def render(path: str, against: str = "hf") -> str:
    data = json.load(open(path))
    rows = defaultdict(dict)
    providers = []
    for p in data["points"]:
        key = (p["mode"], p["batch"], p["seqlen"], p["skip"])
        rows[key][p["provider"]] = p
        if p["provider"] not in providers:
            providers.append(p["provider"])
    head = ("| mode | B | L/KV | skip | skipped | "
            + " | ".join(f"{prov} ms (vs {against})" for prov in providers) + " |")
    lines = [head, "|" + " --- |" * (5 + len(providers))]
    for (mode, b, seq, skip), by_provider in rows.items():
        base = by_provider.get(against)
        base_ms = base["ms"] if base else None
        realized = next((p.get("realized_skip") for p in by_provider.values() if p.get("realized_skip") is not None), None)
        cells = []
        for prov in providers:
            p = by_provider.get(prov)
            if p is None or p["ms"] is None:
                cells.append(p["status"] if p else "-")
            else:
                cells.append(f"{p['ms']:.3f} ({base_ms / p['ms']:.2f}x)" if base_ms else f"{p['ms']:.3f}")
        done = f"{realized:.3f}" if realized is not None else "-"
        lines.append(f"| {mode} | {b} | {seq} | {skip:.2f} | {done} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="hf", help="the provider speedups are measured against (default hf)")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    for path in args.files:
        print(render(path, args.against))
        print()
