"""Low-bit microkernels (lowbit.runtime.qgemm) against the reference semantics of docs/formats.md.

Every ISA path the CPU supports is forced in-process with set_isa. The integer part is
checked exactly (unit scales, |sums| < 2**24 so fp32 holds them exactly); the fp32 epilogue
against an fp64 evaluation of the formula; the whole layer against torch.ops.lowbit.linear.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.runtime import supported_isas

from isa_paths import tile_isa, use_isa
from lowbit.runtime import qgemm
from lowbit.runtime.qgemm import FORMAT_INFO, QGemmError, QGemmKernel

ISAS = supported_isas()
FMTS = sorted(qgemm.FORMATS)
SETTINGS = dict(deadline=None, derandomize=True)


def random_codes(gen: torch.Generator, fmt: str, n: int, k: int) -> torch.Tensor:
    info = FORMAT_INFO[fmt]
    q = torch.randint(info.qmin, info.qmax + 1, (n, k), generator=gen, dtype=torch.int8)
    if fmt == "int1":
        q = torch.where(q == 0, torch.ones_like(q), q)
    return q


def random_zero(gen, fmt, n, ngroups):
    info = FORMAT_INFO[fmt]
    if not info.zero_point:
        return None
    return torch.randint(0, info.qmax + 1, (n, ngroups), generator=gen, dtype=torch.int8)


def ref_quantize(x: torch.Tensor, kblock: int, per_block: bool):
    """BitNet a8 in fp32, as docs/formats.md: s = 127 / max(amax, 1e-5), xq = round(x * s)."""
    x = x.to(torch.float32)
    m, k = x.shape
    nkb = -(-k // kblock)
    padded = torch.zeros(m, nkb * kblock)
    padded[:, :k] = x
    if per_block:
        amax = padded.view(m, nkb, kblock).abs().amax(-1)
    else:
        amax = x.abs().amax(1, keepdim=True)
    s = torch.full_like(amax, 127.0) / amax.clamp(min=1e-5)
    s_full = s.repeat_interleave(kblock, dim=1)[:, : nkb * kblock] if per_block else s
    xq = torch.round(padded * s_full).clamp(-128, 127)
    return xq.to(torch.int8), s if per_block else s.reshape(m)


def block_sums(xq: torch.Tensor, w: torch.Tensor, kblock: int) -> torch.Tensor:
    """Exact integer sums per K-block: [nkb, M, N] (float64 holds them exactly)."""
    m, kp = xq.shape
    nkb = kp // kblock
    wp = torch.zeros(w.shape[0], kp, dtype=torch.float64)
    wp[:, : w.shape[1]] = w.to(torch.float64)
    x64 = xq.to(torch.float64)
    return torch.stack([x64[:, i * kblock:(i + 1) * kblock] @ wp[:, i * kblock:(i + 1) * kblock].T
                        for i in range(nkb)])


def expand_per_block(t: torch.Tensor, nkb: int) -> torch.Tensor:
    return t if t.shape[1] == nkb else t.expand(t.shape[0], nkb)


# ----------------------------------------------------------------------------- packing

@settings(max_examples=60, **SETTINGS)
@given(fmt=st.sampled_from(FMTS), n=st.integers(1, 150), k=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1), kb_steps=st.integers(1, 20))
def test_pack_roundtrip(fmt, n, k, seed, kb_steps):
    gen = torch.Generator().manual_seed(seed)
    q = random_codes(gen, fmt, n, k)
    kg = FORMAT_INFO[fmt].k_granule
    kblock = kb_steps * kg
    zero = random_zero(gen, fmt, n, 1)
    pw = qgemm.pack_weight(q, torch.rand(n) + 0.1, fmt, zero=zero, kblock=kblock)
    assert pw.num_kblocks == -(-k // kblock)
    assert pw.data.numel() == -(-n // 64) * pw.nblock_bytes
    assert torch.equal(qgemm.unpack_weight(pw), q)


def test_pack_layout_is_vnni4_interleaved():
    """2-bit: byte i of a k4 step holds rows 16j + i//4 (j = 0..3) at bits 2j, k = i % 4."""
    n, k = 64, 4
    q = torch.zeros(n, k, dtype=torch.int8)
    q[17, 2] = 1       # j = 1, i = 1*4 + 2 = 6 -> bits 2..3 of byte 6 hold code 1 + 2 = 3
    q[48, 0] = -2      # j = 3, i = 0 -> bits 6..7 of byte 0 hold code 0
    pw = qgemm.pack_weight(q, torch.ones(n), "int2_sym")
    b = pw.data[:64]
    assert (int(b[6]) >> 2) & 3 == 3
    assert (int(b[0]) >> 6) & 3 == 0
    assert (int(b[1]) >> 6) & 3 == 2  # q = 0 -> code 2
    scales = pw.data[64:64 + 256].view(torch.float32)
    assert torch.equal(scales, torch.ones(64))
    # A symmetric format's offset is the constant 2: the K-block ends with the scales.
    assert pw.data.numel() == 64 + 256
    # With zero points, 64 int32 offsets (offset 0 + z) follow the scales.
    zero = torch.arange(64, dtype=torch.int8).remainder(4).view(n, 1)
    pa = qgemm.pack_weight(torch.zeros(n, k, dtype=torch.int8), torch.ones(n, 1), "int2_asym", group=k, zero=zero)
    assert pa.data.numel() == 64 + 512
    assert torch.equal(pa.data[64 + 256:].view(torch.int32), zero.view(-1).to(torch.int32))


# ----------------------------------------------------------------------------- activations

@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=40, **SETTINGS)
@given(m=st.integers(1, 9), k=st.integers(1, 300), kb4=st.integers(1, 40),
       per_block=st.booleans(), bf16=st.booleans(), seed=st.integers(0, 2**31 - 1),
       scale_exp=st.integers(-8, 8))
