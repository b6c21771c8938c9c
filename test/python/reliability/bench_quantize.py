"""Time `LowBitLinear.from_float` (what `quantize_` runs per layer) on one 5632x2048 layer:
the previous implementation (quant_v1_reference) vs the current one, side by side.

    python test/python/reliability/bench_quantize.py [--threads 2] [--repeats 3]

Cases: random fp32/bf16 weights (detection rejects, then quantization) and weights that are
already low-bit (detection succeeds, or fails only late: per-row ternary scales under a
per-tensor config). Prints median wall and process-CPU ms per layer.
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from torch import nn

import lowbit
from lowbit.quant import module as qmodule

import quant_v1_reference as ref

N, K = 5632, 2048


def weights():
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(N, K, generator=g) / K ** 0.5
    tern = torch.randint(-1, 2, (N, K), generator=g).float()
    yield "random fp32", rnd, lowbit.QuantConfig(weights="ternary", activations="int8")
    yield "random bf16", rnd.bfloat16(), lowbit.QuantConfig(weights="ternary", activations="int8")
    yield "random fp32 int4_sym g128", rnd, lowbit.QuantConfig(weights="int4_sym", group_size=128)
    yield "random fp32 int2_asym g64", rnd, lowbit.QuantConfig(weights="int2_asym", group_size=64)
    yield "ternary QAT, tensor scale", tern * 0.02, lowbit.QuantConfig(weights="ternary")
    yield "ternary QAT per-row, tensor cfg", tern * (torch.rand(N, 1, generator=g) * 0.05 + 0.01), \
        lowbit.QuantConfig(weights="ternary")
    yield "ternary QAT per-row, channel cfg", tern * (torch.rand(N, 1, generator=g) * 0.05 + 0.01), \
        lowbit.QuantConfig(weights="ternary", granularity="channel")


def timed(fn, repeats):
    """Median wall and process-CPU ms (CPU time is steadier on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"LowBitLinear.from_float, {N}x{K} (out x in), {args.threads} threads, median of {args.repeats}")
    print(f"{'case':34s} {'before wall/cpu ms':>20s} {'after wall/cpu ms':>20s} {'speedup (cpu)':>14s}")
    for name, w, cfg in weights():
        lin = nn.Linear(K, N, bias=False, dtype=w.dtype)
        lin.weight.data = w
        new = lambda: lowbit.LowBitLinear.from_float(lin, cfg)  # noqa: E731

        def old():
            with mock.patch.object(qmodule, "exact_representation", ref.exact_representation), \
                    mock.patch.object(qmodule, "quantize_weight", ref.quantize_weight), \
                    mock.patch.object(qmodule, "pack_codes", ref.pack_codes):
                return lowbit.LowBitLinear.from_float(lin, cfg)
        a, b = old(), new()
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
        (w_old, c_old), (w_new, c_new) = timed(old, args.repeats), timed(new, args.repeats)
        print(f"{name:34s} {w_old:10.1f} {c_old:9.1f} {w_new:10.1f} {c_new:9.1f} {c_old / c_new:13.1f}x",
              flush=True)


if __name__ == "__main__":
    main()
