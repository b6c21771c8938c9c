"""Dense bf16 BRGEMM on AMX-BF16 tiles against the AVX-512 vdpbf16ps tiles and torch.matmul
(oneDNN, itself on AMX here), with the machine's tdpbf16ps peak measured in the same run
(issue 14, dense part; the int8 tiles are benchmarks/amx.py's).

One process, one thread (torch.set_num_threads(1) too), rounds interleaved: every round
measures the tdpbf16ps and vdpbf16ps peaks (benchmarks/peaks.py loops, 1 thread, 20 ms
bursts) and then each case on every path, the order of the paths alternating between rounds.
Paths: lowbit AMX with B packed (what compiled code runs for a constant weight) and row-major,
lowbit AVX-512 with B packed, torch.matmul(a, b) on bf16 tensors (b [K, N] row-major). Each
path's kernel is dispatched once (`lowbit_brgemm_dispatch`, beta 0, fp32 C as torch's bf16
matmul accumulates; whole K in one invoke). Reported per case: GMAC/s median [min..max] of
thread CPU time, % of the AMX-BF16 peak (same round's burst, and the best burst of the run:
this host's AMX peak is bimodal), and lowbit AMX / torch per round.

Cases: M = 128 x the issue's layer shapes (N x K of 2048/4096/5632); an M sweep (1..128) at
2048 x 2048 and a K sweep at M = 128 with AMX forced at every size (what sets the dispatch
rule, `brgemm.amx_min_rows()` / `brgemm.amx_min_k()`); the 256-column tiles compiled code
issues; and a compiled bf16 MLP (lowbit's compile_function, wall clock) against eager torch.

    python benchmarks/amx_dense.py [--rounds 7] [--quick] [--out benchmarks/results/amx_dense.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peaks as peaks_mod  # noqa: E402
from peaks import summarize  # noqa: E402

from lowbit.runtime import brgemm as bg  # noqa: E402
from lowbit.runtime import current_isa, set_isa  # noqa: E402

TARGET_MACS = 1.0e9  # per measurement on the fast paths (a few ms)


class Case:
    def __init__(self, m: int, n: int, k: int, group: str, paths: tuple[str, ...]):
        gen = torch.Generator().manual_seed(m + n + k)
        self.m, self.n, self.k, self.group = m, n, k, group
        self.a = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        self.b = torch.randn(k, n, generator=gen).to(torch.bfloat16)
        self.pb = bg.pack_b(self.b)
        self.c = torch.empty(m, n)
        self.reps = max(1, int(TARGET_MACS / (m * n * k)))
        self.macs = m * n * k
        self.paths = paths
        self.fns, self.isas = {}, {}
        # AMX at every size here (the sweeps measure what the rule should be)
        rule, before = (bg.amx_min_rows(1), bg.amx_min_k(1)), current_isa()
        for path in paths:
            if path == "torch":
                self.fns[path] = lambda: torch.matmul(self.a, self.b)
                self.isas[path] = "oneDNN"
                continue
            isa, layout = path.split("-")
            set_isa(isa)
            packed = layout == "packed"
            kern = bg.Brgemm(torch.bfloat16, m, n, k, beta=0, b_packed=packed)
            bb = self.pb if packed else self.b
            self.fns[path] = (lambda kern=kern, bb=bb: kern(self.a, bb, self.c))
            self.isas[path] = kern.isa
        bg.amx_min_rows(rule[0])
        bg.amx_min_k(rule[1])
        set_isa(before)
        for fn in self.fns.values():  # warm: scratch, packing buffers, oneDNN's primitive cache
            fn()
        self.check()

    def check(self) -> None:
        """Every lowbit path's result against torch's fp32 matmul of the bf16 inputs."""
        ref = self.a.float() @ self.b.float()
        tol = 1e-4 * (self.a.float().abs() @ self.b.float().abs()).max().item()
        for path, fn in self.fns.items():
            if path != "torch":
                fn()
                err = (self.c - ref).abs().max().item()
                assert err <= tol, f"{self.name()} {path}: max error {err} > {tol}"

    def name(self) -> str:
        return f"M={self.m} N={self.n} K={self.k}"

    def run(self, path: str) -> float:
        fn = self.fns[path]
        t0 = time.thread_time()
        for _ in range(self.reps):
            fn()
        return self.macs * self.reps / (time.thread_time() - t0)


class CompiledMLP:
    """A bf16 MLP (Linear K->N, SiLU, Linear N->K, no bias) compiled by lowbit (its matmuls
    become BRGEMM tiles of N-tile width over the whole A) against eager torch. Wall-clock
    (compiled code may run on an OpenMP worker), 1 thread; the ISA is set before each call
    since compiled code dispatches when it runs."""

    group = "compiled"
    paths = ("amx-packed", "avx512-packed", "torch")

    def __init__(self, m: int, n: int, k: int):
        from lowbit.compiler import threads
        from lowbit.compiler.compile import compile_function
        threads.set_num_threads(1)
        self.m, self.n, self.k = m, n, k
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False), torch.nn.SiLU(),
                                         torch.nn.Linear(n, k, bias=False)).to(torch.bfloat16)
        self.x = torch.randn(m, k, dtype=torch.bfloat16)
        with torch.no_grad():
            self.compiled = compile_function(self.model, (self.x,))
        self.macs = 2 * m * n * k
        self.reps = max(1, int(TARGET_MACS / self.macs))
        self.isas = {"amx-packed": "amx", "avx512-packed": "avx512", "torch": "eager"}
        n0 = bg.amx_invocations()
        self.call("amx-packed")
        assert bg.amx_invocations() > n0, "the compiled model did not reach the AMX tiles"
        with torch.no_grad():
            ref = self.model(self.x).float()
        for p in ("amx-packed", "avx512-packed"):
            err = (self.call(p).float() - ref).abs().max().item()
            assert err <= 2e-2 * ref.abs().max().item(), f"{self.name()} {p}: max error {err}"

    def name(self) -> str:
        return f"MLP M={self.m} {self.k}->{self.n}->{self.k}"

    def call(self, path: str):
        with torch.no_grad():
            if path == "torch":
                return self.model(self.x)
            set_isa(path.split("-")[0])
            return self.compiled(self.x)[0]

    def run(self, path: str) -> float:
        before = current_isa()
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.call(path)
        dt = time.perf_counter() - t0
        set_isa(before)
        return self.macs * self.reps / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 rounds, fewer cases")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "amx_dense.json"))
    args = ap.parse_args()
    cpu = peaks_mod.cpu_description()
    why = peaks_mod.amx_missing("amx_bf16")
    if why:
        print(f"# {cpu.get('model', 'this CPU')} {why}: no AMX tiles to measure")
        return
    torch.set_num_threads(1)
    pk = peaks_mod.Peaks()
    rounds = 3 if args.quick else args.rounds
    full = ("amx-packed", "amx-rowmajor", "avx512-packed", "torch")
    layers = [(2048, 2048), (4096, 4096), (5632, 2048), (2048, 5632)]  # N x K
    cases = [Case(128, n, k, "layer", full) for n, k in (layers[:2] if args.quick else layers)]
    sweep_m = (1, 4, 8, 16, 32, 64) if args.quick else (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)
    cases += [Case(m, 2048, 2048, "m-sweep", ("amx-packed", "avx512-packed", "torch")) for m in sweep_m]
    sweep_k = (16, 32, 64, 128) if args.quick else (2, 8, 16, 24, 32, 48, 64, 128, 256)
    cases += [Case(128, 2048, k, "k-sweep", ("amx-packed", "avx512-packed")) for k in sweep_k]
    cases += [Case(128, 256, k, "n-tile (compiled code's)", ("amx-packed", "avx512-packed")) for k in (2048, 5632)]
    cases.append(CompiledMLP(128, 5632, 2048))
    res = {c.name(): {p: [] for p in c.paths} for c in cases}
    peak = {"amx_bf16": [], "bf16_zmm": []}
    load0 = os.getloadavg()[0]
    for r in range(rounds):
        for name in peak:
            peak[name].append(pk.macs_per_s(name))
        for c in cases:
            order = c.paths if r % 2 == 0 else tuple(reversed(c.paths))
            for p in order:
                res[c.name()][p].append(c.run(p))
        print(f"  round {r + 1}/{rounds} done", flush=True)

    print(f"\n# CPU: {cpu.get('model')}; flags: {' '.join(cpu.get('flags', []))}")
    print(f"# 1 thread (torch too); {rounds} interleaved rounds; thread CPU time; GMAC/s median [min..max]; "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    for name, v in peak.items():
        print(f"peak {name:9s} {statistics.median(v) / 1e9:8.1f} GMAC/s [{min(v) / 1e9:.1f}..{max(v) / 1e9:.1f}]")
    best = max(peak["amx_bf16"])
    out_cases = []
    group = None
    for c in cases:
        if c.group != group:
            group = c.group
            print(f"\n{group:22s} " + " ".join(f"{p:>22s}" for p in full)
                  + f" {'AMX %peak rnd/best':>19s} {'AMX/torch [min..max]':>21s} {'AMX/AVX-512':>11s}")
        row = {"case": c.name(), "group": c.group, "m": c.m, "n": c.n, "k": c.k, "handle_isa": c.isas,
               "timing": "wall clock" if isinstance(c, CompiledMLP) else "thread CPU time",
               "gmacs": {p: summarize([x / 1e9 for x in v]) for p, v in res[c.name()].items()}}
        amx = res[c.name()]["amx-packed"]
        of_round = [x / p for x, p in zip(amx, peak["amx_bf16"])]
        row["amx_pct_round_peak"] = summarize([100 * x for x in of_round])
        row["amx_pct_best_peak"] = 100 * statistics.median(amx) / best
        cells = []
        for p in full:
            v = res[c.name()].get(p)
            cells.append(f"{statistics.median(v) / 1e9:7.1f} [{min(v) / 1e9:5.0f}..{max(v) / 1e9:5.0f}]"
                         if v else f"{'-':>22s}")
        line = f"{c.name():22s} " + " ".join(f"{x:>22s}" for x in cells)
        line += f" {row['amx_pct_round_peak']['median']:8.1f}%/{row['amx_pct_best_peak']:5.1f}%"
        if "torch" in res[c.name()]:
            ratio = [x / y for x, y in zip(amx, res[c.name()]["torch"])]
            row["amx_over_torch"] = summarize(ratio)
            line += f" {statistics.median(ratio):6.2f} [{min(ratio):.2f}..{max(ratio):.2f}]"
        else:
            line += f" {'-':>21s}"
        ratio = [x / y for x, y in zip(amx, res[c.name()]["avx512-packed"])]
        row["amx_over_avx512"] = summarize(ratio)
        line += f" {statistics.median(ratio):11.2f}"
        print(line)
        out_cases.append(row)
    print(f"\nAMX rule in this build: bf16 BRGEMMs of >= {bg.amx_min_rows()} rows and k >= {bg.amx_min_k()} "
          "(the sweeps force AMX at every size); fp32 runs AVX-512")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu, "rounds": rounds,
              "timing": "thread CPU time, 1 thread (torch.set_num_threads(1))",
              "peaks_gmacs": {k: summarize([x / 1e9 for x in v]) for k, v in peak.items()},
              "amx_min_rows": bg.amx_min_rows(), "amx_min_k": bg.amx_min_k(), "cases": out_cases}
    peaks_mod.write_json(args.out, result)


if __name__ == "__main__":
    main()
