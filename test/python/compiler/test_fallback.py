"""Ops the pipeline cannot compile run in eager; the rest of the graph stays compiled.

`aten.erfinv` has no torch-to-linalg lowering, `aten.cumsum` lowers to tm_tensor ops
that our bufferization rejects (a failure in a later stage, located through the
`lowbit.node:` locations), and `lbtest.twice` is a torch.library op with no lowering at
all. Results must match eager and each op must be named in exactly one warning.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from lowbit.compiler.backend import LowbitCallable, lowbit_backend
from lowbit.compiler.compile import CompiledGraph
from lowbit.compiler.partition import BoundGraph, PartitionedGraph, UnsupportedOpWarning, forget_warnings, rejected_ops


@torch.library.custom_op("lbtest::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(9, 7)
        self.fc2 = torch.nn.Linear(7, 5)

    def forward(self, x):
        h = F.silu(self.fc1(x))
        h = torch.erfinv(torch.tanh(h)) * 0.5          # rejected by torch-to-linalg
        h = torch.ops.lbtest.twice(h) + 1              # custom op without a lowering
        h = h.cumsum(-1)                               # rejected later, by bufferize
        return torch.softmax(self.fc2(h), -1)


def _compile(model):
    made = []

    def backend(gm, example_inputs):
        fn = lowbit_backend(gm, example_inputs)
        made.append(fn)
        return fn

    torch._dynamo.reset()
    return torch.compile(model, backend=backend), made


@pytest.fixture(autouse=True)
def fresh_warnings():
    forget_warnings()
    yield
    forget_warnings()


def test_unsupported_ops_run_in_eager_and_warn_once():
    torch.manual_seed(0)
    model = Mixed().eval()
    compiled, made = _compile(model)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in (3, 3, 1, 17):  # a repeat, then new shapes (recompiles)
            x = torch.randn(rows, 9)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    for op in ("aten.erfinv", "lbtest.twice", "aten.cumsum"):
        naming = [m for m in messages if f"cannot compile {op} " in m]
        assert len(naming) == 1, f"{op} named in {len(naming)} warnings: {messages}"
    assert not [m for m in messages if "the graph" in m], messages
    # The supported parts really are compiled: linear/silu/softmax run as native code.
    parts = [entry for fn in made if isinstance(fn, LowbitCallable) for entry in fn.cache.values()]
    # Weights bound as buffers: the partitioned graph is inside the BoundGraph.
    parts = [p.inner if isinstance(p, BoundGraph) else p for p in parts]
    assert parts and all(isinstance(p, PartitionedGraph) for p in parts)
    for p in parts:
        assert p.unsupported == {"aten.erfinv", "lbtest.twice", "aten.cumsum"}
        compiled_parts = [m for m in p.gm.children() if hasattr(m, "compiled")]
        assert compiled_parts and all(isinstance(m.compiled, CompiledGraph) for m in compiled_parts)


def test_fallback_keeps_input_mutations():
    """A graph that writes a cache and uses an unsupported op still updates the cache."""
    def f(cache, pos, v):
        cache.index_copy_(0, pos, v)
        return torch.erfinv(torch.tanh(cache.sum(-1)))

    compiled, _ = _compile(f)
    cache, cache_ref = torch.zeros(6, 4), torch.zeros(6, 4)
    pos, v = torch.tensor([1, 4]), torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        out = compiled(cache, pos, v)
    torch.testing.assert_close(out, f(cache_ref, pos, v))
    torch.testing.assert_close(cache, cache_ref)


def test_rejected_ops_maps_node_locations_to_ops():
    gm = make_fx(lambda x: torch.cumsum(torch.sin(x), 0))(torch.randn(3))
    message = 'error: "lowbit.node:cumsum"("x.py":3:0): op was not bufferized'
    assert rejected_ops(message, gm) == {"aten.cumsum"}
    assert rejected_ops('error: "lowbit.node:nonexistent": boom', gm) == set()


def test_capture_failure_runs_whole_graph_in_eager_with_one_warning():
    # With dynamic output shapes captured, dynamo hands us nonzero's data-dependent
    # shape, which a statically shaped compilation cannot express.
    def f(x):
        return torch.nonzero(x).float().sum(0) + x.sum()

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled, made = _compile(f)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                x = torch.randn(5).relu()
                torch.testing.assert_close(compiled(x), f(x))
    ours = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert len(ours) == 1 and "cannot compile the graph (capture failed" in ours[0], ours


def test_bool_output_of_compiled_comparison():
    """Regression: vectorized code once stored vector<Nxi1> bit-packed into torch bools."""
    from lowbit.compiler.compile import compile_function
    x = torch.randn(37)
    compiled = compile_function(lambda x: x > 0, (x,))
    assert torch.equal(compiled(x)[0], x > 0)
