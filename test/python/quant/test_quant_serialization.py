"""save_quantized / load_quantized through safetensors: round trips, metadata and corrupt files."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.quant import CheckpointError, LowBitLinear, QuantConfig, load_quantized, save_quantized


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(33)
        self.body = nn.Sequential(nn.Linear(33, 50), nn.GELU(), nn.Linear(50, 33, bias=False))
        self.head = nn.Linear(33, 7)

    def forward(self, x):
        return self.head(self.body(self.norm(x)))


def quantized_net():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
    lowbit.quantize_(net, QuantConfig("int2", group_size=16, activations="int8"),
                     filter_fn=lambda m, fqn: fqn.startswith("body"))
    lowbit.quantize_(net, QuantConfig("int8"))
    return net


@pytest.fixture
def saved(tmp_path):
    net = quantized_net()
    path = tmp_path / "net.safetensors"
    save_quantized(net, path, metadata={"model": "Net"})
    return net, path


def test_round_trip_into_float_model_factory(saved):
    net, path = saved
    loaded = load_quantized(Net, path)
    assert isinstance(loaded.body[0], LowBitLinear) and isinstance(loaded.head, LowBitLinear)
    assert loaded.body[0].spec == net.body[0].spec and loaded.head.spec == net.head.spec
    for (k1, v1), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2
        assert torch.equal(v1, v2) if isinstance(v1, torch.Tensor) else v1 == v2
    x = torch.randn(4, 33)
    assert torch.equal(net(x), loaded(x))


def test_round_trip_into_quantized_model(saved):
    net, path = saved
    target = quantized_net()
    with torch.no_grad():
        target.norm.weight.zero_()
    load_quantized(target, path)
    assert torch.equal(target.norm.weight, net.norm.weight)


def test_header_metadata(saved):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["model"] == "Net" and meta["lowbit.format"] == "lowbit-quantized/1"
    layers = json.loads(meta["lowbit.layers"])
    assert layers["body.0"]["spec"]["weight_format"] == "int2_asym"
    assert layers["body.2"]["bias"] is False
    assert set(json.loads(meta["lowbit.sha256"])) == keys
    assert "body.0.zero_points" in keys and "body.0._extra_state" not in keys


def test_packed_bytes_on_disk_are_the_packed_size(saved):
    net, path = saved
    tensor_bytes = sum(v.numel() * v.element_size() for v in net.state_dict().values()
                       if isinstance(v, torch.Tensor))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header_len + tensor_bytes


def test_flipped_data_byte_is_detected(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch for tensor"):
        load_quantized(Net, path)


def test_truncated_and_garbage_files(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_quantized(Net, path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_quantized(Net, junk)
    with pytest.raises(FileNotFoundError):
        load_quantized(Net, tmp_path / "missing.safetensors")


def test_plain_safetensors_is_not_a_lowbit_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(Net().state_dict(), str(path))
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        load_quantized(Net, path)


def rewrite(path, edit_layers=None, edit_tensors=None):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_layers:
        layers = json.loads(meta["lowbit.layers"])
        edit_layers(layers)
        meta["lowbit.layers"] = json.dumps(layers)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_metadata_that_does_not_fit_the_model(saved):
    net, path = saved
    target = quantized_net()
    target.head = LowBitLinear.from_float(nn.Linear(33, 7), QuantConfig("ternary"))
    with pytest.raises(CheckpointError, match="'head' is ternary/tensor a=none in the model but int8/channel"):
        load_quantized(target, path)

    class Smaller(Net):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(33, 6)
    with pytest.raises(CheckpointError, match=r"'head' is Linear\(33, 6\) in the model but \(33, 7\)"):
        load_quantized(Smaller, path)

    class Renamed(Net):
        def __init__(self):
            super().__init__()
            self.out = self.head
            del self.head
    with pytest.raises(CheckpointError, match="'head' recorded in the file does not exist"):
        load_quantized(Renamed, path)


def test_tampered_metadata_and_tensors(saved):
    _, path = saved
    rewrite(path, edit_layers=lambda layers: layers["head"]["spec"].update(weight_format="int3"))
    with pytest.raises(CheckpointError, match="bad metadata for layer 'head'.*unknown weight format"):
        load_quantized(Net, path)


def test_tensor_missing_from_checksum_table(saved):
    _, path = saved
    rewrite(path, edit_tensors=lambda t: t.pop("head.scales"))
    with pytest.raises(CheckpointError, match=r"missing \['head.scales'\]"):
        load_quantized(Net, path)


def test_reserved_metadata_and_non_tensor_state(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_quantized(quantized_net(), tmp_path / "a.safetensors", metadata={"lowbit.x": "1"})

    class WithExtra(nn.Module):
        def get_extra_state(self):
            return {"step": 3}

        def set_extra_state(self, state):
            pass
    with pytest.raises(TypeError, match="cannot save state entry '_extra_state' of type dict"):
        save_quantized(WithExtra(), tmp_path / "b.safetensors")


def test_tied_weights_are_saved(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.proj = nn.Linear(16, 16)
            self.out = nn.Linear(16, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.proj(self.emb(ids)))

    torch.manual_seed(0)
    model = lowbit.quantize_(Tied(), QuantConfig("ternary"), filter_fn=lambda m, fqn: fqn == "proj")
    save_quantized(model, tmp_path / "t.safetensors")
    loaded = load_quantized(Tied, tmp_path / "t.safetensors")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), loaded(ids))
