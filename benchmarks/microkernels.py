"""Low-bit microkernel benchmark: efficiency against this machine's measured limits, and
whole layers against the kernels PyTorch users would pick instead.

Everything runs in one process, single-threaded (torch.set_num_threads(1) for the torch
kernels too), and reports medians:

1. Limits, measured in the same run by benchmarks/peaks.py (interleaved rounds): the
   vpdpbusd zmm / vdpbf16ps / fp32 FMA peaks of one core (24 independent chains), the core
   clock, and the read bandwidth of a buffer >= 4x the L3 with 1 and 2 threads. Every kernel
   is reported as a fraction of the matching peak: int8-activation tiles and layers against
   vpdpbusd zmm, weight-only (fp32 FMA) tiles against vfmadd231ps zmm, torch's bf16 linear
   against vdpbf16ps.
2. Microkernel tiles on L1/L2-resident operands (int8 activations x packed weights), as
   GMAC/s, % of the VNNI peak and packed-weight GB/s, for GEMV-shaped (M = 1..4 tokens)
   and GEMM-shaped (M >= 16) tiles. The GEMV goal compares the packed-weight rate of one
   core with the bandwidth a 2-thread stream gives one core (bw_2t / 2), see docs/kernels.md.
3. Whole layers (lowbit.runtime.qgemm.qlinear, dynamic int8 activations) against
   torch.ops.aten._weight_int4pack_mm_for_cpu, torch.ops.aten._weight_int8pack_mm and bf16
   F.linear on the issue's shapes, as time ratios (torch / lowbit, > 1 means lowbit is faster).

4. The prefill tiles of issue 14: ternary x int8 at M = 128 on 4096x4096 and 2560x6912
   (whole N, all of K in one invoke, weights in L2/L3), with the >= 85%-of-peak goal.

Times are medians of thread CPU time (see median_time; tiles: best of 3 medians); bandwidth
is wall clock (peaks.py: median over rounds).

    python benchmarks/microkernels.py [--quick] [--out benchmarks/results/microkernels.json]

Before/after a kernel change, side by side in one process (two builds of the runtime
loaded with RTLD_LOCAL, same operands, interleaved rounds, thread CPU time, the vpdpbusd
peak of the same rounds):

    python benchmarks/microkernels.py --side-by-side OLD.so [NEW.so] [--rounds 11 | --pairs 100]
        [--shapes 4096x4096x128,int1:256x2048x1,f32/int4_sym:256x1024x1,int4_sym@128:...]
        ([i8|f32|bf16/][format[@group]:]NxKxM: activation type, weight format, scale group,
        shape)
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.runtime import current_isa, set_isa, supported_isas
from lowbit.runtime.library import ISA_IDS
from lowbit.runtime import qgemm

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peaks as peaks_mod  # noqa: E402  (benchmarks/peaks.py, same directory)

LAYER_SHAPES = [(2560, 2560), (6912, 2560), (2560, 6912), (4096, 4096), (14336, 4096), (4096, 14336)]
LAYER_MS = [1, 16, 128]
TILE_FORMATS = ["ternary", "int2_asym", "int1", "int4_sym", "int8"]


def native():
    lib = qgemm._lib()
    lib.lowbit_qbench_vnni_loop.restype = ctypes.c_int64
    lib.lowbit_qbench_vnni_loop.argtypes = [ctypes.c_int64]
    lib.lowbit_qbench_tile.restype = ctypes.c_int32
    lib.lowbit_qbench_tile.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2
    return lib


def median_time(fn, runs: int, min_total: float = 0.0) -> float:
    """Median thread CPU time of fn() over `runs` calls (more while the total is below
    min_total). Single-threaded work only: thread CPU time does not count the time the
    thread is preempted, which on a shared 2-core machine dominates wall-clock medians of
    millisecond-long calls. `wall_stats` gives the wall-clock view of the same calls."""
    fn()  # warm up (page faults, caches, lazy init)
    times, walls = [], []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start < min_total and len(times) < 200):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        times.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - w0)
    wall_stats.append((statistics.median(walls), min(walls)))
    return statistics.median(times)


wall_stats: list[tuple[float, float]] = []  # (median, min) wall time of each median_time call


# ----------------------------------------------------------------------------- limits

def measure_limits(rounds: int) -> dict:
    """benchmarks/peaks.py in this process: VNNI / bf16 / FMA peaks (1 and 2 threads), the
    core clock, and the read bandwidth of a buffer >= 4x L3."""
    return peaks_mod.measure(rounds=rounds, log=lambda *a: None)


# ----------------------------------------------------------------------------- tiles

def random_weight(fmt: str, n: int, k: int, gen: torch.Generator, group: int | None = None,
                  kblock: int | None = None) -> qgemm.PackedWeight:
    """A packed [n x k] weight of random codes of `fmt` (int1 without zeros), scales in
    [0.1, 1.1) and, for the asymmetric formats, random zero points; per channel, or per group."""
    info = qgemm.FORMAT_INFO[fmt]
    q = torch.randint(info.qmin, info.qmax + 1, (n, k), generator=gen, dtype=torch.int8)
    if fmt == "int1":
        q[q == 0] = 1
    ngroups = k // group if group else 1
    scale = torch.rand(n, ngroups, generator=gen) + 0.1
    zero = torch.randint(0, info.qmax + 1, (n, ngroups), generator=gen, dtype=torch.int8) \
        if info.zero_point else None
    return qgemm.pack_weight(q, scale if group else scale[:, 0], fmt, group=group,
                             zero=zero if group or zero is None else zero[:, :1], kblock=kblock)


def tile_case(lib, fmt: str, m: int, n: int, k: int, group: int | None, peak: float,
              bw_core: float, kblock: int | None = None, seed_x: bool = False) -> dict:
    gen = torch.Generator().manual_seed(0)
    info = qgemm.FORMAT_INFO[fmt]
    pw = random_weight(fmt, n, k, gen, group, kblock)
    # activations in the rows compiled layers quantize into (qgemm.act_stride)
    xq, sx, rs = qgemm.quantize_activations(torch.randn(m, k, generator=gen), pw.kblock,
                                            stride=qgemm.act_stride(pw.k_padded))
    kern = qgemm.dispatch_for(pw, m, lda=xq.shape[1])
    y = torch.empty(m, n)
    reps = max(1, int(2e7 / (m * n * k)))  # ~0.1-1 ms per sample (large tiles: ~2-4 ms)
    args = (kern.handle, xq.data_ptr(), pw.data.data_ptr(), y.data_ptr(), sx.data_ptr(),
            rs.data_ptr(), None, pw.num_kblocks, reps)
    # Best of 3 medians of 17: a core's rate, robust to a round that shares the physical
    # core or caches with another tenant (seen as one format running 25% slow in one run).
    t = min(median_time(lambda: lib.lowbit_qbench_tile(*args), runs=17) for _ in range(3)) / reps
    macs = m * n * k / t
    wbytes = pw.data.numel() / t
    return {"format": fmt, "bits": info.bits, "m": m, "n": n, "k": k,
            "group": group or "channel", "kblock": pw.kblock, "isa": kern.isa, "us": t * 1e6,
            "gmacs": macs / 1e9, "pct_peak": 100 * macs / peak, "weight_gbs": wbytes / 1e9,
            "x_core_bw": wbytes / bw_core}


def prefill_two_threads(lib, n: int, k: int, m: int, peak2: float, rounds: int = 9) -> dict:
    """Ternary x int8 M-row tile on 2 threads, each over half of N (the compiler's split),
    started together; the rate sums each thread's MACs over its own CPU time."""
    import threading
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    pw = qgemm.pack_weight(q, torch.rand(n, generator=gen) + 0.1, "ternary")
    xq, sx, rs = qgemm.quantize_activations(torch.randn(m, k, generator=gen), pw.kblock,
                                            stride=qgemm.act_stride(pw.k_padded))
    y = torch.empty(m, n)
    half = n // 2  # a multiple of 64 for the shapes used
    kern = qgemm.QGemmKernel("ternary", torch.int8, torch.float32, m, half, pw.kblock,
                             lda=xq.shape[1], ldb=pw.nblock_bytes, ldc=n, stride_a=pw.kblock,
                             stride_b=pw.kblock_bytes, ld_aux=pw.num_kblocks)
    reps = max(1, int(3e8 / (m * half * k)))
    argsets = [(kern.handle, xq.data_ptr(), pw.data.data_ptr() + (t * half // 64) * pw.nblock_bytes,
                y.data_ptr() + t * half * 4, sx.data_ptr(), rs.data_ptr(), None, pw.num_kblocks, reps)
               for t in range(2)]
    macs = m * half * k * reps
    rates, walls = [], []
    for _ in range(rounds):
        cpu = [0.0, 0.0]
        bar = threading.Barrier(3)

        def work(t):
            bar.wait()
            c0 = time.thread_time()
            lib.lowbit_qbench_tile(*argsets[t])
            cpu[t] = time.thread_time() - c0

        threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        for th in threads:
            th.start()
        bar.wait()
        w0 = time.perf_counter()
        for th in threads:
            th.join()
        walls.append(2 * macs / (time.perf_counter() - w0))
        rates.append(macs / cpu[0] + macs / cpu[1])
    med = statistics.median(rates)
    return {"format": "ternary", "m": m, "n": n, "k": k, "threads": 2, "gmacs": med / 1e9,
            "min": min(rates), "max": max(rates), "pct_peak": 100 * med / peak2,
            "wall_gmacs": statistics.median(walls) / 1e9}


def weight_only_case(lib, fmt: str, m: int, n: int, k: int, fma_peak: float) -> dict:
    """fp32 activations x packed weights (the FMA tiles), L1/L2-resident."""
    gen = torch.Generator().manual_seed(0)
    pw = random_weight(fmt, n, k, gen)
    kern = qgemm.dispatch_for(pw, m, a_dtype=torch.float32)
    a = torch.randn(m, pw.k_padded, generator=gen)
    y = torch.empty(m, n)
    reps = max(1, int(5e6 / (m * n * k)))
    args = (kern.handle, a.data_ptr(), pw.data.data_ptr(), y.data_ptr(), None, None, None,
            pw.num_kblocks, reps)
    t = min(median_time(lambda: lib.lowbit_qbench_tile(*args), runs=9) for _ in range(3)) / reps
    macs = m * n * k / t
    return {"format": fmt, "m": m, "n": n, "k": k, "isa": kern.isa, "us": t * 1e6,
            "gmacs": macs / 1e9, "pct_peak": 100 * macs / fma_peak}


# ----------------------------------------------------------------------------- layers

def layer_cases(n: int, k: int, ms: list[int], vnni_peak_1t: float,
                bf16_peak_1t: float | None) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    # lowbit: ternary (2-bit, per tensor), int4_sym (per group 128), int8 (per channel).
    q2 = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    pw2 = qgemm.pack_weight(q2, torch.tensor(0.02), "ternary")
    q4 = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    pw4 = qgemm.pack_weight(q4, torch.rand(n, k // 128, generator=gen) * 0.01, "int4_sym", group=128)
    del q2, q4
    # torch: int4 (groupsize 128, bf16 activations), int8 weight-only, bf16 dense.
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32), 2)
    sz = (torch.rand(k // 128, n, 2, generator=gen) * 0.01).to(torch.bfloat16)
    w8 = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    s8 = (torch.rand(n, generator=gen) * 0.01).to(torch.bfloat16)
    wbf = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    for m in ms:
        x = torch.randn(m, k, generator=gen)
        xb = x.to(torch.bfloat16)
        runs = 5 if m * n * k < 2e9 else 3
        t = {
            "lowbit_ternary_a8": median_time(lambda: qgemm.qlinear(x, pw2), runs, 0.3),
            "lowbit_int4_a8": median_time(lambda: qgemm.qlinear(x, pw4), runs, 0.3),
            "torch_int4pack_bf16": median_time(
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w4, 128, sz), runs, 0.3),
            "torch_int8pack_bf16": median_time(
                lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, s8), runs, 0.3),
            "torch_linear_bf16": median_time(lambda: F.linear(xb, wbf), runs, 0.3),
        }
        macs = m * n * k
        rows.append({"n": n, "k": k, "m": m, "ms": {key: v * 1e3 for key, v in t.items()},
                     "pct_vnni_peak_ternary": 100 * macs / t["lowbit_ternary_a8"] / vnni_peak_1t,
                     "pct_bf16_peak_torch_bf16": (100 * macs / t["torch_linear_bf16"] / bf16_peak_1t
                                                  if bf16_peak_1t else None),
                     "ternary_weight_gbs": pw2.data.numel() / t["lowbit_ternary_a8"] / 1e9,
                     "ratio_vs_ternary": {key: v / t["lowbit_ternary_a8"] for key, v in t.items()
                                          if key.startswith("torch")},
                     "ratio_int4_vs_torch_int4": t["torch_int4pack_bf16"] / t["lowbit_int4_a8"]})
    return rows


# ----------------------------------------------------------------------------- side by side

SBS_SHAPES = ("4096x4096x128,2560x6912x128,4096x4096x16,256x1024x16,256x2048x4,256x2048x3,"
              "256x2048x2,256x2048x1,4096x4096x1,2560x6912x1")


def side_by_side(lib_paths: list[str], shapes: str, rounds: int, isa: str = "avx512", pairs: int = 0) -> None:
    """Tiles (int8 activations and ternary weights unless the shape says `f32/`, `bf16/`,
    `format:`) of two runtime builds in one process, interleaved; % of the vpdpbusd peak
    (with isa="amx": AMX tiles from amx_min_rows() rows, % of the tdpbsud peak). `pairs`:
    instead of rounds, each shape's builds called back to back `pairs` times (order
    alternating), the last / first ratio per pair."""
    P_, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    libs = {}
    for i, path in enumerate(lib_paths):
        lib = ctypes.CDLL(path)  # RTLD_LOCAL: both builds coexist
        lib.lowbit_qgemm_dispatch.restype = I64
        lib.lowbit_qgemm_dispatch.argtypes = [I32, I32, I32] + [I64] * 9 + [I32]
        lib.lowbit_qbench_tile.restype = I32
        lib.lowbit_qbench_tile.argtypes = [I64] + [P_] * 6 + [I64] * 2
        if lib.lowbit_rt_set_isa(ISA_IDS[isa]) != 0:
            raise SystemExit(f"{path}: the CPU lacks the {isa} path")
        libs[f"{i}:{Path(path).name}"] = lib
    cases = []
    for spec in shapes.split(","):
        adt, _, spec = spec.rpartition("/")
        adt = adt or "i8"
        fmt, _, dims = spec.rpartition(":")
        fmt, _, group = (fmt or "ternary").partition("@")
        n, k, m = (int(v) for v in dims.split("x"))
        gen = torch.Generator().manual_seed(0)
        pw = random_weight(fmt, n, k, gen, int(group) if group else None)
        x = torch.randn(m, k, generator=gen)
        xq, sx, rs = qgemm.quantize_activations(x, pw.kblock, stride=qgemm.act_stride(pw.k_padded))
        atype = {"i8": 1, "f32": 2, "bf16": 3}[adt]
        if adt != "i8":  # weight-only tiles read fp32 / bf16 activations (K zero-padded)
            xq = torch.zeros(m, pw.k_padded, dtype=torch.float32 if adt == "f32" else torch.bfloat16)
            xq[:, :k] = x
        y = torch.empty(m, n)
        # AMX: ~1-2 ms per sample (shorter ones read the tile unit still waking up)
        reps = max(1, int((2e9 if isa == "amx" else 4e8 if adt == "i8" else 1e8) / (m * n * k)))
        per = {}
        for name, lib in libs.items():
            h = lib.lowbit_qgemm_dispatch(qgemm.FORMATS[fmt], atype, 2, m, n, pw.kblock,
                                          xq.shape[1], pw.nblock_bytes, n, pw.kblock,
                                          pw.kblock_bytes, pw.num_kblocks, 0)
            if h <= 0:
                raise SystemExit(f"{name}: dispatch failed ({h})")
            per[name] = (h, xq.data_ptr(), pw.data.data_ptr(), y.data_ptr(), sx.data_ptr(),
                         rs.data_ptr(), None, pw.num_kblocks, reps)
        cases.append((f"{adt}/{fmt}{'@' + group if group else ''} {n}x{k} M={m}", per, m * n * k * reps, (pw, xq, sx, rs, y)))
    pk = peaks_mod.Peaks()
    peak_kind = "amx_int8" if isa == "amx" else "vnni_zmm"
    if pairs:
        adjacent_pairs(libs, cases, pairs, pk, peak_kind)
        return
    res = {(c[0], name): [] for c in cases for name in libs}
    pks = []
    for r in range(rounds):
        pks.append(pk.macs_per_s(peak_kind))
        for name, per, macs, _ in cases:
            order = list(libs) if r % 2 == 0 else list(libs)[::-1]
            for lname in order:
                c0 = time.thread_time()
                libs[lname].lowbit_qbench_tile(*per[lname])
                res[(name, lname)].append(macs / (time.thread_time() - c0))
    peak = statistics.median(pks)
    print(f"# load average {os.getloadavg()[0]:.1f}; {rounds} interleaved rounds; thread CPU time; "
          "GMAC/s median [min..max] and % of the peak")
    print(f"{peak_kind} 1-thread peak, same rounds: median {peak / 1e9:.1f} GMAC/s "
          f"[{min(pks) / 1e9:.1f}..{max(pks) / 1e9:.1f}]")
    names = list(libs)
    # last/first per round as well: the two builds run back to back within a round, so the
    # paired ratio sees through the host's state changes between rounds
    print(f"{'case':28s} " + " ".join(f"{n:>32s}" for n in names) + "   last/first  per round [min..max]")
    for name, _, _, _ in cases:
        cells, meds = [], []
        for lname in names:
            v = sorted(res[(name, lname)])
            med = statistics.median(v)
            meds.append(med)
            cells.append(f"{med / 1e9:6.1f} [{v[0] / 1e9:5.1f}..{v[-1] / 1e9:5.1f}] {100 * med / peak:5.1f}%")
        paired = peaks_mod.summarize([b / a for a, b in zip(res[(name, names[0])], res[(name, names[-1])])])
        print(f"{name:28s} " + " ".join(f"{c:>32s}" for c in cells) + f"   {meds[-1] / meds[0]:.3f}"
              f"  {paired['median']:.3f} [{paired['min']:.2f}..{paired['max']:.2f}]")


def adjacent_pairs(libs: dict, cases: list, pairs: int, pk, peak_kind: str) -> None:
    """side_by_side's back-to-back mode: per shape, `pairs` times every build once in a row
    (order alternating). On a host whose rate changes every few seconds (the shared Xeon's
    AMX) calls a millisecond apart share its state, so their ratio does too."""
    before = pk.macs_per_s(peak_kind)
    names = list(libs)
    print(f"# {pairs} back-to-back calls of each build per shape (order alternating), 1 thread, thread "
          f"CPU time; GMAC/s median; {names[-1]} / {names[0]} per pair: median [quartiles]")
    for name, per, macs, _ in cases:
        rates = {n: [] for n in names}
        for i in range(pairs):
            for lname in (names if i % 2 == 0 else names[::-1]):
                c0 = time.thread_time()
                libs[lname].lowbit_qbench_tile(*per[lname])
                rates[lname].append(macs / (time.thread_time() - c0))
        ratio = [b / a for a, b in zip(rates[names[0]], rates[names[-1]])]
        q = statistics.quantiles(ratio, n=4)
        print(f"{name:28s} " + " ".join(f"{n}: {statistics.median(r) / 1e9:7.1f}" for n, r in rates.items())
              + f"   {statistics.median(ratio):.3f} [{q[0]:.3f}..{q[2]:.3f}]")
    after = pk.macs_per_s(peak_kind)
    print(f"{peak_kind} 1-thread burst before / after: {before / 1e9:.0f} / {after / 1e9:.0f} GMAC/s")


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    ap.add_argument("--bw2-floor", type=float, default=28.0,
                    help="GB/s: the 2-thread read bandwidth used for the GEMV goal is the larger of "
                         "this and the measured one, so a loaded machine (which measures low) "
                         "cannot flatter the ratio; default: the idle-machine value of "
                         "/work/shared/STACK-NOTES.md")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "microkernels.json"))
    ap.add_argument("--side-by-side", nargs="+", metavar="LIB",
                    help="compare runtime builds (OLD.so [NEW.so]; default NEW: the installed one)")
    ap.add_argument("--shapes", default=SBS_SHAPES, help="side-by-side shapes, NxKxM,...")
    ap.add_argument("--rounds", type=int, default=11, help="side-by-side rounds")
    ap.add_argument("--isa", choices=["avx512", "amx"], default="avx512", help="side-by-side ISA")
    ap.add_argument("--pairs", type=int, default=0,
                    help="side-by-side: back-to-back calls of the builds per shape instead of rounds")
    args = ap.parse_args()
    if args.side_by_side:
        from lowbit.runtime import runtime_library_path
        paths = list(args.side_by_side)
        if len(paths) == 1:
            paths.append(str(runtime_library_path()))
        torch.set_num_threads(1)
        side_by_side(paths, args.shapes, args.rounds, args.isa, args.pairs)
        return
    if "avx512" not in supported_isas():
        raise SystemExit("this benchmark measures the AVX-512 VNNI path; the CPU lacks it")
    torch.set_num_threads(1)
    set_isa("avx512")
    lib = native()

    limits = measure_limits(3 if args.quick else 7)
    peak = peaks_mod.peak_mac_per_s(limits, "vnni_zmm", 1)
    fma_peak = peaks_mod.peak_mac_per_s(limits, "fma_zmm", 1)
    bf16_peak = peaks_mod.peak_mac_per_s(limits, "bf16_zmm", 1)
    bw = limits["bandwidth"]
    bw1, bw1_max = bw["1t"]["median"], bw["1t"]["max"]
    bw2, bw2_max = bw["2t"]["median"], bw["2t"]["max"]
    bw_core = max(bw2, args.bw2_floor * 1e9) / 2
    env = {"cpu": limits["cpu"], "isa": current_isa(),
           "threads": 1, "torch": torch.__version__, "loadavg_start": os.getloadavg()}
    print(peaks_mod.format_table(limits))
    print(f"\n# threads: 1 (kernels and torch.set_num_threads(1)); ISA {current_isa()}; "
          f"load average at start {env['loadavg_start'][0]:.1f} (machine shared)")
    print(f"peaks used below (1 core, median of the rounds above): vpdpbusd zmm {peak / 1e9:.1f} GMAC/s, "
          f"fp32 FMA {fma_peak / 1e9:.1f} GMAC/s"
          + (f", vdpbf16ps {bf16_peak / 1e9:.1f} GMAC/s" if bf16_peak else ", no vdpbf16ps"))
    print(f"read bandwidth (median [max]): 1 thread {bw1 / 1e9:.1f} [{bw1_max / 1e9:.1f}] GB/s, "
          f"2 threads {bw2 / 1e9:.1f} [{bw2_max / 1e9:.1f}] GB/s; GEMV goal uses max(measured, "
          f"floor {args.bw2_floor:.0f}) / 2 = {bw_core / 1e9:.1f} GB/s per core")
    print("timing: medians of thread CPU time (single-threaded calls; robust to preemption "
          "on a shared machine; tiles: best of 3 medians of 17); wall-clock medians are in the JSON")

    tiles = []
    gemv = [(m, 256, 2048) for m in (1, 2, 3, 4)]
    gemm = [(m, 256, 1024) for m in ((16, 96) if args.quick else (16, 32, 96))]
    for fmt in (TILE_FORMATS[:1] + TILE_FORMATS[3:4] if args.quick else TILE_FORMATS):
        for m, n, k in gemv + gemm:
            tiles.append(tile_case(lib, fmt, m, n, k, None, peak, bw_core))
    for m, n, k in [(1, 256, 2048), (96, 256, 1024)]:
        tiles.append(tile_case(lib, "int2_sym", m, n, k, 128, peak, bw_core))
        # Per-channel scales cut into K-blocks of 256 (as the compiler's tiler may choose).
        tiles.append(tile_case(lib, "ternary", m, n, k, None, peak, bw_core, kblock=256))
    print("\n## Microkernel tiles (int8 activations, L1/L2-resident, 1 core, medians)")
    print(f"{'format':10s} {'group':>7s} {'kblock':>6s} {'M':>3s} {'N':>4s} {'K':>5s} {'GMAC/s':>8s} "
          f"{'%peak':>6s} {'wGB/s':>7s} {'x(bw2/2)':>8s}")
    for r in tiles:
        print(f"{r['format']:10s} {str(r['group']):>7s} {r['kblock']:6d} {r['m']:3d} {r['n']:4d} "
              f"{r['k']:5d} {r['gmacs']:8.1f} {r['pct_peak']:6.1f} {r['weight_gbs']:7.1f} "
              f"{r['x_core_bw']:8.2f}")

    # The GEMV goal in one place: M = 1 2-bit tiles against 4x the per-core stream share,
    # and the vpdpbusd bound (4 vpdpbusd per 64 code bytes: peak / 4 bytes/s of codes).
    bound = peak / 4
    print(f"\nGEMV goal (>= 4x {bw_core / 1e9:.1f} GB/s = {4 * bw_core / 1e9:.1f} GB/s of packed 2-bit "
          f"weights, M = 1): vpdpbusd bound {bound / 1e9:.1f} GB/s of codes = {bound / bw_core:.2f}x")
    for r in tiles:
        if r["m"] == 1 and r["bits"] == 2:
            print(f"  {r['format']:10s} group {str(r['group']):>7s} kblock {r['kblock']:5d}: "
                  f"{r['weight_gbs']:5.1f} GB/s = {r['x_core_bw']:.2f}x ({r['pct_peak']:.1f}% of peak) "
                  f"{'met' if r['x_core_bw'] >= 4 else 'NOT met'}")

    # Issue 14, item 3: ternary x int8 prefill tiles at M = 128 on real layer shapes.
    prefill = [tile_case(lib, "ternary", 128, n, k, None, peak, bw_core)
               for n, k in [(4096, 4096), (2560, 6912)]]
    print("\n## Prefill tiles: ternary x int8, M = 128, whole layer in one invoke (1 core; goal >= 85% "
          "of the vpdpbusd zmm peak)")
    for r in prefill:
        print(f"  {r['n']}x{r['k']}: {r['gmacs']:.1f} GMAC/s = {r['pct_peak']:.1f}% of "
              f"{peak / 1e9:.1f} -> {'met' if r['pct_peak'] >= 85 else 'NOT met'}")

    peak2 = peaks_mod.peak_mac_per_s(limits, "vnni_zmm", 2)
    prefill2 = [prefill_two_threads(lib, n, k, 128, peak2) for n, k in [(4096, 4096), (2560, 6912)]]
    print("  2 threads (each half of N, started together; thread CPU time, 9 rounds; against the "
          f"2-thread peak {peak2 / 1e9:.1f} GMAC/s of the peaks above):")
    for r in prefill2:
        print(f"  {r['n']}x{r['k']}: {r['gmacs']:.1f} GMAC/s [{r['min'] / 1e9:.1f}..{r['max'] / 1e9:.1f}] "
              f"= {r['pct_peak']:.1f}% -> {'met' if r['pct_peak'] >= 85 else 'NOT met'}; wall clock "
              f"{r['wall_gmacs']:.1f} GMAC/s (machine load shows here)")

    # Weight-only (fp32 activations, FMA tiles) against the fp32 FMA peak.
    wo = [weight_only_case(lib, "ternary", m, 256, 1024, fma_peak) for m in (1, 16)]
    print("\n## Weight-only tiles (fp32 activations, vfmadd231ps), 1 core")
    for r in wo:
        print(f"  ternary M={r['m']:3d} N={r['n']} K={r['k']}: {r['gmacs']:.1f} GMAC/s = "
              f"{r['pct_peak']:.1f}% of the fp32 FMA peak {fma_peak / 1e9:.1f}")

    layers = []
    shapes = LAYER_SHAPES[:2] if args.quick else LAYER_SHAPES
    for n, k in shapes:
        layers += layer_cases(n, k, LAYER_MS, peak, bf16_peak)
    print("\n## Whole layers, 1 thread, median ms (ratio = torch time / lowbit ternary-a8 time)")
    print(f"{'N x K':>12s} {'M':>4s} {'tern-a8':>8s} {'int4-a8':>8s} {'t.int4':>8s} "
          f"{'t.int8':>8s} {'t.bf16':>8s} | {'int4/':>6s} {'int8/':>6s} {'bf16/':>6s} "
          f"{'i4/i4':>6s} {'tGB/s':>6s} {'t%vnni':>6s} {'bf%bf16':>7s}")
    for r in layers:
        t, q = r["ms"], r["ratio_vs_ternary"]
        print(f"{r['n']:>6d}x{r['k']:<5d} {r['m']:4d} {t['lowbit_ternary_a8']:8.3f} "
              f"{t['lowbit_int4_a8']:8.3f} {t['torch_int4pack_bf16']:8.3f} "
              f"{t['torch_int8pack_bf16']:8.3f} {t['torch_linear_bf16']:8.3f} | "
              f"{q['torch_int4pack_bf16']:6.2f} {q['torch_int8pack_bf16']:6.2f} "
              f"{q['torch_linear_bf16']:6.2f} {r['ratio_int4_vs_torch_int4']:6.2f} "
              f"{r['ternary_weight_gbs']:6.1f} {r['pct_vnni_peak_ternary']:6.1f} "
              f"{r['pct_bf16_peak_torch_bf16'] or float('nan'):7.1f}")

    env["loadavg_end"] = os.getloadavg()
    result = {"env": env, "timing": "median thread CPU time (tiles: best of 3 medians of 17)",
              "vnni_peak_gmacs": peak / 1e9, "fma_peak_gmacs": fma_peak / 1e9,
              "bf16_peak_gmacs": bf16_peak / 1e9 if bf16_peak else None, "peaks": limits,
              "read_bw_gbs": {"1": bw1 / 1e9, "2": bw2 / 1e9, "1_max": bw1_max / 1e9,
                              "2_max": bw2_max / 1e9, "2_floor": args.bw2_floor,
                              "per_core_for_goal": bw_core / 1e9},
              "tiles": tiles, "prefill_tiles": prefill, "prefill_tiles_2_threads": prefill2,
              "weight_only_tiles": wo, "layers": layers,
              "wall_clock_median_min_s": wall_stats}
    print()
    peaks_mod.write_json(args.out, result)


if __name__ == "__main__":
    main()
