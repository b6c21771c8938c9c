"""End-to-end generation benchmark: lowbit vs llama.cpp vs eager bf16 vs inductor bf16, same weights.

    python benchmarks/e2e.py                         # 953M ternary Llama ("1b"), every system
    python benchmarks/e2e.py --model 2b4t            # BitNet-b1.58-2B4T sizes (Llama architecture)
    python benchmarks/e2e.py --systems llamacpp-tq2_0,eager-bf16 --rounds 5
    python benchmarks/e2e.py --model tiny --quick    # smoke run of the script itself

The model is `lowbit.generate`'s preset (dim 2048, 16 layers, 16 heads, ffn 5632, vocab
32000 for "1b"): every decoder linear is exactly ternary times one power-of-two scale,
embedding and head fp32, deterministic from `--seed`. Every system gets the SAME tensors:
the torch systems build them with `lowbit.generate.build_llama`, and llama.cpp reads a GGUF
written from the very same tensors (exported to safetensors, then
benchmarks/llamacpp/write_gguf.py: ternary linears as F16, exact; quantized by llama.cpp's
own quantizer to TQ2_0 / TQ1_0 (lossless for these tensors), Q4_0 and F16 for reference).

Systems (`--systems`, comma-separated):
  lowbit                 quantize_ ternary weights + int8 activations, torch.compile(backend="lowbit");
                         q/k/v and w1/w3 fused into one linear each, as `lowbit generate` builds it
  lowbit-int8head        the same with the output head quantized too (int8 weights + activations)
  lowbit-int4head        the same with an int4 head (symmetric, groups of 32: 5 bits per weight)
  lowbit-int4head-avx512 the same, kernels held to AVX-512 VNNI (LOWBIT_ISA=avx512; on AMX CPUs)
  eager-bf16             the same ternary values as bf16 nn.Linear weights, eager PyTorch
  inductor-bf16          same model, torch.compile(backend="inductor", dynamic=False)
  llamacpp-tq2_0         llama-cpp-python 0.3.36 (GGML_NATIVE), TQ2_0 layers, llama.cpp's default
                         Q4_K embedding and Q6_K head
  llamacpp-tq2_0-f32head TQ2_0 layers with the F32 head and embedding lowbit uses
  llamacpp-tq1_0, llamacpp-q4_0, llamacpp-f16

Each system runs in its own subprocess (its peak RSS is its own ru_maxrss; llama.cpp's in
its own virtual environment, made by benchmarks/llamacpp/setup.sh). All workers are set up
one after another (load, quantize, warm-up = compile), then `--rounds` rounds run the
systems interleaved (the order rotates each round), one at a time, with a memory read
bandwidth probe (512 MiB, torch sum, same thread count) in every round. Per round and
system: prefill of a 128-token prompt (tok/s), and decode of 64 greedy tokens at positions
8-72 after an 8-token prompt (tok/s); the compiled torch systems decode as `lowbit.generate`
does (`_LlamaRunner`: a sequence's first step through dynamo, the rest straight into the
compiled graph, lowbit and inductor alike, and lowbit's in one native loop, `runner.decode`;
docs/generation.md). Reported: medians with min-max spread, load and
compile seconds, peak RSS, weight bytes streamed per decode token (everything but the
embedding table) and the effective GB/s of that stream against the probe (the runs' medians,
and per round against that round's probe: the host's bandwidth moves), and how many
leading greedy tokens each pair of systems shares on the same prompt. A worker that fails
(compile error, out of memory, timeout) is reported as a failed row with its reason.

Results: a table on stdout and benchmarks/results/e2e.json (one entry per model, replaced
on re-run). Timings on a shared machine are noisy: the CPU model, thread count, rounds and
spread are part of every entry.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from proc_status import status_bytes  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "e2e.json"
CACHE = Path(os.environ.get("LOWBIT_BENCH_CACHE", Path.home() / ".cache" / "lowbit" / "e2e"))
VENV = Path(os.environ.get("LOWBIT_LLAMACPP_VENV", Path.home() / ".cache" / "lowbit" / "llamacpp-venv"))

SYSTEMS: dict[str, dict] = {
    # lowbit systems build the model as `lowbit generate` does: q/k/v and w1/w3 fused into one
    # linear each (`lowbit.models.fuse_projections_`; same outputs, fewer tensors for dynamo;
    # the compiled code is the same, the binder merges the unfused siblings too)
    "lowbit": dict(kind="torch", weights="ternary", activations="int8", dtype="float32", backend="lowbit",
                   fused=True),
    # the same with the output head on the integer kernels (int8 weights per channel, int8
    # activations), as llama.cpp's default TQ2_0 file quantizes its head (Q6_K)
    "lowbit-int8head": dict(kind="torch", weights="ternary", activations="int8", dtype="float32",
                            backend="lowbit", head="int8", fused=True),
    # int4 head (symmetric, groups of 32, fp32 scales: 5 bits per weight, fewer bytes than Q6_K)
    "lowbit-int4head": dict(kind="torch", weights="ternary", activations="int8", dtype="float32",
                            backend="lowbit", head="int4", fused=True),
    # the same with the kernels held to AVX-512 VNNI (LOWBIT_ISA=avx512): on an AMX CPU, what
    # the AMX tiles bring to prefill, in the same run
    "lowbit-int4head-avx512": dict(kind="torch", weights="ternary", activations="int8", dtype="float32",
                                   backend="lowbit", head="int4", fused=True, env={"LOWBIT_ISA": "avx512"}),
    "eager-bf16": dict(kind="torch", weights="none", activations="none", dtype="bfloat16", backend="eager"),
    "inductor-bf16": dict(kind="torch", weights="none", activations="none", dtype="bfloat16", backend="inductor"),
    "llamacpp-tq2_0": dict(kind="llamacpp", type="TQ2_0", head=None),
    "llamacpp-tq2_0-f32head": dict(kind="llamacpp", type="TQ2_0", head="f32"),
    "llamacpp-tq1_0": dict(kind="llamacpp", type="TQ1_0", head=None),
    "llamacpp-q4_0": dict(kind="llamacpp", type="Q4_0", head=None),
    "llamacpp-f16": dict(kind="llamacpp", type="F16", head=None),
}
DEFAULT_SYSTEMS = ["lowbit", "lowbit-int8head", "llamacpp-tq2_0", "llamacpp-tq2_0-f32head", "llamacpp-tq1_0",
                   "llamacpp-q4_0",
                   "llamacpp-f16", "eager-bf16", "inductor-bf16"]
MODELS = ("1b", "2b4t", "demo", "tiny")
# the systems every other one is compared with, round by round (when they ran)
REFERENCES = ("eager-bf16", "llamacpp-tq2_0")

PREFILL = 128
DECODE_START = 8
DECODE_STEPS = 64


def prompt_ids(seed: int, n: int, vocab: int) -> list[int]:
    """Seeded prompt token ids (numpy only: the llama.cpp worker has no torch); skips 0-2 (unk/bos/eos)."""
    import numpy as np
    return [int(x) for x in np.random.default_rng(seed + 7).integers(3, vocab, size=n)]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ============================================================================ workers
def _config(model: str, seq: int):
    import dataclasses
    from lowbit.generate import PRESETS
    return dataclasses.replace(PRESETS[model], max_seq_len=seq, max_batch=1)


def export_weights(model: str, seed: int, seq: int, path: Path) -> None:
    """The preset's tensors as safetensors for the GGUF writer (int8 codes + .scale, fp32 rest)."""
    import dataclasses
    import torch
    from safetensors.torch import save_file
    from lowbit.generate import block_tensors, outer_tensors
    cfg = _config(model, seq)
    tensors: dict[str, torch.Tensor] = dict(outer_tensors(cfg, seed))
    for i in range(cfg.n_layers):
        for name, value in block_tensors(cfg, i, seed).items():
            if isinstance(value, tuple):
                codes, scale = value
                tensors[name] = codes
                tensors[name + ".scale"] = torch.tensor([scale], dtype=torch.float32)
            else:
                tensors[name] = value
    meta = {"lowbit.config": json.dumps(dataclasses.asdict(cfg)), "lowbit.name": f"lowbit-{model}-seed{seed}",
            "lowbit.context": str(seq)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.rename(path)


def _streamed_bytes_torch(model) -> int:
    skip = ("tok_embeddings", "cache", "causal", "inv_freq")
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or any(s in name for s in skip):
            continue
        total += t.numel() * t.element_size()
    return total


def _kernel_isa(spec: dict) -> str | None:
    """The ISA of lowbit's kernels in this worker (None for the torch baselines)."""
    if spec["backend"] != "lowbit":
        return None
    import lowbit.runtime
    return lowbit.runtime.current_isa()


def torch_worker(args) -> None:
    import torch
    from lowbit.generate import CompileCounter, _LlamaRunner, build_llama
    spec = SYSTEMS[args.system]
    torch.set_num_threads(args.threads)
    cfg = _config(args.model, args.seq)
    t = time.perf_counter()
    model, quantize_s = build_llama(cfg, args.seed, spec["weights"], spec["activations"],
                                    dtype=getattr(torch, spec["dtype"]), head=spec.get("head", "none"),
                                    fused=spec.get("fused", False))
    load_s = time.perf_counter() - t - quantize_s
    counter = None
    fn = model
    if spec["backend"] == "lowbit":
        counter = CompileCounter("lowbit")
        fn = torch.compile(model, backend=counter)
    elif spec["backend"] == "inductor":
        counter = CompileCounter("inductor")
        fn = torch.compile(model, backend=counter, dynamic=False)
    runner = _LlamaRunner(model, fn, dynamic=spec["backend"] == "lowbit", counter=counter)
    p_long = torch.tensor(prompt_ids(args.seed, PREFILL, cfg.vocab_size))
    p_short = torch.tensor(prompt_ids(args.seed, DECODE_START, cfg.vocab_size))

    def prefill_round() -> float:
        runner.reset()
        t0 = time.perf_counter()
        int(runner.prefill(p_long).argmax())
        return time.perf_counter() - t0

    def decode_round() -> tuple[float, list[int]]:
        runner.reset()
        tok = int(runner.prefill(p_short).argmax())
        t0 = time.perf_counter()
        toks = [tok] + runner.decode(tok, DECODE_START, DECODE_STEPS)
        return time.perf_counter() - t0, toks

    with torch.no_grad():
        t = time.perf_counter()
        prefill_round()
        runner.reset()
        tok = int(runner.prefill(p_short).argmax())
        runner.step(tok, DECODE_START)
        warm_s = time.perf_counter() - t
        emit(dict(ready=True, load_s=load_s, quantize_s=quantize_s,
                  compile_s=warm_s if counter is not None else None, warmup_s=warm_s,
                  compile_counts=counter.as_dict() if counter else None,
                  streamed_bytes=_streamed_bytes_torch(model), rss_after_setup=peak_rss(),
                  threads=torch.get_num_threads(), isa=_kernel_isa(spec)))
        for line in sys.stdin:
            if line.strip() == "round":
                p = prefill_round()
                d, toks = decode_round()
                emit(dict(prefill_s=p, decode_s=d, tokens=toks,
                          compile_counts=counter.as_dict() if counter else None))
            elif line.strip() == "quit":
                break
    emit(dict(final=True, peak_rss=peak_rss()))


def llamacpp_worker(args) -> None:
    import numpy as np
    from llama_cpp import Llama
    import gguf
    reader = gguf.GGUFReader(args.gguf)
    streamed = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    head = [t.tensor_type.name for t in reader.tensors if t.name == "output.weight"]
    vocab = int(next(t.shape for t in reader.tensors if t.name == "token_embd.weight")[1])
    del reader
    t = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_ctx=max(256, args.seq), n_batch=512, n_ubatch=512,
                n_threads=args.threads, n_threads_batch=args.threads, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t
    p_long = prompt_ids(args.seed, PREFILL, vocab)
    p_short = prompt_ids(args.seed, DECODE_START, vocab)

    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        # logits of the batch's last token (llama-cpp-python only fills `scores` with logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    def prefill_round() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(p_long)
        last_argmax()
        return time.perf_counter() - t0

    def decode_round() -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(p_short)
        tok = last_argmax()
        toks = [tok]
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            llm.eval([tok])
            tok = last_argmax()
            toks.append(tok)
        return time.perf_counter() - t0, toks

    t = time.perf_counter()
    llm.reset()
    llm.eval(p_short)
    llm.eval([last_argmax()])
    warm_s = time.perf_counter() - t
    emit(dict(ready=True, load_s=load_s, quantize_s=0.0, compile_s=None, warmup_s=warm_s,
              streamed_bytes=streamed, rss_after_setup=peak_rss(), threads=args.threads,
              gguf_types=types, head_type=head[0] if head else None))
    for line in sys.stdin:
        if line.strip() == "round":
            p = prefill_round()
            d, toks = decode_round()
            emit(dict(prefill_s=p, decode_s=d, tokens=toks))
        elif line.strip() == "quit":
            break
    emit(dict(final=True, peak_rss=peak_rss()))


def probe_worker(args) -> None:
    """Read bandwidth: torch sum over a 512 MiB fp32 tensor, best of 5 after one warm-up."""
    import torch
    torch.set_num_threads(args.threads)
    x = torch.ones(128 * 2 ** 20, dtype=torch.float32)
    x.sum()
    emit(dict(ready=True))
    for line in sys.stdin:
        if line.strip() == "round":
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                x.sum()
                best = min(best, time.perf_counter() - t0)
            emit(dict(read_gbs=x.numel() * 4 / best / 1e9))
        elif line.strip() == "quit":
            break
    emit(dict(final=True, peak_rss=peak_rss()))


# ============================================================================ driver
class Worker:
    """A system's subprocess speaking JSON lines."""

    def __init__(self, name: str, cmd: list[str], timeout: float, log_path: Path, max_rss: float = 0,
                 env: dict | None = None):
        self.name, self.timeout, self.max_rss = name, timeout, max_rss
        self.log = open(log_path, "w")
        # Compile seconds are a cold compile's: each worker gets an empty lowbit compile cache
        # (compiled code is otherwise reused from disk across processes; see benchmarks/aot.py).
        self.cache_dir = tempfile.mkdtemp(prefix="lowbit-e2e-cache-")
        atexit.register(shutil.rmtree, self.cache_dir, True)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1,
                                     env=dict(os.environ, LOWBIT_CACHE_DIR=self.cache_dir, **(env or {})))
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.failed: str | None = None
        self.log_path = log_path

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def receive(self, timeout: float | None = None) -> dict | None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(f"timed out after {timeout or self.timeout:.0f} s")
                return None
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                rss = status_bytes(self.proc.pid)
                if self.max_rss and rss > self.max_rss:
                    self.fail(f"killed by the benchmark: RSS {rss / 2 ** 30:.1f} GiB > --max-rss-gib "
                              f"{self.max_rss / 2 ** 30:.0f}")
                    return None
                continue
            if line is None:
                self.proc.wait()
                self.fail(f"exited with {_exit_reason(self.proc.returncode)}")
                return None
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def send(self, cmd: str) -> bool:
        if self.failed:
            return False
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError) as e:
            self.fail(f"stdin closed: {e}")
            return False

    def fail(self, why: str) -> None:
        if self.failed:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.flush()
        tail = _tail(self.log_path)
        self.failed = f"{why}" + (f"; last output: {tail}" if tail else "")