def test_quantize_activations_exact(isa, m, k, kb4, per_block, bf16, seed, scale_exp):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * (2.0 ** scale_exp)
    x[0, : min(k, 3)] = 0.0  # zeros and ties
    if m > 1:
        x[1] = 0.0  # an all-zero row: amax clamps to 1e-5
    if bf16:
        x = x.to(torch.bfloat16)
    kblock = 4 * kb4
    with use_isa(isa):
        xq, s, rs = qgemm.quantize_activations(x, kblock, per_block=per_block)
    rxq, rs_ref = ref_quantize(x, kblock, per_block)
    assert torch.equal(xq, rxq)
    assert torch.equal(s, rs_ref)
    nkb = -(-k // kblock)
    assert torch.equal(rs, rxq.to(torch.int32).view(m, nkb, kblock).sum(-1, dtype=torch.int32))


def test_act_stride_is_an_odd_number_of_lines():
    """Compiled layers quantize into rows act_stride(Kp) bytes apart: at least Kp, a whole
    number of 64-byte lines, odd, and the smallest such."""
    for kp in [1, 4, 32, 63, 64, 65, 96, 128, 200, 2048, 2560, 4096, 5632, 6912, 8192, 11008]:
        s = qgemm.act_stride(kp)
        lines = s // 64
        assert s % 64 == 0 and lines % 2 == 1 and s >= kp, (kp, s)
        assert s - 128 < kp, (kp, s)  # the next smaller odd number of lines is too short
    assert qgemm.act_stride(4096) == 4160 and qgemm.act_stride(64) == 64
    with pytest.raises(ValueError, match="kp must be positive"):
        qgemm.act_stride(0)


@pytest.mark.parametrize("per_block", [False, True])
def test_quantize_into_strided_rows(per_block):
    """quantize_activations(stride=...) writes the same values into wider rows, zero past Kp."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 100, generator=gen)  # Kp = 128: two lines, stride three
    xq, s, rs = qgemm.quantize_activations(x, 64, per_block=per_block)
    stride = qgemm.act_stride(xq.shape[1])
    wq, ws, wrs = qgemm.quantize_activations(x, 64, per_block=per_block, stride=stride)
    assert wq.shape == (5, stride) == (5, 192)
    assert torch.equal(wq[:, :128], xq) and not wq[:, 128:].any()
    assert torch.equal(ws, s) and torch.equal(wrs, rs)
    with pytest.raises(ValueError, match="stride must be at least Kp = 128"):
        qgemm.quantize_activations(x, 64, stride=127)


def test_quantize_rounds_half_to_even():
    # amax = 127 -> s = 1: x * s is exactly representable, so ties are real ties.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]])
    xq, s, _ = qgemm.quantize_activations(x, 8)
    assert float(s[0]) == 1.0
    assert xq.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]


# ----------------------------------------------------------------------------- integer part

@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=120, **SETTINGS)
@given(fmt=st.sampled_from(FMTS), m=st.integers(1, 14), n=st.sampled_from([1, 3, 17, 64, 65, 127, 130]),
       kb_steps=st.integers(1, 12), count=st.integers(1, 4), lda_pad=st.sampled_from([0, 4, 37]),
       ldc_pad=st.sampled_from([0, 5]), seed=st.integers(0, 2**31 - 1), extreme=st.booleans())
def test_integer_part_exact(isa, fmt, m, n, kb_steps, count, lda_pad, ldc_pad, seed, extreme):
    """Unit scales: C equals sum_k xq * (q - z) exactly, for every format, tail and stride."""
    gen = torch.Generator().manual_seed(seed)
    kblock = kb_steps * FORMAT_INFO[fmt].k_granule
    k = kblock * count
    q = random_codes(gen, fmt, n, k)
    zero = random_zero(gen, fmt, n, count)
    scale = torch.ones(n, count)
    pw = qgemm.pack_weight(q, scale, fmt, group=kblock, zero=zero, kblock=kblock) if count > 1 else \
        qgemm.pack_weight(q, torch.ones(n), fmt, zero=zero, kblock=kblock)
    lda, ldc = k + lda_pad, n + ldc_pad
    if extreme:  # the int8 corners, including -128 (outside what the quantizer produces)
        xq = torch.tensor([-128, 127], dtype=torch.int8)[torch.randint(0, 2, (m, lda), generator=gen)]
    else:
        xq = torch.randint(-128, 128, (m, lda), generator=gen, dtype=torch.int8)
    rowsum = xq[:, :k].to(torch.int32).view(m, count, kblock).sum(-1, dtype=torch.int32)
    c = torch.full((m * ldc,), float("nan"))
    with use_isa(isa):
        kern = QGemmKernel(fmt, torch.int8, torch.float32, m, n, kblock, lda=lda,
                           ldb=pw.nblock_bytes, ldc=ldc, stride_a=kblock,
                           stride_b=pw.kblock_bytes, ld_aux=count)
        assert kern.isa == isa
        kern(xq, pw.data, c, count=count, a_scale=torch.ones(m), a_sum=rowsum)
    w = q.to(torch.int64)
    if zero is not None:
        w = w - zero.to(torch.int64).repeat_interleave(kblock, dim=1)
    ref = xq[:, :k].to(torch.int64) @ w.T
    out = c.view(m, ldc)
    assert torch.equal(out[:, :n], ref.to(torch.float32)), (out[:, :n] - ref).abs().max()
    if ldc_pad:
        assert torch.isnan(out[:, n:]).all()  # columns past n untouched


# ----------------------------------------------------------------------------- fp32 epilogue

def run_int8_layer(fmt, x, q, scale, zero, group, bias, per_block, kblock, out_dtype):
    """Quantize + tile through the public API; returns (y, reference fp64, magnitude bound)."""
    n, k = q.shape
    pw = qgemm.pack_weight(q, scale, fmt, group=group, zero=zero, kblock=kblock)
    m = x.shape[0]
    xq, sx, rs = qgemm.quantize_activations(x, pw.kblock, per_block=per_block)
    kern = qgemm.dispatch_for(pw, m, c_dtype=out_dtype, bias=bias is not None,
                              per_block_act_scale=per_block)
    y = torch.empty(m, n, dtype=out_dtype)
    kern(xq, pw.data, y, count=pw.num_kblocks, a_scale=sx, a_sum=rs, bias=bias)

    nkb = pw.num_kblocks
    w = q.to(torch.int64)
    s2 = scale.reshape(1, 1).expand(n, 1) if scale.numel() == 1 else scale.reshape(n, -1)
    s_blk = expand_per_block(s2, nkb).to(torch.float64)
    if zero is not None:
        zb = expand_per_block(zero.reshape(n, -1), nkb).to(torch.int64)
        w = w - zb.repeat_interleave(pw.kblock, dim=1)[:, :k]
    sums = block_sums(xq, w, pw.kblock)  # [nkb, M, N]
    sx64 = sx.to(torch.float64)
    inv = (1.0 / sx64).T[:, :, None] if per_block else (1.0 / sx64)[None, :, None]
    terms = sums * s_blk.T[:, None, :] * inv
    ref = terms.sum(0)
    bound = terms.abs().sum(0)
    if bias is not None:
        ref = ref + bias.to(torch.float64)
        bound = bound + bias.abs().to(torch.float64)
    return y, ref, bound


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=50, **SETTINGS)
@given(fmt=st.sampled_from(FMTS), m=st.sampled_from([1, 2, 3, 4, 7, 16, 17]),
       n=st.sampled_from([1, 17, 64, 100]), k=st.sampled_from([8, 17, 64, 127, 256, 300]),
       grouping=st.sampled_from(["channel", "tensor", 32, 64, 128]), use_bias=st.booleans(),
       per_block=st.booleans(), bf16_out=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_int8_epilogue_matches_formula(isa, fmt, m, n, k, grouping, use_bias, per_block, bf16_out, seed):
    gen = torch.Generator().manual_seed(seed)
    q = random_codes(gen, fmt, n, k)
    if grouping == "tensor":
        scale, group = torch.tensor(0.37), None
    elif grouping == "channel":
        scale, group = torch.rand(n, generator=gen) + 0.05, None
    elif grouping >= k:  # a group as wide as K is per channel
        scale, group = torch.rand(n, generator=gen) + 0.05, None
    else:
        group = grouping
        scale = torch.rand(n, -(-k // group), generator=gen) + 0.05
    ngroups = 1 if scale.dim() < 2 else scale.shape[1]
    zero = random_zero(gen, fmt, n, ngroups)
    kblock = None if (group is not None or not per_block) else 32
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen) if use_bias else None
    out_dtype = torch.bfloat16 if bf16_out else torch.float32
    with use_isa(isa):
        y, ref, bound = run_int8_layer(fmt, x, q, scale, zero, group, bias, per_block, kblock, out_dtype)
    err = (y.to(torch.float64) - ref).abs()
    tol = 2e-6 * bound + 1e-6 + (ref.abs() * 2.0 ** -8 if bf16_out else 0.0)
    assert bool((err <= tol).all()), float((err - tol).max())


# ----------------------------------------------------------------------------- weight-only

@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=40, **SETTINGS)
@given(fmt=st.sampled_from(FMTS), m=st.sampled_from([1, 2, 3, 5, 16]), n=st.sampled_from([1, 17, 64, 129]),
       k=st.sampled_from([4, 17, 64, 255]), grouped=st.booleans(), x_dtype=st.sampled_from(["f32", "bf16"]),
       bf16_out=st.booleans(), use_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_weight_only_matches_reference(isa, fmt, m, n, k, grouped, x_dtype, bf16_out, use_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    q = random_codes(gen, fmt, n, k)
    group = 32 if grouped and k > 32 else None
    ngroups = -(-k // group) if group else 1
    scale = torch.rand(n, ngroups, generator=gen) + 0.05
    zero = random_zero(gen, fmt, n, ngroups)
    pw = qgemm.pack_weight(q, scale if group else scale[:, 0], fmt, group=group,
                           zero=zero if zero is None or group else zero[:, :1])
    x = torch.randn(m, k, generator=gen)
    if x_dtype == "bf16":
        x = x.to(torch.bfloat16)
    bias = torch.randn(n, generator=gen) if use_bias else None
    out_dtype = torch.bfloat16 if bf16_out else torch.float32
    with use_isa(isa):
        y = qgemm.qlinear(x, pw, bias, mode="weight_only", out_dtype=out_dtype)
    gsize = group or k
    w = q.to(torch.float64)
    if zero is not None:
        w = w - zero.to(torch.float64).repeat_interleave(gsize, dim=1)[:, :k]
    w = w * scale.to(torch.float64).repeat_interleave(gsize, dim=1)[:, :k]
    x64 = x.to(torch.float64)
    ref = x64 @ w.T
    bound = x64.abs() @ w.abs().T
    if bias is not None:
        ref, bound = ref + bias.to(torch.float64), bound + bias.abs().to(torch.float64)
    err = (y.to(torch.float64) - ref).abs()
    tol = 1e-5 * bound + 1e-6 + (ref.abs() * 2.0 ** -8 if bf16_out else 0.0)
    assert bool((err <= tol).all()), float((err - tol).max())


# ----------------------------------------------------------------------------- fused epilogue

def act64(name, v: torch.Tensor) -> torch.Tensor:
    """The epilogue activations in fp64 (the definitions of lowbit/qgemm.h)."""
    if name is None:
        return v
    if name == "relu":
        return v.clamp(min=0)
    if name == "relu2":
        return v.clamp(min=0) ** 2
    return v * torch.sigmoid(v)  # silu


def act_tolerance(name, v: torch.Tensor, tol_v: torch.Tensor) -> torch.Tensor:
    """How far act(v +- tol_v) can move from act(v), plus a few fp32 ulp of act itself."""
    if name is None or name == "relu":
        grow = tol_v
    elif name == "relu2":
        grow = 2 * v.clamp(min=0) * tol_v + tol_v ** 2
    else:
        grow = 1.1 * tol_v  # |silu'| <= 1.0998
    return grow + 4 * 2.0 ** -24 * act64(name, v).abs() + 1e-30


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=60, **SETTINGS)
@given(fmt=st.sampled_from(FMTS), m=st.sampled_from([1, 2, 3, 5, 6, 7, 13]),
       n=st.sampled_from([1, 3, 17, 64, 65, 100, 130]), k=st.sampled_from([4, 17, 64, 127, 300]),
       mode=st.sampled_from(["int8", "f32", "bf16"]), act=st.sampled_from([None, "relu", "silu", "relu2"]),
       residual=st.booleans(), use_bias=st.booleans(), bf16_out=st.booleans(),
       grouped=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fused_epilogue_matches_fp64(isa, fmt, m, n, k, mode, act, residual, use_bias, bf16_out,
                                     grouped, seed):
    """C = [C_in +] act(sum * scales + bias) on every ISA, fp32 and bf16 C, N and M tails,
    int8 and weight-only activations, against an fp64 evaluation."""
    gen = torch.Generator().manual_seed(seed)
    q = random_codes(gen, fmt, n, k)
    group = 32 if grouped and k > 32 else None
    ngroups = -(-k // group) if group else 1
    scale = torch.rand(n, ngroups, generator=gen) * 0.2 + 0.01
    zero = random_zero(gen, fmt, n, ngroups)
    pw = qgemm.pack_weight(q, scale if group else scale[:, 0], fmt, group=group, zero=zero)
    x = torch.randn(m, k, generator=gen) * 2
    bias = torch.randn(n, generator=gen) if use_bias else None
    out_dtype = torch.bfloat16 if bf16_out else torch.float32
    c_in = (torch.randn(m, n, generator=gen) * 3).to(out_dtype)
    y = c_in.clone() if residual else torch.full((m, n), float("nan")).to(out_dtype)

    gsize = group or k
    w = q.to(torch.float64)
    if zero is not None:
        w = w - zero.to(torch.float64).repeat_interleave(gsize, dim=1)[:, :k]
    w = w * scale.to(torch.float64).repeat_interleave(gsize, dim=1)[:, :k]
    with use_isa(isa):
        if mode == "int8":
            xq, sx, rs = qgemm.quantize_activations(x, pw.kblock)
            kern = qgemm.dispatch_for(pw, m, c_dtype=out_dtype, bias=use_bias, beta=residual,
                                      activation=act)
            kern(xq, pw.data, y, count=pw.num_kblocks, a_scale=sx, a_sum=rs, bias=bias)
            xa = xq[:, :k].to(torch.float64) / sx.to(torch.float64)[:, None]
        else:
            xa_t = x.to(torch.bfloat16) if mode == "bf16" else x
            a = torch.zeros(m, pw.k_padded, dtype=xa_t.dtype)
            a[:, :k] = xa_t
            kern = qgemm.dispatch_for(pw, m, a_dtype=a.dtype, c_dtype=out_dtype, bias=use_bias,
                                      beta=residual, activation=act)
            kern(a, pw.data, y, count=pw.num_kblocks, bias=bias)
            xa = xa_t.to(torch.float64)
    assert kern.isa == tile_isa(isa, mode == "int8")
    v = xa @ w.T
    tol_v = 4e-6 * (xa.abs() @ w.abs().T) + 1e-6
    if bias is not None:
        v = v + bias.to(torch.float64)
        tol_v = tol_v + 1e-7 * bias.abs().to(torch.float64)
    ref = act64(act, v)
    tol = act_tolerance(act, v, tol_v)
    if residual:
        ref = ref + c_in.to(torch.float64)
    tol = tol + ref.abs() * (2.0 ** -8 if bf16_out else 2.0 ** -23)
    err = (y.to(torch.float64) - ref).abs()
    assert not torch.isnan(y).any()
    assert bool((err <= tol).all()), (float((err - tol).max()), act, residual)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in fp32 ulps (on the integer line of ordered floats; -0 == +0)."""
    def ordered(t):
        i = t.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", ["silu", "relu", "relu2"])
def test_activation_is_accurate_to_few_ulp(isa, act):
    """Exact pre-activation values v = x * step (x = -128..127, power-of-two steps, so
    v covers [-256, 254] finely near 0): the fused activation is within 3 fp32 ulp of
    torch's op and of the fp64 value (down to v = -88.7, where exp(-v) overflows fp32 and
    both torch and the kernel compute v / (1 + inf) = -0 for a true value below 1e-36)."""
    n, k, m = 16, 8, 64
    q = torch.zeros(n, k, dtype=torch.int8)
    q[:, 0] = 1
    ys, vs = [], []
    for step in (2.0 ** -7, 2.0 ** -4, 2.0 ** -1, 2.0):
        pw = qgemm.pack_weight(q, torch.full((n,), step), "int8")
        for half in range(4):  # 64 rows per call, each row a distinct x[m, 0]
            x = torch.arange(-128 + 64 * half, -64 + 64 * half, dtype=torch.int32).to(torch.int8)
            xq = torch.zeros(m, pw.k_padded, dtype=torch.int8)
            xq[:, 0] = x
            rs = xq.to(torch.int32).sum(1, keepdim=True, dtype=torch.int32)
            y = torch.empty(m, n)
            with use_isa(isa):
                qgemm.dispatch_for(pw, m, activation=act)(xq, pw.data, y, count=1,
                                                         a_scale=torch.ones(m), a_sum=rs)
            ys.append(y)
            vs.append((x.to(torch.float32) * step)[:, None].expand(-1, n))
    y, v = torch.cat(ys), torch.cat(vs)
    expect = {"silu": torch.nn.functional.silu, "relu": torch.relu,
              "relu2": lambda t: torch.relu(t) ** 2}[act](v)
    assert int(_ulps(y, expect).max()) <= 3, float((y - expect).abs().max())
    exact = act64(act, v.to(torch.float64))
    # exp(-v) overflows fp32 below v = -88.72 (torch: the same formula, the same -0)
    ok = (v > -88.7) & (exact.abs() >= 2.0 ** -126)
    assert int(_ulps(y[ok], exact[ok].to(torch.float32)).max()) <= 3
    assert float(torch.cat([(y[~ok].double() - exact[~ok]).abs(), torch.zeros(1, dtype=torch.float64)]).max()) < 1e-36


@pytest.mark.parametrize("isa", ISAS)
def test_silu_extreme_inputs(isa):
    """Pre-activations far past exp's range: silu(-big) -> -0 / tiny, silu(big) -> big."""
    n, k, m = 16, 4, 6
    q = torch.zeros(n, k, dtype=torch.int8)
    q[:, 0] = 1
    vals = torch.tensor([-127, -100, -90, 88, 100, 127], dtype=torch.int8)
    for step in (1.0, 2.0 ** 20):  # v up to 127 * 2^20 (exp(-v) -> 0, exp(v) -> inf)
        pw = qgemm.pack_weight(q, torch.full((n,), step), "int8")
        xq = torch.zeros(m, pw.k_padded, dtype=torch.int8)
        xq[:, 0] = vals
        rs = xq.to(torch.int32).sum(1, keepdim=True, dtype=torch.int32)
        for c_dtype in (torch.float32, torch.bfloat16):
            y = torch.empty(m, n, dtype=c_dtype)
            with use_isa(isa):
                qgemm.dispatch_for(pw, m, c_dtype=c_dtype, activation="silu")(
                    xq, pw.data, y, count=1, a_scale=torch.ones(m), a_sum=rs)
            v = vals.to(torch.float32)[:, None].expand(-1, n) * step
            ref = torch.nn.functional.silu(v).to(c_dtype)
            assert torch.allclose(y.float(), ref.float(), rtol=2e-6 if c_dtype == torch.float32 else 1e-2,
                                  atol=1e-30), (y, ref)


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_residual_rounds_once(isa):
    """bf16 C with BETA1: C_in + v is formed in fp32 and rounded once (not round(v) + C_in)."""
    n, k, m = 8, 4, 1
    q = torch.zeros(n, k, dtype=torch.int8)
    q[:, 0] = 1
    pw = qgemm.pack_weight(q, torch.full((n,), 2.0 ** -9), "int8")  # v = 2^-9 + 2^-10 per unit
    xq = torch.zeros(m, pw.k_padded, dtype=torch.int8)
    xq[0, 0] = 3  # v = 3 * 2^-9 = 0.005859375
    rs = xq.to(torch.int32).sum(1, keepdim=True, dtype=torch.int32)
    c = torch.ones(m, n, dtype=torch.bfloat16)  # C_in = 1: 1 + v rounds to 1 + 2^-7 only if v
    with use_isa(isa):                           # is not first rounded to bf16 on its own
        qgemm.dispatch_for(pw, m, c_dtype=torch.bfloat16, beta=True)(
            xq, pw.data, c, count=1, a_scale=torch.ones(m), a_sum=rs)
    expect = (torch.ones(m, n, dtype=torch.float64) + 3 * 2.0 ** -9).to(torch.bfloat16)
    assert torch.equal(c, expect)


# ----------------------------------------------------------------------------- tiling ABI

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["ternary", "int4_asym", "int1"])
def test_tiling_with_offsets_and_beta(isa, fmt):
    """N tiles by pointer offset (b_off = block * nblock_bytes) and K split across two
    BETA1 calls reproduce the whole-layer tile."""
    gen = torch.Generator().manual_seed(7)
    m, n, k, group = 5, 200, 256, 64
    q = random_codes(gen, fmt, n, k)
    scale = torch.rand(n, k // group, generator=gen) + 0.1
    zero = random_zero(gen, fmt, n, k // group)
    pw = qgemm.pack_weight(q, scale, fmt, group=group, zero=zero)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    xq, sx, rs = qgemm.quantize_activations(x, group)
    with use_isa(isa):
        whole = torch.empty(m, n)
        qgemm.dispatch_for(pw, m, bias=True)(xq, pw.data, whole, count=4, a_scale=sx, a_sum=rs, bias=bias)
        tiled = torch.full((m, n), float("nan"))
        geometry = dict(lda=k, ldb=pw.nblock_bytes, ldc=n, stride_a=group,
                        stride_b=pw.kblock_bytes, ld_aux=4)
        for nb in range(-(-n // 64)):
            width = min(64, n - 64 * nb)
            # K-blocks 0..1 write C (+ bias); K-blocks 2..3 accumulate (BETA1). Offsets move
            # A, B and the row sums to the second half.
            head = QGemmKernel(fmt, torch.int8, torch.float32, m, width, group, bias=True, **geometry)
            tail = QGemmKernel(fmt, torch.int8, torch.float32, m, width, group, beta=True, **geometry)
            b0, c0 = nb * pw.nblock_bytes, 64 * nb
            head(xq, pw.data, tiled, count=2, a_scale=sx, a_sum=rs, b_off=b0, c_off=c0,
                 bias=bias, bias_off=c0)
            tail(xq, pw.data, tiled, count=2, a_scale=sx, a_sum=rs, a_off=2 * group, sum_off=2,
                 b_off=b0 + 2 * pw.kblock_bytes, c_off=c0)
    assert torch.allclose(tiled, whole, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_weight_only_exact_on_integers(isa, fmt, x_dtype):
    """Weight-only tiles decode w = a*u - c exactly (AVX-512: 2^23 + u via vpternlogd, then
    minus 2^23 + c): with integer activations and unit scales every sum is an exact integer
    below 2^24, so the fp32 result must equal the fp64 one bit for bit (M and N tails, K
    padding, zero points)."""
    gen = torch.Generator().manual_seed(11)
    for m, n, k in [(1, 70, 92), (4, 130, 300), (7, 64, 36)]:
        q = random_codes(gen, fmt, n, k)
        zero = random_zero(gen, fmt, n, 1)
        pw = qgemm.pack_weight(q, torch.ones(n), fmt, zero=zero)
        x = torch.randint(-100, 101, (m, k), generator=gen).to(x_dtype)
        a = torch.zeros(m, pw.k_padded, dtype=x_dtype)
        a[:, :k] = x
        y = torch.empty(m, n)
        with use_isa(isa):
            qgemm.dispatch_for(pw, m, a_dtype=x_dtype)(a, pw.data, y, count=pw.num_kblocks)
        w = q.to(torch.float64) - (zero.to(torch.float64) if zero is not None else 0)
        assert torch.equal(y.to(torch.float64), x.to(torch.float64) @ w.T), (m, n, k)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k", [(9, 130, 520), (31, 200, 260), (3, 70, 64), (4, 64, 36), (5, 129, 100),
                                   (1, 70, 92), (1, 130, 2060), (2, 70, 92), (1, 64, 24), (1, 65, 40)],
                         ids=["m9", "m31_prefetch", "m3", "m4", "m5", "m1_quads_tail", "m1_long", "m2",
                              "m1_odd_steps", "m1_even_steps"])
def test_isas_agree_bitwise_on_integers(fmt, m, n, k):
    """Every ISA's integer sums equal the scalar path's and fp64's (unit scales, |sum| < 2^24).
    M >= 24 over several n-blocks takes the AVX-512 path that prefetches the next n-block;
    M = 3..5 the shift-decode tiles; M = 1 the 4-set GEMV loop (K steps not a multiple of 4)."""
    gen = torch.Generator().manual_seed(3)
    q = random_codes(gen, fmt, n, k)
    zero = random_zero(gen, fmt, n, 1)
    pw = qgemm.pack_weight(q, torch.ones(n), fmt, zero=zero)
    xq = torch.randint(-128, 128, (m, pw.k_padded), generator=gen, dtype=torch.int8)
    xq[:, k:] = 0
    rs = xq.to(torch.int32).sum(1, keepdim=True, dtype=torch.int32)
    outs = []
    for isa in ISAS:
        with use_isa(isa):
            y = torch.empty(m, n)
            qgemm.dispatch_for(pw, m)(xq, pw.data, y, count=1, a_scale=torch.ones(m), a_sum=rs)
            outs.append(y)
    ref = xq[:, :k].to(torch.float64) @ (q.to(torch.float64) - (zero.to(torch.float64) if zero is not None else 0)).T
    assert torch.equal(outs[0].to(torch.float64), ref)
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


def test_numpy_inputs():
    q = np.random.default_rng(0).integers(-1, 2, size=(70, 40)).astype(np.int8)
    pw = qgemm.pack_weight(q, np.full(70, 0.5, dtype=np.float32), "ternary")
    x = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    y = qgemm.qlinear(x, pw, mode="weight_only")
    ref = torch.from_numpy(x).double() @ (torch.from_numpy(q).double() * 0.5).T
    assert torch.allclose(y.double(), ref, atol=1e-4)


# ----------------------------------------------------------------------------- lowbit.quant

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("weights,group,acts,act_group", [
    ("ternary", None, "int8", None), ("int2_sym", 64, "int8", None), ("int2_asym", 32, "int8", None),
    ("int1", None, "int8", None), ("int4_asym", 128, "none", None), ("int8", None, "int8", None),
    ("int4_sym", None, "int8", 64), ("ternary", None, "none", None),
])
def test_matches_lowbit_linear_op(isa, weights, group, acts, act_group):
    """Cross-check against the eager reference op of lowbit.quant on a real quantized layer."""
    from lowbit.quant import LowBitLinear, QuantConfig
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 96)
    cfg = QuantConfig(weights=weights, activations=acts, group_size=group, act_group_size=act_group)
    mod = LowBitLinear.from_float(lin, cfg)
    spec = mod.spec
    q = mod.int_weight()
    scales = mod.scales
    zp = mod.zero_points
    x = torch.randn(7, 200)
    ref = mod(x)
    g = spec.group_size if spec.granularity == "group" else None
    kblock = act_group if act_group else None
    with use_isa(isa):
        if act_group:  # per-K-block activation scales: one K-block per activation block
            y, _, _ = run_int8_layer(spec.weight_format, x, q, scales.reshape(96, -1)[:, 0]
                                     if spec.granularity != "group" else scales,
                                     zp, g, mod.bias.detach(), True, kblock, torch.float32)
        else:
            pw = qgemm.pack_weight(q, scales, spec.weight_format, group=g, zero=zp)
            y = qgemm.qlinear(x, pw, mod.bias.detach(), mode="int8" if acts == "int8" else "weight_only")
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4), (y - ref).abs().max()


# ----------------------------------------------------------------------------- bad input

def test_dispatch_errors_are_exceptions():
    def kern(**kw):
        args = dict(fmt="ternary", a_dtype=torch.int8, c_dtype=torch.float32, m=4, n=64, kblock=64,
                    lda=64, ldb=1536, ldc=64, stride_a=64, stride_b=1536, ld_aux=1)
        args.update(kw)
        fmt, ad, cd, m, n, kb = (args.pop(x) for x in ("fmt", "a_dtype", "c_dtype", "m", "n", "kblock"))
        return QGemmKernel(fmt, ad, cd, m, n, kb, **args)

    kern()  # the baseline is valid
    with pytest.raises(QGemmError, match="invalid size"):
        kern(m=0)
    with pytest.raises(QGemmError, match="multiple of the format's block"):
        kern(kblock=6, lda=64, stride_a=64)
    with pytest.raises(QGemmError, match="multiple of the format's block"):
        kern(fmt="int1", kblock=12, lda=64, stride_a=64)
    with pytest.raises(QGemmError, match="leading dimension"):
        kern(lda=32)
    with pytest.raises(QGemmError, match="leading dimension"):
        kern(ldc=10)
    with pytest.raises(QGemmError, match="leading dimension"):
        kern(stride_b=100)
    kern(c_dtype=torch.bfloat16, beta=True)  # residual into a bf16 C
    kern(activation="silu", beta=True, bias=True)
    with pytest.raises(ValueError, match="unknown epilogue activation"):
        kern(activation="gelu")
    with pytest.raises(QGemmError, match="unsupported"):  # one activation at most (native check)
        QGemmKernel("ternary", torch.int8, torch.float32, 4, 64, 64, lda=64, ldb=1536, ldc=64,
                    stride_a=64, stride_b=1536, ld_aux=1, activation="relu").__class__  # baseline
        h = qgemm._lib().lowbit_qgemm_dispatch(1, 1, 2, 4, 64, 64, 64, 1536, 64, 64, 1536, 1,
                                               qgemm.F_ACT_RELU | qgemm.F_ACT_SILU)
        qgemm._raise("dispatch", h)
    with pytest.raises(QGemmError, match="unsupported"):
        kern(a_dtype=torch.float32, per_block_act_scale=True)
    with pytest.raises(ValueError, match="unknown weight format"):
        kern(fmt="int3")
    with pytest.raises(TypeError, match="output dtype"):
        kern(c_dtype=torch.int8)


def test_invoke_checks_array_sizes():
    q = torch.ones(64, 64, dtype=torch.int8)
    pw = qgemm.pack_weight(q, torch.ones(64), "ternary")
    kern = qgemm.dispatch_for(pw, 4)
    xq, sx, rs = qgemm.quantize_activations(torch.randn(4, 64), 64)
    y = torch.empty(4, 64)
    kern(xq, pw.data, y, count=1, a_scale=sx, a_sum=rs)
    with pytest.raises(ValueError, match="a is too small"):
        kern(xq[:3], pw.data, y, count=1, a_scale=sx, a_sum=rs)
    with pytest.raises(ValueError, match="b is too small"):
        kern(xq, pw.data[:-1], y, count=1, a_scale=sx, a_sum=rs)
    with pytest.raises(ValueError, match="c is too small"):
        kern(xq, pw.data, y[:3], count=1, a_scale=sx, a_sum=rs)
    with pytest.raises(ValueError, match="overrun lda"):
        kern(xq, pw.data, y, count=2, a_scale=sx, a_sum=rs)
    with pytest.raises(ValueError, match="need a_scale"):
        kern(xq, pw.data, y, count=1)
    with pytest.raises(TypeError, match="a must have dtype int8"):
        kern(xq.float(), pw.data, y, count=1, a_scale=sx, a_sum=rs)
    with pytest.raises(ValueError, match="contiguous"):
        kern(xq.t(), pw.data, y, count=1, a_scale=sx, a_sum=rs)
    with pytest.raises(ValueError, match="count must be"):
        kern(xq, pw.data, y, count=0, a_scale=sx, a_sum=rs)


def test_pack_rejects_bad_weights():
    q = torch.zeros(8, 16, dtype=torch.int8)
    q[3, 5] = 2
    with pytest.raises(ValueError, match=r"q\[3, 5\] = 2 is outside the ternary code range"):
        qgemm.pack_weight(q, torch.ones(8), "ternary")
    with pytest.raises(ValueError, match="0 is not a code"):
        qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8), "int1")
    with pytest.raises(ValueError, match="needs integer zero points"):
        qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8), "int2_asym")
    with pytest.raises(ValueError, match="takes no zero point"):
        qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8), "int2_sym",
                          zero=torch.zeros(8, 1))
    with pytest.raises(ValueError, match="zero points must lie"):
        qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8), "int2_asym",
                          zero=torch.full((8, 1), 4))
    with pytest.raises(ValueError, match="per-channel scale must have shape"):
        qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(7), "int8")
    with pytest.raises(ValueError, match="does not match"):
        qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, 3), "int8", group=8)
    with pytest.raises(TypeError, match="q must have dtype int8"):
        qgemm.pack_weight(torch.zeros(8, 16), torch.ones(8), "int8")
    with pytest.raises(ValueError, match="NaN"):
        qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.full((8,), float("nan")), "int8")
    with pytest.raises(ValueError, match="kblock=16 must equal group=8"):
        qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, 2), "int8", kblock=16)
    with pytest.raises(QGemmError, match="multiple of the format's block"):
        qgemm.pack_weight(torch.ones(8, 16, dtype=torch.int8), torch.ones(8), "int1", kblock=12)


