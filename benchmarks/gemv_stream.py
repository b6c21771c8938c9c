"""Decode GEMVs streamed from DRAM as compiled code runs them, for one or two runtime builds.

A decode step of a low-bit LLM is a sequence of GEMVs whose weights come from DRAM once
each. This benchmark runs such a sequence (default: the 1b preset's 16 layers of fused
q/k/v, o, w1/w3 and w2 shapes, 207 MB of ternary codes) the way `lowbit-lower-qlinear`'s
code runs it: per layer one OpenMP loop (libiomp5, static schedule) over 512-row tasks, each
task one `lowbit_qgemm_invoke`. Each runtime build gets its own dispatch handles over the
same packed weights and activations; rounds alternate the builds (order reversed every
round) after a 512 MiB read probe (torch sum, same thread count). Reported: GB/s of codes
per build (median, min..max over rounds), % of the probe, and the per-round ratio of each
build to the first.

    python benchmarks/gemv_stream.py                                   # the installed runtime
    python benchmarks/gemv_stream.py --libs old=/tmp/old.so new=runtime/_lowbit_rt*.so
    python benchmarks/gemv_stream.py --format int4_sym --group 32 --shapes 32000x2048 --layers 4
    python benchmarks/gemv_stream.py --format f32 --shapes 32000x2048 --layers 2   # dense (BRGEMM)

`--format f32` / `bf16` run dense layers instead: the weights packed for the BRGEMM kernels
(`lowbit_brgemm_pack_b`, as compiled dense Linears are), one-row tiles per task.

The OpenMP driver (a 20-line loop) is compiled with the system C++ compiler on first use.
Writes benchmarks/results/gemv_stream.json (one entry per format / ISA / thread count).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lowbit.runtime import qgemm
from lowbit.runtime.library import load_openmp, openmp_library_path, runtime_library_path

DRIVER = r"""
#include <stdint.h>
#include <chrono>
typedef int32_t (*Invoke)(int64_t, const void*, int64_t, const void*, int64_t, void*, int64_t,
                          const float*, int64_t, const int32_t*, int64_t, const float*, int64_t, int64_t);
typedef int32_t (*DenseInvoke)(int64_t, const void*, int64_t, const void*, int64_t, void*, int64_t, int64_t);
struct Layer { int64_t h; const void* x; const uint8_t* w; float* y; const float* sx; const int32_t* rs;
               int64_t ntasks, task_bytes, task_rows, count; };
// Seconds per pass over the n layers: per layer one static OpenMP loop, task(layer, t) per task.
template <class Task>
double sequence(const Layer* L, int64_t n, int64_t reps, Task task) {
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t l = 0; l < n; ++l) {
      const Layer& y = L[l];
#pragma omp parallel for schedule(static)
      for (int64_t t = 0; t < y.ntasks; ++t) task(y, t);
    }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}
