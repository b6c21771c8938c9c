"""Shared checks of the client-library tests: compile, compare with eager, read `explain`.

Tolerance (docs/clients.md, "Numerics"): lowbit multiplies by codes x the model's own scales
(within the rounding `u_d` of the model's dequant dtype), accumulating in fp32, so
`max |compiled - eager| <= 8 u_d sqrt(K) max |eager|` (plus one bf16 rounding of the output,
2^-7 max |eager|, for bf16 activations).
"""
from __future__ import annotations

import math
import time
import warnings

import torch

import lowbit
from lowbit.compiler.dequant_match import UNIT_ROUNDOFF
from lowbit.compiler.partition import UnsupportedOpWarning, forget_warnings


def compile_and_compare(model, inputs, *, dequant_dtype, k_max, act_dtype=torch.float32, calls=2):
    """Compile `model` with lowbit, check every call against eager; returns (report, seconds)."""
    torch._dynamo.reset()
    forget_warnings()
    compiled = torch.compile(model, backend="lowbit")
    with torch.no_grad():
        ref = model(*inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnsupportedOpWarning)  # an eager fallback would compare eager with eager
            start = time.perf_counter()
            out = compiled(*inputs)
            seconds = time.perf_counter() - start
            for _ in range(calls - 1):
                out = compiled(*inputs)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    u = UNIT_ROUNDOFF[dequant_dtype]
    scale = ref.abs().max().item()
    tol = 8 * u * math.sqrt(k_max) * scale + (2 ** -7 * scale if act_dtype == torch.bfloat16 else 0) + 1e-6 * scale
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol, f"max |compiled - eager| = {err:.3g} > {tol:.3g} (max |eager| {scale:.3g})"
    return lowbit.explain(model), seconds


def recognized(report, count=None, fmt=None):
    """The report's recognized matmuls (at least one; `count` exactly; each format `fmt`)."""
    rows = [e for e in report.matmuls() if str(e.get("result", "")).startswith("recognized")]
    assert rows, f"no matmul recognized:\n{report}"
    if count is not None:
        assert len(rows) == count, f"expected {count} recognized matmuls:\n{report}"
    if fmt is not None:
        for e in rows:
            assert e["format"].startswith(fmt), f"expected {fmt}:\n{report}"
    return rows
