"""Forcing a kernel ISA in-process, shared by the runtime tests of the low-bit and dense tiles."""
from __future__ import annotations

import contextlib
import threading

import torch

from lowbit.runtime import brgemm, current_isa, qgemm, set_isa


@contextlib.contextmanager
def use_isa(name: str):
    """Force an ISA; `amx` also runs AMX tiles from one row and any K-block / k (by default
    the int8 tiles only from qgemm.amx_min_rows() rows and qgemm.amx_min_kblock() values, the
    dense bf16 BRGEMM from brgemm.amx_min_rows() rows and brgemm.amx_min_k()), so every shape
    of a test reaches the AMX path."""
    prev = current_isa()
    set_isa(name)
    rule = None
    if name == "amx":
        rule = (qgemm.amx_min_rows(1), qgemm.amx_min_kblock(1), brgemm.amx_min_rows(1), brgemm.amx_min_k(1))
    try:
        yield
    finally:
        if rule is not None:
            qgemm.amx_min_rows(rule[0])
            qgemm.amx_min_kblock(rule[1])
            brgemm.amx_min_rows(rule[2])
            brgemm.amx_min_k(rule[3])
        set_isa(prev)


def tile_isa(isa: str, int8_activations: bool = True) -> str:
    """The path a tile dispatched under `isa` runs: AMX has int8 tiles only."""
    return "avx512" if isa == "amx" and not int8_activations else isa


def dense_isa(isa: str, dtype: torch.dtype) -> str:
    """The path a dense BRGEMM dispatched under use_isa(isa) runs: AMX has bf16 tiles only
    (fp32 stays on AVX-512), and bf16 without AVX512_BF16 runs on AVX2."""
    if isa == "amx" and dtype == torch.float32:
        return "avx512"
    if isa == "avx512" and dtype == torch.bfloat16 and not brgemm.native_bf16():
        return "avx2"
    return isa


def mismatches_on_threads(call, ref: torch.Tensor, between=None, threads: int = 2, reps: int = 10) -> list[float]:
    """Runs call(y) `reps` times on each of `threads` threads at once, y a fresh NaN array shaped
    like `ref` (and `between()` after every call); returns max |y - ref| of every call whose
    y differs from `ref`."""
    bad = []

    def work():
        for _ in range(reps):
            y = torch.full(ref.shape, float("nan"))
            call(y)
            if between is not None:
                between()
            if not torch.equal(y, ref):
                bad.append(float((y - ref).abs().max()))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return bad
