"""Real size (issue 9): a cold process that builds, compiles and serves the 953M ternary Llama.

    python benchmarks/scale.py                       # the 953M model ("1b"); minutes today, run it alone
    python benchmarks/scale.py --config tiny         # a smoke run of the script (seconds)
    python benchmarks/scale.py --config 1b --set n_layers=2 --lengths 128,33,7

A fresh subprocess (nothing compiled, nothing cached in memory) builds `lowbit.generate`'s
preset (1b: dim 2048, 16 layers, 16 heads, ffn 5632, vocab 32000; every block linear
ternary + int8 activations through `lowbit.quantize_`, fp32 embedding and head), wraps it in
`torch.compile(backend="lowbit")` and runs the sequence of issue 9's "Done when": prefill at
three prompt lengths (default 128, 33, 7), each followed by 32 greedy decode steps.

Reported:
- total wall time of that sequence, from spawning the cold process (Python start, imports,
  building and quantizing the model included) to the last decode step, and its phases;
- calls that compiled: compilations lowbit's backend ran (its per-signature compile entry,
  counted by a wrapper around `lowbit.compiler.backend.lowbit_backend`), the graphs dynamo
  handed to it, and dynamo's own unique-graph counter;
- peak RSS of the child (ru_maxrss) after the sequence, and against the issue's budget
  (the compile worker's own peak, VmHWM, is reported beside it and summed):
  weights as held (packed block weights + fp32 embedding/head) + 1.5 GiB;
- greedy tokens of a 64-token generation (16-token prompt) from the compiled model vs the
  same model in eager PyTorch (lowbit's reference op), in a second process: leading match.

A child that fails, is killed (out of memory) or times out is reported as such, with its
last output. Results: table on stdout, benchmarks/results/scale.json (one entry per config).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from proc_status import status_bytes  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"
DECODE = 32
GEN_PROMPT, GEN_TOKENS = 16, 64


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cfg(args):
    from lowbit.generate import PRESETS
    cfg = PRESETS[args.config]
    changes = {}
    for item in args.set:
        key, value = item.split("=", 1)
        changes[key] = type(getattr(cfg, key))(value)
    seq = max(max(args.lengths) + DECODE, GEN_PROMPT + GEN_TOKENS)
    return dataclasses.replace(cfg, max_seq_len=seq, max_batch=1, **changes)


def _prompt(seed: int, n: int, vocab: int):
    import torch
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed * 7919 + n))


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker_peak() -> int:
    """Peak RSS of lowbit's compile worker process (VmHWM), 0 if none ran. The MLIR pipeline
    runs there, so its memory is part of what compiling costs the user's machine."""
    try:
        from lowbit.compiler.worker import shared_worker
        pid = shared_worker().pid
    except Exception:
        return 0
    return 0 if pid is None else status_bytes(pid, "VmHWM")


def child_compiled(args) -> None:
    t_start = time.perf_counter()
    import torch
    torch._dynamo.utils.counters.clear()
    from lowbit.generate import CompileCounter, _LlamaRunner, build_llama
    import lowbit
    torch.set_num_threads(args.threads)
    cfg = _cfg(args)
    t = time.perf_counter()
    model, quantize_s = build_llama(cfg, args.seed, "ternary", "int8", torch.float32)
    build_s = time.perf_counter() - t
    held = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
               if ("packed" in n or "scales" in n))
    held += sum(p.numel() * p.element_size() for p in model.parameters())
    emit(dict(phase="built", build_s=build_s, quantize_s=quantize_s, held_bytes=held, rss=_peak(),
              since_start=time.perf_counter() - t_start))
    counter = CompileCounter("lowbit")
    runner = _LlamaRunner(model, torch.compile(model, backend=counter))
    phases = []
    with torch.no_grad():
        for length in args.lengths:
            runner.reset()
            prompt = _prompt(args.seed, length, cfg.vocab_size)
            c0 = counter.compiles
            t = time.perf_counter()
            tok = int(runner.prefill(prompt).argmax())
            prefill_s = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(DECODE):
                tok = int(runner.step(tok, length + i).argmax())
            decode_s = time.perf_counter() - t
            phases.append(dict(length=length, prefill_s=prefill_s, decode_s=decode_s,
                               compiles=counter.compiles - c0))
            emit(dict(phase="length", **phases[-1], since_start=time.perf_counter() - t_start))
        seq_end = time.time()
        dyn = dict(torch._dynamo.utils.counters["stats"])
        emit(dict(phase="sequence", seq_end_epoch=seq_end, phases=phases, compile_counts=counter.as_dict(),
                  dynamo_stats={k: int(v) for k, v in dyn.items()}, peak_rss=_peak(),
                  worker_peak_rss=_worker_peak(), since_start=time.perf_counter() - t_start))
        runner.reset()
        prompt = _prompt(args.seed, GEN_PROMPT, cfg.vocab_size)
        c0 = counter.compiles
        t = time.perf_counter()
        tok = int(runner.prefill(prompt).argmax())
        toks = [tok]
        for i in range(GEN_TOKENS - 1):
            tok = int(runner.step(tok, GEN_PROMPT + i).argmax())
            toks.append(tok)
        emit(dict(phase="generation", tokens=toks, seconds=time.perf_counter() - t,
                  compiles=counter.compiles - c0, compile_counts=counter.as_dict(), peak_rss=_peak(),
                  isa=lowbit.runtime.current_isa() if hasattr(lowbit, "runtime") else None))


