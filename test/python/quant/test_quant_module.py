"""quantize_, LowBitLinear constructors, state_dict round trips and measured storage."""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import lowbit
from lowbit.quant import CorruptPackedWeightError, LowBitLinear, QuantConfig, pack_codes


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.attn = nn.MultiheadAttention(24, 2, batch_first=True)
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)
        self.head = nn.Linear(24, 11)

    def forward(self, x):
        h = self.norm(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.down(torch.relu(self.up(h))))


def test_quantize_replaces_linears_in_place():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 5, 24)
    ref = model(x)
    assert lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary", activations="int8")) is model
    for name in ("up", "down", "head"):
        assert isinstance(getattr(model, name), LowBitLinear)
    # MultiheadAttention's out_proj is a Linear subclass used through .weight: left alone
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert model.down.bias is None and model.up.bias is not None
    y = model(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert "weights=ternary, granularity=tensor, activations=int8" in repr(model.up)


def test_bf16_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8)).to(torch.bfloat16)
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    ref = model(x).float()
    lowbit.quantize_(model, QuantConfig("int8"))
    y = model(x)
    assert y.dtype == torch.bfloat16 and model[0].bias.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)


def test_filter_fn_and_per_layer_configs():
    model = Block()
    lowbit.quantize_(model, QuantConfig("int8"), filter_fn=lambda m, fqn: fqn == "head")
    lowbit.quantize_(model, lambda lin, fqn: QuantConfig("int2", group_size=8) if fqn == "up" else None)
    lowbit.quantize_(model, QuantConfig("ternary"))  # the rest; quantized layers are not touched
    assert model.head.spec.weight_format == "int8"
    assert model.up.spec.weight_format == "int2_asym" and model.up.spec.group_size == 8
    assert model.down.spec.weight_format == "ternary"
    with pytest.raises(TypeError, match="expected QuantConfig or None"):
        lowbit.quantize_(Block(), lambda lin, fqn: "ternary")
    with pytest.raises(TypeError, match="from_float"):
        lowbit.quantize_(nn.Linear(4, 4))


def test_quantized_module_holds_no_float_weight():
    model = nn.Sequential(nn.Linear(64, 32))
    weight_ref = weakref.ref(model[0].weight)
    lowbit.quantize_(model, QuantConfig("ternary"))
    gc.collect()
    assert weight_ref() is None
    assert list(model.parameters()) == []
    assert {k: v.dtype for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)} == {
        "0.packed": torch.uint8, "0.scales": torch.float32, "0.bias": torch.float32}


