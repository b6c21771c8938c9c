"""Fused attention kernel vs the previous compiled decomposition vs eager SDPA.

`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=...)` over a static
KV cache of S = 256 positions (B = 1), as `lowbit.models.Attention` calls it:

* decode: T = 1 at positions 8, 64 and 200, mask = the causal row (pos + 1 valid keys);
* prefill: T = 128 from position 0, mask = the first 128 causal rows ([128, 256]).

Head layouts: the 953M model (16 heads, 16 KV heads, head dim 128) and BitNet-2B4T
(20 heads, 5 KV heads, head dim 128). Three variants, each compiled once per shape:

* `fused`: the default pipeline (SDPA -> lowbit::attention -> the runtime kernel);
* `decomposed`: `LOWBIT_DISABLE_PASSES=lowbit-convert-attention`, i.e. torch-mlir's
  decomposition (materialized [B, H, T, S] scores, every cache row read) compiled by the
  rest of the pipeline, what ran before the fused kernel;
* `eager`: PyTorch's own SDPA (its CPU flash-attention kernel).

Every variant runs `--threads` threads (LOWBIT_NUM_THREADS and torch.set_num_threads). Each
round times `--inner` back-to-back calls of every variant in turn (interleaved, so machine
noise hits all of them); the table gives the median over `--rounds` rounds and the
spread (min-max of the round medians). The CPU model and the load average before/after are
recorded. Prints a table and writes benchmarks/results/attention.json.

    python benchmarks/attention.py [--threads 2] [--rounds 7] [--inner 20] [--dtypes f32,bf16]
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

S = 256
MODELS = {"953M": (16, 16, 128), "2B4T": (20, 5, 128)}   # heads, kv heads, head dim
PHASES = [("decode@8", 1, 8), ("decode@64", 1, 64), ("decode@200", 1, 200), ("prefill128", 128, 0)]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _attention(gqa: bool):
    def attention(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return attention


def _inputs(h, hkv, d, t, pos, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, t, d, generator=g).to(dtype)
    k = torch.randn(1, hkv, S, d, generator=g).to(dtype)
    v = torch.randn(1, hkv, S, d, generator=g).to(dtype)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = causal[pos:pos + t]                                # [T, S]: rows pos .. pos+T-1
    return [q, k, v, mask]


def _compile(fn, inputs, disable: str):
    from lowbit.compiler.compile import compile_function
    old = os.environ.get("LOWBIT_DISABLE_PASSES")
    os.environ["LOWBIT_DISABLE_PASSES"] = disable
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            compiled = compile_function(fn, inputs)
            return compiled, time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("LOWBIT_DISABLE_PASSES", None)
        else:
            os.environ["LOWBIT_DISABLE_PASSES"] = old


def _time(fn, args, inner):
    t = time.perf_counter()
    for _ in range(inner):
        fn(*args)
    return (time.perf_counter() - t) / inner * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.json"))
    args = p.parse_args()

    os.environ["LOWBIT_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("LOWBIT_CACHE", "0")   # compile both pipelines for real
    torch.set_num_threads(args.threads)
    from lowbit.compiler import threads
    from lowbit.runtime.library import current_isa

    load_before = os.getloadavg()
    print(f"cpu: {_cpu_model()}  isa: {current_isa()}  threads={args.threads} rounds={args.rounds} "
          f"inner={args.inner}  load average before: {', '.join(f'{x:.2f}' for x in load_before)}")
    header = (f"{'model':5s} {'dtype':5s} {'phase':11s} {'fused us':>16s} {'decomposed us':>16s} "
              f"{'eager us':>16s} {'vs decomp':>9s} {'vs eager':>8s} {'err fused':>9s}")
    print(header)
    print("-" * len(header))
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for model in args.models.split(","):
            h, hkv, d = MODELS[model]
            fn = _attention(h != hkv)
            compiled = {}
            for phase, t, pos in PHASES:
                inputs = _inputs(h, hkv, d, t, pos, dtype)
                # decode positions share one compile per variant (same shapes, other mask)
                key = t
                if key not in compiled:
                    compiled[key] = {name: _compile(fn, inputs, disable)
                                     for name, disable in (("fused", ""), ("decomposed", "lowbit-convert-attention"))}
                graphs = compiled[key]
                threads.configure()
                variants = {"fused": lambda *a, g=graphs["fused"][0]: g(*a)[0],
                            "decomposed": lambda *a, g=graphs["decomposed"][0]: g(*a)[0],
                            "eager": fn}
                with torch.no_grad():
                    ref = fn(*[x.float() if x.is_floating_point() else x for x in inputs])
                    errs = {n: (f(*inputs).float() - ref).abs().max().item() for n, f in variants.items()}
                    for _ in range(3):
                        for f in variants.values():
                            f(*inputs)
                    times = {n: [] for n in variants}
                    for _ in range(args.rounds):
                        for n, f in variants.items():
                            times[n].append(_time(f, inputs, args.inner))
                med = {n: statistics.median(v) for n, v in times.items()}
                row = {"model": model, "heads": h, "kv_heads": hkv, "head_dim": d, "dtype": dname, "phase": phase,
                       "T": t, "S": S, "position": pos,
                       "median_us": {n: round(v, 2) for n, v in med.items()},
                       "min_us": {n: round(min(v), 2) for n, v in times.items()},
                       "max_us": {n: round(max(v), 2) for n, v in times.items()},
                       "rounds_us": {n: [round(x, 2) for x in v] for n, v in times.items()},
                       "speedup_vs_decomposed": round(med["decomposed"] / med["fused"], 3),
                       "speedup_vs_eager": round(med["eager"] / med["fused"], 3),
                       "max_abs_err_vs_fp32_eager": errs,
                       "compile_s": {n: round(graphs[n][1], 1) for n in ("fused", "decomposed")}}
                rows.append(row)

                def cell(n):
                    return f"{med[n]:8.1f} ({min(times[n]):.0f}-{max(times[n]):.0f})"
                print(f"{model:5s} {dname:5s} {phase:11s} {cell('fused'):>16s} {cell('decomposed'):>16s} "
                      f"{cell('eager'):>16s} {row['speedup_vs_decomposed']:9.2f} {row['speedup_vs_eager']:8.2f} "
                      f"{errs['fused']:9.2e}", flush=True)

    load_after = os.getloadavg()
    print(f"load average after: {', '.join(f'{x:.2f}' for x in load_after)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "attention", "threads": args.threads, "rounds": args.rounds, "inner": args.inner,
        "statistic": "median of round medians; min/max = spread of the rounds", "S": S,
        "cpu": _cpu_model(), "isa": current_isa(), "cores": os.cpu_count(), "torch": torch.__version__,
        "load_average_before": load_before, "load_average_after": load_after, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
