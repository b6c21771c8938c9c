"""pack_codes / unpack_codes: exact round trips, the documented bit layout, and corrupt data."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import WEIGHT_FORMATS, CorruptPackedWeightError, get_weight_format, pack_codes, unpack_codes

FORMATS = sorted(WEIGHT_FORMATS)


def random_values(fmt, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(fmt.values), (n, k), generator=g)
    return torch.tensor(fmt.values, dtype=torch.int8)[idx]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(FORMATS), n=st.integers(1, 9),
       k=st.one_of(st.integers(1, 40), st.sampled_from([127, 129, 255, 257, 1023])),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(name, n, k, seed):
    fmt = get_weight_format(name)
    q = random_values(fmt, n, k, seed)
    packed = pack_codes(q, fmt)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (n, -(-k * fmt.bits // 8))
    back = unpack_codes(packed, fmt, k)
    assert back.dtype == torch.int8
    assert torch.equal(back, q)


@pytest.mark.parametrize("name", FORMATS)
def test_layout_matches_documented_bit_formula(name):
    """byte[n, b] bit (bits*j) .. holds code(q[n, b*per_byte + j]), code = index in the value set."""
    fmt = get_weight_format(name)
    k = 3 * fmt.codes_per_byte + 1  # forces a padded last byte (except int8)
    q = random_values(fmt, 4, k, 0)
    packed = pack_codes(q, fmt)
    for n in range(4):
        for kk in range(k):
            byte, j = divmod(kk, fmt.codes_per_byte)
            code = (int(packed[n, byte]) >> (fmt.bits * j)) & ((1 << fmt.bits) - 1)
            assert fmt.values[code] == int(q[n, kk])
        if k % fmt.codes_per_byte:
            used = (k % fmt.codes_per_byte) * fmt.bits
            assert int(packed[n, -1]) >> used == 0  # padding bits are zero


def test_known_ternary_bytes():
    q = torch.tensor([[-1, 0, 1, 0, 1]], dtype=torch.int8)   # codes 0,1,2,1 | 2
    assert pack_codes(q, "ternary").tolist() == [[0b01100100, 0b00000010]]
    q1 = torch.tensor([[1, -1, -1, 1, 1, 1, -1, 1, 1]], dtype=torch.int8)  # int1 code = (q+1)/2
    assert pack_codes(q1, "int1").tolist() == [[0b10111001, 0b1]]
    assert pack_codes(torch.tensor([[-128, 0, 127]], dtype=torch.int8), "int8").tolist() == [[0, 128, 255]]


@pytest.mark.parametrize("name,bad", [("ternary", 2), ("ternary", -2), ("int1", 0), ("int2_sym", 2),
                                      ("int2_asym", -1), ("int2_asym", 4), ("int4_sym", 8), ("int4_asym", 16)])
def test_pack_rejects_values_outside_the_format(name, bad):
    q = torch.zeros(2, 9, dtype=torch.int8) + get_weight_format(name).values[0]
    q[1, 4] = bad
    with pytest.raises(ValueError, match=name):
        pack_codes(q, name)


def test_pack_rejects_float_and_wrong_rank():
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.zeros(2, 4), "ternary")
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(torch.zeros(4, dtype=torch.int8), "ternary")
    with pytest.raises(ValueError, match="unknown weight format"):
        pack_codes(torch.zeros(2, 4, dtype=torch.int8), "int3")


def test_unpack_rejects_invalid_ternary_code():
    packed = pack_codes(torch.zeros(3, 8, dtype=torch.int8), "ternary")
    packed[2, 1] |= 0b11 << 4  # code 3 does not exist in ternary
    with pytest.raises(CorruptPackedWeightError, match="code 3 is not valid for format ternary"):
        unpack_codes(packed, "ternary", 8)


@pytest.mark.parametrize("name", ["ternary", "int1", "int2_asym", "int4_sym"])
def test_unpack_rejects_nonzero_padding(name):
    fmt = get_weight_format(name)
    k = fmt.codes_per_byte + 1
    packed = pack_codes(random_values(fmt, 2, k, 1), fmt)
    packed[1, -1] |= 1 << (8 - 1)  # the top bit of the last byte is padding
    with pytest.raises(CorruptPackedWeightError, match="padding bits after K=.* in row 1"):
        unpack_codes(packed, fmt, k)


def test_unpack_rejects_wrong_dtype_and_shape():
    packed = pack_codes(torch.zeros(3, 10, dtype=torch.int8), "ternary")
    with pytest.raises(CorruptPackedWeightError, match="must be uint8"):
        unpack_codes(packed.to(torch.int8), "ternary", 10)
    with pytest.raises(CorruptPackedWeightError, match=r"shape \[N, 3\].*got \[3, 2\]"):
        unpack_codes(packed[:, :2], "ternary", 10)
    with pytest.raises(CorruptPackedWeightError, match="shape"):
        unpack_codes(packed, "ternary", 13)
