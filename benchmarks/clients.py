"""Quantization libraries' models on lowbit: eager vs torch.compile(backend="lowbit").

    python benchmarks/clients.py [--threads 2] [--dim 2048] [--quick] [--only torchao,hqq,...]

For each library configuration, a 2-layer MLP (dim -> dim -> dim, ReLU between) quantized
by the library itself is run in eager and compiled with lowbit, at T = 1 (decode) and T = 64
(prefill). Each case runs in a fresh subprocess (a crash shows as CRASH, not as a missing
row), with `--threads` threads for torch and for compiled code. Reported per case: the
lowbit format/numerics `explain` gives, the compile time (first call), the medians of eager
and lowbit (interleaved rounds), and the max |lowbit - eager| relative to max |eager|.
Writes benchmarks/results/clients.json. Timings on a machine shared with other jobs are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "clients.json"
ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "fp32-dense": ("torch (baseline)", "nn.Linear fp32, not quantized"),
    "lowbit-int2-g32": ("lowbit (baseline)", "lowbit.quantize_(QuantConfig('int2_sym', group_size=32))"),
    "torchao-int1-g32": ("torchao", "IntxWeightOnlyConfig(int1, PerGroup(32))"),
    "torchao-int2-g32": ("torchao", "IntxWeightOnlyConfig(int2, PerGroup(32))"),
    "torchao-int4-g32": ("torchao", "IntxWeightOnlyConfig(int4, PerGroup(32))"),
    "torchao-int8dyn-int2": ("torchao", "Int8DynamicActivationIntxWeightConfig(int2, PerGroup(32))"),
    "hqq-2bit-g64": ("hqq", "HQQLinear nbits=2 group 64, compute fp32"),
    "hqq-1bit-g64": ("hqq", "HQQLinear nbits=1 group 64, compute fp32"),
    "quanto-qint2": ("optimum-quanto", "quantize(weights=qint2); freeze"),
    "quanto-qint4": ("optimum-quanto", "quantize(weights=qint4); freeze"),
    "gptq-2bit-g128": ("GPTQ-style fixture", "int32-packed, fp16 scales, group 128"),
    "gptq-4bit-g128": ("GPTQ-style fixture", "int32-packed, fp16 scales, group 128"),
    "gptq-4bit-g128-actorder": ("GPTQ-style fixture", "int32-packed, fp16 scales, group 128, act-order g_idx"),
}


def build(case: str, dim: int):
    import torch

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))
    if case == "fp32-dense":
        return mlp
    if case == "lowbit-int2-g32":
        import lowbit
        lowbit.quantize_(mlp, lowbit.QuantConfig(weights="int2_sym", group_size=32))
        return mlp
    if case.startswith("torchao"):
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
        if "int8dyn" in case:
            from torchao.quantization import Int8DynamicActivationIntxWeightConfig
            quantize_(mlp, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int2,
                                                                 weight_granularity=PerGroup(32)))
        else:
            dt = {"int1": torch.int1, "int2": torch.int2, "int4": torch.int4}[case.split("-")[1]]
            quantize_(mlp, IntxWeightOnlyConfig(weight_dtype=dt, granularity=PerGroup(32)))
        return mlp
    if case.startswith("hqq"):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
        nbits = int(case.split("-")[1][0])
        for i in (0, 2):
            mlp[i] = HQQLinear(mlp[i], BaseQuantizeConfig(nbits=nbits, group_size=64),
                               compute_dtype=torch.float32, device="cpu")
        return mlp
    if case.startswith("quanto"):
        from optimum.quanto import freeze, qint2, qint4, quantize
        quantize(mlp, weights=qint2 if "qint2" in case else qint4)
        freeze(mlp)
        return mlp
    if case.startswith("gptq"):
        sys.path.insert(0, str(ROOT / "test" / "python" / "clients"))
        from gptq_style import GPTQStyleLinear
        bits = int(case.split("-")[1][0])
        ao = "actorder" in case
        return torch.nn.Sequential(GPTQStyleLinear(dim, dim, bits, 128, seed=1, act_order=ao), torch.nn.ReLU(),
                                   GPTQStyleLinear(dim, dim, bits, 128, seed=2, act_order=ao))
    raise ValueError(f"unknown case {case!r}")


def run_case(case: str, dim: int, threads: int, rounds: int) -> dict:
    import warnings

    import torch

    import lowbit
    torch.set_num_threads(threads)
    model = build(case, dim)
    out = {"case": case, "library": CASES[case][0], "config": CASES[case][1]}
    compiled = torch.compile(model, backend="lowbit")
    for t in (1, 64):
        x = torch.randn(t, dim)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = model(x)
            start = time.perf_counter()
            y = compiled(x)
            first = time.perf_counter() - start
            fallbacks = [str(w.message) for w in caught if "running it in eager" in str(w.message)]
            eager, mine = [], []
            calls = 20 if t == 1 else 5
            for _ in range(rounds):  # interleaved rounds, medians
                s = time.perf_counter()
                for _ in range(calls):
                    model(x)
                eager.append((time.perf_counter() - s) / calls)
                s = time.perf_counter()
                for _ in range(calls):
                    compiled(x)
                mine.append((time.perf_counter() - s) / calls)
        rel = ((y.float() - ref.float()).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        out[f"T{t}"] = {"first_call_s": round(first, 2), "eager_ms": round(1e3 * statistics.median(eager), 3),
                        "lowbit_ms": round(1e3 * statistics.median(mine), 3), "max_rel_err": float(f"{rel:.3g}"),
                        "fallbacks": fallbacks}
    rows = [e for e in lowbit.explain(model).matmuls() if str(e.get("result", "")).startswith("recognized")]
    out["lowbit"] = sorted({f"{e['format']} [{e.get('numerics', '')}]" for e in rows})
    out["recognized"] = len(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="dim 512, 3 rounds")
    ap.add_argument("--only", default="", help="comma-separated case prefixes")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.dim, args.rounds = 512, 3
    if args.case:
        print(json.dumps(run_case(args.case, args.dim, args.threads, args.rounds)))
        return
    wanted = [c for c in CASES if not args.only or any(c.startswith(p) for p in args.only.split(","))]
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for case in wanted:
        proc = subprocess.run([sys.executable, __file__, "--case", case, "--dim", str(args.dim),
                               "--threads", str(args.threads), "--rounds", str(args.rounds)],
                              capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode or not lines:
            results.append({"case": case, "library": CASES[case][0], "config": CASES[case][1], "error": "CRASH",
                            "stderr": proc.stderr.strip().splitlines()[-3:]})
        else:
            results.append(json.loads(lines[-1]))
        print(_row(results[-1]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads, "dim": args.dim,
            "cpu": _cpu(), "rounds": args.rounds, "model": f"Linear({args.dim},{args.dim}) ReLU Linear({args.dim},{args.dim})"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.only and RESULTS.exists():  # a partial run keeps the other cases' rows
        old = json.loads(RESULTS.read_text())
        rerun = {r["case"] for r in results}
        results = [r for r in old.get("results", []) if r["case"] not in rerun] + results
        results.sort(key=lambda r: list(CASES).index(r["case"]) if r["case"] in CASES else len(CASES))
        meta["partial_runs"] = old.get("meta", {}).get("partial_runs", []) + [{"date": meta["date"], "cases": sorted(rerun)}]
    RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)} ({meta['cpu']}, {args.threads} threads)")


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:<26} CRASH {' | '.join(r.get('stderr', []))[:200]}"
    t1, t64 = r["T1"], r["T64"]
    return (f"{r['case']:<26} {', '.join(r['lowbit']) or 'not recognized':<70} compile {t1['first_call_s']:6.2f} s  "
            f"T=1 eager {t1['eager_ms']:8.3f} lowbit {t1['lowbit_ms']:8.3f} ms ({t1['eager_ms'] / t1['lowbit_ms']:5.2f}x)  "
            f"T=64 eager {t64['eager_ms']:8.3f} lowbit {t64['lowbit_ms']:8.3f} ms ({t64['eager_ms'] / t64['lowbit_ms']:5.2f}x)  "
            f"err {max(t1['max_rel_err'], t64['max_rel_err']):.1e}" + ("  FALLBACK" if t1["fallbacks"] or t64["fallbacks"] else ""))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
