"""Fused epilogues: a compiled ternary layer followed by a residual add or an activation,
with lowbit-fuse-qlinear-epilogue (the kernel's epilogue does it) and without (the
separate elementwise loop the rest of the pipeline generates), side by side in one run.

    down:  down(x) + r           LowBitLinear 6912 -> 2560 (N x K = 2560 x 6912) + residual
    relu2: relu(up(x)) ** 2      LowBitLinear 2560 -> 6912 (N x K = 6912 x 2560), squared ReLU

Ternary weights, int8 activations, 2 threads, M = 1, 16, 128, fp32 and bf16 activations.
The unfused variant is compiled with LOWBIT_DISABLE_PASSES=lowbit-fuse-qlinear-epilogue.
Timing: wall clock (the kernels run on 2 OpenMP threads); the two variants are called
alternately (so both see the same machine state) and each reports the minimum over rounds
of the per-round median, which is what survives a shared machine best.

    python benchmarks/epilogue.py                     # writes benchmarks/results/epilogue.json
    python benchmarks/epilogue.py --ms 1 --dtypes f32 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import lowbit
from lowbit.compiler.compile import compile_function

THREADS = 2
PASS = "lowbit-fuse-qlinear-epilogue"


class Down(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.down = torch.nn.Linear(6912, 2560, bias=False)

    def forward(self, x, r):
        return self.down(x) + r


class UpRelu2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.up = torch.nn.Linear(2560, 6912, bias=False)

    def forward(self, x, r):
        return torch.relu(self.up(x)) ** 2


CASES = {"down(x)+r": (Down, 6912, 2560), "relu(up(x))**2": (UpRelu2, 2560, 6912)}


def compile_variant(model, args, fused: bool):
    old = os.environ.get("LOWBIT_DISABLE_PASSES")
    if fused:
        os.environ.pop("LOWBIT_DISABLE_PASSES", None)
    else:
        os.environ["LOWBIT_DISABLE_PASSES"] = PASS
    try:
        with torch.no_grad():
            return compile_function(model, args)
    finally:
        if old is None:
            os.environ.pop("LOWBIT_DISABLE_PASSES", None)
        else:
            os.environ["LOWBIT_DISABLE_PASSES"] = old


def paired_medians(fa, fb, runs: int, min_seconds: float) -> tuple[float, float]:
    """Median wall times of fa and fb, called alternately, so that both see the same
    machine state (on a shared 2-core machine a 2-thread call takes ~3x longer whenever
    the second core is busy, which would otherwise dominate the comparison)."""
    ta, tb = [], []
    start = time.perf_counter()
    while len(ta) < runs or (time.perf_counter() - start < min_seconds and len(ta) < 2000):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1,16,128")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "epilogue.json"))
    opts = ap.parse_args()
    torch.set_num_threads(THREADS)
    os.environ.setdefault("LOWBIT_NUM_THREADS", str(THREADS))
    load = os.getloadavg()
    print(f"# threads {THREADS}, ISA {lowbit.runtime.current_isa()}, ternary weights, int8 activations; "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("# ms: min over rounds of the per-round median wall time (variants called alternately); x = unfused / fused")
    header = f"{'case':<16} {'dtype':<5} {'M':>4} {'fused ms':>9} {'unfused ms':>11} {'x':>6} {'max |diff|':>11} epilogue"
    print(header)
    rows = []
    for name, (cls, k, n) in CASES.items():
        model = cls()
        lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary", activations="int8"))
        for dname in opts.dtypes.split(","):
            dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dname]
            for m in (int(v) for v in opts.ms.split(",")):
                gen = torch.Generator().manual_seed(m)
                x = torch.randn(m, k, generator=gen).to(dtype)
                r = torch.randn(m, n, generator=gen).to(dtype)
                fused = compile_variant(model, (x, r), True)
                plain = compile_variant(model, (x, r), False)
                epi = [e.get("epilogue") for e in fused.report if e.get("kind") == "matmul"]
                epi_plain = [e.get("epilogue") for e in plain.report if e.get("kind") == "matmul"]
                assert epi_plain == ["none"], epi_plain
                with torch.no_grad():
                    diff = float((fused(x, r)[0].float() - plain(x, r)[0].float()).abs().max())
                    runs = 200 if m == 1 else 30
                    t_f, t_p = [], []
                    for _ in range(opts.rounds):
                        a, b = paired_medians(lambda: fused(x, r), lambda: plain(x, r), runs, 0.2)
                        t_f.append(a)
                        t_p.append(b)
                row = dict(case=name, dtype=dname, m=m, n=n, k=k, fused_ms=min(t_f) * 1e3,
                           unfused_ms=min(t_p) * 1e3, fused_rounds_ms=[t * 1e3 for t in t_f],
                           unfused_rounds_ms=[t * 1e3 for t in t_p], max_abs_diff=diff,
                           epilogue=epi[0] if epi else "?")
                row["speedup"] = row["unfused_ms"] / row["fused_ms"]
                rows.append(row)
                print(f"{name:<16} {dname:<5} {m:>4} {row['fused_ms']:>9.3f} {row['unfused_ms']:>11.3f} "
                      f"{row['speedup']:>6.2f} {diff:>11.2e} {row['epilogue']}", flush=True)
    end_load = os.getloadavg()
    print(f"# load average at end {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(dict(threads=THREADS, isa=lowbit.runtime.current_isa(),
                                              load_start=load, load_end=end_load, rows=rows), indent=1))
    print(f"# wrote {opts.out}")


if __name__ == "__main__":
    main()
