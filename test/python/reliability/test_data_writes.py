"""Writes through `.data` after compiling are seen (issue 13, docs/reliability.md "`.data` writes").

`w.data` is an alias with a version counter of its own; lowbit watches the module state of
every graph it compiles (`module_state.watch_data_writes`) so that the in-place writes the
issue lists -- `w.data.mul_()`, `.data.copy_()`, `.data[...] = ...`, `bias.data.zero_()`, on
`nn.Linear` parameters and on `LowBitLinear` buffers -- move the version counter the bound
graph's guard compares: the next call recompiles (with a warning) and matches eager.
"""
from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
import lowbit.quant
from lowbit.compiler import module_state
from lowbit.compiler.backend import lowbit_backend
from lowbit.compiler.partition import BoundGraph

RECOMPILE = "changed after compilation"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    gc.collect()


class Spy:
    """The lowbit backend, counting how often dynamo hands it a graph."""

    def __init__(self):
        self.callables = []

    def __call__(self, gm, example_inputs):
        fn = lowbit_backend(gm, example_inputs)
        self.callables.append(fn)
        return fn

    def bound(self):
        return [e for c in self.callables for e in c.cache.values() if isinstance(e, BoundGraph)]


def _ternary(n_in: int, n_out: int, seed: int, bias: bool = True) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        q = torch.randint(-1, 2, (n_out, n_in), generator=g).float()
        lin.weight.copy_(q * (torch.rand(n_out, 1, generator=g) * 0.1 + 0.01))
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return lin


