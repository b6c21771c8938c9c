"""torch.ops.lowbit.linear against a float64 rendering of the documented formula, and bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.quant import WEIGHT_FORMATS, CorruptPackedWeightError, LowBitLinear, LowBitSpec, QuantConfig

FORMATS = sorted(WEIGHT_FORMATS)


@st.composite
def layers(draw):
    name = draw(st.sampled_from(FORMATS))
    gran = draw(st.sampled_from(["channel", "group"] + (["tensor"] if name == "ternary" else [])))
    k = draw(st.one_of(st.sampled_from([1, 3, 17, 31, 127, 129]), st.integers(1, 260)))
    n = draw(st.one_of(st.sampled_from([1, 3, 17]), st.integers(1, 40)))
    act = draw(st.sampled_from(["none", "int8"]))
    cfg = QuantConfig(
        weights=name, granularity=gran, activations=act,
        group_size=draw(st.sampled_from([8, 32, 64, 128])) if gran == "group" else None,
        act_group_size=draw(st.sampled_from([None, 8, 16, 64])) if act == "int8" else None)
    return cfg.spec_for(k, n), cfg, draw(st.booleans())


def random_layer(spec, cfg, bias, seed):
    g = torch.Generator().manual_seed(seed)
    fmt = spec.format
    vals = torch.tensor(fmt.values, dtype=torch.int8)
    q = vals[torch.randint(0, len(vals), (spec.out_features, spec.in_features), generator=g)]
    s = torch.rand(spec.scale_shape, generator=g) * 0.1 + 1e-3
    z = torch.randint(0, fmt.qmax + 1, spec.scale_shape, generator=g).to(torch.int8) if fmt.asymmetric else None
    b = torch.randn(spec.out_features, generator=g) if bias else None
    return LowBitLinear.from_quantized(q, s, z, b, config=cfg), q, s, z, b


def formula_fp64(x, spec, q, s, z, b):
    """docs/formats.md in float64, written per index rather than per segment."""
    k, n = spec.in_features, spec.out_features
    cols = torch.arange(k)
    g_of_k = cols // spec.group_width
    s_full = s[:, g_of_k] if spec.granularity != "tensor" else s.expand(n, k)
    zq = q.double() - (z.double()[:, g_of_k] if z is not None else 0.0)
    x2 = x.reshape(-1, k).float()
    if spec.act_format == "none":
        y = x2.double() @ (zq * s_full.double()).T
        terms = x2.double().abs() @ (zq * s_full.double()).abs().T
    else:
        width = spec.act_group_size or k
        b_of_k = cols // width
        absmax = torch.zeros(x2.shape[0], b_of_k.max().item() + 1).scatter_reduce(
            1, b_of_k.expand(x2.shape[0], k), x2.abs(), "amax")
        s_x = torch.full_like(absmax, 127.0) / absmax.clamp(min=1e-5)  # fp32, true division
        xq = torch.clamp(torch.round(x2 * s_x[:, b_of_k]), -128, 127).double()
        r = xq / s_x[:, b_of_k].double()
        y = r @ (zq * s_full.double()).T
        terms = r.abs() @ (zq * s_full.double()).abs().T
    if b is not None:
        y = y + b.double()
        terms = terms + b.double().abs()
    return y.reshape(*x.shape[:-1], n), terms.reshape(*x.shape[:-1], n)


@settings(max_examples=70, deadline=None)
@given(layer=layers(), m=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**31 - 1))
def test_reference_op_matches_fp64_formula(layer, m, seed):
    spec, cfg, bias = layer
    module, q, s, z, b = random_layer(spec, cfg, bias, seed)
    assert module.spec == spec
    x = torch.randn(m, spec.in_features, generator=torch.Generator().manual_seed(seed + 1))
    y = module(x)
    assert y.dtype == torch.float32 and y.shape == (m, spec.out_features)
    y64, terms = formula_fp64(x, spec, q, s, z, b)
    # fp32 accumulation over K (weight-only) or over groups (int8) -> error <= c * K * u * sum|terms|
    tol = 4 * (spec.in_features + 2) * 2**-24 * terms + 1e-30
    assert bool(((y.double() - y64).abs() <= tol).all()), float(((y.double() - y64).abs() / terms).max())


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("group_size,act_group_size", [(None, None), (32, None), (32, 16), (16, 48)])
def test_int8_integer_part_is_exact(name, group_size, act_group_size):
    """With max|x| = 127 per block (s_x = 1), integer x and power-of-two weight scales,
    every step of the formula is exact, so the op must equal the fp64 formula bit for bit."""
    k, n = 101, 13
    cfg = QuantConfig(weights=name, activations="int8", group_size=group_size,
                      granularity=None if group_size else "channel", act_group_size=act_group_size)
    spec = cfg.spec_for(k, n)
    g = torch.Generator().manual_seed(7)
    fmt = spec.format
    q = torch.tensor(fmt.values, dtype=torch.int8)[torch.randint(0, len(fmt.values), (n, k), generator=g)]
    s = 2.0 ** torch.randint(-6, 2, spec.scale_shape, generator=g).float()
    z = torch.randint(0, fmt.qmax + 1, spec.scale_shape, generator=g).to(torch.int8) if fmt.asymmetric else None
    module = LowBitLinear.from_quantized(q, s, z, None, config=cfg)
    x = torch.randint(-127, 128, (4, k), generator=g).float()
    width = act_group_size or k
    x[:, ::width] = 127.0  # every activation block has max|x| = 127
    y64, _ = formula_fp64(x, spec, q, s, z, None)
    assert torch.equal(module(x).double(), y64)


@pytest.mark.parametrize("act", ["none", "int8"])
def test_bf16_activations_follow_the_fp32_definition(act):
    cfg = QuantConfig(weights="int2_asym", group_size=32, activations=act)
    spec = cfg.spec_for(77, 9)
    module, q, s, z, b = random_layer(spec, cfg, True, 3)
    x = torch.randn(3, 77).bfloat16()
    y = module(x)
    assert y.dtype == torch.bfloat16
    # defined as: upcast x to fp32 (exact), compute in fp32, round the result to bf16 once
    assert torch.equal(y, module(x.float()).bfloat16())
    y64, terms = formula_fp64(x.float(), spec, q, s, z, b)
    assert bool(((y.double() - y64).abs() <= 2**-8 * y64.abs() + 1e-4 * terms).all())


def test_leading_dims_and_1d_input():
    module = lowbit.LowBitLinear.from_float(torch.nn.Linear(19, 6), QuantConfig("ternary", "int8"))
    x = torch.randn(2, 3, 19)
    y = module(x)
    assert y.shape == (2, 3, 6)
    assert torch.equal(y[1, 2], module(x[1, 2]))
    assert torch.equal(y.reshape(6, 6), module(x.reshape(6, 19)))


def op_args(module):
    return [module.packed, module.scales, module.zero_points, module.bias, *module.spec.op_attributes()]


def call(x, packed, scales, zp, bias, *attrs):
    return torch.ops.lowbit.linear(x, packed, scales, zp, bias, *attrs)


@pytest.fixture
def ternary():
    return LowBitLinear.from_float(torch.nn.Linear(40, 8), QuantConfig("ternary", group_size=16))


@pytest.fixture
def asym():
    return LowBitLinear.from_float(torch.nn.Linear(40, 8), QuantConfig("int2_asym", group_size=16))


def test_bad_activation_dtype_and_shape(ternary):
    args = op_args(ternary)
    with pytest.raises(TypeError, match="float32 or bfloat16, got torch.float16"):
        call(torch.randn(2, 40).half(), *args)
    with pytest.raises(TypeError, match="got torch.int32"):
        call(torch.ones(2, 40, dtype=torch.int32), *args)
    with pytest.raises(ValueError, match=r"shape \[..., 40\]"):
        call(torch.randn(2, 39), *args)


def test_bad_scales(ternary, asym):
    x = torch.randn(2, 40)
    packed, scales, zp, bias, *attrs = op_args(ternary)
    with pytest.raises(ValueError, match=r"scales .* must have shape \[8, 3\], got \[8, 2\]"):
        call(x, packed, scales[:, :2].contiguous(), zp, bias, *attrs)
    with pytest.raises(TypeError, match="scales must be float32"):
        call(x, packed, scales.double(), zp, bias, *attrs)
    with pytest.raises(ValueError, match="finite and > 0"):
        call(x, packed, -scales, zp, bias, *attrs)
    with pytest.raises(ValueError, match="symmetric and takes no zero_points"):
        call(x, packed, scales, torch.zeros(8, 3, dtype=torch.int8), bias, *attrs)
    packed, scales, zp, bias, *attrs = op_args(asym)
    with pytest.raises(ValueError, match="needs zero_points"):
        call(x, packed, scales, None, bias, *attrs)
    with pytest.raises(ValueError, match=r"zero_points of int2_asym must lie in \[0, 3\]"):
        call(x, packed, scales, zp + 4, bias, *attrs)
    with pytest.raises(TypeError, match="zero_points must be int8"):
        call(x, packed, scales, zp.int(), bias, *attrs)


def test_bad_packed_weight(ternary):
    x = torch.randn(2, 40)
    packed, scales, zp, bias, *attrs = op_args(ternary)
    corrupt = packed.clone()
    corrupt[3, 5] = 0xFF  # four ternary codes of 3
    with pytest.raises(CorruptPackedWeightError, match="code 3 is not valid for format ternary"):
        call(x, corrupt, scales, zp, bias, *attrs)
    with pytest.raises(CorruptPackedWeightError, match="must be uint8"):
        call(x, packed.to(torch.int8), scales, zp, bias, *attrs)
    with pytest.raises(CorruptPackedWeightError, match=r"shape \[8, 10\]"):
        call(x, packed[:, :9], scales, zp, bias, *attrs)


def test_bad_bias_and_attributes(ternary):
    x = torch.randn(2, 40)
    packed, scales, zp, bias, fmt, gran, gs, k, n, act, ags = op_args(ternary)
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        call(x, packed, scales, zp, torch.zeros(7), fmt, gran, gs, k, n, act, ags)
    with pytest.raises(ValueError, match="unknown weight format 'ternery'"):
        call(x, packed, scales, zp, bias, "ternery", gran, gs, k, n, act, ags)
    with pytest.raises(ValueError, match="positive multiple of 8"):
        call(x, packed, scales, zp, bias, fmt, gran, 12, k, n, act, ags)
    with pytest.raises(ValueError, match="activation format"):
        call(x, packed, scales, zp, bias, fmt, gran, gs, k, n, "int4", ags)
    with pytest.raises(ValueError, match="per-tensor scales are only defined for ternary"):
        LowBitSpec("int2_sym", "tensor", 0, 40, 8)


def test_int8_unit_activations_are_taken_as_they_are():
    """act_format int8_unit: x already holds int8 values (quantized by the model): y = (x @ q^T) * s
    with scale 1 for x, exactly; anything else than integers in [-128, 127] is a ValueError."""
    torch.manual_seed(3)
    k, n = 200, 40
    q = torch.randint(-1, 2, (n, k)).float()
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = q * 0.25
    layer = LowBitLinear.from_float(lin, QuantConfig(weights="ternary", activations="int8_unit"))
    assert layer.spec.act_format == "int8_unit"
    x = torch.randint(-128, 128, (5, k)).float()
    y = layer(x)
    assert torch.equal(y, (x.double() @ q.double().T * 0.25).float())
    for bad in (0.5, 128.0, -129.0, float("nan")):
        xb = x.clone()
        xb[2, 7] = bad
        with pytest.raises(ValueError, match="int8_unit"):
            layer(xb)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_runtime_unit_scale_flag_copies_int8_values(isa):
    """lowbit_qquant_act with LOWBIT_QF_AUNIT: scale 1, xq = x, row sums, K tail zero-padded."""
    import ctypes
    from lowbit.runtime import library
    from lowbit.runtime.qgemm import _lib
    if isa not in library.supported_isas():
        pytest.skip(f"{isa} not supported by this CPU")
    before = library.current_isa()
    library.set_isa(isa)
    try:
        m, k, kb = 3, 70, 32
        nkb = -(-k // kb)
        x = torch.randint(-128, 128, (m, k)).float()
        xq = torch.full((m, nkb * kb), 99, dtype=torch.int8)
        s = torch.zeros(m)
        rs = torch.zeros(m, nkb, dtype=torch.int32)
        rc = _lib().lowbit_qquant_act(2, ctypes.c_void_p(x.data_ptr()), m, k, k, kb, 64,
                                      ctypes.c_void_p(xq.data_ptr()), nkb * kb, ctypes.c_void_p(s.data_ptr()),
                                      ctypes.c_void_p(rs.data_ptr()), nkb)
        assert rc == 0
        assert torch.equal(s, torch.ones(m))
        assert torch.equal(xq[:, :k].float(), x) and not xq[:, k:].any()
        padded = torch.nn.functional.pad(x, (0, nkb * kb - k)).view(m, nkb, kb).sum(-1)
        assert torch.equal(rs, padded.to(torch.int32))
        # with a per-block scale the flag is rejected (one scale per token only)
        rc = _lib().lowbit_qquant_act(2, ctypes.c_void_p(x.data_ptr()), m, k, k, kb, 64 | 4,
                                      ctypes.c_void_p(xq.data_ptr()), nkb * kb, ctypes.c_void_p(s.data_ptr()),
                                      ctypes.c_void_p(rs.data_ptr()), nkb)
        assert rc < 0
    finally:
        library.set_isa(before)
