"""Does the CPU a process runs on decide how fast a host-bound layer step is? (device machine)

The exact form's B=1 L=2048 step was fast in one process and slow in the next (docs/BENCHMARKS.md,
ninth session), while hf stayed put. This prints the host's NUMA layout and the GPU's local CPUs,
then times points in child processes pinned to each CPU group (and unpinned), the groups in
alternating order, each child also timing a host probe (launches of a tiny kernel) so that a slow
child can be told apart from a slow step.

    python3 tools/host_placement.py --points 1:2048,1:512 --skip 0.25 --repeats 2
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def _cpulist(text: str) -> list[int]:
    cpus = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _compressed(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (a cpulist, as /sys writes them)."""
    runs = []
    for cpu in cpus:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in runs)


def cpu_groups() -> dict[str, list[int]]:
    """NUMA nodes' CPUs (only those this process may use); on a single node, its two halves by
    CPU number (on an SMT host each half then holds threads of every core)."""
    allowed = sorted(os.sched_getaffinity(0))
    nodes = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))
    groups = {}
    for node in nodes:
        cpus = [c for c in _cpulist((node / "cpulist").read_text()) if c in allowed]
        if cpus:
            groups[node.name] = cpus
    if len(groups) <= 1:
        half = len(allowed) // 2
        groups = {name: cpus for name, cpus in (("first-half", allowed[:half]), ("second-half", allowed[half:])) if cpus}
    groups["unpinned"] = allowed
    return groups


def gpu_local_cpus() -> str:
    try:
        bus = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.split()[0]
        domain, rest = bus.lower().split(":", 1)
        path = Path(f"/sys/bus/pci/devices/{domain[-4:]}:{rest}/local_cpulist")
        return f"{bus}: local CPUs {path.read_text().strip()}"
    except Exception as error:  # a report line, not a failure
        return f"GPU's local CPUs unknown ({error})"


def child(points: str, skip: float, cpus: str) -> dict:
    if cpus:
        os.sched_setaffinity(0, _cpulist(cpus))  # before torch starts its threads
    import torch
    from profile_host import per_call_us  # tools/ is on the path of a script run from it

    from skipgpt.benchmark import LayerBench, cuda_timer

    x = torch.zeros(16, device="cuda")
    launch_us = per_call_us(lambda: x.add_(1), n=2000)
    bench = LayerBench("llama-3.1-8b", torch.bfloat16, torch.device("cuda"))
    out = {"launch_us": round(launch_us, 2), "points": {}}
    for point in points.split(","):
        batch, seqlen = (int(v) for v in point.split(":"))
        for provider in ("hf", "triton-sparse"):
            fn = bench.step(provider, "prefill", batch, seqlen, skip)
            ms = cuda_timer(fn, 25, 200)[0]
            host_ms = per_call_us(fn, n=50) / 1e3
            out["points"][f"{point} {provider}"] = {"ms": round(ms, 3), "host_ms": round(host_ms, 3)}
    out["cpu_last"] = _current_cpu()  # where an unpinned child ended up, after its points
    return out


def _current_cpu() -> int:
    """The CPU this process last ran on: field 39 of /proc/self/stat (fields counted from 1; the
    text after the command's closing parenthesis starts at field 3)."""
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[39 - 3])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="1:2048,1:512", help="comma-separated B:L prefill points")
    parser.add_argument("--skip", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2, help="children per CPU group")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.points, args.skip, args.cpus)))
        return
    if shutil.which("lscpu"):
        subprocess.run(["lscpu"], check=False)
    groups = cpu_groups()
    print("CPU groups:", {name: f"{_compressed(cpus)} ({len(cpus)})" for name, cpus in groups.items()})
    print(gpu_local_cpus())
    for repeat in range(args.repeats):
        names = list(groups) if repeat % 2 == 0 else list(reversed(groups))
        for name in names:
            cmd = [sys.executable, __file__, "--child", "--points", args.points, "--skip", str(args.skip)]
            if name != "unpinned":
                cmd += ["--cpus", ",".join(map(str, groups[name]))]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                print(f"{name}: child failed\n{run.stderr[-2000:]}")
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            cells = "  ".join(f"{k}: {v['ms']:.3f} ms (host {v['host_ms']:.3f})" for k, v in result["points"].items())
            print(f"round {repeat + 1} {name:12s} last on cpu {result['cpu_last']:3d} launch {result['launch_us']:5.1f} us  {cells}",
                  flush=True)


if __name__ == "__main__":
    main()