def test_native_pack_rejects_out_of_range_codes():
    """The C entry point validates too (for callers that bypass Python)."""
    import ctypes
    lib = qgemm._lib()
    q = torch.full((4, 8), 3, dtype=torch.int8)
    out = torch.empty(qgemm.packed_layout("ternary", 4, 8, 8)[0], dtype=torch.uint8)
    s = torch.ones(4)
    rc = lib.lowbit_qpack(1, q.data_ptr(), 4, 8, 8, s.data_ptr(), 8, None, 8, out.data_ptr())
    assert rc == -qgemm.E_QRANGE
    assert "outside the format's range" in str(QGemmError("pack", rc))
    from lowbit.runtime import error_string
    assert error_string(rc) == "weight code or zero point outside the format's range"
    assert lib.lowbit_qgemm_invoke(0, None, 0, None, 0, None, 0, None, 0, None, 0, None, 0, 1) < 0
    assert lib.lowbit_qgemm_invoke(10**9, None, 0, None, 0, None, 0, None, 0, None, 0, None, 0, 1) < 0
    del ctypes


def test_qlinear_bad_input():
    pw = qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8), "int8")
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 16\]"):
        qgemm.qlinear(torch.randn(2, 15), pw)
    with pytest.raises(TypeError, match="x must have dtype"):
        qgemm.qlinear(torch.randn(2, 16, dtype=torch.float64), pw)
    with pytest.raises(ValueError, match="mode must be"):
        qgemm.qlinear(torch.randn(2, 16), pw, mode="int4")
    with pytest.raises(ValueError, match="bias must have shape"):
        qgemm.qlinear(torch.randn(2, 16), pw, torch.zeros(7))
    bad = qgemm.PackedWeight(pw.data[:-1], pw.fmt, pw.n, pw.k, pw.kblock, pw.kblock_bytes,
                             pw.nblock_bytes, pw.num_kblocks)
    with pytest.raises(ValueError, match="packed data has"):
        qgemm.qlinear(torch.randn(2, 16), bad)
    with pytest.raises(ValueError, match="non-empty K"):
        qgemm.quantize_activations(torch.randn(2, 0), 16)
    with pytest.raises(ValueError, match="kblock must be a positive multiple of 4"):
        qgemm.quantize_activations(torch.randn(2, 16), 6)
    y = qgemm.qlinear(torch.randn(2, 3, 16), pw)  # leading dims are flattened and restored
    assert y.shape == (2, 3, 8)