class MLP(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def _ternary_mlp() -> MLP:
    return MLP(_ternary(128, 256, 1), _ternary(256, 64, 2)).eval()


def _lowbit_mlp() -> MLP:
    model = _ternary_mlp()
    lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary", activations="int8"))
    return model


def _compiled(model):
    spy = Spy()
    compiled = torch.compile(model, backend=spy)
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert spy.bound(), "nothing was bound: the test would not exercise the guard"
    return compiled, spy, x


def _check_seen(compiled, model, spy, x, expect_recompile=True):
    with torch.no_grad():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = compiled(x)
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
    recompiled = any(RECOMPILE in str(w.message) for w in caught)
    if expect_recompile is not None:  # None: state read at run time or packed, either is right
        assert recompiled == expect_recompile, [str(w.message) for w in caught]
    # The watched class was in place before dynamo built its guards: no dynamo recompile.
    assert len(spy.callables) == 1


# Each write form of the issue, on the parameters of a bound nn.Linear (fp QAT ternary weights).
LINEAR_WRITES = {
    "weight.data.mul_": lambda m: m.up.weight.data.mul_(2),
    "weight.data.copy_": lambda m: m.up.weight.data.copy_(_ternary(128, 256, 7).weight),
    "weight.data[...] =": lambda m: m.up.weight.data.__setitem__((slice(0, 64),), 0.0),
    "weight.data[i].neg_": lambda m: m.down.weight.data[3].neg_(),
    "bias.data.zero_": lambda m: m.up.bias.data.zero_(),
    "bias.data[...] =": lambda m: m.down.bias.data.__setitem__(Ellipsis, 0.5),
}


@pytest.mark.parametrize("write", sorted(LINEAR_WRITES))
def test_linear_data_write_is_seen(write):
    model = _ternary_mlp()
    compiled, spy, x = _compiled(model)
    before = model(x).detach()
    LINEAR_WRITES[write](model)
    with torch.no_grad():
        assert not torch.allclose(model(x), before), "the write changed nothing: the test cannot fail"
    _check_seen(compiled, model, spy, x, expect_recompile=None if write.startswith("bias") else True)
    _check_seen(compiled, model, spy, x, expect_recompile=False)  # once


def test_dense_packed_weight_data_write_is_seen():
    """A weight that is not low-bit is pre-packed for BRGEMM: the same guard."""
    torch.manual_seed(0)
    model = MLP(nn.Linear(128, 256, bias=False), nn.Linear(256, 64, bias=False)).eval()
    compiled, spy, x = _compiled(model)
    model.down.weight.data.mul_(-0.5)
    _check_seen(compiled, model, spy, x)


# The same on LowBitLinear buffers (packed codes, scales, bias).
def _other_codes(m):
    other = _lowbit_mlp()
    other.up.packed.copy_(torch.flip(other.up.packed, [0]))
    return m.up.packed.data.copy_(other.up.packed)


LOWBIT_WRITES = {
    "scales.data.mul_": lambda m: m.up.scales.data.mul_(3),
    "scales.data[...] =": lambda m: m.down.scales.data.__setitem__((slice(0, 8),), 0.5),
    "packed.data.copy_": _other_codes,
    "packed.data[...] =": lambda m: m.down.packed.data.__setitem__((slice(0, 16),), 0),
    "bias.data.zero_": lambda m: m.up.bias.data.zero_(),
}


@pytest.mark.parametrize("write", sorted(LOWBIT_WRITES))
def test_lowbit_linear_buffer_data_write_is_seen(write):
    model = _lowbit_mlp()
    compiled, spy, x = _compiled(model)
    with torch.no_grad():
        before = model(x)
    LOWBIT_WRITES[write](model)
    with torch.no_grad():
        assert not torch.allclose(model(x), before), "the write changed nothing: the test cannot fail"
    _check_seen(compiled, model, spy, x, expect_recompile=None if write.startswith("bias") else True)


def test_rebinding_data_is_seen():
    model = _ternary_mlp()
    compiled, spy, x = _compiled(model)
    model.up.weight.data = _ternary(128, 256, 9).weight.detach().clone()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_watched_state_behaves_like_the_original():
    model = _lowbit_mlp()
    reference = copy.deepcopy(model)
    compiled, spy, x = _compiled(model)
    w, buf = model.up.packed, model.up.scales
    assert module_state.watched(buf) and type(buf) is module_state.WatchedTensor
    assert isinstance(buf, torch.Tensor) and not isinstance(buf, nn.Parameter)
    # state_dict and copies hold plain tensors; values unchanged
    sd = model.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values() if isinstance(v, torch.Tensor))
    for k, v in reference.state_dict().items():
        assert torch.equal(sd[k], v) if isinstance(v, torch.Tensor) else sd[k] == v
    clone = copy.deepcopy(model)
    assert type(clone.up.scales) is torch.Tensor and type(clone.up.packed) is torch.Tensor
    assert torch.equal(clone.up.scales, buf) and clone.up.scales.data_ptr() != buf.data_ptr()
    # torch.save of the tensor itself writes a plain tensor (weights_only loading accepts it)
    stream = io.BytesIO()
    torch.save({"scales": buf, "packed": w}, stream)
    stream.seek(0)
    loaded = torch.load(stream, weights_only=True)
    assert type(loaded["scales"]) is torch.Tensor and torch.equal(loaded["scales"], buf)
    assert repr(buf) == repr(buf.detach())
    # `.data` shares storage and now the version counter
    v = buf._version
    buf.data.add_(0)
    assert buf._version == v + 1 and buf.data.data_ptr() == buf.data_ptr()
    assert not buf.data.requires_grad


def test_watched_parameter_behaves_like_the_original():
    model = _ternary_mlp()
    compiled, spy, x = _compiled(model)
    w = model.up.weight
    assert type(w) is module_state.WatchedParameter and isinstance(w, nn.Parameter)
    assert repr(w).startswith("Parameter containing:\ntensor(") and "requires_grad=True" in repr(w)
    assert type(copy.deepcopy(w)) is nn.Parameter
    stream = io.BytesIO()
    torch.save(w, stream)
    stream.seek(0)
    loaded = torch.load(stream, weights_only=True)
    assert type(loaded) is nn.Parameter and torch.equal(loaded, w)
    assert [n for n, _ in model.named_parameters()] == ["up.weight", "up.bias", "down.weight", "down.bias"]
    # nn.Module conversions assign `.data` (the real setter): still a parameter, new storage
    model.double()
    assert type(model.up.weight) is module_state.WatchedParameter and model.up.weight.dtype == torch.float64


