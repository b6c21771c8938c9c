"""AMX-INT8 tiles (runtime/native/src/qgemm_amx.cpp) against the AVX-512 path and exact integers.

The AMX tiles share the AVX-512 flush and epilogue, so for int8 activations their outputs must
equal the AVX-512 tiles' bit for bit, on every format, epilogue, tail and stride. Run only on a
CPU with AMX-INT8 that Linux lets this process use; skipped elsewhere with the reason.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.runtime import cpu_features, current_isa, qgemm, set_isa, supported_isas
from lowbit.runtime.qgemm import FORMAT_INFO
from isa_paths import mismatches_on_threads, use_isa
from test_qgemm import FMTS, GuardedArena, random_codes, random_zero

pytestmark = pytest.mark.skipif(
    "amx" not in supported_isas(),
    reason=("this CPU lacks AMX-INT8" if "amx_int8" not in cpu_features() else
            "Linux refused this process the AMX tile state") + "; the AMX tiles cannot run here")


def run_tile(isa, pw, xq, sx, rs, m, *, c_dtype=torch.float32, bias=None, beta=False,
             activation=None, per_block=False, c_in=None):
    with use_isa(isa):
        kern = qgemm.dispatch_for(pw, m, c_dtype=c_dtype, bias=bias is not None, beta=beta,
                                  activation=activation, per_block_act_scale=per_block,
                                  lda=xq.shape[1])
        y = c_in.clone() if c_in is not None else torch.full((m, pw.n), float("nan")).to(c_dtype)
        kern(xq, pw.data, y, count=pw.num_kblocks, a_scale=sx, a_sum=rs, bias=bias)
    return y, kern.isa


def random_packed(gen, fmt, n, k, group, scale_floor):
    """Random codes, zero points (formats that have them) and scales (per group, or per row
    when `group` is None), packed: (q, scale, zero, pw)."""
    q = random_codes(gen, fmt, n, k)
    ngroups = -(-k // group) if group else 1
    zero = random_zero(gen, fmt, n, ngroups)
    scale = torch.rand(n, ngroups, generator=gen) + scale_floor
    pw = qgemm.pack_weight(q, scale if group else scale[:, 0], fmt, group=group,
                           zero=zero if zero is None or group else zero[:, :1])
    return q, scale, zero, pw


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k,group", [
    (16, 64, 64, None),     # one full tile row block, one 64-k step
    (17, 17, 8, None),      # M tail of one row past a tile; K far below one step; N tail
    (33, 130, 260, None),   # second row pair of one row; K-chunk 256 + a 4-wide tail
    (47, 65, 520, 128),     # per-group scales: 5 K-blocks, the last one short
    (64, 100, 1000, None),  # 4 K chunks, the last not a multiple of 64
    (257, 70, 72, None),    # two passes of rows (256 + 1)
], ids=["m16", "m17_k8", "m33_k260", "m47_groups", "m64_k1000", "m257"])
def test_amx_equals_avx512_bitwise(fmt, m, n, k, group):
    if fmt == "int1" and k % 8:
        k += 8 - k % 8
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    q, scale, zero, pw = random_packed(gen, fmt, n, k, group, 0.05)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen)
    for per_block in ((False, True) if group is None else (False,)):
        kblock = 32 if per_block and k % 32 == 0 else pw.kblock
        if kblock != pw.kblock:
            pw = qgemm.pack_weight(q, scale[:, 0], fmt, zero=None if zero is None else zero[:, :1], kblock=kblock)
        xq, sx, rs = qgemm.quantize_activations(x, pw.kblock, per_block=per_block)
        for c_dtype, act, beta in ((torch.float32, None, False), (torch.bfloat16, "silu", True),
                                   (torch.float32, "relu2", True), (torch.bfloat16, "relu", False)):
            c_in = (torch.randn(m, n, generator=gen) * 3).to(c_dtype) if beta else None
            kw = dict(c_dtype=c_dtype, bias=bias, beta=beta, activation=act, per_block=per_block, c_in=c_in)
            y_amx, isa_amx = run_tile("amx", pw, xq, sx, rs, m, **kw)
            y_ref, isa_ref = run_tile("avx512", pw, xq, sx, rs, m, **kw)
            assert (isa_amx, isa_ref) == ("amx", "avx512")
            bits = torch.int16 if c_dtype == torch.bfloat16 else torch.int32  # -0 and +0 differ
            assert torch.equal(y_amx.view(bits), y_ref.view(bits)), \
                (fmt, c_dtype, act, beta, per_block, float((y_amx.float() - y_ref.float()).abs().max()))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k", [(33, 130, 2048), (64, 65, 520), (128, 64, 4096), (33, 1100, 256),
                                   (40, 4160, 128)])
def test_amx_at_the_compiled_stride(fmt, m, n, k):
    """Activations in rows act_stride(Kp) apart (what compiled layers quantize into; the AMX
    tiles then load their A tiles from the rows in place, up to 4096 output rows per call,
    and pack them above): the same bits as contiguous rows, and as AVX-512 at that stride."""
    gen = torch.Generator().manual_seed(m + n + k)
    _, _, _, pw = random_packed(gen, fmt, n, k, None, 0.05)
    x = torch.randn(m, k, generator=gen) * 3
    xq, sx, rs = qgemm.quantize_activations(x, pw.kblock)
    wq, _, _ = qgemm.quantize_activations(x, pw.kblock, stride=qgemm.act_stride(pw.k_padded))
    assert wq.shape[1] > xq.shape[1]
    y_amx, isa = run_tile("amx", pw, wq, sx, rs, m, c_dtype=torch.bfloat16, activation="silu")
    y_ref, _ = run_tile("avx512", pw, wq, sx, rs, m, c_dtype=torch.bfloat16, activation="silu")
    y_contig, _ = run_tile("amx", pw, xq, sx, rs, m, c_dtype=torch.bfloat16, activation="silu")
    assert isa == "amx"
    assert torch.equal(y_amx.view(torch.int16), y_ref.view(torch.int16))
    assert torch.equal(y_amx.view(torch.int16), y_contig.view(torch.int16))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k", [(32, 64, 4096), (45, 129, 2056), (100, 64, 320)])
def test_amx_integer_sums_exact(fmt, m, n, k):
    """Unit scales, the int8 corners (-128 included): the sums equal fp64's exactly (|sum| < 2^24)."""
    gen = torch.Generator().manual_seed(k)
    q = random_codes(gen, fmt, n, k)
    zero = random_zero(gen, fmt, n, 1)
    pw = qgemm.pack_weight(q, torch.ones(n), fmt, zero=zero)
    xq = torch.tensor([-128, 127, -1, 3], dtype=torch.int8)[torch.randint(0, 4, (m, pw.k_padded), generator=gen)]
    xq[:, k:] = 0
    rs = xq.to(torch.int32).sum(1, keepdim=True, dtype=torch.int32)
    y, isa = run_tile("amx", pw, xq, torch.ones(m), rs, m)
    assert isa == "amx"
    w = q.to(torch.float64) - (zero.to(torch.float64) if zero is not None else 0)
    assert torch.equal(y.to(torch.float64), xq[:, :k].to(torch.float64) @ w.T)


