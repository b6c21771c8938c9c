"""The README demo: a ternary (BitNet b1.58-style) Llama, eager vs compiled by lowbit.

Builds a small Llama-style model with deterministic weights, quantizes every linear layer
of the decoder blocks to ternary weights with int8 activations (`lowbit.quantize_`; the
embedding and output head stay fp32, as BitNet does), compiles it with
`torch.compile(model, backend="lowbit")`, and prints, side by side, eager fp32, eager
low-bit (the reference op) and compiled low-bit latencies for prefill and decode, how
closely the compiled logits follow eager, the weight memory, and the compiler's report.

    python examples/demo.py            # defaults: dim 1024, 2 layers, 2 threads
    python examples/demo.py --dim 2048 --layers 4 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import lowbit
from lowbit.models import LlamaConfig, make_tiny_llama, reset_caches


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if t.dtype != torch.bool)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prefill", type=int, default=32)
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)

    cfg = LlamaConfig(dim=args.dim, n_heads=args.dim // 64, n_kv_heads=max(1, args.dim // 256),
                      hidden_dim=args.dim * 8 // 3 // 64 * 64, n_layers=args.layers,
                      max_seq_len=args.prefill + args.decode + 1, vocab_size=4096)
    fp32 = make_tiny_llama(cfg, seed=0)
    model = copy.deepcopy(fp32)
    lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary", activations="int8"),
                     filter_fn=lambda mod, fqn: fqn.startswith("layers."))
    compiled = torch.compile(model, backend="lowbit")

    tokens = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    prefill_pos = torch.arange(args.prefill)
    print(f"lowbit demo: Llama-style, dim {cfg.dim}, {cfg.n_layers} layers, ternary weights + int8 "
          f"activations, {torch.get_num_threads()} threads, ISA {lowbit.runtime.current_isa()}")

    with torch.no_grad():
        t = time.perf_counter()
        reset_caches(model)
        compiled(tokens, prefill_pos)
        step = torch.tensor([args.prefill])
        compiled(tokens[:, -1:], step)
        print(f"compile (prefill + decode graphs): {time.perf_counter() - t:.1f} s")

        def run(m, n_decode):
            reset_caches(m)
            logits = [m(tokens, prefill_pos)[:, -1]]
            nxt = logits[-1].argmax(-1, keepdim=True)
            for i in range(n_decode):
                logits.append(m(nxt, torch.tensor([args.prefill + i]))[:, -1])
                nxt = logits[-1].argmax(-1, keepdim=True)
            return torch.cat(logits)

        eager_logits, compiled_logits = run(model, args.decode), run(compiled, args.decode)
        err = ((compiled_logits - eager_logits).abs().max() / eager_logits.abs().max()).item()
        same = bool((compiled_logits.argmax(-1) == eager_logits.argmax(-1)).all())

        rows = []
        for name, m in (("eager fp32", fp32), ("eager lowbit (reference op)", model), ("lowbit compiled", compiled)):
            reset_caches(m)
            prefill = median_ms(lambda: (reset_caches(m), m(tokens, prefill_pos)), 3)
            reset_caches(m)
            m(tokens, prefill_pos)
            decode = median_ms(lambda: m(tokens[:, -1:], step), 10)
            rows.append((name, prefill, decode))

    base_prefill, base_decode = rows[0][1], rows[0][2]
    print(f"\n{'':30s} {'prefill ' + str(args.prefill) + ' tok':>16s} {'decode 1 tok':>14s} {'vs eager fp32':>14s}")
    for name, prefill, decode in rows:
        print(f"{name:30s} {prefill:13.2f} ms {decode:11.2f} ms {base_decode / decode:12.2f}x")
    print(f"\nweights: fp32 {weight_bytes(fp32) / 2**20:.1f} MiB, lowbit {weight_bytes(model) / 2**20:.1f} MiB "
          f"(embedding and head stay fp32)")
    print(f"compiled vs eager lowbit logits: max rel. error {err:.2e}, same greedy tokens: {same}")
    print("\ncompiler report (lowbit.explain):")
    print(lowbit.explain(model))


if __name__ == "__main__":
    main()
