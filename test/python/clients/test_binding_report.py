"""Binding reports weights it could not bind, and a graph whose tensor-subclass weights cannot
be captured falls back with a warning naming the subclass, every time (not once per process)."""
import warnings

import torch

import lowbit
from lowbit.compiler.partition import UnsupportedOpWarning


class ScaleArgument(torch.nn.Module):
    """Codes are module state, but the scale comes in as an argument: not bindable."""

    def __init__(self):
        super().__init__()
        self.register_buffer("q", torch.randint(-2, 2, (40, 64), dtype=torch.int8))

    def forward(self, x, scale):
        return x @ (self.q.float() * scale).t()


def test_weight_not_module_state_is_reported():
    torch._dynamo.reset()
    model = ScaleArgument()
    x, scale = torch.randn(3, 64), torch.rand(40, 1) + 0.1
    with torch.no_grad():
        out = torch.compile(model, backend="lowbit")(x, scale)
    torch.testing.assert_close(out, model(x, scale))
    rows = [e for e in lowbit.explain(model).matmuls() if e.get("result") == "not bound"]
    assert rows and "not module state" in rows[0]["reason"], lowbit.explain(model)


class Opaque(torch.Tensor):
    """A traceable wrapper subclass whose ops export cannot trace and that has no dequantize."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner):
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner, ctx, size, stride):
        return Opaque(inner["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.t.default:
            return Opaque(args[0].inner.t())
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.linear.default):
            unwrapped = [a.inner if isinstance(a, Opaque) else a for a in args]
            return func(*unwrapped, **(kwargs or {}))
        if func is torch.ops.aten.detach.default:
            return Opaque(args[0].inner)
        return NotImplemented

    dequantize = None  # no dequantized fallback


def test_subclass_capture_failure_warns_per_graph():
    for _ in range(2):  # a second model falling back must warn again
        torch._dynamo.reset()
        lin = torch.nn.Linear(16, 8, bias=False)
        lin.weight = torch.nn.Parameter(Opaque(lin.weight.detach().clone()), requires_grad=False)
        x = torch.randn(2, 16)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torch.compile(lin, backend="lowbit")(x)
        torch.testing.assert_close(out, x @ lin.weight.inner.t())
        messages = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
        assert any("tensor-subclass" in m and "Opaque" in m for m in messages), messages


def test_which_sources_are_module_state():
    from lowbit.compiler.module_state import is_attribute_source
    assert is_attribute_source("L['fn']._modules['0'].meta['zero']")   # hqq's meta dict
    assert is_attribute_source("L['self'].bias")
    assert not is_attribute_source("L['x']")
    assert not is_attribute_source("L['args'][0]")
    assert not is_attribute_source("L['past_key_values'].key_cache[0]")  # an argument's data


class CacheObject:
    def __init__(self):
        self.k = torch.randn(40, 64)


class UsesArgumentObject(torch.nn.Module):
    def forward(self, x, cache):
        return x @ cache.k.t()


def test_argument_object_tensors_stay_runtime_inputs():
    """A tensor held by an object passed as an argument changes per call: never bound."""
    torch._dynamo.reset()
    model, cache, x = UsesArgumentObject(), CacheObject(), torch.randn(3, 64)
    compiled = torch.compile(model, backend="lowbit")
    with torch.no_grad():
        compiled(x, cache)
        cache.k = torch.randn(40, 64)  # a new tensor, same shape: must be read at run time
        torch.testing.assert_close(compiled(x, cache), x @ cache.k.t())
