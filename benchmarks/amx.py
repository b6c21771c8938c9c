"""AMX-INT8 tiles against the AVX-512 VNNI tiles and the machine's tile peak (issue 14).

One process, one thread per tile (torch.set_num_threads(1)), rounds interleaved: every round
measures the tdpbsud and vpdpbusd peaks (benchmarks/peaks.py loops, 1 thread) and then each
case on the AMX path and on the AVX-512 path, same operands, same handle kinds as compiled
code uses (`lowbit_qgemm_dispatch`, whole K in one invoke). Reported per case: GMAC/s median
[min..max] of thread CPU time (each sample after one untimed call of the same tile), % of
the AMX peak (against the mean of the tdpbsud bursts run right before and after that case's
AMX run, against the same round's burst and against the best burst of the run: on the Xeon
seen so far the tdpbsud loop reads either ~1000 or
~2000-2300 GMAC/s from one round to the next), and AMX / VNNI per round. Then the fast state
alone: each side's upper quartile over the run (tiles, VNNI tiles, every tdpbsud burst), since
the bursts and the tiles change state independently within a round. Last, "sustained": the
issue's two layers and the compiled prefill's tile called back to back as a prefill does,
blocks of AMX / VNNI call pairs between two bursts (each pair's ratio shares the host's
state; blocks of the cases interleaved; `--blocks`).

Cases: the issue's M = 128 layers (4096x4096, 2560x6912: N x K) in one invoke; the tile the
compiler issues for a 1B model's prefill (M = 128 tokens x 512 output rows x K 2048) in every
format, and once more with its activation rows 2048 bytes apart instead of the compiled
layout's act_stride (2112: the ratio is printed); an M sweep on that tile with AMX forced at every M (what sets the row threshold,
`qgemm.amx_min_rows()`); and the
4096x4096 layer on 2 threads (each half of N, started together). The dense bf16 BRGEMM's AMX
tiles against AVX-512 and torch.matmul: benchmarks/amx_dense.py.

    python benchmarks/amx.py [--rounds 15] [--blocks 24] [--quick] [--out benchmarks/results/amx.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peaks as peaks_mod  # noqa: E402
from microkernels import native, random_weight  # noqa: E402
from peaks import summarize  # noqa: E402

from lowbit.runtime import brgemm, qgemm, set_isa  # noqa: E402

FORMATS = ["ternary", "int2_asym", "int1", "int4_sym", "int8"]


class Case:
    """One tile shape and format, dispatched on both paths over the same operands."""

    def __init__(self, lib, fmt: str, m: int, n: int, k: int, threads: int = 1, force: bool = False,
                 packed_rows: bool = False):
        gen = torch.Generator().manual_seed(0)
        self.pw = random_weight(fmt, n, k, gen)
        # activations in the rows compiled layers quantize into (qgemm.act_stride), or with
        # packed_rows exactly Kp bytes apart (the layout before act_stride)
        self.packed_rows = packed_rows
        self.xq, self.sx, self.rs = qgemm.quantize_activations(
            torch.randn(m, k, generator=gen), self.pw.kblock,
            stride=None if packed_rows else qgemm.act_stride(self.pw.k_padded))
        self.y = torch.empty(m, n)
        self.lib, self.fmt, self.m, self.n, self.k, self.threads = lib, fmt, m, n, k, threads
        part = n // threads  # a multiple of 64 for the shapes used
        # ~1-2 ms of AMX work per sample: shorter ones (0.1-0.3 ms) read 20-25% low, the AMX
        # unit still waking up after the VNNI run before it
        self.reps = max(1, int(2e9 / (m * part * k)))
        self.handles = {}
        # force: AMX below the row threshold too (the sweep that sets the threshold)
        rows = qgemm.amx_min_rows(1) if force else None
        for isa in ("amx", "avx512"):
            set_isa(isa)
            kern = qgemm.QGemmKernel(fmt, torch.int8, torch.float32, m, part, self.pw.kblock,
                                     lda=self.xq.shape[1], ldb=self.pw.nblock_bytes, ldc=n,
                                     stride_a=self.pw.kblock, stride_b=self.pw.kblock_bytes,
                                     ld_aux=self.pw.num_kblocks)
            self.handles[isa] = (kern.handle, kern.isa)
        if rows is not None:
            qgemm.amx_min_rows(rows)
        self.macs = m * part * k * self.reps  # per thread

    def name(self) -> str:
        t = f", {self.threads} threads" if self.threads > 1 else ""
        rows = ", rows Kp apart" if self.packed_rows else ""
        return f"{self.fmt} M={self.m} {self.n}x{self.k}{t}{rows}"

    def run(self, isa: str, warm: bool = True) -> float:
        """MAC/s: the sum over threads of each thread's MACs over its CPU time (`warm`: after
        one untimed call)."""
        handle = self.handles[isa][0]
        cpu = [0.0] * self.threads
        bar = threading.Barrier(self.threads)
        pw, part = self.pw, self.n // self.threads

        def work(t):
            args = (handle, self.xq.data_ptr(), pw.data.data_ptr() + (t * part // 64) * pw.nblock_bytes,
                    self.y.data_ptr() + t * part * 4, self.sx.data_ptr(), self.rs.data_ptr(), None,
                    pw.num_kblocks, self.reps)
            # one untimed call first: right after a tdpbsud burst the tiles ran ~10% slower
            # for a while (4096 x 4096: 0.90x back-to-back calls, median of 16 blocks)
            if warm:
                self.lib.lowbit_qbench_tile(*args[:-1], 1)
            bar.wait()
            c0 = time.thread_time()
            self.lib.lowbit_qbench_tile(*args)
            cpu[t] = time.thread_time() - c0

        if self.threads == 1:
            work(0)
        else:
            ths = [threading.Thread(target=work, args=(t,)) for t in range(self.threads)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
        return sum(self.macs / c for c in cpu)


def upper_quartile(values: list[float]) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[2]


def sustained(cases: list[Case], pk, blocks: int, pairs: int = 16) -> dict:
    """Back-to-back calls, as in a prefill: per block and case, a tdpbsud burst, one untimed
    AMX / VNNI pair, `pairs` timed pairs (order alternating), another burst. Per block: the
    medians of the AMX and VNNI calls, of the pairs' AMX / VNNI ratios, and the AMX median
    against the mean of the two bursts; blocks of the cases interleaved."""
    med = statistics.median
    out = {c.name(): {"amx": [], "vnni": [], "amx_over_vnni": [], "pct_adjacent": [], "bursts": []}
           for c in cases}
    for _ in range(blocks):
        for c in cases:
            before = pk.macs_per_s("amx_int8")
            c.run("amx", warm=False)
            c.run("avx512", warm=False)
            amx, vnni, ratio = [], [], []
            for i in range(pairs):
                r = {isa: c.run(isa, warm=False) for isa in (("amx", "avx512") if i % 2 == 0 else ("avx512", "amx"))}
                amx.append(r["amx"])
                vnni.append(r["avx512"])
                ratio.append(r["amx"] / r["avx512"])
            after = pk.macs_per_s("amx_int8")
            rec = out[c.name()]
            rec["amx"].append(med(amx))
            rec["vnni"].append(med(vnni))
            rec["amx_over_vnni"].append(med(ratio))
            rec["pct_adjacent"].append(200 * med(amx) / (before + after))
            rec["bursts"] += [before, after]
    return out


def report_sustained(res: dict, blocks: int, pairs: int) -> dict:
    """Print the sustained blocks' table; returns its JSON."""
    bursts = [b for r in res.values() for b in r["bursts"]]
    fast = upper_quartile(bursts)
    print(f"\nSustained: {blocks} blocks of {pairs} back-to-back AMX / VNNI call pairs per case, "
          f"1 thread; median [min..max] over blocks (upper quartile); tdpbsud bursts "
          f"{statistics.median(bursts) / 1e9:.0f} GMAC/s median, {fast / 1e9:.0f} upper quartile")
    print(f"{'case':24s} {'AMX GMAC/s':>26s} {'%adjacent bursts':>24s} {'%fast burst':>12s} "
          f"{'VNNI GMAC/s':>12s} {'AMX/VNNI per pair':>26s}")
    out = {}
    for name, r in res.items():
        a, q, adj, v = r["amx"], r["amx_over_vnni"], r["pct_adjacent"], r["vnni"]
        out[name] = {"amx_gmacs": summarize([x / 1e9 for x in a]), "vnni_gmacs": summarize([x / 1e9 for x in v]),
                     "amx_over_vnni": summarize(q), "amx_pct_adjacent": summarize(adj),
                     "amx_pct_fast_burst": 100 * statistics.median(a) / fast,
                     "upper_quartile": {"amx_gmacs": upper_quartile(a) / 1e9,
                                        "amx_pct_fast_burst": 100 * upper_quartile(a) / fast,
                                        "amx_over_vnni": upper_quartile(q)}}
        print(f"{name:24s} {statistics.median(a) / 1e9:7.1f} [{min(a) / 1e9:6.1f}..{max(a) / 1e9:6.1f}] "
              f"({upper_quartile(a) / 1e9:4.0f}) {statistics.median(adj):6.1f}% [{min(adj):3.0f}..{max(adj):3.0f}] "
              f"({upper_quartile(adj):3.0f}%) {100 * statistics.median(a) / fast:5.1f}% ({100 * upper_quartile(a) / fast:3.0f}%) "
              f"{statistics.median(v) / 1e9:8.1f} {statistics.median(q):7.2f} [{min(q):.2f}..{max(q):.2f}] ({upper_quartile(q):.2f})")
    return {"blocks": blocks, "pairs": pairs, "bursts_gmacs": summarize([b / 1e9 for b in bursts]),
            "fast_burst_gmacs": fast / 1e9, "cases": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="3 rounds, fewer cases")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "amx.json"))
    ap.add_argument("--blocks", type=int, default=24, help="sustained blocks per headline case (0: none)")
    args = ap.parse_args()
    cpu = peaks_mod.cpu_description()
    why = peaks_mod.amx_missing("amx_int8")
    if why:
        print(f"# {cpu.get('model', 'this CPU')} {why}: no AMX tiles to measure")
        return
    torch.set_num_threads(1)
    lib = native()
    pk = peaks_mod.Peaks()
    rounds = 3 if args.quick else args.rounds

    cases = [Case(lib, "ternary", 128, 4096, 4096), Case(lib, "ternary", 128, 2560, 6912)]
    cases += [Case(lib, f, 128, 512, 2048) for f in (FORMATS[:1] if args.quick else FORMATS)]
    # the compiled prefill's tile with its activation rows 2048 bytes apart (same L1 sets)
    cases += [Case(lib, "ternary", 128, 512, 2048, packed_rows=True)]
    sweep = [Case(lib, "ternary", m, 512, 2048, force=True)
             for m in ((16, 32, 64) if args.quick else (8, 16, 24, 32, 48, 64))]
    two = [Case(lib, "ternary", 128, 4096, 4096, threads=2)]
    all_cases = cases + sweep + two
    res = {c.name(): {"amx": [], "avx512": [], "adjacent": []} for c in all_cases}
    peak = {"amx_int8": [], "vnni_zmm": [], "amx_int8_2t": []}
    bursts = {1: [], 2: []}  # every tdpbsud burst of the run, by threads
    load0 = os.getloadavg()[0]
    for r in range(rounds):
        for name in ("amx_int8", "vnni_zmm"):
            peak[name].append(pk.macs_per_s(name))
        peak["amx_int8_2t"].append(pk.macs_per_s("amx_int8", 2))
        bursts[1].append(peak["amx_int8"][-1])
        bursts[2].append(peak["amx_int8_2t"][-1])
        for c in all_cases:
            for isa in (("amx", "avx512") if r % 2 == 0 else ("avx512", "amx")):
                if isa == "amx":  # the tdpbsud bursts right before and after the AMX run
                    before = pk.macs_per_s("amx_int8", c.threads)
                res[c.name()][isa].append(c.run(isa))
                if isa == "amx":
                    after = pk.macs_per_s("amx_int8", c.threads)
                    res[c.name()]["adjacent"].append((before + after) / 2)
                    bursts[c.threads] += [before, after]
        print(f"  round {r + 1}/{rounds} done", flush=True)

    print(f"\n# CPU: {cpu.get('model')}; flags: {' '.join(cpu.get('flags', []))}")
    print(f"# 1 thread per tile unless stated; {rounds} interleaved rounds; thread CPU time; load average "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f}")
    for name, v in peak.items():
        print(f"peak {name:12s} {statistics.median(v) / 1e9:8.1f} GMAC/s [{min(v) / 1e9:.1f}..{max(v) / 1e9:.1f}]")
    best = max(peak["amx_int8"])
    out_cases = []
    print(f"\n{'case':34s} {'AMX GMAC/s':>24s} {'%adjacent [min..max]':>21s} {'%peak (round)':>14s} {'%best':>6s} {'VNNI GMAC/s':>24s} "
          f"{'%vnni':>6s} {'AMX/VNNI [min..max]':>22s}")
    for c in all_cases:
        a, v = res[c.name()]["amx"], res[c.name()]["avx512"]
        pk_a = peak["amx_int8_2t"] if c.threads == 2 else peak["amx_int8"]
        pk_v = [p * c.threads for p in peak["vnni_zmm"]]
        of_round = [x / p for x, p in zip(a, pk_a)]
        of_adjacent = [x / p for x, p in zip(a, res[c.name()]["adjacent"])]
        ratio = [x / y for x, y in zip(a, v)]
        best_c = max(pk_a) if c.threads == 2 else best
        row = {"case": c.name(), "format": c.fmt, "m": c.m, "n": c.n, "k": c.k, "threads": c.threads,
               "handle_isa": {isa: h[1] for isa, h in c.handles.items()},
               "amx_gmacs": summarize([x / 1e9 for x in a]),
               "vnni_gmacs": summarize([x / 1e9 for x in v]),
               "amx_pct_round_peak": summarize([100 * x for x in of_round]),
               "amx_pct_adjacent_peak": summarize([100 * x for x in of_adjacent]),
               "amx_pct_best_peak": 100 * statistics.median(a) / best_c,
               "vnni_pct_peak": 100 * statistics.median(v) / statistics.median(pk_v),
               "amx_over_vnni": summarize(ratio)}
        out_cases.append(row)
        adj = row["amx_pct_adjacent_peak"]
        print(f"{c.name():34s} {statistics.median(a) / 1e9:8.1f} [{min(a) / 1e9:6.1f}..{max(a) / 1e9:6.1f}] "
              f"{adj['median']:8.1f}% [{adj['min']:3.0f}..{adj['max']:3.0f}]"
              f"{row['amx_pct_round_peak']['median']:13.1f}% {row['amx_pct_best_peak']:5.1f}% "
              f"{statistics.median(v) / 1e9:8.1f} [{min(v) / 1e9:6.1f}..{max(v) / 1e9:6.1f}] "
              f"{row['vnni_pct_peak']:5.1f}% {statistics.median(ratio):6.2f} [{min(ratio):.2f}..{max(ratio):.2f}]"
              + ("" if c.handles["amx"][1] == "amx" else f"  (AMX handle runs {c.handles['amx'][1]})"))
    # The host's AMX rate halves and recovers within milliseconds, for the bursts and the
    # tiles separately (a tile can read faster than the burst next to it), so per-round
    # pairs mix states. The upper quartiles of all samples estimate each in the fast state.
    print(f"\nFast state (upper quartile of each side's samples over the run; tdpbsud bursts: "
          f"{upper_quartile(bursts[1]) / 1e9:.0f} GMAC/s 1 thread, {upper_quartile(bursts[2]) / 1e9:.0f} 2 threads)")
    print(f"{'case':34s} {'AMX GMAC/s':>11s} {'%burst':>7s} {'VNNI GMAC/s':>12s} {'AMX/VNNI':>9s}")
    for c, row in zip(all_cases, out_cases):
        a, v = (upper_quartile(res[c.name()][isa]) for isa in ("amx", "avx512"))
        b = upper_quartile(bursts[c.threads])
        row["fast_state"] = {"amx_gmacs": a / 1e9, "burst_gmacs": b / 1e9, "amx_pct_burst": 100 * a / b,
                             "vnni_gmacs": v / 1e9, "amx_over_vnni": a / v}
        print(f"{c.name():34s} {a / 1e9:11.1f} {100 * a / b:6.1f}% {v / 1e9:12.1f} {a / v:9.2f}")
    stride = [x / y for x, y in zip(res["ternary M=128 512x2048"]["amx"],
                                    res["ternary M=128 512x2048, rows Kp apart"]["amx"])]
    print(f"\nAMX, ternary M=128 512x2048, activation rows act_stride(2048) = "
          f"{qgemm.act_stride(2048)} vs 2048 bytes apart: {statistics.median(stride):.3f} "
          f"[{min(stride):.3f}..{max(stride):.3f}] per round")
    print(f"\nAMX rule in this build: int8 tiles of >= {qgemm.amx_min_rows()} rows and K-blocks of >= "
          f"{qgemm.amx_min_kblock()} values (the M sweep forces AMX at every M); dense bf16 BRGEMMs: "
          f">= {brgemm.amx_min_rows()} rows and k >= {brgemm.amx_min_k()} (benchmarks/amx_dense.py)")
    sus = None
    if args.blocks:  # the layers and the compiled prefill's tile, back to back
        pairs = 8 if args.quick else 16
        sus = report_sustained(sustained(cases[:3], pk, args.blocks, pairs), args.blocks, pairs)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu, "rounds": rounds,
              "timing": "thread CPU time, 1 thread per tile unless stated",
              "peaks_gmacs": {k: summarize([x / 1e9 for x in v]) for k, v in peak.items()},
              "amx_min_rows": qgemm.amx_min_rows(), "amx_min_kblock": qgemm.amx_min_kblock(),
              "cases": out_cases, "amx_act_stride_over_kp_rows": summarize(stride), "sustained": sus}
    peaks_mod.write_json(args.out, result)


if __name__ == "__main__":
    main()
