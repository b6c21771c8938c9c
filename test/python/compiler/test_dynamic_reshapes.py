"""Reshapes that merge dynamic dims (`lowbit.compiler.reshape_fixes`).

torch-mlir lowers a view that merges dynamic dims (`[s0, s1, 64] -> [s0*s1, 64]`, as
`nn.Linear` on a 3-D input decomposes) into `tensor.cast ... to tensor<?x1x64xf32>` plus a
collapse, i.e. it assumes `s1 == 1`. `fix_dynamic_reshapes` rewrites such views into
`prims.collapse` (+ a splitting view); every case here is compiled once, shape-generic,
and compared with eager for several sizes (1, odd, mixed), and its torch-to-linalg IR is
checked for casts of a dynamic dim to a static size.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import lowbit  # noqa: F401  (registers the "lowbit" dynamo backend)
from lowbit.compiler import partition
from lowbit.compiler.compile import compile_captured
from lowbit.compiler.frontend import FrontendError, capture, import_graph
from lowbit.compiler.pipeline import CompileOptions, Pipeline
from lowbit.compiler import reshape_fixes
from lowbit.compiler.reshape_fixes import (DynamicReshapeError, dynamic_to_static_casts,
                                           fix_dynamic_reshapes)

aten, prims = torch.ops.aten, torch.ops.prims
RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
SIZES = [(1, 1), (3, 7), (2, 1), (1, 5), (4, 4)]
def _linalg_ir(captured) -> str:
    module = import_graph(captured)
    Pipeline(options=CompileOptions(weights="freeze")).run(module, stop="torch-to-linalg")
    return str(module)


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _x(*shape):
    return torch.randn(*shape)


def _linear3d():
    torch.manual_seed(0)
    return torch.nn.Linear(64, 32)


# name -> (module or function, inputs for sizes (A, B), dynamic_dims)
CASES = {
    "linear3d": (_linear3d, lambda a, b: (_x(a, b, 64),), {0: {0: "A", 1: "B"}}),
    "merge_then_split_back": (
        lambda: Fn(lambda x: (x.reshape(-1, 64) * 2).reshape(x.shape[0], x.shape[1], 64) + 1),
        lambda a, b: (_x(a, b, 64),), {0: {0: "A", 1: "B"}}),
    "unflatten": (
        lambda: Fn(lambda x, y: (x.reshape(-1, 64) * 2).unflatten(0, (y.shape[0], -1)) + 1),
        lambda a, b: (_x(a, b, 64), _x(a)), {0: {0: "A", 1: "B"}, 1: {0: "A"}}),
    "expand_then_reshape": (
        lambda: Fn(lambda x, y: x.expand(x.shape[0], y.shape[0], 64).reshape(-1, 64) + 1),
        lambda a, b: (_x(a, 1, 64), _x(b)), {0: {0: "A"}, 1: {0: "B"}}),
    "flatten_all": (lambda: Fn(lambda x: torch.flatten(x) * 3), lambda a, b: (_x(a, b, 64),),
                    {0: {0: "A", 1: "B"}}),
    "flatten_three_dynamic": (lambda: Fn(lambda x: x.flatten(0, 2) * 3),
                              lambda a, b: (_x(a, b, a + 2, 8),), {0: {0: "A", 1: "B", 2: "C"}}),
    "merge_and_split": (lambda: Fn(lambda x: x.reshape(-1, 8, 8) + 1), lambda a, b: (_x(a, b, 64),),
                        {0: {0: "A", 1: "B"}}),
    "transpose_then_reshape": (
        lambda: Fn(lambda x: x.transpose(1, 2).reshape(x.shape[0], 4, -1) + 1),
        lambda a, b: (_x(a, b, 4, 16),), {0: {0: "A", 1: "B"}}),
    "transpose_merge_dynamic": (
        lambda: Fn(lambda x: x.transpose(0, 1).reshape(-1, 16) + 1),
        lambda a, b: (_x(a, b, 16),), {0: {0: "A", 1: "B"}}),
    "swap_sizes": (lambda: Fn(lambda x: x.reshape(x.shape[1], x.shape[0]) + 1), lambda a, b: (_x(a, b),),
                   {0: {0: "A", 1: "B"}}),
    "many_to_many": (lambda: Fn(lambda x: (x.reshape(-1, 64) + 1).reshape(-1, 128) * 2),
                     lambda a, b: (_x(a, 128),), {0: {0: "A"}}),
    "unit_dim_between": (lambda: Fn(lambda x: x.reshape(x.shape[0], x.shape[2], 64) + 1),
                         lambda a, b: (_x(a, 1, b, 64),), {0: {0: "A", 2: "B"}}),
    "matmul_4d": (lambda: Fn(lambda x, w: x @ w), lambda a, b: (_x(a, b, 5, 8), _x(8, 3)),
                  {0: {0: "A", 1: "B"}}),
    "merge_across_split": (lambda: Fn(lambda x: x.reshape(-1, 3) * 2), lambda a, b: (_x(a, b, 6),),
                           {0: {0: "A", 1: "B"}}),
    "unit_dims_moved": (lambda: Fn(lambda x: x.reshape(1, -1, 1) + 1), lambda a, b: (_x(a, 1, b),),
                        {0: {0: "A", 2: "B"}}),
    "int64": (lambda: Fn(lambda x: x.reshape(-1, 4) + 1),
              lambda a, b: (torch.randint(-50, 50, (a, b, 4)),), {0: {0: "A", 1: "B"}}),
    "bf16": (lambda: Fn(lambda x: x.reshape(-1, 64) * 2), lambda a, b: (_x(a, b, 64).to(torch.bfloat16),),
             {0: {0: "A", 1: "B"}}),
}


def _capture(name):
    make, inputs, dims = CASES[name]
    model = make().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, inputs(2, 3), dynamic_dims=dims)
    return model, inputs, captured


def _merging_views(gm) -> list[str]:
    """Reshape nodes whose output merges >= 2 input dims of which one is dynamic."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in RESHAPES:
            ins, outs = n.args[0].meta["val"].shape, n.meta["val"].shape
            dyn_in = sum(isinstance(d, torch.SymInt) for d in ins)
            if dyn_in and len(outs) < len(ins):
                out.append(n.name)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_eager(name):
    model, inputs, captured = _capture(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. FX's "erase_node on an already erased node"
        fix_dynamic_reshapes(captured.graph_module)
    ir_text = _linalg_ir(captured)
    compiled = compile_captured(captured)
    for a, b in SIZES:
        args = inputs(a, b)
        with torch.no_grad():
            ref = model(*args)
            got = compiled(*args)[0]
            graph_eager = captured.graph_module(*[args[i] for i in captured.input_indices])[0]
        assert got.shape == ref.shape, (a, b)
        tol = 2e-2 if ref.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol, msg=f"{name} at sizes {(a, b)}")
        torch.testing.assert_close(graph_eager, ref, atol=tol, rtol=tol)  # the rewritten graph in eager
    assert not dynamic_to_static_casts(ir_text), ir_text
    assert not _merging_views(captured.graph_module), captured.graph_module.code


