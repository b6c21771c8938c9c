"""Corruption fuzzer for saved models (lowbit.save_quantized / load_quantized).

Every corrupted file must raise a `CheckpointError` (a lowbit error naming the file), never load
a silently changed model, never raise anything else and never crash the process. Cases:
truncation at every structural boundary, single bit flips in the length prefix, the header
JSON, the lowbit metadata strings and the tensor data, dtype swaps and shape swaps that keep
every byte checksum consistent (F32 -> I32 scales/bias, U8 -> BOOL/I8 packed, I8 -> U8 zero
points, a transposed shape), metadata edits (act_format int8 -> none, group size, bias flag,
a removed header checksum, a user entry), and bad paths (directory, missing file).
"""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

import lowbit
from lowbit.quant import CheckpointError, QuantConfig, load_quantized, save_quantized
from lowbit.quant.serialization import CheckpointNotFoundError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(40)
        self.a = nn.Linear(40, 24)                 # ternary, int8 activations
        self.b = nn.Linear(24, 40, bias=False)     # int2_asym group 16 (zero points)
        self.head = nn.Linear(40, 9)               # int4_sym channel

    def forward(self, x):
        return self.head(self.b(self.a(self.norm(x))))


def build() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
    lowbit.quantize_(net, QuantConfig("ternary", activations="int8"), filter_fn=lambda m, f: f == "a")
    lowbit.quantize_(net, QuantConfig("int2_asym", group_size=16), filter_fn=lambda m, f: f == "b")
    lowbit.quantize_(net, QuantConfig("int4_sym"))
    return net


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    net = build()
    path = tmp_path_factory.mktemp("ckpt") / "net.safetensors"
    save_quantized(net, path, metadata={"model": "Net"})
    return net, path.read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + body


def outcome(net: Net, path, data: bytes) -> str:
    """'error' if load raised CheckpointError naming the file, 'same' if it loaded a model
    equal to the original; anything else fails the test."""
    path.write_bytes(data)
    try:
        loaded = load_quantized(Net, path)
    except CheckpointError as e:
        assert str(path) in str(e), f"error does not name the file: {e}"
        return "error"
    state, want = loaded.state_dict(), net.state_dict()
    assert state.keys() == want.keys()
    for k, v in want.items():
        got = state[k]
        if isinstance(v, torch.Tensor):
            assert got.dtype == v.dtype and torch.equal(got, v), f"silently changed tensor {k}"
        else:
            assert got == v, f"silently changed {k}"
    return "same"


def test_pristine_file_loads(original, tmp_path):
    net, data = original
    assert outcome(net, tmp_path / "x.safetensors", data) == "same"


def test_truncation(original, tmp_path):
    net, data = original
    n = int.from_bytes(data[:8], "little")
    cuts = {0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) - 1, (8 + n + len(data)) // 2}
    cuts |= set(random.Random(0).sample(range(len(data)), 20))
    for cut in sorted(cuts):
        assert outcome(net, tmp_path / "x.safetensors", data[:cut]) == "error", cut
    # trailing garbage is corruption too
    assert outcome(net, tmp_path / "x.safetensors", data + b"\0" * 8) == "error"


