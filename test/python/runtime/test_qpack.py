"""lowbit_qpack (the fast packer) against an independent numpy packer written from the layout
in docs/kernels.md, byte for byte, on every format with N, K and K-block tails; and its speed
on a real layer shape."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.runtime import qgemm
from lowbit.runtime.qgemm import FORMAT_INFO

FMTS = sorted(qgemm.FORMATS)
BITS = {"ternary": 2, "int2_sym": 2, "int2_asym": 2, "int1": 1, "int4_sym": 4, "int4_asym": 4,
        "int8": 8}
OFFSET = {"ternary": 1, "int2_sym": 2, "int2_asym": 0, "int1": 1, "int4_sym": 8, "int4_asym": 0,
          "int8": 128}


def reference_pack(fmt, q, scale, group, zero, kblock):
    """docs/kernels.md 'Packed layout', written independently of the C++ code."""
    n, k = q.shape
    bits = BITS[fmt]
    a = 2 if fmt == "int1" else 1
    total, kbb, nbb, nkb = qgemm.packed_layout(fmt, n, k, kblock)
    out = np.zeros(total, dtype=np.uint8)
    r, c = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    r, c = r.ravel(), c.ravel()
    u = ((q.astype(np.int64).ravel() + OFFSET[fmt]) // a).astype(np.int64)
    nl, kl = r % 64, c % kblock
    j, i = nl // 16, (nl % 16) * 4 + kl % 4
    if bits == 2:
        byte, shift = (kl // 4) * 64 + i, 2 * j
    elif bits == 1:
        byte, shift = (kl // 8) * 64 + i, 4 * ((kl % 8) // 4) + j
    elif bits == 4:
        byte, shift = (kl // 4) * 128 + (j // 2) * 64 + i, 4 * (j % 2)
    else:
        byte, shift = (kl // 4) * 256 + 64 * j + i, 0 * j
    pos = (r // 64) * nbb + (c // kblock) * kbb + byte
    np.bitwise_or.at(out, pos, (u << shift).astype(np.uint8))
    codes = kblock // (8 if bits == 1 else 4) * {1: 64, 2: 64, 4: 128, 8: 256}[bits]
    ngroups = scale.shape[1]
    for row in range(n):
        for kb in range(nkb):
            g = 0 if ngroups == 1 else kb
            base = (row // 64) * nbb + kb * kbb + codes
            out[base + 4 * (row % 64): base + 4 * (row % 64) + 4] = np.array([scale[row, g]], np.float32).view(np.uint8)
            if FORMAT_INFO[fmt].zero_point:  # symmetric formats store no offsets (constant)
                offv = OFFSET[fmt] + int(zero[row, g])
                o = base + 256 + 4 * (row % 64)
                out[o:o + 4] = np.array([offv], np.int32).view(np.uint8)
    return out


def random_codes(rng, fmt, n, k):
    info = FORMAT_INFO[fmt]
    q = rng.integers(info.qmin, info.qmax + 1, size=(n, k)).astype(np.int8)
    if fmt == "int1":
        q[q == 0] = 1
    return q


@settings(max_examples=80, deadline=None, derandomize=True)
@given(fmt=st.sampled_from(FMTS), n=st.integers(1, 200), k=st.integers(1, 700),
       kb_steps=st.integers(1, 90), grouped=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_pack_matches_the_documented_layout_bytewise(fmt, n, k, kb_steps, grouped, seed):
    rng = np.random.default_rng(seed)
    kg = FORMAT_INFO[fmt].k_granule
    kblock = kb_steps * kg  # crosses the packer's 256-wide K chunks for larger values
    q = random_codes(rng, fmt, n, k)
    ngroups = -(-k // kblock) if grouped else 1
    group = kblock if grouped else k
    scale = (rng.random((n, ngroups)) + 0.1).astype(np.float32)
    zero = (rng.integers(0, FORMAT_INFO[fmt].qmax + 1, size=(n, ngroups)).astype(np.int8)
            if FORMAT_INFO[fmt].zero_point else None)
    pw = qgemm.pack_weight(torch.from_numpy(q), torch.from_numpy(scale), fmt, group=group,
                           zero=None if zero is None else torch.from_numpy(zero), kblock=kblock)
    ref = reference_pack(fmt, q, scale, group, zero, kblock)
    got = pw.data.numpy()
    if not np.array_equal(got, ref):
        bad = np.flatnonzero(got != ref)
        pytest.fail(f"{len(bad)} bytes differ, first at {bad[0]}: got {got[bad[0]]} want {ref[bad[0]]}")


@pytest.mark.parametrize("fmt", FMTS)
def test_pack_reads_rows_with_a_leading_dimension(fmt):
    rng = np.random.default_rng(1)
    n, k, ldq = 70, 300, 333
    full = random_codes(rng, fmt, n, ldq)
    full[:, k:] = 100  # out of range for most formats: must not be read
    q = np.ascontiguousarray(full[:, :k])
    scale = np.ones((n, 1), np.float32)
    zero = np.zeros((n, 1), np.int8) if FORMAT_INFO[fmt].zero_point else None
    total = qgemm.packed_layout(fmt, n, k, 100 if fmt != "int1" else 104)[0]
    kblock = 100 if fmt != "int1" else 104
    out = np.full(total, 0xAB, dtype=np.uint8)  # the packer must write every byte
    rc = qgemm._lib().lowbit_qpack(qgemm._format(fmt), full.ctypes.data, n, k, ldq,
                                   scale.ctypes.data, k, None if zero is None else zero.ctypes.data,
                                   kblock, out.ctypes.data)
    assert rc == 0
    assert np.array_equal(out, reference_pack(fmt, q, scale, k, zero, kblock))


def test_failed_pack_writes_nothing():
    q = np.zeros((130, 64), np.int8)
    q[129, 63] = 2  # last code out of the ternary range
    out = np.full(qgemm.packed_layout("ternary", 130, 64, 64)[0], 7, np.uint8)
    s = np.ones(130, np.float32)
    rc = qgemm._lib().lowbit_qpack(1, q.ctypes.data, 130, 64, 64, s.ctypes.data, 64, None, 64,
                                   out.ctypes.data)
    assert rc == -qgemm.E_QRANGE and (out == 7).all()


def test_pack_is_fast_for_a_2560x6912_layer(capsys):
    # Whole 1-3B models are packed at load time: 6912x2560 (a 3B MLP layer) must take
    # milliseconds, not the ~200 ms of the old per-code loop.
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.integers(-1, 2, size=(6912, 2560)).astype(np.int8))
    scale = torch.rand(6912) + 0.5
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        qgemm.pack_weight(q, scale, "ternary")
        times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    with capsys.disabled():
        print(f"\npack_weight ternary 6912x2560: {ms:.1f} ms (median of 5; min {1e3 * min(times):.1f})")
    assert ms < 100, f"{ms:.1f} ms"
