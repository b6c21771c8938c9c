"""Ahead-of-time artifacts and the compile cache: size, load time, first call, warm compile.

    python benchmarks/aot.py                      # demo preset
    python benchmarks/aot.py --preset 1b --max-seq-len 64

Every step runs in its own fresh process (a cold start is what is measured):
1. `lowbit.aot.compile_preset` -> an artifact in a temporary directory: compile seconds and the
   sizes of code.so, weights.safetensors and manifest.json, next to the packed weights alone
   (the packed layer buffers binding derived) and all stored tensors;
2. a process that cannot import torch-mlir: `import lowbit.aot` time, `lowbit.aot.load` time with
   verify="fast" and with verify="full" (sha256 of every file), first-call latency of a prefill
   and of a decode step, then steady prefill / decode times (medians) and the greedy tokens;
3. `lowbit.generate` (torch.compile(backend="lowbit")), `--rounds` times, interleaved:
   - cold: a fresh process with an empty compile cache directory;
   - warm: a fresh process on the directory the cold one filled;
   - floor: a fresh process compiling with a backend that runs dynamo's graph as is (eager):
     dynamo's own tracing and guards, which no lowbit cache can skip (see docs/aot.md).
   "Compile time" is `lowbit.generate`'s warm-up in every case: 2 x (prefill + one decode
   step), i.e. tracing, compiling or loading, and the first calls. The floor is that warm-up
   minus the time spent running the eager graphs; the warm run is split into the backend's
   cache lookup (module-state digest, entry loading), running compiled code, and the rest
   (dynamo). The same calls are timed again at steady state after generating, and "without
   steady-state runs" reports cold and warm minus that time (the floor already excludes its
   graphs' time). The JIT's tokens must equal the artifact's.
   `--layers once,each` runs both ways of tracing the Llama block, interleaved: `once` is the
   block's `nested_compile_region` (dynamo traces one layer and reuses it), `each` the block
   unmarked (dynamo traces all of them, as before 2026-11-30). `--dynamo-speedups on,off` runs
   with and without `lowbit.compiler.dynamo_speedups` (memoized source remapping in dynamo's
   reuse checks of nested regions and stamp-outs, no guard-latency measurement), or `reuse`
   (only the reuse checks' memo, as before session 8), interleaved the same way; `--fused on,off` builds the
   preset with q/k/v and w1/w3 fused (as `lowbit.generate` does) or separate; variants are
   named `once`, `once/off`, `once/unfused`, ...

Goals (issue 11): load <= 1 s for the 953M "1b" preset; warm-cache compile <= 5% of cold.
Prints a table (medians over rounds) and appends a record to benchmarks/results/aot.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCK = textwrap.dedent("""
    import sys
    class _NoCompiler:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch_mlir", "mlir"):
                raise ImportError(name + " blocked")
            return None
    sys.meta_path.insert(0, _NoCompiler())
""")

COMPILE = """
import json, time
t = time.perf_counter()
import lowbit.aot
path = lowbit.aot.compile_preset({preset!r}, {path!r}, max_seq_len={seq}, target={target!r}, overwrite=True)
seconds = time.perf_counter() - t
m = json.load(open(path + "/manifest.json"))
from lowbit.compiler.artifact_format import MappedTensors
w = MappedTensors(path + "/weights.safetensors")
sizes = {{}}
for name in w.names():
    t_ = w.get(name)
    kind = name.split(".")[0]
    sizes[kind] = sizes.get(kind, 0) + t_.numel() * t_.element_size()
print(json.dumps({{"compile_s": seconds, "model_build_s": m["model"].get("build_s"), "files": m["files"],
                  "build": m["build"], "tensor_bytes": sizes,
                  "entries": len(m["entries"]), "programs": len(m["programs"]), "target": m["target"]["name"]}}))
