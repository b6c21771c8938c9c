"""Compiler foundation benchmark: call overhead, a Llama decoder block, dense matmul.

    python benchmarks/compiler.py [--threads 2] [--quick] [--only overhead,decoder,matmul]

Prints one table and writes benchmarks/results/compiler.json. All numbers are medians
of repeated runs in one process per case (each case runs in a fresh subprocess so a
crash in one backend cannot hide the others' numbers), with `--threads` threads for
torch and for lowbit's compiled code. Every lowbit and inductor result is also checked
against eager (max abs error reported), so a fast wrong answer is visible.

Cases
  overhead   per-call time of `x + 1` on a 4x4 tensor: eager; lowbit's compiled callable
             called directly; lowbit's bare JIT call; torch.compile with lowbit; with inductor
  decoder    one Llama-style block (dim 1024, 16 heads, 4 KV heads, SwiGLU 2816, cache 256)
             in fp32 and bf16: prefill 128 tokens, decode 1 token; eager / inductor / lowbit
  matmul     x[M, 4096] @ W[4096, 4096]^T (frozen W) at M=1 and M=128, fp32 and bf16:
             torch (oneDNN/MKL) vs lowbit
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "compiler.json"


def median_time(fn, min_runs: int, min_seconds: float, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def _setup(threads: int):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    return torch


def case_overhead(threads: int, quick: bool) -> list[dict]:
    torch = _setup(threads)
    from lowbit.compiler.compile import compile_function

    x = torch.randn(4, 4)
    f = lambda x: x + 1  # noqa: E731
    direct = compile_function(f, (x,))
    jit = direct.jit
    out = [torch.empty(4, 4)]
    torch._dynamo.reset()
    via_lowbit = torch.compile(f, backend="lowbit", dynamic=False)
    via_inductor = torch.compile(lambda x: x + 1, backend="inductor", dynamic=False)
    rows = []
    with torch.no_grad():
        for name, call in [("eager", lambda: f(x)),
                           ("lowbit: compiled callable (direct)", lambda: direct(x)),
                           ("lowbit: bare JIT call, preallocated out", lambda: jit.call_unchecked([x], out)),
                           ("torch.compile(backend=lowbit)", lambda: via_lowbit(x)),
                           ("torch.compile(backend=inductor)", lambda: via_inductor(x))]:
            call()
            per_call = []
            for _ in range(5 if quick else 15):
                n = 2000
                t = time.perf_counter()
                for _ in range(n):
                    call()
                per_call.append((time.perf_counter() - t) / n)
            rows.append({"case": "overhead", "what": name, "us_per_call": statistics.median(per_call) * 1e6})
    return rows


def _block_config(quick: bool):
    from lowbit.models import LlamaConfig
    if quick:
        return LlamaConfig(dim=256, n_heads=8, n_kv_heads=2, hidden_dim=688, max_seq_len=160)
    return LlamaConfig(dim=1024, n_heads=16, n_kv_heads=4, hidden_dim=2816, max_seq_len=256)


def case_decoder(threads: int, quick: bool, dtype_name: str, backend: str) -> list[dict]:
    torch = _setup(threads)
    from lowbit.models import make_decoder_block

    dtype = getattr(torch, dtype_name)
    cfg = _block_config(quick)
    block = make_decoder_block(cfg, dtype, seed=0)
    reference = copy.deepcopy(block)
    prefill_len = 128
    gen = torch.Generator().manual_seed(0)
    x_prefill = torch.randn(1, prefill_len, cfg.dim, generator=gen).to(dtype)
    x_decode = torch.randn(1, 1, cfg.dim, generator=gen).to(dtype)
    pos_prefill, pos_decode = torch.arange(prefill_len), torch.tensor([prefill_len])
    torch._dynamo.reset()
    model = block if backend == "eager" else torch.compile(block, backend=backend, dynamic=False)
    rows = []
    with torch.no_grad():
        expected_prefill = reference(x_prefill, pos_prefill)
        expected_decode = reference(x_decode, pos_decode)
        for phase, x, pos, expected in [("prefill 128", x_prefill, pos_prefill, expected_prefill),
                                        ("decode 1", x_decode, pos_decode, expected_decode)]:
            t = time.perf_counter()
            out = model(x, pos)
            first_call = time.perf_counter() - t
            err = (out.float() - expected.float()).abs().max().item()
            seconds = median_time(lambda: model(x, pos), min_runs=3 if quick else 5,
                                  min_seconds=1.0 if quick else 3.0)
            rows.append({"case": "decoder", "dtype": dtype_name, "phase": phase, "backend": backend,
                         "ms": seconds * 1e3, "first_call_s": first_call, "max_abs_err_vs_eager": err,
                         "config": {"dim": cfg.dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                                    "hidden_dim": cfg.hidden_dim, "max_seq_len": cfg.max_seq_len}})
    return rows


def case_matmul(threads: int, quick: bool, dtype_name: str) -> list[dict]:
    torch = _setup(threads)
    dtype = getattr(torch, dtype_name)
    n = k = 1024 if quick else 4096
    linear = torch.nn.Linear(k, n, bias=False).to(dtype).eval().requires_grad_(False)
    rows = []
    for m in (1, 128):
        x = torch.randn(m, k).to(dtype)
        flops = 2.0 * m * n * k
        with torch.no_grad():
            expected = linear(x)
            t_torch = median_time(lambda: linear(x), min_runs=5, min_seconds=0.5 if quick else 2.0)
            torch._dynamo.reset()
            compiled = torch.compile(linear, backend="lowbit", dynamic=False)
            t = time.perf_counter()
            out = compiled(x)
            first_call = time.perf_counter() - t
            err = (out.float() - expected.float()).abs().max().item()
            t_lowbit = median_time(lambda: compiled(x), min_runs=3, min_seconds=0.5 if quick else 2.0)
        rows.append({"case": "matmul", "dtype": dtype_name, "M": m, "N": n, "K": k,
                     "torch_ms": t_torch * 1e3, "lowbit_ms": t_lowbit * 1e3,
                     "torch_gflops": flops / t_torch / 1e9, "lowbit_gflops": flops / t_lowbit / 1e9,
                     "lowbit_vs_torch": t_torch / t_lowbit, "first_call_s": first_call,
                     "max_abs_err_vs_torch": err})
    return rows


def _cases(only: set[str]) -> list[tuple[str, dict]]:
    cases = []
    if "overhead" in only:
        cases.append(("overhead", {}))
    if "decoder" in only:
        for dtype in ("float32", "bfloat16"):
            for backend in ("eager", "inductor", "lowbit"):
                cases.append(("decoder", {"dtype_name": dtype, "backend": backend}))
    if "matmul" in only:
        for dtype in ("float32", "bfloat16"):
            cases.append(("matmul", {"dtype_name": dtype}))
    return cases


def run_case(name: str, kwargs: dict, threads: int, quick: bool) -> list[dict]:
    """Run one case in a fresh interpreter; a crash becomes a row saying so."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--run-case", name, "--case-args", json.dumps(kwargs),
           "--threads", str(threads), "--out", out] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    try:
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
            return [{"case": name, **kwargs, "error": f"exit code {done.returncode}: {tail}"}]
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def print_table(rows: list[dict], threads: int) -> None:
    print(f"\nlowbit compiler benchmark ({threads} threads, medians)\n")
    over = [r for r in rows if r["case"] == "overhead"]
    if over:
        print("per-call overhead, x + 1 on f32[4, 4]")
        for r in over:
            print(f"  {r.get('what', '?'):42s} {r['us_per_call']:8.2f} us" if "error" not in r else f"  ERROR {r['error']}")
    dec = [r for r in rows if r["case"] == "decoder"]
    if dec:
        cfg = next((r["config"] for r in dec if "config" in r), {})
        print(f"\ndecoder block {cfg}: ms per call (max |err| vs eager)")
        print(f"  {'dtype':9s} {'phase':12s} {'eager':>18s} {'inductor':>22s} {'lowbit':>22s}")
        for dtype in ("float32", "bfloat16"):
            for phase in ("prefill 128", "decode 1"):
                cells = []
                for backend in ("eager", "inductor", "lowbit"):
                    r = next((r for r in dec if r.get("dtype", r.get("dtype_name")) == dtype
                              and r.get("backend") == backend and r.get("phase", phase) == phase), None)
                    if r is None:
                        cells.append("-")
                    elif "error" in r:
                        cells.append("CRASH")
                    else:
                        cells.append(f"{r['ms']:.2f}" + ("" if backend == "eager" else f" ({r['max_abs_err_vs_eager']:.1e})"))
                print(f"  {dtype:9s} {phase:12s} {cells[0]:>18s} {cells[1]:>22s} {cells[2]:>22s}")
        for r in dec:
            if "error" in r:
                print(f"  {r.get('dtype_name')} {r.get('backend')}: {r['error']}")
    mm = [r for r in rows if r["case"] == "matmul"]
    if mm:
        print("\ndense matmul x[M, K] @ W[N, K]^T, W frozen")
        print(f"  {'dtype':9s} {'M':>4s} {'torch GFLOP/s':>14s} {'lowbit GFLOP/s':>15s} {'lowbit/torch':>13s} {'max|err|':>9s}")
        for r in mm:
            if "error" in r:
                print(f"  {r.get('dtype_name')}: {r['error']}")
                continue
            print(f"  {r['dtype']:9s} {r['M']:4d} {r['torch_gflops']:14.1f} {r['lowbit_gflops']:15.1f} "
                  f"{r['lowbit_vs_torch']:12.0%} {r['max_abs_err_vs_torch']:9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer runs (smoke test)")
    parser.add_argument("--only", default="overhead,decoder,matmul")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)
    parser.add_argument("--case-args", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_case:
        fn = {"overhead": case_overhead, "decoder": case_decoder, "matmul": case_matmul}[args.run_case]
        rows = fn(args.threads, args.quick, **json.loads(args.case_args))
        Path(args.out).write_text(json.dumps(rows))
        return
    rows = []
    for name, kwargs in _cases(set(args.only.split(","))):
        print(f"running {name} {kwargs} ...", file=sys.stderr, flush=True)
        rows += run_case(name, kwargs, args.threads, args.quick)
    print_table(rows, args.threads)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    import torch
    meta = {"threads": args.threads, "quick": args.quick, "torch": torch.__version__,
            "cpu": _cpu_name(), "command": " ".join(["python", "benchmarks/compiler.py"] + sys.argv[1:])}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {RESULTS}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
