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

`--cold`: decode attention with the KV cache in DRAM, as in a real decode step (where the
weights streaming through every token evict the caches from L3). One compiled graph runs G
SDPA calls ("layers", each its own K/V tensors, G <= 16) on one thread team, as a model's
decode step does; the benchmark rotates over R such sets, L = G * R distinct caches whose
visible rows (the only rows the kernel reads) together exceed 2x L3, so every call reads
DRAM. `hot` calls the same graph with one cache repeated (its rows stay in L2/L3). Reported:
microseconds per layer and GB/s of K/V bytes actually needed (visible keys, once per KV head:
GQA query heads of a group share them), next to a read-bandwidth probe on as many threads
(benchmarks/peaks.py's, 256 MiB) measured twice in every round; `--threads 1,2` measures
both counts in every round. Rounds interleave cases, cold/hot
and the probe; medians and min-max spread. `--libs name=path,...` runs one worker process
per runtime library (`LOWBIT_RUNTIME_LIB`; `default` = the built one), each compiling once,
and runs every case in each of them back to back (before/after at the same moment of a
shared machine; the table's `cold`/`hot` columns are the median per-round speedups over the
first library); `name=path:thp`
runs that worker with THP_MEM_ALLOC_ENABLE=1 (torch allocates large tensors, the caches
included, on transparent huge pages); `name=path:heads` compiles with lowbit-lower-attention's
work units forced to single heads (as before KV-head groups; in-process compile), so
`before=default:heads,after=default` measures the lowering alone. Besides the decode cases,
`--cases S128@0xT128` (or S256@0xT128) runs causal prefill of 128 tokens the same way. Writes
benchmarks/results/attention_cold.json (`--out` for another file).

    python benchmarks/attention.py --cold [--threads 1,2] [--rounds 7] [--libs before=/tmp/old.so,after=default]
                                   [--clock cpu (with --threads 1)] [--cases ...,S128@0xT128]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
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
    p.add_argument("--threads", default="2", help="--cold: a list (e.g. 1,2)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=None)
    p.add_argument("--cold", action="store_true", help="decode attention on cold KV caches (see above)")
    p.add_argument("--cases", default=",".join(COLD_CASES),
                   help=f"--cold: which (S, pos, T) cases (also: {', '.join(EXTRA_CASES)})")
    p.add_argument("--libs", default="default", help="--cold: name=path,... runtime libraries to compare")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="--cold: wall time, or the worker thread's CPU time (1 thread only)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cold:
        if args.worker:
            cold_worker(args)
        else:
            cold_main(args)
        return
    args.out = args.out or str(Path(__file__).parent / "results" / "attention.json")

    os.environ["LOWBIT_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("LOWBIT_CACHE", "0")   # compile both pipelines for real
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


# --cold cases: name -> (S = cache length, position of the first query, T)
COLD_CASES = {"S128@60": (128, 60, 1), "S1024@511": (1024, 511, 1), "S2048@2000": (2048, 2000, 1),
              "S1024@508xT4": (1024, 508, 4)}
# Not in the default --cases: causal prefill of 128 tokens (mask = the first 128 causal rows).
EXTRA_CASES = {"S128@0xT128": (128, 0, 128), "S256@0xT128": (256, 0, 128)}
ALL_CASES = {**COLD_CASES, **EXTRA_CASES}
MAX_GRAPH_LAYERS = 16
MSG = "@@"   # worker -> driver protocol lines start with this


def _cold_graph(gqa: bool, layers: int):
    def step(q, mask, *kv):
        return tuple(F.scaled_dot_product_attention(q, kv[2 * i], kv[2 * i + 1], attn_mask=mask, enable_gqa=gqa)
                     for i in range(layers))
    return step


def _cold_case(model, dname, case, l3):
    h, hkv, d = MODELS[model]
    s, pos, t = ALL_CASES[case]
    es = DTYPES[dname].itemsize
    visible = pos + t                                   # keys any query of the call sees
    kv_bytes = 2 * hkv * visible * d * es               # K and V rows read per layer (once per KV head)
    layers = max(4, -(-2 * l3 // kv_bytes))             # distinct caches: > 2x L3 of visible rows
    g = min(MAX_GRAPH_LAYERS, layers)
    sets = -(-layers // g)
    return {"model": model, "dtype": dname, "case": case, "H": h, "Hkv": hkv, "D": d, "S": s, "pos": pos,
            "T": t, "kv_bytes_per_layer": kv_bytes, "graph_layers": g, "sets": sets, "caches": g * sets}


def cold_worker(args) -> None:
    """Compile every case, then run one round per "round" line on stdin (see cold_main)."""
    from lowbit.compiler import threads
    from lowbit.runtime.library import current_isa, runtime_library_path
    from peaks import Peaks, l3_bytes
    import numpy as np

    units = os.environ.get("LOWBIT_BENCH_ATTN_UNITS", "")
    if units == "heads":   # the lowering before KV-head groups: one head per work unit
        from lowbit.passes import lower_attention
        lower = lower_attention.lowered_text
        lower_attention.lowered_text = lambda *a, **k: lower(*a[:5], max_group_queries=0)

    l3 = l3_bytes()
    gen = torch.Generator().manual_seed(0)
    cases = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for model in args.models.split(","):
            for case in args.cases.split(","):
                c = _cold_case(model, dname, case, l3)
                h, hkv, d, s, pos, t = c["H"], c["Hkv"], c["D"], c["S"], c["pos"], c["T"]
                q = torch.randn(1, h, t, d, generator=gen).to(dtype)
                mask = torch.ones(s, s, dtype=torch.bool).tril()[pos:pos + t].contiguous()
                sets = [[torch.randn(1, hkv, s, d, generator=gen).to(dtype) for _ in range(2 * c["graph_layers"])]
                        for _ in range(c["sets"])]
                fn = _cold_graph(h != hkv, c["graph_layers"])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from lowbit.compiler.compile import compile_function
                    t0 = time.perf_counter()
                    graph = compile_function(fn, [q, mask, *sets[0]])
                    c["compile_s"] = round(time.perf_counter() - t0, 2)
                with torch.no_grad():   # check once: the kernel against eager SDPA in fp32
                    got = graph(q, mask, *sets[0])[0].float()
                    ref = F.scaled_dot_product_attention(q.float(), sets[0][0].float(), sets[0][1].float(),
                                                         attn_mask=mask, enable_gqa=h != hkv)
                    c["max_abs_err"] = (got - ref).abs().max().item()
                cases.append((c, graph, q, mask, sets))
    probe = Peaks()
    counts = [int(x) for x in str(args.threads).split(",")]
    buf = np.ones((256 << 20) // 8, dtype=np.uint64)
    info = {"lib": str(runtime_library_path()), "isa": current_isa(), "l3_bytes": l3,
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""), "units": units or "groups",
            "cases": [c for c, *_ in cases]}
    print(MSG + json.dumps({"ready": info}), flush=True)

    # --clock cpu: this thread's CPU time, which a shared machine's descheduling does not
    # inflate; valid on 1 thread only (the OpenMP team is the calling thread then).
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    def run(graph, q, mask, arg_sets, passes):
        t0 = clock()
        for _ in range(passes):
            for kv in arg_sets:
                graph(q, mask, *kv)
        return clock() - t0

    passes = {}
    with torch.no_grad():
        for line in sys.stdin:   # "probe NT" or "case I NT"; anything else ends the worker
            cmd = line.split()
            if not cmd or cmd[0] not in ("probe", "case"):
                break
            nt = int(cmd[-1])
            if os.environ.get("LOWBIT_NUM_THREADS") != str(nt):
                os.environ["LOWBIT_NUM_THREADS"] = str(nt)
                torch.set_num_threads(nt)
                threads.configure()
            if cmd[0] == "probe":
                print(MSG + json.dumps({"gbs": probe.read_bandwidth(buf, nt) / 1e9}), flush=True)
                continue
            c, graph, q, mask, sets = cases[int(cmd[1])]
            hot_sets = [[sets[0][0], sets[0][1]] * c["graph_layers"]]
            key = (nt, int(cmd[1]))
            if key not in passes:   # first round: warm up, then size the timed loops to ~25 ms
                run(graph, q, mask, sets, 1)
                once = run(graph, q, mask, sets, 1)
                passes[key] = max(1, int(0.025 / once))
            n = passes[key]
            cold = run(graph, q, mask, sets, n) / (n * c["caches"])
            run(graph, q, mask, hot_sets, 1)
            hn = max(1, n * c["sets"])
            hot = run(graph, q, mask, hot_sets, hn) / (hn * c["graph_layers"])
            print(MSG + json.dumps({"cold_us": cold * 1e6, "hot_us": hot * 1e6}), flush=True)


def cold_main(args) -> None:
    import subprocess
    libs = {}
    thp, heads = set(), set()
    for item in args.libs.split(","):
        name, _, path = item.partition("=")
        while path.endswith((":thp", ":heads")):
            path, _, tag = path.rpartition(":")
            (thp if tag == "thp" else heads).add(name)
        libs[name] = path or "default"
    workers = {}
    if args.clock == "cpu" and str(args.threads) != "1":
        raise SystemExit("--clock cpu measures the calling thread only: use it with --threads 1")
    base = [sys.executable, str(Path(__file__).resolve()), "--cold", "--worker", "--threads", str(args.threads),
            "--clock", args.clock,
            "--dtypes", args.dtypes, "--models", args.models, "--cases", args.cases]
    for name, path in libs.items():
        env = dict(os.environ)
        env.setdefault("LOWBIT_CACHE", "0")
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
        if path != "default":
            env["LOWBIT_RUNTIME_LIB"] = str(Path(path).resolve())
        if name in thp:   # torch's CPU allocator: 2 MiB-aligned, madvise(MADV_HUGEPAGE) for large tensors
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        if name in heads:   # compile in-process so that the worker's patched lowering applies
            env["LOWBIT_BENCH_ATTN_UNITS"] = "heads"
            env["LOWBIT_COMPILE_WORKER"] = "0"
        workers[name] = subprocess.Popen(base, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def receive(proc):
        for line in proc.stdout:
            if line.startswith(MSG):
                return json.loads(line[len(MSG):])
        raise RuntimeError(f"a benchmark worker exited (code {proc.wait()})")

    ready = {name: receive(w)["ready"] for name, w in workers.items()}   # workers compile concurrently
    cases = next(iter(ready.values()))["cases"]
    load_before = os.getloadavg()
    print(f"cpu: {_cpu_model()}  isa: {next(iter(ready.values()))['isa']}  threads={args.threads} "
          f"rounds={args.rounds}  clock={args.clock}  L3={ready[next(iter(ready))]['l3_bytes'] >> 20} MiB  "
          f"load average before: {', '.join(f'{x:.2f}' for x in load_before)}")
    for name, r in ready.items():
        print(f"  {name}: {r['lib']}{'  (THP_MEM_ALLOC_ENABLE=1: K/V caches on 2 MiB pages)' if r['THP_MEM_ALLOC_ENABLE'] else ''}"
              f"{'  (work units: single heads, the lowering before KV-head groups)' if r['units'] == 'heads' else ''}")
    def ask(name, command):
        workers[name].stdin.write(command + "\n")
        workers[name].stdin.flush()
        return receive(workers[name])

    # Fine-grained interleaving: every case runs in every worker back to back (order
    # alternating per round), so the libraries see the same moment of a shared machine.
    rounds = {name: [] for name in workers}
    for r in range(args.rounds):
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]
        result = {name: {} for name in workers}
        for nt in str(args.threads).split(","):
            for name in order:
                result[name][nt] = {"probe_gbs": ask(name, f"probe {nt}")["gbs"], "cases": []}
            for i in range(len(cases)):
                for name in order:
                    result[name][nt]["cases"].append(ask(name, f"case {i} {nt}"))
            for name in order:
                result[name][nt]["probe_gbs_after"] = ask(name, f"probe {nt}")["gbs"]
        for name in workers:
            rounds[name].append(result[name])
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    load_after = os.getloadavg()

    def stats(xs):
        return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}

    names = list(workers)
    counts = [str(int(x)) for x in str(args.threads).split(",")]
    probes, rows = {}, []
    for nt in counts:
        probe = stats([x for rs in rounds.values() for rr in rs for x in (rr[nt]["probe_gbs"], rr[nt]["probe_gbs_after"])])
        probes[nt] = {"all": probe, **{n: stats([x for rr in rounds[n] for x in (rr[nt]["probe_gbs"], rr[nt]["probe_gbs_after"])])
                                      for n in names}}
        print(f"\n{nt} thread(s): read probe ({nt} threads, 256 MiB, twice per round in every worker): median "
              f"{probe['median']:.1f} GB/s (spread {probe['min']:.1f}-{probe['max']:.1f})")
        header = f"{'model':5s} {'dtype':5s} {'case':13s} {'MB/layer':>8s} {'caches':>6s}"
        for name in names:
            header += f" | {name + ' cold us':>18s} {'GB/s':>5s} {'hot us':>6s} {'GB/s':>5s}"
            if name != names[0]:
                header += f" {'cold':>6s} {'hot':>6s}"
        print(header)
        print("-" * len(header))
        for i, c in enumerate(cases):
            row = dict(c, threads=int(nt))
            line = f"{c['model']:5s} {c['dtype']:5s} {c['case']:13s} {c['kv_bytes_per_layer'] / 1e6:8.2f} {c['caches']:6d}"
            for name in names:
                cold = [rr[nt]["cases"][i]["cold_us"] for rr in rounds[name]]
                hot = [rr[nt]["cases"][i]["hot_us"] for rr in rounds[name]]
                cs, hs = stats(cold), stats(hot)
                kb = c["kv_bytes_per_layer"] / 1e3
                row[name] = {"cold_us": cs, "hot_us": hs, "cold_gbs": round(kb / cs["median"], 2),
                             "hot_gbs": round(kb / hs["median"], 2),
                             "cold_fraction_of_probe": round(kb / cs["median"] / probe["median"], 3),
                             "compile_s": ready[name]["cases"][i]["compile_s"],
                             "max_abs_err_vs_fp32_eager": ready[name]["cases"][i]["max_abs_err"],
                             "rounds_cold_us": [round(x, 2) for x in cold], "rounds_hot_us": [round(x, 2) for x in hot]}
                cell = f"{cs['median']:6.1f} ({cs['min']:.0f}-{cs['max']:.0f})"
                line += f" | {cell:>18s} {row[name]['cold_gbs']:5.1f} {hs['median']:6.1f} {row[name]['hot_gbs']:5.1f}"
                if name != names[0]:   # per-round ratios against the first library (same moment)
                    base = rounds[names[0]]
                    rc = stats([b[nt]["cases"][i]["cold_us"] / x for b, x in zip(base, cold)])
                    rh = stats([b[nt]["cases"][i]["hot_us"] / x for b, x in zip(base, hot)])
                    row[name]["speedup_cold_vs_" + names[0]] = rc
                    row[name]["speedup_hot_vs_" + names[0]] = rh
                    line += f" {rc['median']:5.2f}x {rh['median']:5.2f}x"
            rows.append(row)
            print(line)
    print(f"load average after: {', '.join(f'{x:.2f}' for x in load_after)}")
    out = Path(args.out or Path(__file__).parent / "results" / "attention_cold.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "attention --cold", "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": [int(x) for x in counts], "rounds": args.rounds, "clock": args.clock,
        "statistic": "median over rounds; min/max = spread of the rounds; speedup_*: median of the per-round "
                     "ratios (first library's time / this one's, measured back to back)",
        "bytes": "K and V rows of the visible keys (pos + T), once per KV head",
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "libs": {n: ready[n]["lib"] for n in names}, "huge_pages": {n: bool(ready[n]["THP_MEM_ALLOC_ENABLE"]) for n in names},
        "work_units": {n: ready[n]["units"] for n in names},
        "isa": ready[names[0]]["isa"],
        "l3_bytes": ready[names[0]]["l3_bytes"], "read_probe_gbs": probes,
        "load_average_before": load_before, "load_average_after": load_after, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
