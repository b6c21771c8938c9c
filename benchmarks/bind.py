"""Weight binding at BitNet-b1.58-2B4T width: how long `bind_weights` takes per compile.

    python benchmarks/bind.py                         # 4 layers, vocab 32000, 3 rounds
    python benchmarks/bind.py --layers 2,4 --vocab 128256 --rounds 3
    python benchmarks/bind.py --layers 30 --vocab 128256 --rounds 1 --variants code-table

The model is `lowbit.hf.make_bitnet` with the 2B4T width (hidden 2560, ffn 6912, 20/5 heads,
transformers' `BitLinear`: uint8-packed ternary codes unpacked in the forward) and random
weights. Each run is a fresh process (`LOWBIT_CACHE=0`, nothing shared): build the model, run
it eagerly once, then `lowbit.hf.compile` and one forward of a 7-token prompt
(`use_cache=False`); it records the seconds inside `bind_weights` (summed over the graph's
bindings), the compile's first call, the compiled logits' largest difference from eager's,
and a sha256 of every tensor binding derived (the packed layers, in order).

Variants (run interleaved, the order alternating between rounds; medians are reported):

- `code-table`: the tree as it is. A weight computed elementwise from 8-bit integer codes is
  proven low-bit on the table of its codes (`compiler/code_table.py`), and `act_quant` probes
  the packed scale where binding saw the first non-zero code; binding runs on one intra-op
  thread.
- `code-table-pool`: the same, with binding's ops on torch's intra-op pool (all threads).
- `full-proof`: the tree with all three switched off in the child process, i.e. binding as
  before 2026-11-30 (every weight evaluated in fp32 and searched element by element by
  `find_exact_format`; `act_quant` unpacks each packed layer and lists its non-zeros; torch's
  thread pool).

All variants must derive the same bytes (the digest) and the same logits: the table proof
recognises exactly what the full proof does. Prints a table and appends a record to
benchmarks/results/bind.json.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bind.json"
VARIANTS = ("code-table", "code-table-pool", "full-proof")
WIDTH = dict(hidden_size=2560, intermediate_size=6912, num_attention_heads=20, num_key_value_heads=5,
             max_position_embeddings=128, rope_theta=500000.0)


def _cpu() -> str:
    """Model name with family and model number ("AMD EPYC (family 26 model 2)": Zen 5)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def _child(variant: str, layers: int, vocab: int) -> dict:
    os.environ["LOWBIT_CACHE"] = "0"
    import torch
    from lowbit import hf
    import lowbit.compiler.bind as bind
    import lowbit.compiler.code_table as code_table
    import lowbit.compiler.partition as partition

    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}")
    if variant == "full-proof":
        code_table.prove_per_tensor_ternary = lambda *a, **k: None
        bind._first_nonzero = lambda q, rows=16: None
    if variant in ("full-proof", "code-table-pool"):
        bind._one_intra_op_thread = contextlib.nullcontext

    t0 = time.perf_counter()
    model = hf.make_bitnet(hf.bitnet_config(vocab_size=vocab, num_hidden_layers=layers, **WIDTH), seed=0)
    build_s = time.perf_counter() - t0
    ids = torch.randint(3, vocab, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits

    bindings = []
    original = partition.bind_weights

    def timed_bind(*args, **kwargs):
        result = original(*args, **kwargs)
        bindings.append(result)
        return result

    partition.bind_weights = timed_bind
    hf.compile(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    first_call_s = time.perf_counter() - t0
    digest = hashlib.sha256()
    layers_bound = 0
    for b in bindings:
        layers_bound += len(b.layers)
        for t in b.derived:
            digest.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    formats = sorted({e.get("format", "") for b in bindings for e in b.report if e.get("result") == "recognized"})
    return dict(variant=variant, layers=layers, vocab=vocab, threads=torch.get_num_threads(),
                build_s=round(build_s, 2), bind_s=round(sum(b.seconds for b in bindings), 3),
                first_call_s=round(first_call_s, 2), bound_layers=layers_bound, formats=formats,
                max_abs_diff=float((got - ref).abs().max()), digest=digest.hexdigest()[:16],
                load_before=os.getloadavg()[0])


def _run(variant: str, layers: int, vocab: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--layers", str(layers), "--vocab", str(vocab)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} ({layers} layers) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="4", help="comma-separated layer counts (default 4)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (2B4T: 128256; default 32000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    ap.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/bind.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, int(args.layers), args.vocab)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    sizes = [int(x) for x in args.layers.split(",")]
    runs: list[dict] = []
    for r in range(args.rounds):
        for layers in sizes:
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                res = _run(v, layers, args.vocab, args.timeout)
                res["round"] = r
                runs.append(res)
                print(f"  round {r} {v:15s} {layers:2d} layers: bind {res['bind_s']:7.2f} s  first call "
                      f"{res['first_call_s']:7.2f} s  load {res['load_before']:.1f}", file=sys.stderr)

    rows = []
    for layers in sizes:
        for v in variants:
            mine = [x for x in runs if x["layers"] == layers and x["variant"] == v]
            rows.append(dict(layers=layers, variant=v, runs=len(mine),
                             bind_s_median=round(statistics.median(x["bind_s"] for x in mine), 2),
                             bind_s_min=min(x["bind_s"] for x in mine),
                             first_call_s_median=round(statistics.median(x["first_call_s"] for x in mine), 2),
                             bound_layers=mine[0]["bound_layers"], formats=mine[0]["formats"],
                             digests=sorted({x["digest"] for x in mine}),
                             max_abs_diff=max(x["max_abs_diff"] for x in mine)))
    print(f"\nbind_weights, BitNet 2B4T width, vocab {args.vocab}; CPU {_cpu()}, "
          f"{runs[0]['threads']} threads, load average {min(x['load_before'] for x in runs):.1f}-"
          f"{max(x['load_before'] for x in runs):.1f}; medians of {args.rounds} interleaved rounds")
    print(f"{'layers':>6} {'variant':>15} {'bind s':>8} {'per layer':>9} {'first call s':>12} "
          f"{'bound':>5} {'digest':>17} {'|compiled-eager|':>16}")
    for row in rows:
        per = row["bind_s_median"] / row["layers"]
        print(f"{row['layers']:>6} {row['variant']:>15} {row['bind_s_median']:>8.2f} {per:>9.2f} "
              f"{row['first_call_s_median']:>12.2f} {row['bound_layers']:>5} {','.join(row['digests']):>17} "
              f"{row['max_abs_diff']:>16.2e}")
    for layers in sizes:
        digests = {d for row in rows if row["layers"] == layers for d in row["digests"]}
        if len(digests) > 1:
            print(f"WARNING: {layers} layers: the variants derived different bytes {sorted(digests)}")
    if not args.no_save:
        record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      cpu=_cpu(), threads=runs[0]["threads"], vocab=args.vocab, rounds=args.rounds,
                      rows=rows, runs=runs)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        history = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        history.append(record)
        RESULTS.write_text(json.dumps(history, indent=1) + "\n")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
