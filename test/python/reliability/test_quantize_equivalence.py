"""The blocked (fast) quantizers and packing reproduce the previous implementation bit for bit.

`quant_v1_reference.py` is lowbit.quant's quantization and packing code as it was before the
rewrite (whole-matrix temporaries, 0.3-6 s per 5632x2048 layer). Every case here compares
q, scales, zero points and packed bytes exactly, and errors by type and message: formats x
granularities x group sizes, K not a multiple of the group size or of the codes per byte,
several row blocks, a row longer than a block, bf16/fp16/fp64 and non-contiguous weights,
tiny/huge magnitudes, and weights that are already low-bit (exact detection), partly so, or
only in their first rows.
"""
from __future__ import annotations

import pytest
import torch

from lowbit.quant import (
    WEIGHT_FORMATS,
    CorruptPackedWeightError,
    LowBitSpec,
    exact_representation,
    pack_codes,
    quantize_weight,
    unpack_codes,
)
from lowbit.quant import quantizers as fast_quantizers

import quant_v1_reference as ref

FORMATS = sorted(WEIGHT_FORMATS)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 4096 elements, so that these small shapes span many row blocks (and the
    K = 70001 rows are longer than a block)."""
    monkeypatch.setattr(fast_quantizers, "_BLOCK_ELEMENTS", 1 << 12)


# (N, K): tails of every packing (K % 8), groups with a short last group, several row
# blocks and a row longer than a block (with the 4096-element blocks of small_blocks).
SHAPES = [(1, 1), (3, 7), (5, 33), (17, 200), (64, 1000), (300, 130), (129, 2051), (2, 70001)]


def specs_for(name: str, n: int, k: int):
    yield LowBitSpec(name, "channel", 0, k, n)
    if name == "ternary":
        yield LowBitSpec(name, "tensor", 0, k, n)
    for g in (8, 32, 128, 256):
        if g <= 2 * k:
            yield LowBitSpec(name, "group", g, k, n)


def cases():
    for name in FORMATS:
        for n, k in SHAPES:
            for spec in specs_for(name, n, k):
                if n * k > 2**16 and spec.granularity == "group" and spec.group_size != 128:
                    continue  # keep the run short: big shapes with one group size (tail of 3 / 113)
                yield pytest.param(spec, id=f"{name}-{spec.granularity}{spec.group_size or ''}-{n}x{k}")


def assert_same(new, old):
    if old is None or new is None:
        assert new is None and old is None, (new, old)
        return
    assert new.q.dtype == old.q.dtype == torch.int8
    assert torch.equal(new.q, old.q)
    assert new.scales.dtype == old.scales.dtype == torch.float32
    assert torch.equal(new.scales, old.scales)
    assert (new.zero_points is None) == (old.zero_points is None)
    if old.zero_points is not None:
        assert new.zero_points.dtype == torch.int8
        assert torch.equal(new.zero_points, old.zero_points)


def random_weight(n, k, seed, dtype=torch.float32, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * scale).to(dtype)


def lowbit_weight(spec, seed):
    """A weight that is exactly q * s (or (q - z) * s) per group, every group holding an end value."""
    fmt = spec.format
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor(fmt.values, dtype=torch.int8)
    q = vals[torch.randint(0, len(vals), (spec.out_features, spec.in_features), generator=g)]
    s = torch.rand(spec.scale_shape, generator=g) * 0.1 + 0.01
    z = torch.randint(0, fmt.qmax + 1, spec.scale_shape, generator=g).to(torch.int8) if fmt.asymmetric else None
    q[:, 0] = fmt.qmax if fmt.name != "int2_sym" else fmt.qmin
    if spec.granularity == "group":
        q[:, ::spec.group_size] = q[:, :1]
    return ref.dequantize_weight(q, s, z, spec)


@pytest.mark.parametrize("spec", list(cases()))
def test_quantize_weight_is_bit_identical(spec):
    n, k = spec.out_features, spec.in_features
    for seed, dtype in ((0, torch.float32), (1, torch.bfloat16)):
        w = random_weight(n, k, seed, dtype)
        assert_same(quantize_weight(w, spec), ref.quantize_weight(w, spec))


@pytest.mark.parametrize("spec", list(cases()))
def test_exact_representation_is_bit_identical(spec):
    w = lowbit_weight(spec, 3)
    new, old = exact_representation(w, spec), ref.exact_representation(w, spec)
    assert_same(new, old)
    if not spec.format.asymmetric:
        assert new is not None  # symmetric formats with end values are always found
    # random weights: both reject
    w = random_weight(spec.out_features, spec.in_features, 4)
    assert_same(exact_representation(w, spec), ref.exact_representation(w, spec))


@pytest.mark.parametrize("name", FORMATS)
def test_partly_lowbit_weights(name):
    """Exact in the first rows (or all but one group) only: both reject; both quantize alike."""
    for gran, gs in (("channel", 0), ("group", 32)):
        spec = LowBitSpec(name, gran, gs, 300, 260)
        w = lowbit_weight(spec, 5)
        w[-1, -1] += 1e-3  # last group of the last row block no longer exact
        assert exact_representation(w, spec) is None and ref.exact_representation(w, spec) is None
        assert_same(quantize_weight(w, spec), ref.quantize_weight(w, spec))
    if name == "ternary":
        # per-row ternary scales under a per-tensor config: every row is exact on its own
        q = torch.randint(-1, 2, (260, 300), generator=torch.Generator().manual_seed(6)).float()
        w = q * (torch.rand(260, 1, generator=torch.Generator().manual_seed(7)) + 0.5)
        spec = LowBitSpec(name, "tensor", 0, 300, 260)
        assert exact_representation(w, spec) is None and ref.exact_representation(w, spec) is None
        assert_same(quantize_weight(w, spec), ref.quantize_weight(w, spec))


@pytest.mark.parametrize("name", FORMATS)
def test_dtypes_layouts_and_magnitudes(name):
    spec = LowBitSpec(name, "group", 64, 200, 90)
    for dtype in (torch.float16, torch.float64):
        w = random_weight(90, 200, 8, dtype)
        assert_same(quantize_weight(w, spec), ref.quantize_weight(w, spec))
    w_t = random_weight(200, 90, 9).t()  # non-contiguous
    assert not w_t.is_contiguous()
    assert_same(quantize_weight(w_t, spec), ref.quantize_weight(w_t, spec))
    assert_same(exact_representation(w_t, spec), ref.exact_representation(w_t, spec))
    for scale in (1e-30, 1e-9, 1e30):  # subnormal / floored scales, huge values
        w = random_weight(90, 200, 10, scale=scale)
        assert_same(quantize_weight(w, spec), ref.quantize_weight(w, spec))
    w = torch.zeros(90, 200)
    w[3, :64] = -2.5  # all-zero groups next to a constant one
    assert_same(quantize_weight(w, spec), ref.quantize_weight(w, spec))
    assert_same(exact_representation(w, spec), ref.exact_representation(w, spec))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_non_finite_errors_match(bad, gran):
    spec = LowBitSpec("ternary", gran, 32 if gran == "group" else 0, 100, 700)
    w = random_weight(700, 100, 11)
    w[650, 99] = bad  # in a late row block
    for fn in (quantize_weight, exact_representation):
        with pytest.raises(ValueError, match="NaN or infinity"):
            fn(w, spec)


def test_tensor_scale_does_not_depend_on_the_thread_count():
    """Per-tensor absmean: the float64 sum is taken in a fixed order (torch's whole-tensor
    reduction changes its order with the thread count; the fp32 scale rarely shows it)."""
    spec = LowBitSpec("ternary", "tensor", 0, 2048, 512)
    w = random_weight(512, 2048, 12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fast_quantizers._tensor_stats(w, spec).absmean
        torch.set_num_threads(2)
        two = fast_quantizers._tensor_stats(w, spec).absmean
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(quantize_weight(w, spec).scales, ref.quantize_weight(w, spec).scales)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (7, 9), (4, 16), (33, 127), (130, 1001)])
def test_packing_is_bit_identical(name, n, k):
    fmt = WEIGHT_FORMATS[name]
    g = torch.Generator().manual_seed(n * 1000 + k)
    vals = torch.tensor(fmt.values, dtype=torch.int8)
    q = vals[torch.randint(0, len(vals), (n, k), generator=g)]
    for dtype in (torch.int8, torch.int16, torch.int64, torch.uint8 if fmt.qmin >= 0 else torch.int32):
        packed = pack_codes(q.to(dtype), fmt)
        assert packed.dtype == torch.uint8
        assert torch.equal(packed, ref.pack_codes(q.to(dtype), fmt))
    assert torch.equal(unpack_codes(packed, fmt, k), ref.unpack_codes(packed, fmt, k))
    assert torch.equal(unpack_codes(packed, fmt, k), q)


def _error(fn, *args):
    try:
        fn(*args)
    except (ValueError, TypeError) as e:
        return type(e), str(e)
    return None


@pytest.mark.parametrize("name", FORMATS)
def test_packing_errors_match(name):
    fmt = WEIGHT_FORMATS[name]
    bad_values = [fmt.qmin - 1, fmt.qmax + 1] + ([0] if name == "int1" else [])
    for bad in bad_values:
        q = torch.full((3, 9), fmt.values[0], dtype=torch.int16)
        q[2, 5] = bad
        got = _error(pack_codes, q, fmt)
        assert got is not None and got == _error(ref.pack_codes, q, fmt)
    for q in (torch.zeros(3, 9, dtype=torch.float32), torch.zeros(3, 9, dtype=torch.bool), torch.zeros(9, dtype=torch.int8)):
        got = _error(pack_codes, q, fmt)
        assert got is not None and got == _error(ref.pack_codes, q, fmt)
    packed = ref.pack_codes(torch.full((3, 9), fmt.values[0], dtype=torch.int8), fmt)
    padding, code3 = packed.clone(), packed.clone()
    padding[1, -1] = 0xFF  # non-zero padding bits (K = 9), and for ternary code 3
    code3[2, 0] = 0xFF     # code 3 for ternary; valid codes for every other format
    cases = [(padding, fmt.bits < 8), (code3, name == "ternary"),
             (packed.to(torch.int8), True), (packed[:, :-1], True)]
    for p, corrupt in cases:
        got, want = _error(unpack_codes, p, fmt, 9), _error(ref.unpack_codes, p, fmt, 9)
        assert got == want
        assert (got is not None) == corrupt
        if corrupt:
            assert issubclass(got[0], CorruptPackedWeightError)