@pytest.mark.parametrize("fmt", FMTS)
def test_amx_sums_at_the_largest_kblock(fmt):
    """The largest K-block (65536) of the largest codes against -128: the AMX tiles multiply
    the fields masked in place (up to 240 for 4-bit codes), and their int32 sums must not wrap
    before being shifted back. The exact sum, -128 * qmax * 65536, is an fp32 integer."""
    info = FORMAT_INFO[fmt]
    m, n, k = 16, 64, 65536
    q = torch.full((n, k), info.qmax, dtype=torch.int8)
    pw = qgemm.pack_weight(q, torch.ones(n), fmt, zero=torch.zeros(n, 1, dtype=torch.int8) if info.zero_point else None)
    assert pw.kblock == k
    xq = torch.full((m, pw.k_padded), -128, dtype=torch.int8)
    rs = xq.to(torch.int32).sum(1, keepdim=True, dtype=torch.int32)
    for isa in ("amx", "avx512"):
        y, got = run_tile(isa, pw, xq, torch.ones(m), rs, m)
        assert got == isa
        assert torch.equal(y, torch.full((m, n), -128.0 * info.qmax * k)), isa


def test_dispatch_rule():
    """AMX runs int8 tiles of >= amx_min_rows() rows and K-blocks of >= amx_min_kblock()
    values; fewer rows, shorter K-blocks and fp activations run AVX-512."""
    pw = qgemm.pack_weight(torch.ones(64, 256, dtype=torch.int8), torch.ones(64), "ternary")
    before = current_isa()
    set_isa("amx")
    try:
        rows = qgemm.amx_min_rows()
        assert rows >= 1
        assert qgemm.dispatch_for(pw, rows).isa == "amx"
        assert qgemm.dispatch_for(pw, max(1, rows - 1)).isa == ("avx512" if rows > 1 else "amx")
        assert qgemm.dispatch_for(pw, rows, a_dtype=torch.float32).isa == "avx512"
        assert qgemm.dispatch_for(pw, rows, a_dtype=torch.bfloat16).isa == "avx512"
        old = qgemm.amx_min_rows(7)
        try:
            assert old == rows and qgemm.amx_min_rows() == 7
            assert qgemm.dispatch_for(pw, 7).isa == "amx" and qgemm.dispatch_for(pw, 6).isa == "avx512"
        finally:
            qgemm.amx_min_rows(old)
        with pytest.raises(ValueError, match="amx_min_rows"):
            qgemm.amx_min_rows(0)
        # short K-blocks (scale groups) stay on AVX-512
        kmin = qgemm.amx_min_kblock()
        grouped = qgemm.pack_weight(torch.ones(64, 256, dtype=torch.int8), torch.ones(64, 256 // 32),
                                    "int4_sym", group=32)
        assert kmin > 32 and qgemm.dispatch_for(grouped, rows).isa == "avx512"
        big = qgemm.pack_weight(torch.ones(64, 256, dtype=torch.int8), torch.ones(64, 256 // kmin),
                                "int4_sym", group=kmin)
        assert qgemm.dispatch_for(big, rows).isa == "amx"
        old = qgemm.amx_min_kblock(32)
        try:
            assert old == kmin and qgemm.dispatch_for(grouped, rows).isa == "amx"
        finally:
            qgemm.amx_min_kblock(old)
        with pytest.raises(ValueError, match="amx_min_kblock"):
            qgemm.amx_min_kblock(0)
        set_isa("avx512")
        assert qgemm.dispatch_for(pw, 4 * rows).isa == "avx512"
    finally:
        set_isa(before)


def test_threads_and_other_amx_users_between_calls():
    """Tiles on two threads at once, each thread also running torch's own AMX bf16 matmul
    (oneDNN) between calls: every call configures its own tiles and gets the same result."""
    gen = torch.Generator().manual_seed(5)
    m, n, k = 96, 192, 1000
    q = random_codes(gen, "ternary", n, k)
    pw = qgemm.pack_weight(q, torch.rand(n, generator=gen) + 0.1, "ternary")
    xq, sx, rs = qgemm.quantize_activations(torch.randn(m, k, generator=gen), pw.kblock)
    ref, _ = run_tile("avx512", pw, xq, sx, rs, m)
    a = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    before = current_isa()
    set_isa("amx")
    try:
        kern = qgemm.dispatch_for(pw, m)
        assert kern.isa == "amx"
        # oneDNN may configure AMX tiles on this thread between our calls
        bad = mismatches_on_threads(lambda y: kern(xq, pw.data, y, count=1, a_scale=sx, a_sum=rs), ref,
                                    between=lambda: torch.mm(a, a.T))
    finally:
        set_isa(before)
    assert not bad, bad


@pytest.mark.parametrize("at_end", [True, False], ids=["guard_after", "guard_before"])
def test_amx_tiles_stay_in_bounds(at_end):
    """Every operand flush against an inaccessible page: the A tiles read straight from the
    activation rows (calls of <= 1024 output rows whose last K step fits the row) and from
    packed panels (wider calls, or K-blocks whose last step would run past the row) must not
    read a byte outside them, nor the decode outside the codes, nor the epilogue outside C."""
    arena = GuardedArena()
    gen = torch.Generator().manual_seed(13)
    for fmt in FMTS:
        # (m, n, k, group): direct A, one K-block; packed (tail step past the row); direct A
        # over 5 K-blocks of a padded row; packed (a call wider than 1024 output rows)
        for m, n, k, group in [(8, 64, 128, None), (17, 130, 264, None), (33, 65, 520, 128),
                               (40, 1100, 200, None)]:
            pw = random_packed(gen, fmt, n, k, group, 0.1)[3]
            x = torch.randn(m, k, generator=gen)
            xq, sx, rs = qgemm.quantize_activations(x, pw.kblock)
            ref, isa_ref = run_tile("avx512", pw, xq, sx, rs, m)
            packed, xq_g, sx_g, rs_g = (arena.place(t, at_end) for t in (pw.data, xq, sx, rs))
            pw_g = dataclasses.replace(pw, data=packed)
            with use_isa("amx"):
                kern = qgemm.dispatch_for(pw_g, m)
                y = arena.place(torch.full((m, n), float("nan")), at_end)
                kern(xq_g, packed, y, count=pw.num_kblocks, a_scale=sx_g, a_sum=rs_g)
            assert (kern.isa, isa_ref) == ("amx", "avx512")
            assert torch.equal(y.view(torch.int32), ref.view(torch.int32)), (fmt, m, n, k)