def flip(data: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def test_bit_flips_in_length_header_and_data(original, tmp_path):
    net, data = original
    n = int.from_bytes(data[:8], "little")
    rng = random.Random(1)
    positions = [(p, b) for p in range(8) for b in range(8)]                       # length prefix
    positions += [(rng.randrange(8, 8 + n), rng.randrange(8)) for _ in range(150)]  # header JSON
    positions += [(rng.randrange(8 + n, len(data)), rng.randrange(8)) for _ in range(80)]  # data
    results = {}
    for pos, bit in positions:
        results[(pos, bit)] = outcome(net, tmp_path / "x.safetensors", flip(data, pos, bit))
    changed = [k for k, v in results.items() if v != "error"]
    # a flip in the header's alignment padding may leave the file equivalent ("same" is checked
    # to be bit-identical); every other flip must be an error
    for pos, _ in changed:
        assert data[pos:pos + 1] == b" " and 8 <= pos < 8 + n, (pos, results)


def metadata_value_span(data: bytes, key: str) -> tuple[int, int]:
    """Byte range of a metadata value inside the raw header."""
    start = data.index(json.dumps(key).encode() + b":") + len(json.dumps(key)) + 1
    end = data.index(b'"', start + 1)
    while data[end - 1:end] == b"\\":
        end = data.index(b'"', end + 1)
    return start + 1, end


@pytest.mark.parametrize("key", ["lowbit.layers", "lowbit.sha256", "lowbit.header_sha256", "lowbit.format", "model"])
def test_bit_flips_in_metadata(original, tmp_path, key):
    net, data = original
    lo, hi = metadata_value_span(data, key)
    rng = random.Random(key)
    for _ in range(40):
        pos, bit = rng.randrange(lo, hi), rng.randrange(7)  # stay in ASCII: JSON strings
        assert outcome(net, tmp_path / "x.safetensors", flip(data, pos, bit)) == "error", (key, pos, bit)


SWAPS = [
    ("a.scales", "F32", "I32"), ("a.bias", "F32", "I32"), ("head.scales", "F32", "I32"),
    ("a.packed", "U8", "BOOL"), ("a.packed", "U8", "I8"), ("b.zero_points", "I8", "U8"),
    ("b.zero_points", "I8", "BOOL"), ("norm.weight", "F32", "I32"), ("head.bias", "F32", "F32"),
]


@pytest.mark.parametrize("key,old,new", SWAPS)
def test_dtype_swaps_with_consistent_bytes(original, tmp_path, key, old, new):
    net, data = original
    header, body = split(data)
    assert header[key]["dtype"] == old
    header[key]["dtype"] = new
    edited = join(header, body)
    assert outcome(net, tmp_path / "x.safetensors", edited) == ("same" if old == new else "error")


def test_shape_swap_with_consistent_bytes(original, tmp_path):
    net, data = original
    header, body = split(data)
    header["head.packed"]["shape"] = header["head.packed"]["shape"][::-1]
    assert outcome(net, tmp_path / "x.safetensors", join(header, body)) == "error"


def edit_layers(data: bytes, fn) -> bytes:
    header, body = split(data)
    layers = json.loads(header["__metadata__"]["lowbit.layers"])
    fn(layers)
    header["__metadata__"]["lowbit.layers"] = json.dumps(layers, sort_keys=True)
    return join(header, body)


@pytest.mark.parametrize("edit", [
    lambda L: L["a"]["spec"].update(act_format="none"),
    lambda L: L["b"]["spec"].update(group_size=8),
    lambda L: L["head"]["spec"].update(weight_format="int4_asym"),
    lambda L: L["head"].update(bias=False),
    lambda L: L["head"].update(bias="yes"),
    lambda L: L["a"]["spec"].update(in_features=40.0),
    lambda L: L.pop("head"),
    lambda L: L.update(extra={"spec": L["a"]["spec"], "bias": True}),
], ids=["act_format", "group_size", "weight_format", "bias_flag", "bias_type", "float_int", "drop_layer", "extra_layer"])
def test_layer_metadata_edits(original, tmp_path, edit):
    net, data = original
    assert outcome(net, tmp_path / "x.safetensors", edit_layers(data, edit)) == "error"


def test_other_header_edits(original, tmp_path):
    net, data = original
    for fn in (lambda m: m.pop("lowbit.header_sha256"), lambda m: m.update(model="Other"),
               lambda m: m.update(extra="1"), lambda m: m.pop("model"),
               lambda m: m.update({"lowbit.format": "lowbit-quantized/9"})):
        header, body = split(data)
        fn(header["__metadata__"])
        assert outcome(net, tmp_path / "x.safetensors", join(header, body)) == "error"


def test_bad_paths_name_the_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="is a directory") as e:
        load_quantized(Net, tmp_path)
    assert str(tmp_path) in str(e.value) and isinstance(e.value, FileNotFoundError)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointNotFoundError, match="no such file") as e:
        load_quantized(Net, missing)
    assert str(missing) in str(e.value)


def test_dtype_that_fits_the_file_but_not_the_model(tmp_path):
    """A valid file whose non-quantized tensor has another dtype than the model's: load_state_dict
    would convert it silently; it is refused."""
    net = build()
    net.norm.double()
    path = tmp_path / "d.safetensors"
    save_quantized(net, path)
    with pytest.raises(CheckpointError, match=r"'norm\.(weight|bias)' is torch.float64 in the file but torch.float32"):
        load_quantized(Net, path)
