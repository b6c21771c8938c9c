"""AVX-512 panel tiles (runtime/native/src/qgemm_panel_avx512.cpp) against the register tiles.

Tiles of int8 activations x 1-/2-/4-bit codes with at least qgemm.panel_min_rows() rows and
K-blocks of at least qgemm.panel_min_kblock() values decode the codes once per pass into an L1
panel. They share the register tiles' flush and epilogue, so
their outputs must equal the register tiles' bit for bit on every format, epilogue, tail,
K-block and stride; the integer part must be exact. Needs AVX-512 VNNI; skipped elsewhere.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from lowbit.runtime import qgemm, supported_isas
from isa_paths import mismatches_on_threads, use_isa
from test_qgemm import GuardedArena, random_codes, random_zero

pytestmark = pytest.mark.skipif("avx512" not in supported_isas(),
                                reason="this CPU lacks AVX-512 VNNI; the panel tiles cannot run here")

PANEL_FMTS = ["int1", "int2_asym", "int2_sym", "int4_asym", "int4_sym", "ternary"]  # 1-/2-/4-bit


@contextlib.contextmanager
def panel_rule(rule: str):
    old = qgemm.panel_rule(rule)
    try:
        yield
    finally:
        qgemm.panel_rule(old)


@contextlib.contextmanager
def panel_rows(rows: int):
    """Dispatch under the AVX-512 ISA with panel_min_rows() = rows, every K-block length
    allowed and the panel rule "always" (1: every 1-/2-/4-bit int8 tile takes the panel; a
    huge value: none does)."""
    old = qgemm.panel_min_rows(rows), qgemm.panel_min_kblock(1)
    try:
        with use_isa("avx512"), panel_rule("always"):
            yield
    finally:
        qgemm.panel_min_rows(old[0])
        qgemm.panel_min_kblock(old[1])


def run(rows, pw, xq, sx, rs, m, *, c_dtype=torch.float32, bias=None, beta=False, activation=None,
        per_block=False, c_in=None, lda=None):
    """One tile through the public API; returns (C, whether the panel path ran)."""
    with panel_rows(rows):
        kern = qgemm.dispatch_for(pw, m, c_dtype=c_dtype, bias=bias is not None, beta=beta,
                                  activation=activation, per_block_act_scale=per_block)
        y = c_in.clone() if c_in is not None else torch.full((m, pw.n), float("nan")).to(c_dtype)
        before = qgemm.panel_invocations()
        kern(xq, pw.data, y, count=pw.num_kblocks, a_scale=sx, a_sum=rs, bias=bias)
        ran = qgemm.panel_invocations() > before
    assert kern.isa == "avx512"
    return y, ran


def packed(gen, fmt, n, k, group):
    q = random_codes(gen, fmt, n, k)
    ngroups = -(-k // group) if group else 1
    zero = random_zero(gen, fmt, n, ngroups)
    scale = torch.rand(n, ngroups, generator=gen) + 0.05
    pw = qgemm.pack_weight(q, scale if group else scale[:, 0], fmt, group=group,
                           zero=zero if zero is None or group else zero[:, :1])
    return q, scale, zero, pw


@pytest.mark.parametrize("fmt", PANEL_FMTS)
@pytest.mark.parametrize("m,n,k,group", [
    (2, 64, 256, None),       # two rows, one full panel
    (6, 17, 8, None),         # one row block; K far below a panel; N tail
    (15, 130, 260, None),     # 2 blocks + 3 rows; a second panel of one sub-step
    (47, 65, 520, 128),       # per-group scales: 5 K-blocks, the last one short
    (64, 100, 1000, None),    # 4 panels, the last not full
    (127, 70, 72, None),      # 21 blocks of 6 rows + a 1-row tail
    (250, 66, 6912 // 8, None),  # two passes of 126 + 124 rows
], ids=["m2", "m6_k8", "m15_k260", "m47_groups", "m64_k1000", "m127", "m250"])
def test_panel_equals_register_tiles_bitwise(fmt, m, n, k, group):
    if fmt == "int1" and k % 8:
        k += 8 - k % 8
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    q, scale, zero, pw = packed(gen, fmt, n, k, group)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen)
    for per_block in ((False, True) if group is None else (False,)):
        if per_block and k % 32 == 0:
            pw = qgemm.pack_weight(q, scale[:, 0], fmt, zero=None if zero is None else zero[:, :1], kblock=32)
        xq, sx, rs = qgemm.quantize_activations(x, pw.kblock, per_block=per_block)
        for c_dtype, act, beta in ((torch.float32, None, False), (torch.bfloat16, "silu", True),
                                   (torch.float32, "relu2", True), (torch.bfloat16, "relu", False)):
            c_in = (torch.randn(m, n, generator=gen) * 3).to(c_dtype) if beta else None
            kw = dict(c_dtype=c_dtype, bias=bias, beta=beta, activation=act, per_block=per_block, c_in=c_in)
            y_panel, ran = run(1, pw, xq, sx, rs, m, **kw)
            y_reg, ran_reg = run(1 << 40, pw, xq, sx, rs, m, **kw)
            assert ran and not ran_reg
            bits = torch.int16 if c_dtype == torch.bfloat16 else torch.int32  # -0 and +0 differ
            assert torch.equal(y_panel.view(bits), y_reg.view(bits)), \
                (fmt, c_dtype, act, beta, per_block, float((y_panel.float() - y_reg.float()).abs().max()))


@pytest.mark.parametrize("fmt", PANEL_FMTS)
@pytest.mark.parametrize("m,n,k,lda_pad", [(32, 64, 4096, 0), (45, 129, 2056, 37), (121, 64, 320, 4)])
def test_panel_integer_sums_exact(fmt, m, n, k, lda_pad):
    """Unit scales, the int8 corners (-128 included), padded activation rows: the sums equal
    fp64's exactly (|sum| < 2^24)."""
    gen = torch.Generator().manual_seed(k + lda_pad)
    q = random_codes(gen, fmt, n, k)
    zero = random_zero(gen, fmt, n, 1)
    pw = qgemm.pack_weight(q, torch.ones(n), fmt, zero=zero)
    lda = pw.k_padded + lda_pad
    xq = torch.tensor([-128, 127, -1, 3], dtype=torch.int8)[torch.randint(0, 4, (m, lda), generator=gen)]
    xq[:, k:pw.k_padded] = 0
    rs = xq[:, :k].to(torch.int32).sum(1, keepdim=True, dtype=torch.int32)
    with panel_rows(1):
        kern = qgemm.QGemmKernel(fmt, torch.int8, torch.float32, m, n, pw.kblock, lda=lda,
                                 ldb=pw.nblock_bytes, ldc=n, stride_a=pw.kblock,
                                 stride_b=pw.kblock_bytes, ld_aux=1)
        y = torch.full((m, n), float("nan"))
        before = qgemm.panel_invocations()
        kern(xq, pw.data, y, count=1, a_scale=torch.ones(m), a_sum=rs)
        assert qgemm.panel_invocations() == before + 1
    w = q.to(torch.float64) - (zero.to(torch.float64) if zero is not None else 0)
    assert torch.equal(y.to(torch.float64), xq[:, :k].to(torch.float64) @ w.T)