"""

LOAD = BLOCK + """
import json, statistics, time, resource
t = time.perf_counter()
import torch
import_torch = time.perf_counter() - t
t = time.perf_counter()
import lowbit.aot, lowbit.runtime.artifact, lowbit.runtime.library
lowbit.runtime.library.load_openmp(); lowbit.runtime.library.load_runtime()
import_lowbit = time.perf_counter() - t
t = time.perf_counter()
art = lowbit.aot.load_llama({path!r}, verify="fast")
load_fast = time.perf_counter() - t
t = time.perf_counter()
art = lowbit.aot.load_llama({path!r}, verify="full")
load_full = time.perf_counter() - t
prompt = torch.randint(0, art.vocab, ({prompt},), generator=torch.Generator().manual_seed(1))
t = time.perf_counter()
first = int(art.prefill(prompt).argmax())
first_prefill = time.perf_counter() - t
t = time.perf_counter()
art.step(first, {prompt})
first_decode = time.perf_counter() - t
prefill, decode = [], []
for _ in range(3):
    art.reset()
    t = time.perf_counter()
    art.prefill(prompt)
    prefill.append(time.perf_counter() - t)
art.reset()
nxt = int(art.prefill(prompt).argmax())
tokens = [nxt]
for i in range({tokens} - 1):
    t = time.perf_counter()
    nxt = int(art.step(nxt, {prompt} + i).argmax())
    decode.append(time.perf_counter() - t)
    tokens.append(nxt)
assert "torch_mlir" not in sys.modules
print(json.dumps({{"import_torch_s": import_torch, "import_lowbit_aot_s": import_lowbit, "load_fast_s": load_fast,
                  "load_full_s": load_full, "first_prefill_s": first_prefill, "first_decode_s": first_decode,
                  "prefill_s": statistics.median(prefill), "decode_ms": 1e3 * statistics.median(decode),
                  "tokens": tokens, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "threads": torch.get_num_threads()}}))
"""

JIT = """
import json, os, statistics, time, torch
import lowbit
import lowbit.models
if {flat!r}:  # trace every layer (the block without its nested_compile_region), for comparison
    lowbit.models.DecoderBlock.trace_once = False
from lowbit.compiler import backend as lb_backend, compile_cache
if {no_speedups!r}:  # dynamo's own reuse check, for comparison
    from lowbit.compiler import dynamo_speedups
    dynamo_speedups.uninstall()
if {reuse_only!r}:  # only the reuse-check memo (as before session 8): torch's stamp-out and guard profiling
    from lowbit.compiler import dynamo_speedups
    from torch._dynamo import guards as _guards
    from torch._dynamo.variables import invoke_subgraph as _isg
    _isg.stamp_out_subgraph = dynamo_speedups._installed["stamp_out_subgraph"]
    _guards.profile_guard_manager = dynamo_speedups._installed["profile_guard_manager"]
if {prev!r}:  # the lookup as before session 9: program key from the inlined graph, no digest prefetch,
    # dynamo's log headers with the tokenized function names, torch's evals of source expressions
    # (for a same-commit A/B)
    from lowbit.compiler import dynamo_speedups
    from torch._dynamo.symbolic_convert import InstructionTranslatorBase as _ITB
    _ITB.get_line_of_code_header = dynamo_speedups._installed["get_line_of_code_header"]
    import torch._guards
    vars(torch._guards).pop("eval", None)  # source values from expressions compiled per evaluation
    compile_cache.prefetch_state_digests = lambda tensors: None
    _graph_code, _program_key = compile_cache.graph_code, compile_cache.program_key
    compile_cache.graph_code = lambda gm: None  # the backend takes no code before inlining
    compile_cache.program_key = lambda gm, *a, code=None: _program_key(gm, *a, code=_graph_code(gm))
if {unfused!r}:  # the preset with separate q/k/v and w1/w3 linears (as before 2026-11-30), for comparison
    _build_llama = lowbit.generate.build_llama
    lowbit.generate.build_llama = lambda *a, **k: _build_llama(*a, **{{**k, "fused": False}})