def _exit_reason(rc: int) -> str:
    if rc is not None and rc < 0:
        import signal
        name = signal.Signals(-rc).name
        return f"signal {name}" + (" (killed: out of memory?)" if name == "SIGKILL" else "")
    return f"exit code {rc}"


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-600:]


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({_exit_reason(r.returncode)}): {(r.stderr or r.stdout)[-1500:]}")


def prepare_gguf(model: str, seed: int, seq: int, systems: list[str]) -> dict[str, Path]:
    """Export the tensors, write the base GGUF and quantize it once per type (cached)."""
    vpy = VENV / "bin" / "python"
    if not vpy.exists():
        raise RuntimeError(f"no llama.cpp environment at {VENV}: run bash benchmarks/llamacpp/setup.sh")
    d = CACHE / f"{model}-seed{seed}-seq{seq}"
    d.mkdir(parents=True, exist_ok=True)
    weights = d / "weights.safetensors"
    if not weights.exists():
        print(f"[e2e] exporting the {model} tensors to {weights}", flush=True)
        _run([sys.executable, __file__, "--export", str(weights), "--model", model, "--seed", str(seed),
              "--seq", str(seq)], "exporting weights")
    base = d / "base-f16-f32.gguf"
    if not base.exists():
        print(f"[e2e] writing {base}", flush=True)
        _run([str(vpy), str(HERE / "llamacpp" / "write_gguf.py"), "base", "--weights", str(weights),
              "--out", str(base) + ".tmp"], "writing the base GGUF")
        os.rename(str(base) + ".tmp", base)
    out = {}
    for s in systems:
        spec = SYSTEMS[s]
        if spec["kind"] != "llamacpp":
            continue
        path = d / f"{spec['type'].lower()}{'-' + spec['head'] + 'head' if spec['head'] else ''}.gguf"
        if not path.exists():
            print(f"[e2e] quantizing {path.name}", flush=True)
            cmd = [str(vpy), str(HERE / "llamacpp" / "write_gguf.py"), "quant", "--base", str(base),
                   "--type", spec["type"], "--out", str(path) + ".tmp"]
            if spec["head"]:
                cmd += ["--head", spec["head"]]
            _run(cmd, f"quantizing {spec['type']}")
            os.rename(str(path) + ".tmp", path)
        out[s] = path
    return out


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def _match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def drive(args, on_round=None) -> dict:
    systems = args.systems
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    seq = PREFILL
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {s: {"system": s, **SYSTEMS[s]} for s in systems}
    ggufs: dict[str, Path] = {}
    if any(SYSTEMS[s]["kind"] == "llamacpp" for s in systems):
        try:
            ggufs = prepare_gguf(args.model, args.seed, seq, systems)
        except RuntimeError as e:
            for s in systems:
                if SYSTEMS[s]["kind"] == "llamacpp":
                    rows[s]["status"] = "failed"
                    rows[s]["reason"] = str(e)

    workers: dict[str, Worker] = {}
    base = ["--model", args.model, "--seed", str(args.seed), "--seq", str(seq), "--threads", str(args.threads)]
    for s in systems:  # set up one at a time: no system's load or compile competes with another's
        if rows[s].get("status") == "failed":
            continue
        if SYSTEMS[s]["kind"] == "llamacpp":
            cmd = [str(VENV / "bin" / "python"), __file__, "--worker", s, "--gguf", str(ggufs[s])] + base
        else:
            cmd = [sys.executable, __file__, "--worker", s] + base
        print(f"[e2e] setting up {s}", flush=True)
        w = Worker(s, cmd, args.timeout, logs / f"{args.model}-{s}.log", args.max_rss_gib * 2 ** 30,
                   SYSTEMS[s].get("env"))
        ready = w.receive(args.setup_timeout)
        if ready is None:
            rows[s].update(status="failed", reason=f"setup: {w.failed}")
            print(f"[e2e] {s} FAILED: {rows[s]['reason']}", flush=True)
            continue
        rows[s].update(ready)
        workers[s] = w
        print(f"[e2e] {s} ready: load {ready['load_s']:.1f} s, warm-up {ready['warmup_s']:.1f} s", flush=True)
    probe = Worker("probe", [sys.executable, __file__, "--worker", "probe", "--threads", str(args.threads)],
                   args.timeout, logs / "probe.log")
    probe.receive(args.timeout)

    samples = {s: {"prefill_s": [], "decode_s": [], "tokens": [], "probe": []} for s in workers}
    probes: list[float] = []
    order = list(workers)
    for r in range(args.rounds):
        rot = order[r % len(order):] + order[:r % len(order)] if order else []
        round_probe = None
        if probe.send("round"):
            res = probe.receive()
            if res:
                probes.append(res["read_gbs"])
                round_probe = res["read_gbs"]
        for s in rot:
            w = workers[s]
            if w.failed or not w.send("round"):
                continue
            res = w.receive()
            if res is None:
                continue
            samples[s]["prefill_s"].append(res["prefill_s"])
            samples[s]["decode_s"].append(res["decode_s"])
            samples[s]["tokens"].append(res["tokens"])
            samples[s]["probe"].append(round_probe)
            if res.get("compile_counts"):
                rows[s]["compile_counts"] = res["compile_counts"]
        print(f"[e2e] round {r + 1}/{args.rounds} done", flush=True)
        if on_round is not None and r + 1 < args.rounds:
            on_round(_summarize(args, systems, rows, workers, samples, probes, r + 1))
    for s, w in list(workers.items()) + [("probe", probe)]:
        if w.send("quit"):
            fin = w.receive(60)
            if fin and s != "probe":
                rows[s]["peak_rss"] = fin["peak_rss"]
        if w.failed and s != "probe":
            rows[s].update(status="failed", reason=w.failed)
        if w.proc.poll() is None:
            w.proc.wait(timeout=60)

    return _summarize(args, systems, rows, workers, samples, probes, args.rounds)