def test_dispatch_rule():
    """The panel runs int8 tiles of 1-/2-/4-bit codes from panel_min_rows() rows and K-blocks
    of panel_min_kblock() values; fewer rows, shorter K-blocks, 8-bit codes and fp activations
    keep the register tiles."""
    before = qgemm.panel_invocations()
    rows, kmin = qgemm.panel_min_rows(), qgemm.panel_min_kblock()
    assert rows >= 1 and kmin >= 4

    def takes_panel(fmt, m, a_dtype=torch.int8, group=None, rule="always"):
        zero = torch.ones(64, 1, dtype=torch.int8) if qgemm.FORMAT_INFO[fmt].zero_point else None
        k = 512
        if group:
            zero = None if zero is None else zero.expand(64, k // group).contiguous()
        pw = qgemm.pack_weight(torch.ones(64, k, dtype=torch.int8),
                               torch.ones(64, k // group) if group else torch.ones(64), fmt,
                               group=group, zero=zero)
        xa = torch.ones(m, pw.k_padded, dtype=a_dtype)
        kw = dict(a_scale=torch.ones(m), a_sum=torch.full((m, pw.num_kblocks), pw.kblock, dtype=torch.int32)) \
            if a_dtype == torch.int8 else {}
        with use_isa("avx512"), panel_rule(rule):
            kern = qgemm.dispatch_for(pw, m, a_dtype=a_dtype)
            n0 = qgemm.panel_invocations()
            kern(xa, pw.data, torch.empty(m, 64), count=pw.num_kblocks, **kw)
            return qgemm.panel_invocations() > n0

    assert takes_panel("ternary", rows) and takes_panel("int1", rows) and takes_panel("int4_sym", rows)
    assert not takes_panel("int8", rows)
    assert not takes_panel("ternary", rows, torch.float32)
    if rows > 1:
        assert not takes_panel("ternary", rows - 1)
    assert takes_panel("int2_asym", rows, group=kmin) and not takes_panel("int2_asym", rows, group=kmin // 2)
    old = qgemm.panel_min_rows(3), qgemm.panel_min_kblock(64)
    try:
        assert old == (rows, kmin) and qgemm.panel_min_rows() == 3 and qgemm.panel_min_kblock() == 64
        assert takes_panel("int2_asym", 3) and not takes_panel("int2_asym", 2)
        assert takes_panel("int4_asym", 3, group=64) and not takes_panel("int4_asym", 3, group=32)
    finally:
        qgemm.panel_min_rows(old[0])
        qgemm.panel_min_kblock(old[1])
    with pytest.raises(ValueError, match="panel_min_rows"):
        qgemm.panel_min_rows(0)
    with pytest.raises(ValueError, match="panel_min_kblock"):
        qgemm.panel_min_kblock(-1)
    assert qgemm.panel_invocations() > before
    for fmt in PANEL_FMTS:  # past both thresholds, the rule decides
        assert not takes_panel(fmt, rows, rule="never")
        measured = qgemm.panel_speedup(qgemm.FORMAT_INFO[fmt].bits) > 1
        assert takes_panel(fmt, rows, rule="measured") == measured, fmt


def test_panel_rule_and_speedup():
    """The rule is "measured" unless set; the speedup of each code width is measured once per
    process (the same value every time), positive and finite; bad values are refused."""
    assert qgemm.panel_rule() == "measured"
    with use_isa("avx512"):
        speedups = {bits: qgemm.panel_speedup(bits) for bits in (1, 2, 4)}
        assert all(0 < s < 100 for s in speedups.values()), speedups
        assert speedups == {bits: qgemm.panel_speedup(bits) for bits in (1, 2, 4)}
        with pytest.raises(ValueError, match="8-bit"):
            qgemm.panel_speedup(8)
    with panel_rule("never"):
        assert qgemm.panel_rule() == "never"
        assert qgemm.panel_rule("always") == "never" and qgemm.panel_rule() == "always"
        with pytest.raises(ValueError, match="unknown panel rule 'fast'"):
            qgemm.panel_rule("fast")
        assert qgemm._lib().lowbit_qgemm_panel_rule(3) < 0 and qgemm.panel_rule() == "always"
    assert qgemm.panel_rule() == "measured"
    if "avx2" in supported_isas():
        with use_isa("avx2"), pytest.raises(RuntimeError, match="AVX-512 ISA; this process runs avx2"):
            qgemm.panel_speedup(2)


def test_panel_speedup_measured_once_across_threads():
    """Threads asking for a width's first measurement at once all get the one measured value
    (a fresh process: this one has measured already)."""
    code = (
        "import threading\n"
        "from lowbit.runtime import qgemm\n"
        "out = []\n"
        "ts = [threading.Thread(target=lambda b=b: out.append((b, qgemm.panel_speedup(b))))\n"
        "      for b in (1, 2, 4) * 4]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "assert {b: len({s for bb, s in out if bb == b}) for b in (1, 2, 4)} == {1: 1, 2: 1, 4: 1}, out\n"
        "print('ok')\n")
    env = dict(os.environ, LOWBIT_ISA="avx512")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_threads_share_nothing():
    """Two threads run the same panel tile at once (each has its own scratch)."""
    gen = torch.Generator().manual_seed(5)
    m, n, k = 96, 192, 1000
    pw = packed(gen, "ternary", n, k, None)[3]
    xq, sx, rs = qgemm.quantize_activations(torch.randn(m, k, generator=gen), pw.kblock)
    ref, _ = run(1 << 40, pw, xq, sx, rs, m)
    with panel_rows(1):
        kern = qgemm.dispatch_for(pw, m)
        bad = mismatches_on_threads(lambda y: kern(xq, pw.data, y, count=1, a_scale=sx, a_sum=rs), ref)
    assert not bad, bad


@pytest.mark.parametrize("at_end", [True, False], ids=["guard_after", "guard_before"])
def test_panel_stays_in_bounds(at_end):
    """Every operand flush against an inaccessible page: the activation packing, the decode and
    the next panel's prefetch (which may point past the codes: prefetches do not fault) must
    not touch a byte outside their arrays."""
    arena = GuardedArena()
    gen = torch.Generator().manual_seed(13)
    for fmt in PANEL_FMTS:
        for m, n, k, group in [(8, 64, 128, None), (17, 130, 264, None), (33, 65, 520, 128), (7, 3, 8, None)]:
            pw = packed(gen, fmt, n, k, group)[3]
            xq, sx, rs = qgemm.quantize_activations(torch.randn(m, k, generator=gen), pw.kblock)
            ref, _ = run(1 << 40, pw, xq, sx, rs, m)
            data, xq_g, sx_g, rs_g = (arena.place(t, at_end) for t in (pw.data, xq, sx, rs))
            y = arena.place(torch.full((m, n), float("nan")), at_end)
            with panel_rows(1):
                kern = qgemm.dispatch_for(dataclasses.replace(pw, data=data), m)
                before = qgemm.panel_invocations()
                kern(xq_g, data, y, count=pw.num_kblocks, a_scale=sx_g, a_sum=rs_g)
                assert qgemm.panel_invocations() == before + 1
            assert torch.equal(y.view(torch.int32), ref.view(torch.int32)), (fmt, m, n, k)
