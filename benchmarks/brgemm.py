"""Dense BRGEMM benchmark: microkernels vs the core's peak and vs torch, and the compiled
4096x4096 Linear vs torch.

    python benchmarks/brgemm.py            # full run, writes benchmarks/results/brgemm.json
    python benchmarks/brgemm.py --quick    # fewer repetitions

Part 1 (one thread): the FMA (fp32, zmm vfmadd231ps) and BF16-dot (vdpbf16ps) peak of one
core is measured in this run by benchmarks/peaks.py (the runtime's instruction-throughput
loops, 24 independent accumulators), then each kernel shape runs through
`lowbit_brgemm_invoke` directly and as torch.matmul with torch.set_num_threads(1).
Part 2 (two threads): `nn.Linear(4096, 4096, bias=False)` compiled by lowbit (weights
packed, dense tiles -> BRGEMM calls, OpenMP) vs eager F.linear, at M=1 and M=128.

Timings are medians of interleaved repetitions (ours, torch, ours, ...), so both sides see
the same machine load; the table prints the thread counts used. Part 1 (and the peak) times
thread CPU time: every call there is single-threaded, and on a shared 2-core machine the
wall clock of a millisecond call mostly measures preemption. Part 2 is wall clock.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from lowbit.runtime import brgemm as bg
from lowbit.runtime import current_isa

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "brgemm.json"



def median_time(fn, reps: int, clock=time.perf_counter) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = clock()
        fn()
        ts.append(clock() - t)
    return statistics.median(ts)


def interleaved(fns: dict, reps: int, rounds: int = 5, clock=time.perf_counter) -> dict:
    """Median over `rounds` rounds of each function's median of `reps` calls, alternating."""
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per[k].append(median_time(fn, reps, clock))
    return {k: statistics.median(v) for k, v in per.items()}


def measure_peak(reps: int) -> dict | None:
    """The fp32 FMA (vfmadd231ps zmm) and bf16 dot (vdpbf16ps zmm) peaks of one core in GFLOP/s
    (2 FLOP per MAC), measured now by benchmarks/peaks.py's native loops (thread CPU time,
    median of interleaved rounds), the same loops every benchmark's fraction-of-peak uses."""
    if current_isa() != "avx512" or not bg.native_bf16():
        return None
    sys.path.insert(0, str(ROOT))
    import peaks as peaks_mod
    res = peaks_mod.measure(rounds=max(3, reps), threads=(1,), bandwidth=False,
                            kinds=["fma_zmm", "bf16_zmm"], log=lambda *a: None)
    return {"f32": 2 * peaks_mod.peak_mac_per_s(res, "fma_zmm", 1) / 1e9,
            "bf16": 2 * peaks_mod.peak_mac_per_s(res, "bf16_zmm", 1) / 1e9,
            "cpu": res["cpu"]["model"], "clock_ghz": res["clock_hz"][1]["median"] / 1e9}


KERNEL_SHAPES = [
    # (label, m, n, k, batch, packed)
    ("register tile, L1 (14x32, k=256, batch 16)", 14, 32, 256, 16, True),
    ("small GEMM 64x64x256", 64, 64, 256, 1, True),
    ("compiler tile of 4096^2 @ M=128 (128x32x4096)", 128, 32, 4096, 1, True),
    ("128x256x4096 packed", 128, 256, 4096, 1, True),
    ("128x256x4096 row-major B", 128, 256, 4096, 1, False),
    ("GEMV 1x4096x4096 packed", 1, 4096, 4096, 1, True),
]


def kernel_table(peak: dict | None, reps: int) -> list[dict]:
    torch.set_num_threads(1)
    lib = bg._lib()
    rows = []
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        for label, m, n, k, batch, packed in KERNEL_SHAPES:
            a = torch.randn(m, k).to(dtype)
            b = torch.randn(k, n).to(dtype)
            bb = bg.pack_b(b) if packed else b
            kern = bg.Brgemm(dtype, m, n, k, beta=0, b_packed=packed)
            c = torch.empty(m, n)
            h, ap, bp, cp = kern.handle, a.data_ptr(), bb.data_ptr(), c.data_ptr()
            kern(a, bb, c, batch=batch)  # checked call once (bounds), then raw invokes
            t = interleaved({"ours": lambda: lib.lowbit_brgemm_invoke(h, ap, 0, bp, 0, cp, 0, batch),
                             "torch": lambda: torch.matmul(a, b)}, reps, clock=time.thread_time)
            flops_ours = 2.0 * m * n * k * batch
            gf_ours = flops_ours / t["ours"] / 1e9
            gf_torch = 2.0 * m * n * k / t["torch"] / 1e9
            row = dict(dtype=name, shape=label, m=m, n=n, k=k, batch=batch, packed=packed,
                       ours_gflops=round(gf_ours, 1), torch_gflops=round(gf_torch, 1),
                       vs_torch=round(gf_ours / gf_torch, 2),
                       pct_peak=round(100 * gf_ours / peak[name], 1) if peak else None)
            if m == 1:
                row["ours_weight_gbs"] = round(bb.numel() * bb.element_size() / t["ours"] / 1e9, 1)
                row["torch_weight_gbs"] = round(b.numel() * b.element_size() / t["torch"] / 1e9, 1)
            rows.append(row)
    return rows