def test_linear3d_is_rewritten_to_collapse():
    _, _, captured = _capture("linear3d")
    gm = captured.graph_module
    assert _merging_views(gm)
    assert dynamic_to_static_casts(_linalg_ir(captured))  # what torch-mlir makes of it unfixed
    fix_dynamic_reshapes(gm)
    collapses = [n for n in gm.graph.nodes if n.target == prims.collapse.default]
    assert [(n.args[1], n.args[2]) for n in collapses] == [(0, 1)]
    assert not _merging_views(gm)


def test_idempotent():
    _, _, captured = _capture("merge_and_split")
    gm = captured.graph_module
    fix_dynamic_reshapes(gm)
    code = gm.code
    fix_dynamic_reshapes(gm)
    assert gm.code == code


def test_static_graph_untouched():
    model = Fn(lambda x: (x.reshape(-1, 64) * 2).reshape(2, 3, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, (_x(2, 3, 64),))
    gm = captured.graph_module
    code, nodes = gm.code, [(n.name, n.target, n.args) for n in gm.graph.nodes]
    fix_dynamic_reshapes(gm)
    assert gm.code == code
    assert [(n.name, n.target, n.args) for n in gm.graph.nodes] == nodes


def test_dynamic_views_that_only_keep_or_split_dims_untouched():
    model = Fn(lambda x: (x.reshape(x.shape[0], 8, 8) + 1).reshape(x.shape[0], 4, 16) * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # [A, 64] -> [A, 8, 8] splits; [A, 8, 8] -> [A, 4, 16] regroups static dims only.
        captured = capture(model, (_x(3, 64),), dynamic_dims={0: {0: "A"}})
    gm = captured.graph_module
    code = gm.code
    fix_dynamic_reshapes(gm)
    assert gm.code == code
    compiled = compile_captured(captured)
    for a in (1, 2, 5):
        x = _x(a, 64)
        torch.testing.assert_close(compiled(x)[0], model(x))


def test_unpaired_dims_collapse_everything(monkeypatch):
    """Dims the pass cannot pair symbolically: all collapsed, then split by the size list."""
    model, inputs, captured = _capture("merge_and_split")
    monkeypatch.setattr(reshape_fixes, "_pair_dims", lambda *a: None)
    fix_dynamic_reshapes(captured.graph_module)
    collapses = [n for n in captured.graph_module.graph.nodes if n.target == prims.collapse.default]
    assert [(n.args[1], n.args[2]) for n in collapses] == [(0, 2)]
    compiled = compile_captured(captured)
    for a, b in SIZES:
        x, = inputs(a, b)
        torch.testing.assert_close(compiled(x)[0], model(x))


def test_reshape_without_metadata_raises():
    _, _, captured = _capture("linear3d")
    gm = captured.graph_module
    view = next(n for n in gm.graph.nodes if n.target in RESHAPES and len(n.meta["val"].shape) == 2)
    del view.args[0].meta["val"]
    with pytest.raises(DynamicReshapeError) as info:
        fix_dynamic_reshapes(gm)
    assert isinstance(info.value, FrontendError)  # what the fallback runs in eager
    assert info.value.nodes == [view.name]
    assert view.name in str(info.value)


def test_sizes_specialised_to_examples_raise():
    """`view(x, [2, 5, 64])` on a dynamic `[A*B, 64]` (what a partitioned part whose sizes
    arrive as SymInt inputs becomes after `capture`): right for one size only."""
    _, _, captured = _capture("merge_then_split_back")
    gm = captured.graph_module
    view = next(n for n in gm.graph.nodes if n.target in RESHAPES and len(n.meta["val"].shape) == 3)
    view.args = (view.args[0], [2, 3, 64])
    with pytest.raises(DynamicReshapeError, match="specialised") as info:
        fix_dynamic_reshapes(gm)
    assert info.value.nodes == [view.name]


class BlockWithCacheInputs(torch.nn.Module):
    """`DecoderBlock` whose key/value caches are arguments (updated in place)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, input_pos, k_cache, v_cache):
        state = {"attention.cache.k": k_cache, "attention.cache.v": v_cache}
        return torch.func.functional_call(self.block, state, (x, input_pos))


@pytest.mark.parametrize("dims", ["batch_and_length", "length"])
def test_decoder_block(dims):
    """Batch and length dynamic: every Linear merges [B, T, dim] -> [B*T, dim]; length only:
    [1, T, dim] -> [T, dim]."""
    from lowbit.models import LlamaConfig, make_decoder_block
    cfg = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=32, max_batch=4)
    model = BlockWithCacheInputs(make_decoder_block(cfg, torch.float32, seed=11)).eval()
    shape = (cfg.max_batch, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
    batch = 2 if dims == "batch_and_length" else 1
    example = (torch.randn(batch, 3, cfg.dim), torch.arange(3), torch.zeros(shape), torch.zeros(shape))
    dynamic = {0: {0: "B", 1: "T"}, 1: {0: "T"}} if dims == "batch_and_length" else {0: {1: "T"}, 1: {0: "T"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, example, dynamic_dims=dynamic)
    fix_dynamic_reshapes(captured.graph_module)
    assert not dynamic_to_static_casts(_linalg_ir(captured))
    compiled = compile_captured(captured)
    sizes = [(1, 1), (3, 5), (2, 7), (4, 1), (1, 9)] if batch > 1 else [(1, 1), (1, 5), (1, 8), (1, 13)]
    for b, t in sizes:
        x, pos = torch.randn(b, t, cfg.dim), torch.arange(t)
        caches = [torch.zeros(shape) for _ in range(4)]
        with torch.no_grad():
            ref = model(x, pos, caches[0], caches[1])
            got = compiled(x, pos, caches[2], caches[3])[0]
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5, msg=f"B={b} T={t}")
        torch.testing.assert_close(caches[2], caches[0], atol=2e-5, rtol=1e-5)  # the cache write-back
        torch.testing.assert_close(caches[3], caches[1], atol=2e-5, rtol=1e-5)


# --- through torch.compile(backend="lowbit", dynamic=True) ------------------------------

@pytest.fixture
def fixed_capture(monkeypatch):
    """Until partition.py calls the pass itself: apply it right after every capture."""
    original = partition.capture

    def capture_and_fix(*args, **kwargs):
        captured = original(*args, **kwargs)
        fix_dynamic_reshapes(captured.graph_module)
        return captured

    monkeypatch.setattr(partition, "capture", capture_and_fix)
    torch._dynamo.reset()
    partition.forget_warnings()
    yield
    torch._dynamo.reset()


class Attention(torch.nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1) @ v
        return self.out(a.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("which", ["mlp", "attention"])
def test_torch_compile_dynamic(fixed_capture, which):
    torch.manual_seed(1)
    if which == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(),
                                    torch.nn.Linear(96, 64, bias=False)).eval()
    else:
        model = Attention().eval()
    compiled = torch.compile(model, backend="lowbit", dynamic=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b, t in [(2, 5), (3, 7), (1, 9), (2, 1), (1, 1), (4, 3)]:
            x = torch.randn(b, t, 64)
            torch.testing.assert_close(compiled(x), model(x), atol=2e-5, rtol=1e-5, msg=f"{which} {(b, t)}")
    fallbacks = [w for w in caught if issubclass(w.category, partition.UnsupportedOpWarning)]
    assert not fallbacks, [str(w.message) for w in fallbacks]


class LinearEagerOpLinear(torch.nn.Module):
    """A Linear on each side of an op torch-to-linalg rejects: the graph is partitioned."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 96)
        self.b = torch.nn.Linear(96, 64)

    def forward(self, x):
        return self.b(torch.erfinv(torch.tanh(self.a(x))) * 0.5)


def test_torch_compile_dynamic_partitioned(fixed_capture):
    """Parts captured from a partitioned dynamic graph get their sizes as SymInt inputs,
    which capture specialises; the pass must not let such a part compile for one size."""
    torch.manual_seed(2)
    model = LinearEagerOpLinear().eval()
    compiled = torch.compile(model, backend="lowbit", dynamic=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, t in [(2, 5), (3, 7), (1, 9), (4, 1)]:
            x = torch.randn(b, t, 64)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5, msg=f"{(b, t)}")
