"""A compiled ternary LowBitLinear vs the kernels users would pick instead (2 threads).

Side by side in one run, per shape (N x K) and tokens M:
  lowbit   torch.compile(LowBitLinear(ternary, int8 activations), backend="lowbit")
  bf16     F.linear with bf16 weights and activations (oneDNN)
  int4     torch.ops.aten._weight_int4pack_mm_for_cpu (group 128, bf16 activations)
  ref      the eager reference op torch.ops.lowbit.linear (a specification, not a kernel)
with weights hot (one layer called repeatedly) and, at M = 1, cold: R distinct layers
whose packed weights together exceed 2x L3 are called in rotation, so every call streams
its weights from DRAM. Also measured in the same run: the machine's read bandwidth (2
threads, streaming reduction) and one core's VNNI int8 peak (instruction-throughput loop),
which give the goals' denominators:
  M = 1, cold:  packed-weight bytes/s >= 85% of read bandwidth, and >= 6x bf16 F.linear
  M = 128:      >= 70% of the 2-core VNNI int8 peak (2 * N * K * M ops)

    python benchmarks/linear.py                 # all shapes, M = 1, 16, 128
    python benchmarks/linear.py --shapes 4096x4096 --ms 1 --no-ref
Writes benchmarks/results/linear.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.compiler.compile import compile_function
from lowbit.compiler.target import host_target

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peaks  # noqa: E402  (benchmarks/peaks.py: the same-run limits)

SHAPES = [(2560, 2560), (6912, 2560), (2560, 6912), (4096, 4096), (14336, 4096), (4096, 14336)]
THREADS = 2


def wall_median(fn, runs: int, min_seconds: float = 0.2) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start < min_seconds and len(times) < 500):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Branches(torch.nn.Module):
    """R independent layers on the same input: one compiled graph streams all weights."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


def ternary_layer(n: int, k: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=False)
    return lowbit.LowBitLinear.from_float(linear, lowbit.QuantConfig(weights="ternary", activations="int8"))


def packed_bytes(layer) -> int:
    return sum(b.numel() * b.element_size() for b in layer.buffers())


