"""Loop structures for the AMX-INT8 low-bit tile, measured outside the runtime (issue 14).

Builds benchmarks/amx_loops.cpp with g++ and runs it: one ternary x int8 layer per variant
(the 2 x 2 tile blocking of runtime/native/src/qgemm_amx.cpp; no flush or epilogue), each
between two tdpbsud bursts, repetitions interleaved, 1 thread. Reported per variant: the
median [min..max] of its rate over the mean of the two adjacent bursts (the host's AMX rate
halves and recovers within seconds on the Xeon seen, and that moves both), and GMAC/s.

  chunked_256        the runtime's earlier design: a chunk of 256 k decoded once per n-block
                     into L1 planes, the int32 sums spilled between chunks
  l2_panel           sums kept in the tiles for all of K; the n-block's decoded codes for all
                     of K in L2, the next n-block's decoded between the TDPBSUDs
  ring               sums kept for all of K; every row pair decodes its two B tiles of step
                     t + 4 into an 8-step ring (L1) during step t's TDPBSUDs
  ring_t1            the same with activation tiles loaded by TILELOADDT1 (the runtime's design)
  bound_codes_in_l1  ring_t1 reading its codes from one L1-resident KiB (what codes in L1 allow)
  bound_no_decode    no decode: A and already decoded B tiles both streamed from L2

    python benchmarks/amx_loops.py [--reps 11] [--shapes 128x4096x4096,128x2048x2048]
                                   [--out benchmarks/results/amx_loops.json]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peaks as peaks_mod  # noqa: E402
from peaks import summarize  # noqa: E402


SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ["-O2", "-mavx512f", "-mavx512bw", "-mamx-tile", "-mamx-int8"]


def build(workdir: Path) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise SystemExit("amx_loops.py needs a C++ compiler (g++)")
    exe = workdir / "amx_loops"
    subprocess.run([cxx, *FLAGS, "-o", str(exe), str(SOURCE)], check=True)
    return exe


def run_shape(exe: Path, m: int, n: int, k: int, reps: int) -> dict:
    out = subprocess.run([str(exe), str(m), str(n), str(k), str(reps)], check=True,
                         capture_output=True, text=True).stdout
    ratio, gmacs, burst = defaultdict(list), defaultdict(list), []
    for line in out.splitlines():
        name, _, g, r, b = line.split()
        ratio[name].append(float(r))
        gmacs[name].append(float(g))
        burst.append(float(b))
    return {"m": m, "n": n, "k": k, "burst_gmacs": summarize(burst),
            "variants": {v: {"ratio_to_burst": summarize(ratio[v]), "gmacs": summarize(gmacs[v])}
                         for v in ratio}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--shapes", default="128x4096x4096,128x2048x2048", help="MxNxK,...")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "amx_loops.json"))
    args = ap.parse_args()
    cpu = peaks_mod.cpu_description()
    why = peaks_mod.amx_missing("amx_int8")
    if why:
        print(f"# {cpu.get('model', 'this CPU')} {why}: no AMX loops to measure")
        return
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        shapes = []
        for spec in args.shapes.split(","):
            m, n, k = (int(v) for v in spec.split("x"))
            shapes.append(run_shape(exe, m, n, k, args.reps))
    print(f"# CPU: {cpu.get('model')}; 1 thread; {args.reps} interleaved repetitions; thread CPU time")
    for s in shapes:
        b = s["burst_gmacs"]
        print(f"\nM={s['m']} N={s['n']} K={s['k']}: tdpbsud burst {b['median']:.0f} GMAC/s "
              f"[{b['min']:.0f}..{b['max']:.0f}]")
        print(f"{'variant':20s} {'of adjacent burst':>24s} {'GMAC/s':>24s}")
        for v, r in s["variants"].items():
            q, g = r["ratio_to_burst"], r["gmacs"]
            print(f"{v:20s} {q['median']:8.2f} [{q['min']:.2f}..{q['max']:.2f}]".ljust(46)
                  + f"{g['median']:8.0f} [{g['min']:.0f}..{g['max']:.0f}]")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu, "reps": args.reps,
              "timing": "thread CPU time, 1 thread", "flags": FLAGS, "shapes": shapes}
    print()
    peaks_mod.write_json(args.out, result)


if __name__ == "__main__":
    main()