@pytest.mark.parametrize("n,k,group_size", [(6912, 2560, None), (2560, 6912, 128)])
def test_storage_of_a_2560x6912_ternary_layer(n, k, group_size):
    """Bytes actually held (storage sizes of all buffers) vs 2 bits/weight + fp32 scales."""
    cfg = QuantConfig("ternary", group_size=group_size)
    linear = nn.Linear(k, n, bias=False)
    layer = LowBitLinear.from_float(linear, cfg)
    held = sum(b.untyped_storage().nbytes() for b in layer.buffers())
    n_scales = layer.scales.numel()
    ideal = n * k * 2 // 8 + 4 * n_scales
    assert n_scales == (1 if group_size is None else n * -(-k // 128))
    assert abs(held - ideal) <= 0.02 * ideal
    assert held == ideal  # K is a multiple of 4: no padding at all
    fp32_bytes = linear.weight.untyped_storage().nbytes()
    assert held < fp32_bytes / 15.9 if group_size is None else held < fp32_bytes / 14


def test_state_dict_round_trip_and_format_check():
    cfg = QuantConfig("int4_asym", group_size=16, activations="int8")
    src = LowBitLinear.from_float(nn.Linear(37, 9), cfg)
    dst = LowBitLinear(37, 9, True, cfg)
    dst.load_state_dict(src.state_dict())
    for name, buf in src.named_buffers():
        assert torch.equal(buf, getattr(dst, name))
    x = torch.randn(3, 37)
    assert torch.equal(src(x), dst(x))
    # same tensor shapes, different format: refused instead of reinterpreted
    t = LowBitLinear.from_float(nn.Linear(40, 8), QuantConfig("ternary", group_size=8))
    s = LowBitLinear(40, 8, True, QuantConfig("int2_sym", group_size=8))
    with pytest.raises(ValueError, match="holds a ternary/group8 .* this module is int2_sym/group8"):
        s.load_state_dict(t.state_dict())


def test_load_state_dict_validates_data():
    layer = LowBitLinear.from_float(nn.Linear(40, 8), QuantConfig("ternary"))
    sd = copy.deepcopy(layer.state_dict())
    sd["packed"][0, 0] = 0xFF
    with pytest.raises(CorruptPackedWeightError, match="code 3"):
        LowBitLinear(40, 8).load_state_dict(sd)
    sd = copy.deepcopy(layer.state_dict())
    sd["scales"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        LowBitLinear(40, 8).load_state_dict(sd)
    sd = copy.deepcopy(layer.state_dict())
    sd["packed"] = sd["packed"][:, :5]
    with pytest.raises(RuntimeError, match="size mismatch"):
        LowBitLinear(40, 8).load_state_dict(sd)


def test_from_quantized_values_and_packed():
    cfg = QuantConfig("int2_sym", group_size=8)
    q = torch.randint(-2, 2, (5, 21), dtype=torch.int8)
    s = torch.rand(5, 3) + 0.1
    a = LowBitLinear.from_quantized(q, s, config=cfg)
    b = LowBitLinear.from_quantized(pack_codes(q, "int2_sym"), s, config=cfg, in_features=21)
    c = LowBitLinear.from_quantized(q.long(), s, config=cfg)
    assert torch.equal(a.int_weight(), q) and torch.equal(b.int_weight(), q) and torch.equal(c.packed, a.packed)
    assert torch.equal(a.dequantized_weight(), q.float() * s.repeat_interleave(8, 1)[:, :21])


def test_from_quantized_bad_input():
    cfg = QuantConfig("ternary", granularity="channel")
    q = torch.zeros(4, 10, dtype=torch.int8)
    s = torch.ones(4, 1)
    with pytest.raises(ValueError, match=r"out of range for format ternary .* max 2"):
        LowBitLinear.from_quantized(q + 2, s, config=cfg)
    with pytest.raises(TypeError, match="from_lowbit_float"):
        LowBitLinear.from_quantized(q.float(), s, config=cfg)
    with pytest.raises(ValueError, match=r"scales .* must have shape \[4, 1\], got \[4\]"):
        LowBitLinear.from_quantized(q, s.reshape(4), config=cfg)
    with pytest.raises(TypeError, match="scales must be float32"):
        LowBitLinear.from_quantized(q, s.half(), config=cfg)
    with pytest.raises(ValueError, match="in_features is required"):
        LowBitLinear.from_quantized(pack_codes(q, "ternary"), s, config=cfg)
    with pytest.raises(CorruptPackedWeightError, match=r"shape \[4, 4\].*got \[4, 3\]"):
        LowBitLinear.from_quantized(pack_codes(q, "ternary"), s, config=cfg, in_features=13)
    with pytest.raises(ValueError, match="bias must be a float tensor of shape"):
        LowBitLinear.from_quantized(q, s, None, torch.zeros(5), config=cfg)
    asym = QuantConfig("int4_asym")
    with pytest.raises(ValueError, match=r"must lie in \[0, 15\]"):
        LowBitLinear.from_quantized(q, s, torch.full((4, 1), 16, dtype=torch.int8), config=asym)


def test_qat_ternary_export_is_stored_losslessly():
    """A BitNet QAT checkpoint exports W = q * s with q ternary and one s per tensor."""
    torch.manual_seed(1)
    q = torch.randint(-1, 2, (48, 64)).float()
    w = q * 0.0371
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = LowBitLinear.from_lowbit_float(w, lin.bias, QuantConfig("ternary"))
    assert torch.equal(layer.dequantized_weight(), w)
    assert torch.equal(LowBitLinear.from_float(lin, QuantConfig("ternary")).dequantized_weight(), w)
    lossy = LowBitLinear.from_float(lin, QuantConfig("ternary", detect_exact=False))
    assert not torch.equal(lossy.dequantized_weight(), w)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), lin(x))
    with pytest.raises(ValueError, match="not exactly representable as ternary/tensor"):
        LowBitLinear.from_lowbit_float(w + 1e-3, None, QuantConfig("ternary"))


def test_config_validation():
    assert QuantConfig("int4").weights == "int4_sym"
    assert QuantConfig("int1").granularity == "channel"
    assert QuantConfig(group_size=64).granularity == "group"
    with pytest.raises(ValueError, match="unknown weight format"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="conflicts"):
        QuantConfig(group_size=32, granularity="channel")
    with pytest.raises(ValueError, match="positive multiple of 8"):
        QuantConfig(group_size=0)
    with pytest.raises(ValueError, match="only meaningful with int8"):
        QuantConfig(act_group_size=32)
    with pytest.raises(ValueError, match="only defined for ternary"):
        QuantConfig("int1", granularity="tensor")


@pytest.mark.parametrize("cast", ["to_bf16", "half", "double"])
def test_dtype_casts_keep_the_quantized_state(cast):
    # A quantized model cast with .to(dtype) / .half() keeps its fp32 scales and bias bit
    # for bit (a bf16 round trip would change the weights) and still runs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    lowbit.quantize_(model, QuantConfig(weights="int2_asym", group_size=32))
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.randn(3, 64)
    want = model(x)
    dtype = {"to_bf16": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
    model = model.half() if cast == "half" else model.to(dtype)
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    if dtype is torch.bfloat16:
        got = model(x.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_quantize_runs_on_one_intra_op_thread_and_restores_the_count():
    """quantize_ pins torch's pool to one thread while it converts (lowbit.quant.threads) and
    gives the caller's count back, also when a layer fails."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def config(linear, fqn):
            seen.append(torch.get_num_threads())
            return QuantConfig(weights="ternary", activations="int8")

        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
        lowbit.quantize_(model, config)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        assert isinstance(model[0], LowBitLinear) and isinstance(model[2], LowBitLinear)

        with pytest.raises(TypeError, match="expected QuantConfig"):
            lowbit.quantize_(nn.Sequential(nn.Linear(8, 8)), lambda linear, fqn: "ternary")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
