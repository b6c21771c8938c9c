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
