"""Quantization rules of every format, checked against straightforward per-group loops."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import (
    WEIGHT_FORMATS,
    LowBitSpec,
    dequantize_weight,
    exact_representation,
    pack_codes,
    quantize_activations_int8,
    quantize_weight,
    unpack_codes,
)

FORMATS = sorted(WEIGHT_FORMATS)
ODD_K = [1, 3, 7, 17, 31, 33, 63, 127, 129, 200]


def spec_strategy():
    @st.composite
    def build(draw):
        name = draw(st.sampled_from(FORMATS))
        grans = ["channel", "group"] + (["tensor"] if name == "ternary" else [])
        gran = draw(st.sampled_from(grans))
        k = draw(st.one_of(st.sampled_from(ODD_K), st.integers(1, 300)))
        n = draw(st.integers(1, 7))
        gs = draw(st.sampled_from([8, 16, 32, 64, 128, 256])) if gran == "group" else 0
        return LowBitSpec(name, gran, gs, k, n)
    return build()


def group_slices(spec):
    """(row range, column slice, scale index) per scale group, the plain way."""
    n, k = spec.out_features, spec.in_features
    if spec.granularity == "tensor":
        yield range(n), slice(0, k), (0, 0)
        return
    for row in range(n):
        for g in range(spec.num_groups):
            yield range(row, row + 1), slice(g * spec.group_width, min(k, (g + 1) * spec.group_width)), (row, g)


def loop_reference(w, spec):
    """The documented rules, one group at a time, in float64 for the statistics."""
    fmt = spec.format
    s_ref = torch.empty(spec.scale_shape, dtype=torch.float32)
    z_ref = torch.zeros(spec.scale_shape, dtype=torch.int8) if fmt.asymmetric else None
    q_ref = torch.empty(w.shape, dtype=torch.int8)
    for rows, cols, idx in group_slices(spec):
        block = w[rows.start:rows.stop, cols]
        b64 = block.double()
        hi, lo = max(float(b64.max()), 0.0), min(float(b64.min()), 0.0)
        if fmt.name in ("ternary", "int1"):
            stat = float(b64.abs().sum()) / block.numel()
        elif fmt.asymmetric:
            stat = (hi - lo) / fmt.qmax
        else:
            stat = max(hi / fmt.qmax, lo / fmt.qmin)
        s = max(torch.tensor(stat, dtype=torch.float32).item(), torch.tensor(1e-8, dtype=torch.float32).item())
        s32 = torch.tensor(s, dtype=torch.float32)
        s_ref[idx] = s32
        if fmt.name == "int1":
            q = torch.where(block >= 0, 1, -1)
        elif fmt.asymmetric:
            z = int(torch.round(torch.tensor(-lo, dtype=torch.float32) / s32).clamp(0, fmt.qmax))
            z_ref[idx] = z
            q = (torch.round(block / s32) + z).clamp(0, fmt.qmax)
        else:
            q = torch.round(block / s32).clamp(fmt.qmin, fmt.qmax)
        q_ref[rows.start:rows.stop, cols] = q.to(torch.int8)
    return q_ref, s_ref, z_ref


@settings(max_examples=80, deadline=None)
@given(spec=spec_strategy(), seed=st.integers(0, 2**31 - 1), bf16=st.booleans())
def test_quantize_matches_rules_and_round_trips_exactly(spec, seed, bf16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(spec.out_features, spec.in_features, generator=g) * 0.05
    if bf16:
        w = w.bfloat16()
    qw = quantize_weight(w, spec)
    q_ref, s_ref, z_ref = loop_reference(w.float(), spec)
    assert torch.equal(qw.scales, s_ref)
    assert torch.equal(qw.q, q_ref)
    assert (qw.zero_points is None) == (z_ref is None)
    if z_ref is not None:
        assert torch.equal(qw.zero_points, z_ref)
    # quantize -> pack -> unpack -> dequantize reproduces the quantized values bit for bit
    q_back = unpack_codes(pack_codes(qw.q, spec.format), spec.format, spec.in_features)
    assert torch.equal(q_back, qw.q)
    deq = dequantize_weight(q_back, qw.scales, qw.zero_points, spec)
    assert torch.equal(deq, dequantize_weight(qw.q, qw.scales, qw.zero_points, spec))
    # error bounds implied by the rules (no clipping for symmetric int formats)
    err = (deq - w.float()).abs()
    s_full = qw.scales.repeat_interleave(spec.group_width, 1)[:, :spec.in_features] \
        if spec.granularity != "tensor" else qw.scales
    if spec.format.name not in ("ternary", "int1"):
        # half a step (a full step for asymmetric: z is rounded) + the rounding of q * s
        bound = (0.5 if not spec.format.asymmetric else 1.0) * s_full + 1e-6 * (deq.abs() + s_full)
        assert bool((err <= bound).all())


def test_ternary_is_bitnet_absmean():
    w = torch.tensor([[0.4, -0.1, 0.0, 2.0], [-0.3, 0.05, 0.2, -0.9]])
    qw = quantize_weight(w, LowBitSpec("ternary", "tensor", 0, 4, 2))
    s = w.abs().mean()
    assert torch.allclose(qw.scales, s.reshape(1, 1))
    assert qw.q.tolist() == torch.clamp(torch.round(w / s), -1, 1).to(torch.int8).tolist()


def test_all_zero_groups_get_the_floor_scale():
    for name in FORMATS:
        qw = quantize_weight(torch.zeros(2, 16), LowBitSpec(name, "channel", 0, 16, 2))
        assert torch.all(qw.scales == torch.tensor(1e-8, dtype=torch.float32))
        deq = dequantize_weight(qw.q, qw.scales, qw.zero_points, LowBitSpec(name, "channel", 0, 16, 2))
        if name != "int1":
            assert torch.equal(deq, torch.zeros(2, 16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(bad):
    w = torch.zeros(2, 8)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_weight(w, LowBitSpec("ternary", "tensor", 0, 8, 2))


def test_weight_shape_and_dtype_errors():
    spec = LowBitSpec("int2_asym", "group", 32, 40, 3)
    with pytest.raises(ValueError, match=r"shape \[3, 40\]"):
        quantize_weight(torch.zeros(40, 3), spec)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_weight(torch.zeros(3, 40, dtype=torch.int32), spec)


@settings(max_examples=40, deadline=None)
@given(spec=spec_strategy(), seed=st.integers(0, 2**31 - 1))
def test_exact_representation_recovers_lowbit_float_weights(spec, seed):
    """A float weight that is q * s (a QAT export) is stored losslessly when the group hits an
    end of the value set (symmetric formats); asymmetric detection is best effort but exact."""
    fmt = spec.format
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor(fmt.values, dtype=torch.int8)
    q = vals[torch.randint(0, len(vals), (spec.out_features, spec.in_features), generator=g)]
    s = (torch.rand(spec.scale_shape, generator=g) * 0.1 + 0.01).float()
    z = torch.randint(0, fmt.qmax + 1, spec.scale_shape, generator=g).to(torch.int8) if fmt.asymmetric else None
    end = fmt.qmax if fmt.name != "int2_sym" else fmt.qmin
    for rows, cols, _ in group_slices(spec):  # make every group contain an end value
        q[rows.start, cols.start] = end
    w = dequantize_weight(q, s, z, spec)
    rep = exact_representation(w, spec)
    if fmt.asymmetric and rep is None:
        return
    assert rep is not None
    assert torch.equal(dequantize_weight(rep.q, rep.scales, rep.zero_points, spec), w)
    if not fmt.asymmetric:
        assert torch.equal(rep.q, q)


def test_exact_representation_rejects_ordinary_weights():
    w = torch.randn(5, 33)
    for name in FORMATS:
        assert exact_representation(w, LowBitSpec(name, "channel", 0, 33, 5)) is None


def test_ternary_qat_export_needs_detection():
    """absmean re-quantization of an exactly ternary tensor picks the wrong scale."""
    q = torch.tensor([[1, 0, -1, 0], [0, 0, 1, 1]], dtype=torch.int8)
    w = q.float() * 0.125
    spec = LowBitSpec("ternary", "tensor", 0, 4, 2)
    rep = exact_representation(w, spec)
    assert torch.equal(rep.q, q) and rep.scales.item() == 0.125
    assert quantize_weight(w, spec).scales.item() != 0.125


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 6), k=st.sampled_from(ODD_K), block=st.sampled_from([0, 8, 32, 64]),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-7, 1e-3, 1.0, 300.0]))
def test_int8_activation_quantization(m, k, block, seed, scale):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * scale
    xq, s_x = quantize_activations_int8(x, block)
    width = block or k
    assert s_x.shape == (m, math.ceil(k / width))
    for row in range(m):
        for b in range(s_x.shape[1]):
            seg = x[row, b * width:(b + 1) * width]
            s = torch.tensor(127.0, dtype=torch.float32) / seg.abs().max().clamp(min=1e-5)
            assert s_x[row, b] == s
            assert torch.equal(xq[row, b * width:(b + 1) * width], torch.clamp(torch.round(seg * s), -128, 127))
    assert float(xq.abs().max()) <= 127