extern "C" double gemv_sequence(const Layer* L, int64_t n, int64_t reps, Invoke invoke) {
  return sequence(L, n, reps, [=](const Layer& y, int64_t t) {
    invoke(y.h, y.x, 0, y.w, t * y.task_bytes, y.y, t * y.task_rows, y.sx, 0, y.rs, 0, nullptr, 0, y.count);
  });
}
// Dense layers: `w` is the packed B (brgemm panels), task_bytes its element offset per task.
extern "C" double dense_sequence(const Layer* L, int64_t n, int64_t reps, DenseInvoke invoke) {
  return sequence(L, n, reps, [=](const Layer& y, int64_t t) {
    invoke(y.h, y.x, 0, y.w, t * y.task_bytes, y.y, t * y.task_rows, y.count);
  });
}
"""
DENSE = {"f32": (1, torch.float32), "bf16": (2, torch.bfloat16)}  # LOWBIT_DTYPE_*, torch dtype

I64, I32, P_ = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}


class Layer(ctypes.Structure):
    _fields_ = [("h", I64), ("x", P_), ("w", P_), ("y", P_), ("sx", P_), ("rs", P_),
                ("ntasks", I64), ("task_bytes", I64), ("task_rows", I64), ("count", I64)]


def build_driver() -> ctypes.CDLL:
    omp = openmp_library_path()
    if omp is None:
        raise SystemExit("no libiomp5 found (pip install intel-openmp, or set LOWBIT_OPENMP_LIB)")
    tag = hashlib.sha256((DRIVER + str(omp)).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"lowbit-gemv-driver-{tag}.so"
    if not out.exists():
        src = out.with_suffix(".cpp")
        src.write_text(DRIVER)
        obj = out.with_suffix(".o")
        # Compiled with gcc's OpenMP front end, linked against libiomp5 only (its GOMP_* entry
        # points), so the loop runs on the same OpenMP runtime as compiled code.
        subprocess.run(["c++", "-O2", "-fopenmp", "-fPIC", "-c", str(src), "-o", str(obj)], check=True)
        subprocess.run(["c++", "-shared", str(obj), "-o", str(out), str(omp), f"-Wl,-rpath,{omp.parent}"], check=True)
    lib = ctypes.CDLL(str(out))
    for fn in (lib.gemv_sequence, lib.dense_sequence):
        fn.restype = ctypes.c_double
        fn.argtypes = [P_, I64, I64, P_]
    return lib


def load_build(path: str, isa: str | None) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)  # RTLD_LOCAL: two builds coexist, each with its own handle table
    lib.lowbit_qgemm_dispatch.restype = I64
    lib.lowbit_qgemm_dispatch.argtypes = [I32, I32, I32] + [I64] * 9 + [I32]
    lib.lowbit_brgemm_dispatch.restype = I64
    lib.lowbit_brgemm_dispatch.argtypes = [I32] + [I64] * 9
    lib.lowbit_brgemm_packed_size.restype = I64
    lib.lowbit_brgemm_packed_size.argtypes = [I32, I64, I64]
    lib.lowbit_brgemm_pack_b.restype = I32
    lib.lowbit_brgemm_pack_b.argtypes = [I32, P_, I64, I64, I64, I32, P_, I64]
    lib.lowbit_rt_set_isa.argtypes = [I32]
    if isa is not None and lib.lowbit_rt_set_isa(ISAS[isa]) != 0:
        raise SystemExit(f"{path}: this CPU cannot run the {isa} path")
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libs", nargs="+", default=None, metavar="NAME=PATH",
                    help="runtime builds to compare (default: the installed one)")
    ap.add_argument("--format", default="ternary",
                    help="a low-bit format (qgemm tiles), or f32 / bf16 (dense BRGEMM tiles, packed B)")
    ap.add_argument("--group", type=int, default=None, help="scale group size (per-channel if unset)")
    ap.add_argument("--shapes", default="6144x2048,2048x2048,11264x2048,2048x5632", help="NxK per layer")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tile", type=int, default=512,
                    help="rows per OpenMP task (at most; the largest 64-row multiple dividing N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", choices=list(ISAS), default=None)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemv_stream.json"))
    args = ap.parse_args()

    load_openmp()
    driver = build_driver()
    specs = args.libs or [f"installed={runtime_library_path()}"]
    libs = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        libs[name] = load_build(path, args.isa)

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] * args.layers
    gen = torch.Generator().manual_seed(0)
    if args.format in DENSE:
        tables, total, keep = dense_tables(args, libs, shapes, gen)
    else:
        tables, total, keep = lowbit_tables(args, libs, shapes, gen)
    run = driver.dense_sequence if args.format in DENSE else driver.gemv_sequence
    entry = "lowbit_brgemm_invoke" if args.format in DENSE else "lowbit_qgemm_invoke"
    report(args, libs, specs, tables, total, run, entry)


def task_rows(n: int, tile: int) -> int:
    """The largest multiple of 64 rows, at most `tile`, that splits N into equal tasks."""
    if n % 64 or tile < 64:
        raise SystemExit(f"N = {n} and --tile {tile} must be whole 64-row blocks")
    return max(t for t in range(64, min(tile, n) + 1, 64) if n % t == 0)


def dense_tables(args, libs, shapes, gen):
    """fp32 / bf16 weights packed for the BRGEMM kernels (one-row tiles), as compiled dense
    Linears are."""
    dtype, tdtype = DENSE[args.format]
    keep, total = [], 0
    tables = {name: (Layer * len(shapes))() for name in libs}
    first = next(iter(libs.values()))
    for i, (n, k) in enumerate(shapes):
        w = (torch.randn(n, k, generator=gen) * 0.02).to(tdtype)
        elems = first.lowbit_brgemm_packed_size(dtype, k, n)
        packed = torch.empty(elems, dtype=tdtype)
        rc = first.lowbit_brgemm_pack_b(dtype, w.data_ptr(), k, n, k, 1, packed.data_ptr(), elems)
        if rc != 0:
            raise SystemExit(f"packing failed ({rc})")
        kp = elems // n if n % 32 == 0 else None
        total += packed.numel() * packed.element_size()
        x = torch.randn(1, k, generator=gen).to(tdtype)
        y = torch.empty(1, n)
        keep += [packed, x, y]
        tile = task_rows(n, args.tile)
        for name, lib in libs.items():
            h = lib.lowbit_brgemm_dispatch(dtype, 1, tile, k, k, kp * 32, n, 0, 0, 1 | 2)  # BETA_0 | B_PACKED
            if h <= 0:
                raise SystemExit(f"{name}: dispatch failed ({h})")
            tables[name][i] = Layer(h, x.data_ptr(), packed.data_ptr(), y.data_ptr(), None, None,
                                    n // tile, tile * kp, tile, 1)
    return tables, total, keep


def lowbit_tables(args, libs, shapes, gen):
    info = qgemm.FORMAT_INFO[args.format]
    packed = {}
    for n, k in sorted(set(shapes)):
        q = torch.randint(info.qmin, info.qmax + 1, (n, k), generator=gen, dtype=torch.int8)
        if args.format == "int1":
            q[q == 0] = 1
        zero = (torch.randint(0, info.qmax + 1, (n, 1 if not args.group else k // args.group),
                              generator=gen, dtype=torch.int8) if info.zero_point else None)
        scale = torch.rand(n, k // args.group, generator=gen) + 0.1 if args.group else torch.rand(n, generator=gen) + 0.1
        packed[(n, k)] = qgemm.pack_weight(q, scale, args.format, group=args.group, zero=zero)
    keep, total = [], 0
    tables = {name: (Layer * len(shapes))() for name in libs}
    for i, (n, k) in enumerate(shapes):
        pw = packed[(n, k)]
        w = pw.data.clone()  # every layer its own bytes: nothing is read from cache twice
        total += w.numel() * w.element_size()
        xq, sx, rs = qgemm.quantize_activations(torch.randn(1, k, generator=gen), pw.kblock)
        y = torch.empty(1, n)
        keep += [w, xq, sx, rs, y]
        tile = task_rows(n, args.tile)
        for name, lib in libs.items():
            h = lib.lowbit_qgemm_dispatch(qgemm.FORMATS[args.format], 1, 2, 1, tile, pw.kblock, pw.k_padded,
                                          pw.nblock_bytes, n, pw.kblock, pw.kblock_bytes, pw.num_kblocks, 0)
            if h <= 0:
                raise SystemExit(f"{name}: dispatch failed ({h})")
            tables[name][i] = Layer(h, xq.data_ptr(), w.data_ptr(), y.data_ptr(), sx.data_ptr(), rs.data_ptr(),
                                    n // tile, (tile // 64) * pw.nblock_bytes, tile, pw.num_kblocks)
    return tables, total, keep


def report(args, libs, specs, tables, total, run, entry) -> None:
    shapes_n = len(tables[next(iter(tables))])
    torch.set_num_threads(args.threads)
    from lowbit.compiler import threads
    threads.set_num_threads(args.threads)
    threads.configure()
    probe_buf = torch.ones(128 * 2 ** 20)
    gbs = {name: [] for name in libs}
    probes = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        probe_buf.sum()
        probes.append(probe_buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        time.sleep(0.2)  # torch's own pool stops spinning before the OpenMP loops start
        for name in (list(libs) if r % 2 == 0 else list(libs)[::-1]):
            invoke = ctypes.cast(getattr(libs[name], entry), P_)
            run(ctypes.addressof(tables[name]), shapes_n, 1, invoke)  # warm-up
            dt = run(ctypes.addressof(tables[name]), shapes_n, 3, invoke)
            gbs[name].append(total / dt / 1e9)

    probe = statistics.median(probes)
    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    isa = args.isa or "default"
    print(f"# {cpu}; {args.format}{f' g{args.group}' if args.group else ''}, {shapes_n} GEMVs, "
          f"{total / 1e6:.1f} MB of codes; {args.threads} threads, ISA {isa}, {args.tile}-row tasks; "
          f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}")
    print(f"read probe: median {probe:.1f} GB/s [{min(probes):.1f}..{max(probes):.1f}]")
    first = next(iter(libs))
    rows = {}
    for name, v in gbs.items():
        ratios = sorted(a / b for a, b in zip(v, gbs[first]))
        med = statistics.median(v)
        line = f"{name:12s} {med:6.1f} GB/s [{min(v):.1f}..{max(v):.1f}]  {100 * med / probe:4.0f}% of probe"
        if name != first:
            line += f"   / {first}: {statistics.median(ratios):.3f} [{ratios[0]:.3f}..{ratios[-1]:.3f}]"
        print(line)
        rows[name] = {"gbs": v, "median_gbs": med, "vs_probe": med / probe,
                      "ratio_to_first": {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}}

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"entries": {}}
    key = f"{args.format}{f'-g{args.group}' if args.group else ''}:{args.shapes}x{args.layers}:{isa}:{args.threads}t"
    result["entries"][key] = {
        "cpu": cpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
        "isa": isa, "format": args.format, "group": args.group, "tile_rows": args.tile,
        "codes_bytes": total, "rounds": args.rounds, "probe_gbs": probes,
        "libs": {name: spec.partition("=")[2] for name, spec in zip(libs, specs)}, "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