from lowbit.compiler.compile_log import counters
timers = {{"lookup_s": 0.0, "callable_s": 0.0, "graph_s": 0.0}}
warmup = {{}}
def timed(name, fn):
    def run(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timers[name] += time.perf_counter() - t
    return run
compile_cache.lookup_program = timed("lookup_s", compile_cache.lookup_program)
lb_backend.LowbitCallable.__call__ = timed("callable_s", lb_backend.LowbitCallable.__call__)
def eager_backend(gm, example_inputs, **kwargs):  # the floor: dynamo's graph run as is
    return timed("graph_s", gm.forward)
# generate() resets the runner before each of its 2 warm-up rounds and once more before it
# generates: the third reset marks the end of the warm-up. The floor stops there (its eager
# generation would only take time).
resets, cpu, pcpu = [], [], []
real_reset = lowbit.generate._LlamaRunner.reset
def reset(self):
    resets.append(time.perf_counter())
    cpu.append(time.thread_time())  # the main thread's CPU time: dynamo and lowbit's Python, less noisy under load
    pcpu.append(time.process_time())  # every thread's (compiled code's OpenMP workers, the digest prefetch)
    if len(resets) == 3:
        warmup.update(timers, warmup_s=resets[2] - resets[0], thread_cpu_s=cpu[2] - cpu[0],
                      process_cpu_s=pcpu[2] - pcpu[0])
        if {floor!r}:
            print(json.dumps({{"compile_s": warmup["warmup_s"], "warmup_timers": warmup, "tokens": None,
                              "load_average": os.getloadavg()[0], "graphs": compile_counter[0].as_dict() if compile_counter else None}}), flush=True)
            os._exit(0)
    return real_reset(self)
lowbit.generate._LlamaRunner.reset = reset
runners = []
real_init = lowbit.generate._LlamaRunner.__init__
def init(self, *a, **k):
    real_init(self, *a, **k)
    runners.append(self)
lowbit.generate._LlamaRunner.__init__ = init
compile_counter = []
real_counter = lowbit.generate.CompileCounter
class CountingCounter(real_counter):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        compile_counter.append(self)
lowbit.generate.CompileCounter = CountingCounter
prompt = torch.randint(0, lowbit.generate.PRESETS[{preset!r}].vocab_size, ({prompt},),
                       generator=torch.Generator().manual_seed(1))
backend = eager_backend if {floor!r} else "lowbit"
if {floor!r}:  # what generate() does for backend="lowbit" before tracing (one recompile less)
    from lowbit.compiler.frontend import _install_thread_aware_readers
    _install_thread_aware_readers()
t = time.perf_counter()
r = lowbit.generate({preset!r}, prompt, {tokens}, backend=backend)
# the warm-up's calls at steady state (same process, code compiled and loaded): 2 x (reset,
# prefill, one decode step), median of 3; compile_s minus this is the compile without running
# (under no_grad as in generate: with grad mode on, dynamo's guards fail and it traces again)
steady = []
hits = counters["program_cache_hits"]
with torch.no_grad():
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(2):
            runners[-1].reset(); first = int(runners[-1].prefill(prompt).argmax()); runners[-1].step(first, {prompt})
        steady.append(time.perf_counter() - t0)
assert counters["program_cache_hits"] == hits, "the steady-state calls compiled again"
print(json.dumps({{"compile_s": r.compile_s, "steady_warmup_s": statistics.median(steady), "total_s": time.perf_counter() - t, "load_s": r.load_s,
                  "tokens": r.tokens, "cache_hits": counters["cache_hits"], "pipelines": counters["pipelines"],
                  "program_hits": counters["program_cache_hits"], "warmup_timers": warmup,
                  "graphs": r.compile_counts, "sources": compile_cache.source_fingerprint(), "lowbit": lowbit.__file__,
                  "load_average": os.getloadavg()[0],
                  "decode_ms": 1e3 * r.decode_s / max(r.decode_steps, 1)}}))
"""


_ENV: dict = {}  # every step's environment (--frozen: PYTHONPATH)
_CWD: list = []


def _run(code: str, env: dict | None = None, timeout: int = 7200) -> Any:
    # from a directory of its own: the checkout as the working directory (sys.path[0]) would
    # shadow a frozen copy's `lowbit` package
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **_ENV, **(env or {})}, cwd=_CWD[0] if _CWD else None)
    if r.returncode != 0:
        raise SystemExit(f"step failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _freeze(tmp: str) -> dict:
    """A copy of the committed sources (`git archive HEAD`) laid out as the `lowbit` package,
    with the built runtime library, first on PYTHONPATH for every step: other sessions editing
    this checkout during the run would otherwise change the compile cache's key (it covers
    lowbit's sources) between the cold and the warm process."""
    repo = HERE.parent
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    pkg = os.path.join(tmp, "frozen", "lowbit")
    shutil.copytree(os.path.join(src, "lowbit"), pkg)
    for sub in ("compiler", "passes", "quant", "runtime"):
        shutil.copytree(os.path.join(src, sub), os.path.join(pkg, sub))
    for lib in (repo / "runtime").glob("_lowbit_rt*.so"):
        shutil.copy2(lib, os.path.join(pkg, "runtime", lib.name))
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    path = os.path.join(tmp, "frozen") + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": path.rstrip(os.pathsep), "commit": commit}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _print_round(r: int, one: dict, layers: str = "") -> None:
    c, w, f = one["cold"], one["warm"], one["floor"]
    floor = (f"{f['compile_s'] - f['warmup_timers']['graph_s']:.2f} s (load {f['load_average']:.1f}; main thread CPU "
             f"{f['warmup_timers'].get('thread_cpu_s', float('nan')):.2f} s incl. the eager graphs)" if f else "not run")
    flag = "" if _valid(one) else "  INVALID: the warm process missed the cache (sources changed?)"
    print(f"  round {r}{' ' + layers if layers else ''}: cold {c['compile_s']:.2f} s (load {c['load_average']:.1f}; "
          f"steady runs {c['steady_warmup_s']:.2f} s), warm {w['compile_s']:.2f} s "
          f"(load {w['load_average']:.1f}; main thread CPU {w['warmup_timers'].get('thread_cpu_s', float('nan')):.2f} s, "
          f"all threads {w['warmup_timers'].get('process_cpu_s', float('nan')):.2f} s; "
          f"lookup {w['warmup_timers']['lookup_s']:.2f} s; steady runs "
          f"{w['steady_warmup_s']:.2f} s), floor {floor}{flag}", flush=True)


def _valid(one: dict) -> bool:
    """A round counts if its warm process found the cold one's entries: nothing compiled, and
    lowbit's sources and runtime library unchanged between the two (other sessions editing the
    same checkout change the cache key in between)."""
    return one["warm"]["pipelines"] == 0 and one["cold"]["sources"] == one["warm"]["sources"]


def _jit_summary(all_rounds: list) -> dict:
    med = statistics.median
    rounds = [r for r in all_rounds if _valid(r)]
    if not rounds:
        raise SystemExit("no valid round: every warm process missed the cache (sources changed?)")
    cold = [r["cold"]["compile_s"] for r in rounds]
    warm = [r["warm"]["compile_s"] for r in rounds]
    lookup = [r["warm"]["warmup_timers"]["lookup_s"] for r in rounds]
    callable_ = [r["warm"]["warmup_timers"]["callable_s"] for r in rounds]
    # time inside the backend's compile entry (program key, weight digests, lookup, loading):
    # CompileCounter's seconds; the rest of the time inside the callable runs compiled code
    backend = [r["warm"]["graphs"]["seconds"] for r in rounds]
    nan = float("nan")
    floor_total = [r["floor"]["compile_s"] if r["floor"] else nan for r in rounds]
    floor_graph = [r["floor"]["warmup_timers"]["graph_s"] if r["floor"] else nan for r in rounds]
    floor = [t - g for t, g in zip(floor_total, floor_graph)]
    # compile without running: the warm-up minus the same calls timed at steady state afterwards
    # (the floor's warm-up already excludes all time inside its eager graphs)
    cold_net = [r["cold"]["compile_s"] - r["cold"]["steady_warmup_s"] for r in rounds]
    warm_net = [r["warm"]["compile_s"] - r["warm"]["steady_warmup_s"] for r in rounds]
    loads = [r[k]["load_average"] for r in rounds for k in ("cold", "warm", "floor") if r[k]]
    warms = [w for r in rounds for w in r.get("warms", []) if w["pipelines"] == 0 and w["sources"] == r["cold"]["sources"]]
    return {"median": {"cold_s": med(cold), "warm_s": med(warm), "warm_ratio": med(w / c for w, c in zip(warm, cold)),
                       "warm_lookup_s": med(lookup), "warm_backend_s": med(backend),
                       "warm_run_s": med(c - b for c, b in zip(callable_, backend)),
                       "warm_dynamo_s": med(w - c for w, c in zip(warm, callable_)),
                       "warm_thread_cpu_s": med(r["warm"]["warmup_timers"].get("thread_cpu_s", float("nan"))
                                                for r in rounds),
                       "warm_process_cpu_s": med(r["warm"]["warmup_timers"].get("process_cpu_s", float("nan"))
                                                 for r in rounds),
                       "cold_thread_cpu_s": med(r["cold"]["warmup_timers"].get("thread_cpu_s", float("nan"))
                                                for r in rounds),
                       "floor_thread_cpu_s": med(r["floor"]["warmup_timers"].get("thread_cpu_s", float("nan"))
                                                 if r["floor"] else float("nan") for r in rounds),
                       "floor_s": med(floor), "floor_total_s": med(floor_total), "floor_graph_s": med(floor_graph),
                       "floor_ratio": med(f / c for f, c in zip(floor, cold)),
                       "cold_net_s": med(cold_net), "warm_net_s": med(warm_net),
                       "warm_net_ratio": med(w / c for w, c in zip(warm_net, cold_net)),
                       "floor_net_ratio": med(f / c for f, c in zip(floor, cold_net)),
                       "steady_warmup_s": med(r["warm"]["steady_warmup_s"] for r in rounds)},
            "all_warms": {"n": len(warms), "warm_s": med(w["compile_s"] for w in warms),
                          "thread_cpu_s": med(w["warmup_timers"]["thread_cpu_s"] for w in warms),
                          "process_cpu_s": med(w["warmup_timers"]["process_cpu_s"] for w in warms),
                          "lookup_s": med(w["warmup_timers"]["lookup_s"] for w in warms)} if warms else None,
            "load_average_range": f"{min(loads):.1f}-{max(loads):.1f}", "valid_rounds": len(rounds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--target", default=None, choices=[None, "avx512-bf16", "avx512", "avx2", "portable"])
    ap.add_argument("--no-jit", action="store_true", help="skip the torch.compile cold/warm comparison")
    ap.add_argument("--no-artifact", action="store_true", help="only the torch.compile cold/warm/floor rounds")
    ap.add_argument("--rounds", type=int, default=1, help="cold/warm/floor rounds (medians are reported)")
    ap.add_argument("--frozen", action="store_true",
                    help="run every step on a copy of the committed sources (git archive HEAD) and the built "
                         "runtime library: edits to the checkout during the run do not change cache keys")
    ap.add_argument("--layers", default="once", help="comma-separated: 'once' (the block's "
                    "nested_compile_region: dynamo traces one layer), 'each' (the block unmarked: dynamo traces "
                    "every layer); several are interleaved within each round")
    ap.add_argument("--dynamo-speedups", default="on", help="comma-separated: 'on' (lowbit.compiler."
                    "dynamo_speedups installed, as lowbit's backend does) and/or 'off' (torch's own code); several "
                    "are interleaved within each round")
    ap.add_argument("--fused", default="on", help="comma-separated: 'on' (q/k/v and w1/w3 fused into one linear "
                    "each, as lowbit.generate builds presets) and/or 'off' (separate linears); several are "
                    "interleaved within each round")
    ap.add_argument("--variants", default=None, help="comma-separated variant names to run instead of every "
                    "combination of --layers/--dynamo-speedups/--fused (e.g. 'once,once/reuse/unfused': "
                    "this session's state against the previous one; '/prev': the program lookup and dynamo's "
                    "log headers as before session 9)")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor processes (dynamo alone): "
                    "each 1b process builds the model anew, ~1-2 min on a loaded machine")
    ap.add_argument("--warm-rounds", type=int, default=1, help="warm processes per cold one (each variant's, "
                    "interleaved); a round's warm figures are its median-time warm process, and the summary adds "
                    "medians over every warm process")
    ap.add_argument("--json", default=str(HERE / "results" / "aot.json"))
    args = ap.parse_args()
    if args.prompt + args.tokens > args.max_seq_len:
        raise SystemExit("--prompt + --tokens exceeds --max-seq-len")

    load_avg = os.getloadavg()
    built = loaded = None
    commit = None
    with tempfile.TemporaryDirectory(prefix="lowbit-aot-bench-") as tmp:
        if args.frozen:
            frozen = _freeze(tmp)
            commit = frozen.pop("commit")
            _ENV.update(frozen)
            _CWD.append(tmp)
            where = _run("import json, lowbit, lowbit.compiler; print(json.dumps([lowbit.__file__, "
                         "lowbit.compiler.__file__]))")
            if not all(w.startswith(os.path.join(tmp, "frozen")) for w in where):
                raise SystemExit(f"--frozen: lowbit still imports from {where}")
            print(f"frozen sources: commit {commit[:12]} (+ the runtime library built in the checkout)", flush=True)
        if not args.no_artifact:
            path = os.path.join(tmp, f"{args.preset}.lowbit")
            built = _run(COMPILE.format(preset=args.preset, path=path, seq=args.max_seq_len, target=args.target))
            loaded = _run(LOAD.format(path=path, prompt=args.prompt, tokens=args.tokens))
        jits = {}
        if not args.no_jit:
            layers = [v.strip() for v in args.layers.split(",") if v.strip()]
            if not layers or any(v not in ("once", "each") for v in layers):
                raise SystemExit(f"--layers: expected 'once' and/or 'each', got {args.layers!r}")
            speedups = [v.strip() for v in args.dynamo_speedups.split(",") if v.strip()]
            if not speedups or any(v not in ("on", "off", "reuse") for v in speedups):
                raise SystemExit(f"--dynamo-speedups: expected 'on', 'reuse' and/or 'off', got {args.dynamo_speedups!r}")
            fused = [v.strip() for v in args.fused.split(",") if v.strip()]
            if not fused or any(v not in ("on", "off") for v in fused):
                raise SystemExit(f"--fused: expected 'on' and/or 'off', got {args.fused!r}")
            code = lambda floor, flat, off, reuse, unfused, prev: JIT.format(
                preset=args.preset, prompt=args.prompt, tokens=args.tokens, floor=floor, flat=flat,
                no_speedups=off, reuse_only=reuse, unfused=unfused, prev=prev)
            layers = [v + ("" if sp == "on" else f"/{sp}") + ("" if fu == "on" else "/unfused")
                      for v in layers for sp in speedups for fu in fused]
            if args.variants:
                layers = [v.strip() for v in args.variants.split(",") if v.strip()]
                for v in layers:
                    p = v.split("/")
                    if p[0] not in ("once", "each") or not set(p[1:]) <= {"off", "reuse", "unfused", "prev"}:
                        raise SystemExit(f"--variants: {v!r} is not <once|each>[/off|/reuse][/unfused][/prev]")
            rounds = {v: [] for v in layers}
            for r in range(args.rounds):  # interleaved: cold, warm, floor; each a fresh process
                # with several variants (--layers, --dynamo-speedups), their order alternates from round to round
                order = layers if r % 2 == 0 else layers[::-1]
                how, env, ones = {}, {}, {}
                for v in order:
                    # lowbit.generate sizes the KV cache to prompt + tokens; the artifact's is max_seq_len
                    parts = v.split("/")
                    how[v] = (parts[0] == "each", "off" in parts, "reuse" in parts, "unfused" in parts, "prev" in parts)
                    env[v] = {"LOWBIT_CACHE": "1", "LOWBIT_CACHE_DIR": os.path.join(tmp, f"cache{r}-{v.replace('/', '-')}")}
                    ones[v] = {"cold": _run(code(False, *how[v]), env[v]), "warms": []}
                    if args.warm_rounds == 1:
                        ones[v]["warms"].append(_run(code(False, *how[v]), env[v]))
                for k in range(args.warm_rounds if args.warm_rounds > 1 else 0):
                    # several warm processes per cold one, the variants interleaved, order alternating
                    for v in (order if k % 2 == 0 else order[::-1]):
                        w = _run(code(False, *how[v]), env[v])
                        ones[v]["warms"].append(w)
                        print(f"  round {r} {v} warm {k}: {w['compile_s']:.2f} s (load {w['load_average']:.1f}; main "
                              f"thread CPU {w['warmup_timers']['thread_cpu_s']:.2f} s, all threads "
                              f"{w['warmup_timers']['process_cpu_s']:.2f} s; {w['pipelines']} pipeline runs)", flush=True)
                for v in order:
                    one = ones[v]
                    # the round's warm figure: the warm process of median warm-up time (of two, the slower)
                    one["warm"] = sorted(one["warms"], key=lambda w: w["compile_s"])[len(one["warms"]) // 2]
                    one["floor"] = None if args.no_floor else _run(code(True, *how[v]), {"LOWBIT_CACHE": "0"})
                    rounds[v].append(one)
                    _print_round(r, one, f"layers traced {v}" if len(layers) > 1 else "")
            jits = {v: {"rounds": rounds[v], **_jit_summary(rounds[v])} for v in layers}

    mib = 2 ** 20
    threads = loaded["threads"] if loaded else "?"
    print(f"lowbit AOT, preset {args.preset} (max_seq_len {args.max_seq_len}); CPU {_cpu()}, {threads} threads; "
          f"load average at start {load_avg[0]:.1f} (other jobs share the machine: times are noisy)")
    if built:
        files = built["files"]
        packed = built["tensor_bytes"].get("derived", 0)
        stored = sum(built["tensor_bytes"].values())
        print(f"  target                       {built['target']}")
        print(f"  compile to artifact          {built['compile_s']:8.1f} s  (model build {built['model_build_s']} s; "
              "trace/compile/link s: "
              f"{built['build']['seconds']}), {built['entries']} entries, {built['programs']} programs")
        print(f"  code.so                      {files['code.so']['bytes'] / mib:8.2f} MiB")
        print(f"  weights.safetensors          {files['weights.safetensors']['bytes'] / mib:8.2f} MiB "
              f"(packed layer buffers {packed / mib:.2f} MiB, all stored tensors {stored / mib:.2f} MiB)")
        print(f"  import torch / lowbit.aot    {loaded['import_torch_s']:8.3f} s / {loaded['import_lowbit_aot_s']:.3f} s "
              "(+ loading the runtime and OpenMP libraries)")
        print(f"  load, verify=fast            {loaded['load_fast_s']:8.3f} s")
        print(f"  load, verify=full (sha256)   {loaded['load_full_s']:8.3f} s   (goal for 1b: <= 1 s)")
        print(f"  first prefill ({args.prompt:3d} tokens)   {loaded['first_prefill_s'] * 1e3:8.1f} ms, "
              f"steady {loaded['prefill_s'] * 1e3:.1f} ms")
        print(f"  first decode step            {loaded['first_decode_s'] * 1e3:8.1f} ms, steady "
              f"{loaded['decode_ms']:.2f} ms/token")
        print(f"  loader peak RSS              {loaded['peak_rss_mib']:8.1f} MiB")
    for variant, jit in jits.items():
        m = jit["median"]
        n = len(jit["rounds"])
        last = [r for r in jit["rounds"] if _valid(r)][-1]
        print(f"  torch.compile, layers traced {variant} ({'each layer' if variant.startswith('each') else 'one layer, reused'} "
              f"by dynamo), medians of {jit['valid_rounds']} valid round(s) of {n} (load average "
              f"{jit['load_average_range']})")
        print(f"  cold (empty cache)           {m['cold_s']:8.2f} s  ({last['cold']['pipelines']} pipeline runs)")
        print(f"  warm cache                   {m['warm_s']:8.2f} s  ({100 * m['warm_ratio']:.1f}% of cold; "
              f"{last['warm']['program_hits']} whole-program hits, {last['warm']['pipelines']} pipeline runs; "
              "goal <= 5%)")
        print(f"    backend: key, digest, load {m['warm_backend_s']:8.2f} s  (lookup_program {m['warm_lookup_s']:.2f} s)")
        print(f"    compiled code (first runs) {m['warm_run_s']:8.2f} s")
        print(f"    dynamo and the rest        {m['warm_dynamo_s']:8.2f} s")
        print(f"    main thread's CPU time     {m['warm_thread_cpu_s']:8.2f} s  (the warm-up's, whatever the load; "
              f"all threads {m['warm_process_cpu_s']:.2f} s; cold's main thread {m['cold_thread_cpu_s']:.2f} s, "
              f"floor's {m['floor_thread_cpu_s']:.2f} s incl. its eager graphs)")
        if jit.get("all_warms") and jit["all_warms"]["n"] > len(jit["rounds"]):
            a = jit["all_warms"]
            print(f"    every warm process ({a['n']}): medians {a['warm_s']:.2f} s, main thread CPU "
                  f"{a['thread_cpu_s']:.2f} s, all threads {a['process_cpu_s']:.2f} s, lookup {a['lookup_s']:.2f} s; "
                  f"{100 * a['warm_s'] / m['cold_s']:.1f}% of the cold median")
        print(f"  floor: dynamo alone (eager)  {m['floor_s']:8.2f} s  ({100 * m['floor_ratio']:.1f}% of cold; "
              f"its warm-up {m['floor_total_s']:.2f} s minus {m['floor_graph_s']:.2f} s running the eager graphs)")
        print(f"  without steady-state runs    cold {m['cold_net_s']:.2f} s, warm {m['warm_net_s']:.2f} s "
              f"({100 * m['warm_net_ratio']:.1f}% of cold), floor {100 * m['floor_net_ratio']:.1f}% of cold "
              f"(cold and warm minus the warm-up's calls timed at steady state: {m['steady_warmup_s']:.2f} s warm)")
        if loaded:
            same = all(r["cold"]["tokens"] == loaded["tokens"] == r["warm"]["tokens"] for r in jit["rounds"])
            print(f"  JIT tokens == artifact tokens: {same}")
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": _cpu(), "threads": threads, "load_average": load_avg[0], "args": vars(args), "frozen_commit": commit,
              "build": built, "load": loaded, "jit": jits}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else []
    runs.append(record)
    out.write_text(json.dumps(runs, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