def test_save_quantized_of_a_compiled_model(tmp_path):
    """lowbit's own (pickle-free) save path reads the state through state_dict."""
    model = _lowbit_mlp()
    compiled, spy, x = _compiled(model)
    path = tmp_path / "m.safetensors"
    lowbit.quant.save_quantized(model, path)
    fresh = _lowbit_mlp()
    with torch.no_grad():
        fresh.up.scales.mul_(2)
    lowbit.quant.load_quantized(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_dropping_the_compiled_model_restores_the_class():
    model = _lowbit_mlp()
    compiled, spy, x = _compiled(model)
    weight = model.down.bias
    lin = model.up.packed
    assert module_state.watched(lin) and module_state.watched(weight)
    # a second compiled graph over the same tensors keeps them watched until both are gone
    spy2 = Spy()
    other = torch.compile(model, backend=spy2, dynamic=False)
    with torch.no_grad():
        other(torch.randn(5, 128))
    del compiled, spy, spy2, other
    torch._dynamo.reset()
    gc.collect()
    assert type(lin) is torch.Tensor and type(weight) is torch.Tensor
    plain = _ternary_mlp()
    compiled, spy, x = _compiled(plain)
    assert type(plain.up.weight) is module_state.WatchedParameter
    del compiled, spy
    torch._dynamo.reset()
    gc.collect()
    assert type(plain.up.weight) is nn.Parameter
    # and `.data` is the plain alias again (its own version counter)
    v = plain.up.weight._version
    plain.up.weight.data.mul_(1)
    assert plain.up.weight._version == v


def test_state_that_is_not_packed_sees_data_writes_without_recompiling():
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(128)
            self.proj = _ternary(128, 64, 3, bias=False)

        def forward(self, x):
            return self.proj(self.norm(x))

    model = Normed().eval()
    compiled, spy, x = _compiled(model)
    model.norm.weight.data.mul_(3.0)
    _check_seen(compiled, model, spy, x, expect_recompile=False)


def test_data_write_seen_through_the_program_cache(tmp_path, monkeypatch):
    """A whole program found in the persistent compile cache guards like a bound graph."""
    monkeypatch.setenv("LOWBIT_CACHE", "1")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    from lowbit.compiler.compile_log import counters

    model = _ternary_mlp()
    compiled, first, x = _compiled(model)
    torch._dynamo.reset()
    # `first` keeps its graph: the parameters stay watched while dynamo traces them again,
    # and the program key must not depend on their class
    assert module_state.watched(model.up.weight)
    hits = counters["program_cache_hits"]
    spy = Spy()
    compiled = torch.compile(model, backend=spy)
    with torch.no_grad():
        compiled(x)
    assert counters["program_cache_hits"] == hits + 1
    model.up.weight.data.mul_(2)
    _check_seen(compiled, model, spy, x)


def test_only_weight_buffers_are_watched():
    """A buffer that is no weight (read elementwise) keeps its class: other backends' exact type
    checks (aot_autograd's first-call custom-op check refuses other tensor types) still work."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = _ternary(128, 64, 4)
            self.register_buffer("gain", torch.rand(64) + 0.5)

        def forward(self, x):
            return self.proj(x) * self.gain

    model = Scaled().eval()
    compiled, spy, x = _compiled(model)
    assert type(model.gain) is torch.Tensor and type(model.proj.weight) is module_state.WatchedParameter
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), model(x))
    model.gain.data.mul_(2)  # read at run time: seen without a recompile
    _check_seen(compiled, model, spy, x, expect_recompile=False)
