"""Eager PyTorch vs lowbit on the elementwise/reduction ops of a Llama decoder block.

softmax, RMSNorm and SiLU(gate) * up at prefill (128 x 4096), decode (1 x 4096) and
attention-score (32 x 128 x 128) shapes, fp32 and bf16. Both sides use the same thread
count (torch.set_num_threads and LOWBIT_NUM_THREADS); each measurement is the median of
`--reps` timings of `--inner` back-to-back calls, eager and lowbit interleaved so that
machine noise hits both. Prints a table and writes benchmarks/results/elementwise.json.

    python benchmarks/elementwise.py [--threads 2] [--reps 15] [--inner 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F


def softmax(x):
    return torch.softmax(x, -1)


def rmsnorm(x, w):
    v = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype) * w


def silu_mul(gate, up):
    return F.silu(gate) * up


CASES = [
    ("softmax", softmax, (128, 4096)), ("softmax", softmax, (1, 4096)), ("softmax", softmax, (32, 128, 128)),
    ("rmsnorm", rmsnorm, (128, 4096)), ("rmsnorm", rmsnorm, (1, 4096)),
    ("silu_mul", silu_mul, (128, 11008)), ("silu_mul", silu_mul, (1, 11008)),
]


def _args(name, shape, dtype):
    x = torch.randn(shape).to(dtype)
    if name == "rmsnorm":
        return [x, torch.randn(shape[-1]).to(dtype)]
    if name == "silu_mul":
        return [x, torch.randn(shape).to(dtype)]
    return [x]


def _time(fn, args, inner):
    t = time.perf_counter()
    for _ in range(inner):
        fn(*args)
    return (time.perf_counter() - t) / inner * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "elementwise.json"))
    args = p.parse_args()

    os.environ["LOWBIT_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    from lowbit.compiler import threads
    from lowbit.compiler.compile import compile_function

    rows = []
    header = f"{'op':9s} {'dtype':9s} {'shape':15s} {'eager us':>10s} {'lowbit us':>10s} {'speedup':>8s} {'max err':>9s}"
    print(f"threads={args.threads} reps={args.reps} inner={args.inner} (median of reps)")
    print(header)
    print("-" * len(header))
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn, shape in CASES:
            inputs = _args(name, shape, dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = compile_function(fn, inputs)
            threads.configure()
            lowbit_fn = lambda *a: compiled(*a)[0]  # noqa: E731
            with torch.no_grad():
                err = (lowbit_fn(*inputs).float() - fn(*inputs).float()).abs().max().item()
                for _ in range(3):
                    fn(*inputs), lowbit_fn(*inputs)
                eager_t, lowbit_t = [], []
                for _ in range(args.reps):
                    eager_t.append(_time(fn, inputs, args.inner))
                    lowbit_t.append(_time(lowbit_fn, inputs, args.inner))
            e, l = statistics.median(eager_t), statistics.median(lowbit_t)
            dt = str(dtype).replace("torch.", "")
            rows.append({"op": name, "dtype": dt, "shape": list(shape), "eager_us": round(e, 2),
                         "lowbit_us": round(l, 2), "speedup": round(e / l, 3), "max_abs_err": err})
            print(f"{name:9s} {dt:9s} {'x'.join(map(str, shape)):15s} {e:10.1f} {l:10.1f} {e / l:8.2f} {err:9.2e}",
                  flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "elementwise", "threads": args.threads, "reps": args.reps, "inner": args.inner,
        "statistic": "median", "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
