"""Reductions and elementwise ops over empty and odd shapes compile and match eager (issue 13).

`x.sum(-1)` of a `[5, 0]` tensor segfaulted lowbit-vectorize (a 0-lane vector; contained by
the compile worker, the op ran in eager with a warning); with that fixed, the compiled code
crashed the process at run time, because a `memref<5x0xf32>` argument made MLIR keep the
descriptor calling convention while the JIT passes bare pointers (lowbit-empty-memref-args).
Here every case must compile (no fallback warning) and give eager's result.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import lowbit  # noqa: F401  (registers the backend)
from lowbit.compiler.partition import forget_warnings

SHAPES = [(5, 0), (2, 0, 3), (0, 5), (0,), (3, 0, 0), (1, 1), (7, 3), (5, 17), (2, 65, 3), (3, 129)]
OPS = {
    "sum(-1)": lambda x: x.sum(-1),
    "sum(0)": lambda x: x.sum(0),
    "sum(1)": lambda x: x.sum(1) if x.dim() > 1 else x.sum(0),
    "sum()": lambda x: x.sum(),
    "mean(-1)": lambda x: x.mean(-1),
    "amax(-1) (nonempty)": lambda x: x.amax(-1) if x.shape[-1] else x.sum(-1),
    "prod(-1)": lambda x: x.prod(-1),
    "sum(-1, keepdim) * 2 + x": lambda x: x.sum(-1, keepdim=True) * 2 + x,
    "exp + 1": lambda x: torch.exp(x) + 1,
    "square sum over (0, -1)": lambda x: (x * x).sum((0, -1)) if x.dim() > 1 else (x * x).sum(),
}


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    forget_warnings()
    yield
    torch._dynamo.reset()


def _compiled_matches(fn, x):
    compiled = torch.compile(fn, backend="lowbit", dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(x)
    fallbacks = [str(w.message) for w in caught if "lowbit" in str(w.message)]
    assert not fallbacks, fallbacks
    want = fn(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1, x.numel()), equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", sorted(OPS))
def test_matches_eager(shape, op):
    torch.manual_seed(0)
    _compiled_matches(OPS[op], torch.randn(*shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(5, 0), (2, 0, 3), (0, 4)], ids=str)
def test_empty_sum_other_dtypes(shape, dtype):
    x = torch.randint(-5, 5, shape).to(dtype)
    _compiled_matches(lambda t: t.sum(-1), x)
