"""torch-mlir lowering faults fixed by lowbit's decompositions (compiler/decompositions.py),
checked against eager through torch.compile(backend="lowbit") on small tensors.

* Integer floor division went through float64: (2**63 - 1) // 2**30 gave 8589934592.
* 8-bit integer matrix products (mm, bmm, mv, dot, addmm, matmul) and every zero-K product
  killed the process with SIGSEGV inside torch-mlir's torch-to-linalg conversion. Those run
  in a subprocess, so a regression fails one test instead of killing pytest.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

I64_MAX, I64_MIN = 2**63 - 1, -(2**63)


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="lowbit", dynamic=False)


def edge_values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    info = torch.iinfo(dtype)
    g = torch.Generator().manual_seed(seed)
    fixed = [info.max, info.min + 1, info.max - 1, info.min + 2, 0, 1, -1, 7, -7]
    rnd = torch.randint(info.min + 1, info.max, (n - len(fixed),), generator=g, dtype=torch.int64)
    return torch.cat([torch.tensor(fixed, dtype=torch.int64), rnd]).to(dtype)


def divisors(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Non-zero divisors of every sign and size (no -1 with INT_MIN: eager overflows too)."""
    info = torch.iinfo(dtype)
    g = torch.Generator().manual_seed(seed)
    fixed = [2**30 if info.bits == 64 else 3, -2, 2, 1, -1, 3, -5, info.max, info.min + 1]
    d = torch.randint(1, 2**min(info.bits - 2, 40), (n - len(fixed),), generator=g, dtype=torch.int64)
    sign = torch.where(torch.rand(d.shape, generator=g) < 0.5, -1, 1)
    return torch.cat([torch.tensor(fixed, dtype=torch.int64), d * sign]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_integer_floor_division_is_exact(dtype):
    def f(x, y):
        return (torch.div(x, y, rounding_mode="floor"), x // y, torch.floor_divide(x, y),
                x // 1073741824 if dtype == torch.int64 else x // 3, x // -7,
                torch.div(x, y, rounding_mode="trunc"), torch.remainder(x, y))

    x, y = edge_values(dtype, 40, 1), divisors(dtype, 40, 2)
    want = f(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an eager fallback would hide a lowering fault
        got = compiled(f)(x, y)
    for i, (g_, w) in enumerate(zip(got, want)):
        assert g_.dtype == w.dtype and torch.equal(g_, w), (i, g_.tolist(), w.tolist())


def test_the_reported_case():
    x = torch.tensor([I64_MAX, I64_MAX - 1, I64_MIN + 1], dtype=torch.int64)
    got = compiled(lambda t: t // 2**30)(x)
    assert got.tolist() == [8589934591, 8589934591, -8589934592]


def test_float_floor_division_is_untouched():
    x, y = torch.randn(17) * 100, torch.randn(17)
    f = lambda a, b: (torch.div(a, b, rounding_mode="floor"), a // 3.0)  # noqa: E731
    for g_, w in zip(compiled(f)(x, y), f(x, y)):
        assert torch.equal(g_, w)


PRODUCTS = r'''
import sys, warnings, torch, lowbit
warnings.simplefilter("ignore")
g = torch.Generator().manual_seed(0)

def ints(shape, dtype):
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)

def floats(shape, dtype):
    return torch.randn(shape, generator=g).to(dtype)

cases = []
for dtype in (torch.int8, torch.uint8):
    for k in (0, 1, 7, 300):            # 300 * 127 * 127 wraps int16; the int8 result wraps mod 256
        cases += [
            (f"mm {dtype} K={k}", torch.mm, (ints((3, k), dtype), ints((k, 5), dtype))),
            (f"bmm {dtype} K={k}", torch.bmm, (ints((2, 3, k), dtype), ints((2, k, 4), dtype))),
            (f"mv {dtype} K={k}", torch.mv, (ints((3, k), dtype), ints((k,), dtype))),
            (f"dot {dtype} K={k}", torch.dot, (ints((k,), dtype), ints((k,), dtype))),
            (f"matmul3d {dtype} K={k}", torch.matmul, (ints((2, 3, k), dtype), ints((k, 5), dtype))),
        ]
    cases.append((f"addmm {dtype}", torch.addmm, (ints((3, 5), dtype), ints((3, 6), dtype), ints((6, 5), dtype))))
for dtype in (torch.float32, torch.bfloat16, torch.int32, torch.int64):
    make = floats if dtype.is_floating_point else ints
    cases += [
        (f"mm {dtype} K=0", torch.mm, (make((3, 0), dtype), make((0, 5), dtype))),
        (f"bmm {dtype} K=0", torch.bmm, (make((2, 3, 0), dtype), make((2, 0, 4), dtype))),
        (f"matmul {dtype} K=0", torch.matmul, (make((4, 0), dtype), make((0,), dtype))),
    ]
only = sys.argv[1] if len(sys.argv) > 1 else None
for name, fn, args in cases:
    if only and only not in name:
        continue
    print("START", name, flush=True)
    torch._dynamo.reset()
    want = fn(*args)
    with torch.no_grad():
        got = torch.compile(fn, backend="lowbit", dynamic=False)(*args)
    ok = got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    print("OK" if ok else "WRONG", name, "" if ok else (got.flatten()[:8].tolist(), want.flatten()[:8].tolist()),
          flush=True)
'''


@pytest.mark.parametrize("which", ["torch.int8", "torch.uint8", "K=0"])
def test_byte_integer_and_zero_k_products_match_eager_without_crashing(which):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PRODUCTS), which], capture_output=True,
                          text=True, timeout=1200, env=dict(os.environ, LOWBIT_NUM_THREADS="1"))
    lines = proc.stdout.splitlines()
    started = [line[6:] for line in lines if line.startswith("START ")]
    assert started, proc.stderr[-3000:]
    assert proc.returncode == 0, f"process died ({proc.returncode}) in case {started[-1]!r}: {proc.stderr[-2000:]}"
    wrong = [line for line in lines if line.startswith("WRONG")]
    assert not wrong, wrong
    assert sum(line.startswith("OK") for line in lines) == len(started)


RECIPROCAL = r'''
import warnings, torch, lowbit
warnings.simplefilter("error", UserWarning)   # an eager fallback would hide the fault
cases = [
    torch.tensor([-8.0, 6.0, 0.0, -0.0, 5.0, float("nan"), float("inf"), -float("inf"), 1e-38, 3e38]),
    torch.tensor([3.0, 0.0, -0.0, 1e-30, 0.1]).bfloat16(),
    torch.tensor([-8, 6, 0, 5, -1]),
    torch.tensor([3, 0, -2], dtype=torch.int32),
    torch.tensor([True, False]),
]
for x in cases:
    print("START", x.dtype, flush=True)
    torch._dynamo.reset()
    want = torch.reciprocal(x)
    got = torch.compile(torch.reciprocal, backend="lowbit", dynamic=False)(x)
    same = got.dtype == want.dtype and torch.equal(got.isnan(), want.isnan()) \
        and torch.equal(torch.nan_to_num(got), torch.nan_to_num(want)) \
        and torch.equal(torch.signbit(got), torch.signbit(want))
    print("OK" if same else "WRONG", x.dtype, got.tolist(), want.tolist(), flush=True)
'''


def test_reciprocal_of_zero_is_inf_not_an_abort():
    """torch-mlir's reciprocal asserted x != 0 at run time: SIGABRT ("unimplemented: tensor with
    zero element") at the first call whose input held a zero; eager gives +-inf."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(RECIPROCAL)], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, LOWBIT_NUM_THREADS="1"))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, (proc.returncode, lines[-1:], proc.stderr[-2000:])
    assert sum(line.startswith("OK") for line in lines) == 5, proc.stdout


VARIANCE = r'''
import warnings, torch, lowbit
warnings.simplefilter("error", UserWarning)
g = torch.Generator().manual_seed(0)
x32 = torch.randn(6, 37, generator=g) * 3 + 1
fns = {
    "var": lambda t: torch.var(t, dim=1),
    "var_unbiased0": lambda t: torch.var(t, dim=0, correction=0, keepdim=True),
    "std": lambda t: torch.std(t, dim=1),
    "var_mean": lambda t: torch.var_mean(t, dim=1),
    "var_all": lambda t: torch.var(t),
}
for dtype in (torch.bfloat16, torch.float16):
    x = x32.to(dtype)
    for name, fn in fns.items():
        print("START", name, dtype, flush=True)
        torch._dynamo.reset()
        want = fn(x)
        got = torch.compile(fn, backend="lowbit", dynamic=False)(x)
        want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
        # eager accumulates in fp32 and rounds once: allow one ulp of the narrow type
        ok = all(g_.dtype == w.dtype and torch.allclose(g_.float(), w.float(), rtol=2 * torch.finfo(dtype).eps, atol=0)
                 for g_, w in zip(got, want))
        print("OK" if ok else "WRONG", name, dtype, got[0].float().reshape(-1)[:3].tolist(),
              want[0].float().reshape(-1)[:3].tolist(), flush=True)
'''


def test_narrow_float_variance_compiles_and_matches():
    """var/std/var_mean of bf16/fp16 went through f64 and needed __truncdfbf2, which the JIT
    cannot resolve: SIGSEGV after "JIT session error: Symbols not found"."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(VARIANCE)], capture_output=True, text=True,
                          timeout=1200, env=dict(os.environ, LOWBIT_NUM_THREADS="1"))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, (proc.returncode, lines[-1:], proc.stderr[-2000:])
    wrong = [line for line in lines if line.startswith("WRONG")]
    assert not wrong and sum(line.startswith("OK") for line in lines) == 10, proc.stdout