# ----------------------------------------------------------------------------- bounds

class GuardedArena:
    """Copies of arrays placed flush against an inaccessible (PROT_NONE) page, so a kernel
    reading or writing one byte past the end (or before the start) faults. ASan does not see
    AVX-512 masked loads and stores, and valgrind has no AVX-512; guard pages see everything."""

    PAGE = 4096

    def __init__(self):
        import ctypes
        import mmap
        self._mmap, self._ctypes = mmap, ctypes
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._keep = []

    def place(self, t: torch.Tensor, at_end: bool = True) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        data_pages = -(-nbytes // self.PAGE)
        mm = self._mmap.mmap(-1, (data_pages + 2) * self.PAGE)
        base = self._ctypes.addressof(self._ctypes.c_char.from_buffer(mm))
        for page in (0, data_pages + 1):
            assert self._libc.mprotect(base + page * self.PAGE, self.PAGE, 0) == 0
        offset = (data_pages + 1) * self.PAGE - nbytes if at_end else self.PAGE
        out = torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
        out.copy_(t)
        self._keep.append(mm)
        return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("at_end", [True, False])
def test_kernels_stay_in_bounds(isa, at_end):
    arena = GuardedArena()
    gen = torch.Generator().manual_seed(11)
    for fmt in FMTS:
        for m, n, k in [(1, 1, 8), (3, 17, 24), (7, 65, 72), (2, 130, 8)]:
            q = random_codes(gen, fmt, n, k)
            zero = random_zero(gen, fmt, n, 1)
            pw = qgemm.pack_weight(q, torch.rand(n) + 0.1, fmt, zero=zero)
            packed = arena.place(pw.data, at_end)
            pw_g = qgemm.PackedWeight(packed, *[getattr(pw, f) for f in
                                               ("fmt", "n", "k", "kblock", "kblock_bytes",
                                                "nblock_bytes", "num_kblocks")])
            x = torch.randn(m, k, generator=gen)
            bias = arena.place(torch.randn(n, generator=gen), at_end)
            with use_isa(isa):
                xq, sx, rs = qgemm.quantize_activations(arena.place(x, at_end), pw.kblock)
                xq, sx, rs = (arena.place(t, at_end) for t in (xq, sx, rs))
                for c_dtype in (torch.float32, torch.bfloat16):
                    y = arena.place(torch.zeros(m, n, dtype=c_dtype), at_end)
                    qgemm.dispatch_for(pw, m, c_dtype=c_dtype, bias=True)(
                        xq, packed, y, count=1, a_scale=sx, a_sum=rs, bias=bias)
                    # the fused epilogue reads C (residual) and runs the activation on tails
                    qgemm.dispatch_for(pw, m, c_dtype=c_dtype, bias=True, beta=True, activation="silu")(
                        xq, packed, y, count=1, a_scale=sx, a_sum=rs, bias=bias)
                for x_dtype in (torch.float32, torch.bfloat16):
                    xa = arena.place(torch.zeros(m, pw.k_padded, dtype=x_dtype), at_end)
                    y = arena.place(torch.zeros(m, n), at_end)
                    qgemm.dispatch_for(pw, m, a_dtype=x_dtype)(xa, packed, y, count=1)
                y = qgemm.qlinear(arena.place(x, at_end), pw_g, mode="weight_only")
                assert y.shape == (m, n)