def bench_shape(n: int, k: int, ms: list[int], l3: int, with_ref: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(n * 31 + k)
    layer = ternary_layer(n, k, seed=0)
    wbytes = layer.packed.numel()  # the 2-bit codes the kernels stream (scales are tiny)
    wbf = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32), 2)
    sz = (torch.rand(k // 128, n, 2, generator=gen) * 0.01).to(torch.bfloat16)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen)
        xb = x.to(torch.bfloat16)
        t0 = time.perf_counter()
        compiled = compile_function(torch.nn.Sequential(layer), (x,))
        compile_s = time.perf_counter() - t0
        out, ref = compiled(x)[0], layer(x)
        rel_err = ((out - ref).abs().max() / ref.abs().max()).item()
        runs = 20 if m * n * k < 2e9 else 7
        t = {
            "lowbit": wall_median(lambda: compiled(x), runs),
            "bf16": wall_median(lambda: F.linear(xb, wbf), runs),
            "int4": wall_median(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w4, 128, sz), runs),
        }
        if with_ref:
            t["ref"] = wall_median(lambda: layer(x), 2, 0.0)
        row = {"n": n, "k": k, "m": m, "weights": "hot", "compile_s": compile_s, "rel_err": rel_err,
               "ms": {key: v * 1e3 for key, v in t.items()},
               "lowbit_weight_gbs": wbytes / t["lowbit"] / 1e9,
               "lowbit_gops": 2 * m * n * k / t["lowbit"] / 1e9,
               "speedup": {key: v / t["lowbit"] for key, v in t.items() if key != "lowbit"}}
        rows.append(row)
        del compiled
    if 1 in ms:
        rows.append(bench_cold(n, k, l3, wbytes, gen))
    return rows


def bench_cold(n: int, k: int, l3: int, wbytes: int, gen) -> dict:
    copies = max(2, min(48, -(-2 * l3 // wbytes)))
    layers = [ternary_layer(n, k, seed=i + 1) for i in range(copies)]
    x = torch.randn(1, k, generator=gen)
    compiled = compile_function(Branches(layers), (x,))
    t_lowbit = wall_median(lambda: compiled(x), 5) / copies
    bf_copies = max(2, -(-2 * l3 // (n * k * 2)))
    wbfs = [(torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(bf_copies)]
    xb = x.to(torch.bfloat16)
    t_bf16 = wall_median(lambda: [F.linear(xb, w) for w in wbfs], 5) / bf_copies
    return {"n": n, "k": k, "m": 1, "weights": "cold", "copies": copies,
            "ms": {"lowbit": t_lowbit * 1e3, "bf16": t_bf16 * 1e3},
            "lowbit_weight_gbs": wbytes / t_lowbit / 1e9,
            "speedup": {"bf16": t_bf16 / t_lowbit}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                   help="comma-separated NxK list")
    p.add_argument("--ms", default="1,16,128")
    p.add_argument("--no-ref", action="store_true", help="skip the (slow) eager reference op")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "linear.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    target = host_target()

    limits = peaks.measure(rounds=5, threads=(1, THREADS), kinds=["vnni_zmm"], log=lambda *a: None)
    bw = limits["bandwidth"][f"{THREADS}t"]
    bw_best, bw_median = bw["max"], bw["median"]
    peak_core = peaks.peak_mac_per_s(limits, "vnni_zmm", 1) * 2  # MAC/s -> ops/s on one core
    peak = peak_core * THREADS
    print(f"threads {THREADS}, ISA {lowbit.runtime.current_isa()}, {target.describe()}, "
          f"CPU {limits['cpu']['model']} (family {limits['cpu']['family']} model {limits['cpu']['model_id']}), load average {limits['load_average_start']:.2f}")
    print(f"read bandwidth (2 threads): best {bw_best / 1e9:.1f} GB/s, median {bw_median / 1e9:.1f} GB/s; "
          f"VNNI int8 peak: {peak_core / 1e9:.0f} GOPS/core, {peak / 1e9:.0f} GOPS for {THREADS} cores")

    rows = []
    header = (f"{'N x K':>12} {'M':>4} {'weights':>7} {'lowbit ms':>10} {'GB/s':>6} {'%BW':>5} {'GOPS':>6} "
              f"{'%peak':>6} {'x bf16':>7} {'x int4':>7} {'x ref':>7} {'rel err':>8}")
    print(header)
    for n, k in shapes:
        for r in bench_shape(n, k, ms, target.l3, not args.no_ref):
            r["pct_bandwidth"] = 100 * r["lowbit_weight_gbs"] * 1e9 / bw_best
            if "lowbit_gops" in r:
                r["pct_vnni_peak"] = 100 * r["lowbit_gops"] * 1e9 / peak
            rows.append(r)
            s = r["speedup"]
            print(f"{n:>6}x{k:<5} {r['m']:>4} {r['weights']:>7} {r['ms']['lowbit']:>10.3f} "
                  f"{r['lowbit_weight_gbs']:>6.1f} {r['pct_bandwidth']:>5.0f} "
                  f"{r.get('lowbit_gops', float('nan')):>6.0f} {r.get('pct_vnni_peak', float('nan')):>6.1f} "
                  f"{s.get('bf16', float('nan')):>7.2f} {s.get('int4', float('nan')):>7.2f} "
                  f"{s.get('ref', float('nan')):>7.1f} {r.get('rel_err', float('nan')):>8.1e}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "threads": THREADS, "isa": lowbit.runtime.current_isa(), "target": target.describe(),
        "cpu": limits["cpu"], "load_average_start": limits["load_average_start"],
        "read_bandwidth_best_gbs": bw_best / 1e9, "read_bandwidth_median_gbs": bw_median / 1e9,
        "vnni_peak_gops": peak / 1e9, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