def _summarize(args, systems, rows, workers, samples, probes, rounds_done) -> dict:
    import copy
    rows = copy.deepcopy(rows)
    read_gbs = statistics.median(probes) if probes else None
    for s in workers:
        row, smp = rows[s], samples[s]
        if not smp["decode_s"]:
            row.setdefault("status", "failed")
            row.setdefault("reason", "no round completed")
            continue
        row.setdefault("status", "ok")
        pre = [PREFILL / x for x in smp["prefill_s"]]
        dec = [DECODE_STEPS / x for x in smp["decode_s"]]
        row["prefill_tok_s"] = _stats(pre)
        row["decode_tok_s"] = _stats(dec)
        row["tokens"] = smp["tokens"][-1]
        row["tokens_stable"] = all(t == smp["tokens"][0] for t in smp["tokens"])
        gbs = [row["streamed_bytes"] * x / 1e9 for x in dec]
        row["weights_gbs"] = _stats(gbs)
        if read_gbs:
            row["weights_gbs_vs_probe"] = statistics.median(gbs) / read_gbs
        # The host's bandwidth can change between rounds (42 <-> 77 GB/s within minutes): each
        # round's stream against that round's probe.
        per_round = [g / p for g, p in zip(gbs, smp["probe"]) if p]
        if per_round:
            row["weights_vs_round_probe"] = _stats(per_round)
    ok = [s for s in systems if rows[s].get("status") == "ok"]
    matches = {a: {b: _match(rows[a]["tokens"], rows[b]["tokens"]) for b in ok if b != a} for a in ok}
    # The host's state moves both sides of a comparison (its AMX throughput halves between
    # rounds on the Xeon seen so far): speedups as the median of each round's own ratio.
    for s in ok:
        ratios = {}
        for ref in REFERENCES:
            if ref == s or ref not in ok or len(samples[ref]["prefill_s"]) != len(samples[s]["prefill_s"]):
                continue
            ratios[ref] = {
                "prefill": _stats([b / a for a, b in zip(samples[s]["prefill_s"], samples[ref]["prefill_s"])]),
                "decode": _stats([b / a for a, b in zip(samples[s]["decode_s"], samples[ref]["decode_s"])])}
        if ratios:
            rows[s]["speedup_per_round"] = ratios
    return {
        "model": args.model, "seed": args.seed, "threads": args.threads, "cpu": _cpu_model(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds_done,
        "complete": rounds_done == args.rounds,
        "prefill_tokens": PREFILL, "decode_positions": [DECODE_START, DECODE_START + DECODE_STEPS],
        "read_probe_gbs": _stats(probes), "systems": [rows[s] for s in systems],
        "greedy_match": matches, "tokens_compared": DECODE_STEPS + 1,
        "load_average": os.getloadavg(),
    }


def table(result: dict) -> str:
    lines = [f"e2e {result['model']}: {result['threads']} threads, {result['cpu']}, {result['rounds']} rounds "
             f"interleaved, {result['date']}; medians [min-max]"]
    pr = result["read_probe_gbs"]
    if pr:
        lines.append(f"read probe (512 MiB, torch sum): {pr['median']:.1f} GB/s [{pr['min']:.1f}-{pr['max']:.1f}]")
    lines.append(f"{'system':24s} {'prefill 128 tok/s':>22s} {'decode 8-72 tok/s':>22s} {'load s':>7s} "
                 f"{'compile s':>9s} {'peak RSS':>9s} {'weights/token':>13s} {'GB/s (% probe)':>16s} "
                 f"{'% of its round probe':>22s}")
    for r in result["systems"]:
        if r.get("status") != "ok":
            lines.append(f"{r['system']:24s} FAILED: {r.get('reason', '?')[:300]}")
            continue
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        comp = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        pct = f"({100 * r['weights_gbs_vs_probe']:.0f}%)" if r.get("weights_gbs_vs_probe") else ""
        rp = r.get("weights_vs_round_probe")
        per_round = f"{100 * rp['median']:.0f}% [{100 * rp['min']:.0f}-{100 * rp['max']:.0f}]" if rp else ""
        lines.append(
            f"{r['system']:24s} {p['median']:8.1f} [{p['min']:.1f}-{p['max']:.1f}]".ljust(48)
            + f"{d['median']:7.2f} [{d['min']:.2f}-{d['max']:.2f}]".rjust(22)
            + f" {r['load_s']:7.1f} {comp:>9s} {r.get('peak_rss', 0) / 2 ** 30:8.2f}G"
            + f" {r['streamed_bytes'] / 1e9:12.3f}G {r['weights_gbs']['median']:8.1f} {pct:>7s}"
            + f" {per_round:>22s}")
    for r in result["systems"]:
        for ref, sp in r.get("speedup_per_round", {}).items():
            p, d = sp["prefill"], sp["decode"]
            lines.append(f"{r['system']} / {ref}, median of per-round ratios: prefill {p['median']:.2f}x "
                         f"[{p['min']:.2f}-{p['max']:.2f}], decode {d['median']:.2f}x [{d['min']:.2f}-{d['max']:.2f}]")
    isas = [f"{r['system']} {r['isa']}" for r in result["systems"] if r.get("isa")]
    if isas:
        lines.append("lowbit kernel ISA: " + ", ".join(isas))
    if result["greedy_match"]:
        lines.append(f"greedy tokens: leading matches out of {result['tokens_compared']} (8-token prompt)")
        for a, m in result["greedy_match"].items():
            lines.append(f"  {a:24s} " + ", ".join(f"{b} {n}" for b, n in m.items()))
    return "\n".join(lines)


def save(result: dict) -> None:
    data = {"entries": {}}
    if RESULTS.exists():
        try:
            data = json.loads(RESULTS.read_text())
        except json.JSONDecodeError:
            pass
    # one entry per model and system set: runs of other systems stay
    key = result["model"] + ("-quick" if result.get("quick") else "") + ":" + \
        ",".join(r["system"] for r in result["systems"])
    data.setdefault("entries", {})[key] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="1b")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 rounds (a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds for one round of one system")
    p.add_argument("--setup-timeout", type=float, default=1800, help="seconds for a system's load + compile")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/e2e.json")
    p.add_argument("--max-rss-gib", type=float, default=16.0,
                   help="kill a worker whose RSS exceeds this and report it (protects a shared machine; 0: off)")
    # internal
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=PREFILL, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export:
        export_weights(args.model, args.seed, args.seq, Path(args.export))
        return 0
    if args.worker:
        args.system = args.worker
        if args.worker == "probe":
            probe_worker(args)
        elif SYSTEMS[args.worker]["kind"] == "llamacpp":
            llamacpp_worker(args)
        else:
            torch_worker(args)
        return 0
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.quick:
        args.rounds = min(args.rounds, 2)
    def partial(result: dict) -> None:
        result["quick"] = args.quick
        if not args.no_save:
            save(result)
            print(f"[e2e] partial results ({result['rounds']} rounds) saved", flush=True)

    result = drive(args, partial)
    result["quick"] = args.quick
    print(table(result))
    if not args.no_save:
        save(result)
        print(f"[e2e] wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