def child_eager(args) -> None:
    import torch
    from lowbit.generate import build_llama, greedy_reference
    torch.set_num_threads(args.threads)
    cfg = _cfg(args)
    model, _ = build_llama(cfg, args.seed, "ternary", "int8", torch.float32)
    t = time.perf_counter()
    toks = greedy_reference(model, _prompt(args.seed, GEN_PROMPT, cfg.vocab_size), GEN_TOKENS)
    emit(dict(phase="generation", tokens=toks, seconds=time.perf_counter() - t, peak_rss=_peak()))


def run_child(kind: str, args, timeout: float) -> tuple[list[dict], str | None, float, float]:
    """Run a child, collect its JSON lines; returns (messages, failure, spawn epoch, wall s)."""
    cmd = [sys.executable, __file__, "--child", kind, "--config", args.config, "--seed", str(args.seed),
           "--threads", str(args.threads), "--lengths", ",".join(map(str, args.lengths))]
    for item in args.set:
        cmd += ["--set", item]
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lowbit-scale-{kind}-{os.getpid()}.log"
    spawn = time.time()
    t0 = time.perf_counter()
    # A cold process means a cold compile cache too: an empty cache directory per child
    # (lowbit keeps compiled code on disk across processes; benchmarks/aot.py measures that).
    cache_dir = tempfile.mkdtemp(prefix="lowbit-scale-cache-")
    env = dict(os.environ, LOWBIT_CACHE_DIR=cache_dir)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: ([lines.put(l) for l in proc.stdout], lines.put(None)), daemon=True).start()
        msgs, failure = [], None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line.startswith("{"):
                msgs.append(json.loads(line))
                print(f"[scale] {kind}: {json.dumps({k: v for k, v in msgs[-1].items() if k != 'tokens'})[:300]}",
                      flush=True)
            if time.monotonic() > deadline:
                proc.kill()
                failure = f"timed out after {timeout:.0f} s"
                break
            rss = status_bytes(proc.pid)
            if args.max_rss_gib and rss > args.max_rss_gib * 2 ** 30:
                proc.kill()
                failure = f"killed by the benchmark: RSS {rss / 2 ** 30:.1f} GiB > --max-rss-gib {args.max_rss_gib}"
                break
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if failure is None and rc != 0:
        import signal
        why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        if rc == -9:
            why += " (killed: out of memory?)"
        failure = why
    if failure:
        tail = [l.strip() for l in log_path.read_text(errors="replace").splitlines() if l.strip()][-3:]
        failure += ("; last output: " + " | ".join(tail))[-800:] if tail else ""
    shutil.rmtree(cache_dir, ignore_errors=True)
    return msgs, failure, spawn, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="1b", help="lowbit.generate preset: tiny, demo, 1b, 2b4t")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--lengths", default="128,33,7", help="three prompt lengths")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the compiled child")
    p.add_argument("--no-eager", action="store_true", help="skip the eager reference generation")
    p.add_argument("--max-rss-gib", type=float, default=16.0,
                   help="kill a child whose RSS exceeds this (protects a shared machine; 0: no limit)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    from lowbit.generate import PRESETS
    if args.config not in PRESETS:
        raise SystemExit(f"--config must be one of {', '.join(PRESETS)}")
    if len(args.lengths) < 1 or min(args.lengths) < 1:
        raise SystemExit("--lengths needs positive prompt lengths")
    if args.child == "compiled":
        child_compiled(args)
        return 0
    if args.child == "eager":
        child_eager(args)
        return 0

    cfg = _cfg(args)
    msgs, failure, spawn, wall = run_child("compiled", args, args.timeout)
    by = {}
    for m in msgs:
        by.setdefault(m["phase"], []).append(m)
    result = dict(config=args.config, overrides=args.set, cfg=dataclasses.asdict(cfg), lengths=args.lengths,
                  decode_steps=DECODE, threads=args.threads, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  cpu=_cpu(), load_average=os.getloadavg(), child_wall_s=wall)
    if "built" in by:
        b = by["built"][0]
        result.update(build_s=b["build_s"], quantize_s=b["quantize_s"], held_bytes=b["held_bytes"],
                      budget_bytes=b["held_bytes"] + int(1.5 * 2 ** 30))
    if "sequence" in by:
        s = by["sequence"][0]
        result.update(status="ok", sequence_wall_s=s["seq_end_epoch"] - spawn, phases=s["phases"],
                      compile_counts=s["compile_counts"], dynamo_stats=s["dynamo_stats"],
                      peak_rss=s["peak_rss"], worker_peak_rss=s.get("worker_peak_rss", 0))
    else:
        result.update(status="failed", reason=failure or "the child ended before finishing the sequence",
                      phases=[m for m in by.get("length", [])])
    if failure and result["status"] == "ok":
        result["after_sequence_failure"] = failure
    if "generation" in by:
        g = by["generation"][0]
        result.update(generation_tokens=g["tokens"], generation_s=g["seconds"],
                      generation_compiles=g["compiles"], final_peak_rss=g["peak_rss"])
        if not args.no_eager:
            emsgs, efail, _, _ = run_child("eager", args, max(args.timeout, 3600))
            eg = [m for m in emsgs if m.get("phase") == "generation"]
            if eg:
                ref = eg[0]["tokens"]
                n = 0
                for a, b in zip(g["tokens"], ref):
                    if a != b:
                        break
                    n += 1
                result.update(eager_tokens=ref, greedy_match=n, eager_generation_s=eg[0]["seconds"])
            else:
                result["eager_failure"] = efail
    print(table(result))
    if not args.no_save:
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"entries": {}}
        key = args.config + ("" if not args.set else "[" + ",".join(args.set) + "]")
        data.setdefault("entries", {})[key] = result
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(f"[scale] wrote {RESULTS}")
    return 0 if result["status"] == "ok" else 1


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def table(r: dict) -> str:
    gib = 2 ** 30
    out = [f"scale {r['config']}{' ' + ','.join(r['overrides']) if r['overrides'] else ''}: "
           f"{r['threads']} threads, {r['cpu']}, {r['date']}, load average {r['load_average'][0]:.1f}"]
    if r["status"] != "ok":
        out.append(f"FAILED: {r.get('reason')}")
    else:
        cc = r["compile_counts"]
        out.append(f"cold process -> prefill {r['lengths']} + {r['decode_steps']} decode steps each: "
                   f"{r['sequence_wall_s']:.1f} s total (goal <= 60 s)")
        out.append(f"  build {r['build_s']:.1f} s (quantize_ {r['quantize_s']:.1f} s)")
        for ph in r["phases"]:
            out.append(f"  prompt {ph['length']:4d}: prefill {ph['prefill_s']:8.2f} s, {r['decode_steps']} decode "
                       f"{ph['decode_s']:7.2f} s ({r['decode_steps'] / ph['decode_s']:.1f} tok/s), "
                       f"compiles {ph['compiles']}")
        out.append(f"calls that compiled: {cc['compiles']} (goal <= 2); graphs handed to lowbit {cc['graphs']}; "
                   f"dynamo unique graphs {r['dynamo_stats'].get('unique_graphs', '?')}")
        worker = r.get("worker_peak_rss", 0)
        out.append(f"peak RSS {r['peak_rss'] / gib:.2f} GiB vs budget {r['budget_bytes'] / gib:.2f} GiB "
                   f"(weights as held {r['held_bytes'] / gib:.2f} GiB + 1.5 GiB); compile worker peak "
                   f"{worker / gib:.2f} GiB (sum {(r['peak_rss'] + worker) / gib:.2f} GiB)")
    if "generation_tokens" in r:
        m = r.get("greedy_match")
        out.append(f"64-token greedy generation: {r['generation_s']:.1f} s, compiles {r['generation_compiles']}; "
                   + (f"matches eager for {m}/{len(r['generation_tokens'])} tokens" if m is not None
                      else f"eager reference failed: {r['eager_failure']}" if r.get("eager_failure")
                      else "not compared with eager (--no-eager)"))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