def compile_dense(fn, inputs):
    """Compile with the default pipeline (adding the dense passes if it lacks them);
    returns the compiled graph and the IR after the runtime-calls stage."""
    from lowbit.compiler.compile import ENTRY, CompiledGraph
    from lowbit.compiler.frontend import capture, import_graph
    from lowbit.compiler.jit import JitFunction
    from lowbit.compiler.pipeline import Pipeline, default_stages

    stages = default_stages()
    for s in stages:
        if s.name == "lowbit" and "lowbit-dense-tile" not in s.passes:
            s.passes.insert(0, "lowbit-dense-tile")
        if s.name == "runtime-calls" and "lowbit-dense-brgemm-calls" not in s.passes:
            s.passes.insert(0, "lowbit-dense-brgemm-calls")
    pipeline = Pipeline(stages=stages)
    captured = capture(fn, inputs)
    module = import_graph(captured, func_name=ENTRY)
    pipeline.run(module, stop="runtime-calls")
    ir_text = str(module)
    pipeline.run(module, start="lower-to-llvm")
    jit = JitFunction(module, ENTRY, captured.input_specs, captured.output_specs)
    return CompiledGraph(captured, jit, pipeline), ir_text


def compiled_table(reps: int, threads_n: int) -> list[dict]:
    from lowbit.compiler import threads

    threads.set_num_threads(threads_n)
    torch.set_num_threads(threads_n)
    rows = []
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4096, 4096, bias=False).to(dtype)
        for m in (1, 128):
            x = torch.randn(m, 4096, dtype=dtype)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled, ir_text = compile_dense(lin, (x,))
            compile_s = time.perf_counter() - t0
            assert "lowbit_brgemm_invoke" in ir_text
            with torch.no_grad():
                err = (compiled(x)[0].float() - lin(x).float()).abs().max().item()
                t = interleaved({"ours": lambda: compiled(x), "torch": lambda: lin(x)}, reps)
            flops = 2.0 * m * 4096 * 4096
            wbytes = 4096 * 4096 * (4 if dtype == torch.float32 else 2)
            rows.append(dict(dtype=name, m=m, threads=threads_n, ours_ms=round(t["ours"] * 1e3, 3),
                             torch_ms=round(t["torch"] * 1e3, 3),
                             ours_gflops=round(flops / t["ours"] / 1e9, 1),
                             torch_gflops=round(flops / t["torch"] / 1e9, 1),
                             ours_weight_gbs=round(wbytes / t["ours"] / 1e9, 1),
                             torch_weight_gbs=round(wbytes / t["torch"] / 1e9, 1),
                             vs_torch=round(t["torch"] / t["ours"], 2), compile_s=round(compile_s, 1),
                             max_abs_err_vs_torch=err))
            del compiled
    return rows


def print_tables(peak, kernels, compiled) -> None:
    print(f"\nlowbit dense BRGEMM benchmark  (ISA {current_isa()}, native bf16 {bg.native_bf16()})")
    if peak:
        print(f"CPU: {peak['cpu']} at {peak['clock_ghz']:.2f} GHz; measured single-core peak "
              f"(benchmarks/peaks.py loops): fp32 FMA {peak['f32']:.1f} GFLOP/s, "
              f"bf16 dot {peak['bf16']:.1f} GFLOP/s; load average {os.getloadavg()[0]:.1f} (shared machine)")
    print("\nKernels, 1 thread (GFLOP/s; torch = torch.matmul, 1 thread)")
    print(f"{'dtype':5} {'shape':48} {'ours':>8} {'%peak':>6} {'torch':>8} {'ours/torch':>10}")
    for r in kernels:
        extra = f"   weights {r['ours_weight_gbs']} vs {r['torch_weight_gbs']} GB/s" if "ours_weight_gbs" in r else ""
        pct = f"{r['pct_peak']:.1f}" if r["pct_peak"] is not None else "-"
        print(f"{r['dtype']:5} {r['shape']:48} {r['ours_gflops']:8.1f} {pct:>6} {r['torch_gflops']:8.1f} "
              f"{r['vs_torch']:10.2f}{extra}")
    if compiled:
        print(f"\nCompiled nn.Linear(4096, 4096) vs eager, {compiled[0]['threads']} threads")
        print(f"{'dtype':5} {'M':>4} {'ours ms':>9} {'torch ms':>9} {'ours GF/s':>10} {'torch GF/s':>10} "
              f"{'ours GB/s':>9} {'torch GB/s':>10} {'ours/torch':>10} {'compile s':>9}")
        for r in compiled:
            print(f"{r['dtype']:5} {r['m']:4d} {r['ours_ms']:9.3f} {r['torch_ms']:9.3f} {r['ours_gflops']:10.1f} "
                  f"{r['torch_gflops']:10.1f} {r['ours_weight_gbs']:9.1f} {r['torch_weight_gbs']:10.1f} "
                  f"{r['vs_torch']:10.2f} {r['compile_s']:9.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--threads", type=int, default=2, help="threads for the compiled Linear comparison")
    p.add_argument("--skip-compiled", action="store_true", help="only the kernel table")
    args = p.parse_args(argv)
    reps = 3 if args.quick else 7

    peak = measure_peak(reps)
    kernels = kernel_table(peak, reps)
    compiled = [] if args.skip_compiled else compiled_table(reps, args.threads)
    print_tables(peak, kernels, compiled)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "brgemm",
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "isa": current_isa(), "native_bf16": bg.native_bf16(), "torch": torch.__version__},
        "statistic": "median of interleaved repetitions (kernels and peak: thread CPU time; compiled: wall clock)",
        "peak_gflops_1core": peak,
        "kernels_1thread": kernels,
        "compiled_linear_4096": compiled,
    }, indent=2))
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
