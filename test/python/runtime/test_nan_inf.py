"""NaN / Inf semantics of the native kernels equal the eager reference op on every ISA.

Eager (`torch.ops.lowbit.linear`, docs/formats.md), int8 activations: s = 127 / max(|x|)
.clamp(1e-5) and round(x * s), so a row holding a NaN has s = NaN (all outputs NaN) and a row
holding +-Inf has s = 0 and round(Inf * 0) = NaN (all outputs NaN). Weight-only: a plain fp32
x @ W^T (Inf * w = +-Inf, Inf * 0 = NaN, +Inf + -Inf = NaN). Fused epilogues follow torch:
relu(NaN) = NaN, relu(-Inf) = 0, silu(-Inf) = NaN, silu(+Inf) = +Inf, NaN + r = NaN.
Each kernel output is compared with eager `act(lowbit.linear(x, bias)) [+ residual]`: NaN
positions and +-Inf values exactly, finite values to a tolerance.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from lowbit.runtime import supported_isas
from lowbit.runtime import qgemm

from isa_paths import tile_isa, use_isa

ISAS = supported_isas()
NAN, INF = float("nan"), float("inf")
ROWS = ["nan", "pinf", "ninf", "nan_and_inf", "huge", "flt_max", "zeros", "tiny", "normal"]


def special_rows(k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(len(ROWS), k, generator=gen)
    for i, kind in enumerate(ROWS):
        if kind == "nan":
            x[i, k // 3] = NAN
        elif kind == "pinf":
            x[i, k - 1] = INF  # last column: the K tail of a block
        elif kind == "ninf":
            x[i, 0] = -INF
        elif kind == "nan_and_inf":
            x[i, 1 % k] = INF
            x[i, k // 2] = NAN
        elif kind == "huge":
            x[i] *= 1e36
        elif kind == "flt_max":
            x[i, k // 2] = 3.4028234e38
        elif kind == "zeros":
            x[i] = 0
        elif kind == "tiny":
            x[i] *= 1e-30
    return x


ACTS = {None: lambda v: v, "relu": torch.relu, "silu": F.silu, "relu2": lambda v: torch.relu(v) ** 2}


def make_layer(weights, acts, act_group, k, n, seed):
    from lowbit.quant import LowBitLinear, QuantConfig
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    cfg = QuantConfig(weights=weights, activations=acts, act_group_size=act_group)
    return LowBitLinear.from_float(lin, cfg)


def compare(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    y, ref = y.to(torch.float32), ref.to(torch.float32)
    nan_y, nan_r = torch.isnan(y), torch.isnan(ref)
    assert torch.equal(nan_y, nan_r), (
        f"{what}: NaN positions differ: kernel NaN at {nan_y.nonzero().tolist()[:6]}, "
        f"eager NaN at {nan_r.nonzero().tolist()[:6]}")
    inf_y, inf_r = torch.isinf(y), torch.isinf(ref)
    assert torch.equal(inf_y, inf_r) and torch.equal(y[inf_y], ref[inf_r]), (
        f"{what}: Inf values differ: kernel {y[inf_y | inf_r].tolist()[:6]} "
        f"eager {ref[inf_y | inf_r].tolist()[:6]}")
    fin = ~(nan_y | inf_y)
    torch.testing.assert_close(y[fin], ref[fin], rtol=2e-2, atol=1e-3 * (1 + ref[fin].abs().max()),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_f32", "x_bf16"])
@pytest.mark.parametrize("mode,act_group", [("int8", None), ("int8", 64), ("none", None)],
                         ids=["int8", "int8_block64", "weight_only"])
def test_qlinear_rows_match_eager(isa, x_dtype, mode, act_group):
    k, n = 200, 96
    mod = make_layer("ternary", mode, act_group, k, n, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = special_rows(k, gen).to(x_dtype)
    with torch.no_grad():
        ref = mod(x)  # torch.ops.lowbit.linear, output in x's dtype
    g = None
    if act_group:  # per-K-block activation scales: one kernel K-block per activation block
        pw = qgemm.pack_weight(mod.int_weight(), mod.scales, "ternary", kblock=act_group)
        xq, sx, rs = qgemm.quantize_activations(x, act_group, per_block=True)
        y = torch.empty(len(ROWS), n, dtype=x_dtype)
        with use_isa(isa):
            kern = qgemm.dispatch_for(pw, len(ROWS), c_dtype=x_dtype, bias=True,
                                      per_block_act_scale=True)
            kern(xq, pw.data, y, count=pw.num_kblocks, a_scale=sx, a_sum=rs,
                 bias=mod.bias.detach().float())
    else:
        pw = qgemm.pack_weight(mod.int_weight(), mod.scales, "ternary", group=g)
        with use_isa(isa):
            y = qgemm.qlinear(x, pw, mod.bias.detach(), mode="int8" if mode == "int8" else "weight_only")
    compare(y, ref, f"{isa} {mode} {x_dtype}")
    # the test must see the special values at all
    assert torch.isnan(ref[ROWS.index("nan")]).all()
    if mode == "none":
        assert torch.isinf(ref[ROWS.index("pinf")]).any()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", [None, "relu", "silu", "relu2"])
@pytest.mark.parametrize("mode", ["int8", "f32", "bf16"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["c_f32", "c_bf16"])
def test_fused_epilogues_match_eager(isa, act, mode, out_dtype):
    """C = [C_in +] act(linear(x) + bias) as one tile vs eager torch ops on lowbit.linear."""
    k, n = 130, 70  # K not a multiple of the 4-granule (padded K), N tail (70 = 64 + 6)
    mod = make_layer("int2_sym", "int8" if mode == "int8" else "none", None, k, n, seed=3)
    gen = torch.Generator().manual_seed(4)
    x_dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    x = special_rows(k, gen).to(x_dtype)
    m = x.shape[0]
    bias = torch.randn(n, generator=gen)
    bias[5] = NAN  # one NaN bias column: NaN in every row of that column
    c_in = (torch.randn(m, n, generator=gen) * 3).to(out_dtype)
    c_in[ROWS.index("normal"), 9] = NAN  # a NaN residual
    pw = qgemm.pack_weight(mod.int_weight(), mod.scales, "int2_sym")
    with torch.no_grad():
        mod.bias.copy_(bias)
        lin = mod(x)  # torch.ops.lowbit.linear with the bias, in x's dtype
    for residual in (False, True):
        ref = ACTS[act](lin.to(torch.float32))
        if residual:
            ref = ref + c_in.to(torch.float32)
        y = c_in.clone() if residual else torch.full((m, n), 7.0).to(out_dtype)
        with use_isa(isa):
            if mode == "int8":
                xq, sx, rs = qgemm.quantize_activations(x, pw.kblock)
                kern = qgemm.dispatch_for(pw, m, c_dtype=out_dtype, bias=True, beta=residual,
                                          activation=act)
                kern(xq, pw.data, y, count=pw.num_kblocks, a_scale=sx, a_sum=rs, bias=bias)
            else:
                a = torch.zeros(m, pw.k_padded, dtype=x_dtype)
                a[:, :k] = x
                kern = qgemm.dispatch_for(pw, m, a_dtype=x_dtype, c_dtype=out_dtype, bias=True,
                                          beta=residual, activation=act)
                kern(a, pw.data, y, count=pw.num_kblocks, bias=bias)
        assert kern.isa == tile_isa(isa, mode == "int8")
        compare(y, ref.to(out_dtype), f"{isa} {mode} act={act} residual={residual} {out_dtype}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_quantizer_marks_non_finite_rows(isa, per_block, x_dtype):
    """NaN / +-Inf anywhere in a row (per token) or a K-block (per block): scale NaN, codes 0,
    row sum 0; every other row / block is quantized exactly as before."""
    k, kblock = 100, 32
    gen = torch.Generator().manual_seed(5)
    x = special_rows(k, gen).to(x_dtype)
    with use_isa(isa):
        xq, s, rs = qgemm.quantize_activations(x, kblock, per_block=per_block)
    xf = x.to(torch.float32)
    nkb = -(-k // kblock)
    for r in range(x.shape[0]):
        for b in range(nkb if per_block else 1):
            cols = slice(b * kblock, min(k, (b + 1) * kblock)) if per_block else slice(0, k)
            seg = xf[r, cols]
            sc = s[r, b] if per_block else s[r]
            if not torch.isfinite(seg).all():
                assert torch.isnan(sc), (r, b)
                blocks = range(b, b + 1) if per_block else range(nkb)
                for bb in blocks:
                    assert int(rs[r, bb]) == 0
                    assert (xq[r, bb * kblock:(bb + 1) * kblock] == 0).all()
            else:
                want = torch.tensor(127.0) / seg.abs().max().clamp(min=1e-5)
                assert float(sc) == float(want), (r, b, float(sc), float(want))
                q = torch.round(seg * want).clamp(-128, 127)
                assert torch.equal(xq[r, cols].to(torch.float32), q), (r, b)


def test_quantize_zero_rows_is_a_no_op():
    """A dynamic token count of 0: the C entry point validates and returns 0 without touching
    (possibly null) buffers; the Python wrapper returns empty tensors; qlinear an empty output."""
    lib = qgemm._lib()
    assert lib.lowbit_qquant_act(2, None, 0, 64, 64, 64, 0, None, 64, None, None, 1) == 0
    assert lib.lowbit_qquant_act(2, None, -1, 64, 64, 64, 0, None, 64, None, None, 1) == -2
    assert lib.lowbit_qquant_act(2, None, 0, 64, 64, 6, 0, None, 64, None, None, 1) == -4
    assert lib.lowbit_qquant_act(9, None, 0, 64, 64, 64, 0, None, 64, None, None, 1) == -1
    xq, s, rs = qgemm.quantize_activations(torch.empty(0, 70), 32)
    assert xq.shape == (0, 96) and s.shape == (0,) and rs.shape == (0, 3)
    pw = qgemm.pack_weight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8), "ternary")
    for mode in ("int8", "weight_only"):
        y = qgemm.qlinear(torch.empty(0, 16), pw, mode=mode)
        assert y.shape == (0, 8)
        y = qgemm.qlinear(torch.empty(2, 0, 16), pw, mode=mode)
        assert y.shape == (2, 0, 8)
