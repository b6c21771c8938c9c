"""Memory over time: RSS across many calls and across compile/delete cycles.

    python benchmarks/memory.py [--calls 10000] [--cycles 30] [--threads 2]

Two checks of issue 13's "RSS flat" goal, each in a fresh subprocess:

  calls   one compiled model (2 ternary LowBitLinear layers 256 -> 1024 -> 256 with SiLU, batch 4, fp32)
          called `--calls` times; RSS sampled every 1000 calls after a 200-call warm-up
  cycles  `--cycles` times: build a new model of the same kind (new weights), quantize,
          torch.compile, call it 20 times, delete model and compiled function,
          torch._dynamo.reset(), gc.collect(); RSS after each cycle. The first 5 cycles
          are warm-up (caches, allocator arenas, the compile worker's first start)

Growth is reported as the least-squares slope over the measured samples (KiB per 1000
calls, KiB per cycle) and as last - first. The compile worker's RSS (a separate process)
is reported too. Prints a table and writes benchmarks/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"


def rss_kib(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def build(seed: int):
    import torch
    import lowbit

    torch.manual_seed(seed)
    dim = 256
    model = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.SiLU(), torch.nn.Linear(4 * dim, dim)).eval()
    lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary"))
    return model, torch.randn(4, dim)


def worker_rss() -> int | None:
    from lowbit.compiler.worker import shared_worker
    pid = shared_worker().pid
    return rss_kib(pid) if pid else None


def case_calls(calls: int) -> dict:
    import torch

    model, x = build(0)
    with torch.no_grad():
        compiled = torch.compile(model, backend="lowbit")
        want = model(x)
        for _ in range(200):
            compiled(x)
        assert torch.allclose(compiled(x), want, atol=1e-4, rtol=1e-4)
        samples = []
        for i in range(calls + 1):
            if i % 1000 == 0:
                samples.append((i, rss_kib()))
            compiled(x)
    xs, ys = [s[0] / 1000 for s in samples], [s[1] for s in samples]
    return {"case": "calls", "samples": samples, "kib_per_1000_calls": slope(xs, ys),
            "first_kib": ys[0], "last_kib": ys[-1], "worker_kib": worker_rss()}


def case_cycles(cycles: int) -> dict:
    import gc

    import torch

    samples, worker = [], []
    for c in range(cycles):
        model, x = build(c)
        with torch.no_grad():
            compiled = torch.compile(model, backend="lowbit")
            for _ in range(20):
                y = compiled(x)
            assert torch.allclose(y, model(x), atol=1e-4, rtol=1e-4)
        del model, compiled, y
        torch._dynamo.reset()
        gc.collect()
        samples.append((c, rss_kib()))
        worker.append(worker_rss())
    measured = samples[5:]
    xs, ys = [s[0] for s in measured], [s[1] for s in measured]
    return {"case": "cycles", "samples": samples, "worker_kib": worker, "kib_per_cycle": slope(xs, ys),
            "first_kib": ys[0], "last_kib": ys[-1],
            "worker_kib_per_cycle": slope(xs, [w or 0 for w in worker[5:]])}


def run_case(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--run-case", name, "--calls", str(args.calls), "--cycles", str(args.cycles)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), LOWBIT_NUM_THREADS=str(args.threads), LOWBIT_CACHE="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"case": name, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=10000)
    p.add_argument("--cycles", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="calls,cycles")
    p.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_case:
        import torch
        torch.set_num_threads(args.threads)
        result = case_calls(args.calls) if args.run_case == "calls" else case_cycles(args.cycles)
        print(json.dumps(result))
        return
    rows = [run_case(name, args) for name in args.only.split(",")]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    meta = {"cpu": cpu, "threads": args.threads, "calls": args.calls, "cycles": args.cycles,
            "python": platform.python_version(), "load_average": os.getloadavg()}
    print(f"CPU {cpu}, {args.threads} threads, load average {meta['load_average'][0]:.1f}")
    print("| case | first RSS MiB | last RSS MiB | growth | compile worker RSS MiB |")
    print("|---|---:|---:|---|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | error | | {r['error'].splitlines()[-1] if r['error'] else ''} | |")
            continue
        if r["case"] == "calls":
            growth = f"{r['kib_per_1000_calls']:.1f} KiB / 1000 calls over {args.calls} calls"
            wk = r["worker_kib"]
        else:
            growth = (f"{r['kib_per_cycle']:.1f} KiB / cycle over cycles 5-{args.cycles - 1} "
                      f"(worker {r['worker_kib_per_cycle']:.1f} KiB / cycle)")
            wk = r["worker_kib"][-1]
        print(f"| {r['case']} | {r['first_kib'] / 1024:.1f} | {r['last_kib'] / 1024:.1f} | {growth} | "
              f"{(wk or 0) / 1024:.1f} |")
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
