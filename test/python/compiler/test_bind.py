"""Weights are data, not code: `torch.compile(backend="lowbit")` binds low-bit weights as packed
runtime buffers (`lowbit.compiler.bind`) instead of freezing module state into the IR.

What is pinned down here, through torch.compile on tiny models:
* fp QAT weights that are exactly ternary / int2 and a model's own dequantization subgraph
  (packed int codes unpacked in forward) become `lowbit.packed_linear` with the packed bytes as a
  new graph input, and no fp weight (no module state that binding consumed) stays a graph input;
* siblings on one input (q/k/v) become one packed_linear and slices;
* dense fp32/bf16 weights that are not low-bit become `lowbit.packed_matmul` (BRGEMM panels);
* `lowbit.explain` lists every bound layer with the ISA it runs with;
* every case, compiled vs eager on M in {1, 3, 17, 65}, also with K and N that are not multiples
  of the 64-row kernel block / 32-wide BRGEMM panel;
* in-place weight updates after compiling.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.compiler.backend import LowbitCallable, lowbit_backend
from lowbit.compiler.compile import CompiledGraph
from lowbit.compiler.partition import BoundGraph, PartitionedGraph, UnsupportedOpWarning, forget_warnings

MS = (1, 3, 17, 65)
packed_linear = torch.ops.lowbit.packed_linear.default
packed_matmul = torch.ops.lowbit.packed_matmul.default


class Spy:
    """The lowbit backend, remembering the callables it returned."""

    def __init__(self):
        self.callables: list[LowbitCallable] = []

    def __call__(self, gm, example_inputs):
        fn = lowbit_backend(gm, example_inputs)
        self.callables.append(fn)
        return fn

    def bound(self) -> list[BoundGraph]:
        return [e for c in self.callables for e in c.cache.values() if isinstance(e, BoundGraph)]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def ternary_(linear: nn.Linear, seed: int = 0) -> nn.Linear:
    """A QAT checkpoint: W = {-1, 0, 1} x a per-row scale, stored as fp32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q = torch.randint(-1, 2, linear.weight.shape, generator=g).float()
        s = torch.rand(linear.weight.shape[0], 1, generator=g) * 0.1 + 0.01
        linear.weight.copy_(q * s)
    return linear


def int2_(linear: nn.Linear, seed: int = 0, group: int = 32) -> nn.Linear:
    """int2 (values -2..1) with per-group scales over K, stored as fp32."""
    g = torch.Generator().manual_seed(seed)
    n, k = linear.weight.shape
    with torch.no_grad():
        q = torch.randint(-2, 2, (n, k), generator=g).float()
        s = (torch.rand(n, k // group, generator=g) * 0.1 + 0.01).repeat_interleave(group, dim=1)
        linear.weight.copy_(q * s)
    return linear


class Packed2BitLinear(nn.Module):
    """Plain PyTorch 2-bit layer (examples/packed_2bit_model.py): codes packed 4 per byte,
    dequantized in forward with shifts, masks, an offset and per-group scales."""

    def __init__(self, in_features: int, out_features: int, group: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, 4, (out_features, in_features), dtype=torch.uint8, generator=g)
        c = codes.view(out_features, -1, 4)
        self.register_buffer("packed", (c[..., 0] << 6) | (c[..., 1] << 4) | (c[..., 2] << 2) | c[..., 3])
        self.register_buffer("scales", torch.rand(out_features, in_features // group, generator=g) * 0.1 + 0.01)
        self.group = group

    def forward(self, x):
        p = self.packed
        q = torch.stack([(p >> 6) & 3, (p >> 4) & 3, (p >> 2) & 3, p & 3], dim=-1).reshape(p.shape[0], -1)
        w = (q.to(torch.float32) - 2.0) * self.scales.repeat_interleave(self.group, dim=1)
        return F.linear(x, w)


class MLP(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


class QKV(nn.Module):
    def __init__(self, d: int = 128, n: int = 64):
        super().__init__()
        self.q = ternary_(nn.Linear(d, n, bias=False), 1)
        self.k = ternary_(nn.Linear(d, n, bias=False), 2)
        self.v = ternary_(nn.Linear(d, n, bias=False), 3)

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def _compile(model):
    spy = Spy()
    return torch.compile(model, backend=spy), spy


def _run_ms(spy, compiled, model, k, dtype=torch.float32, ms=MS, rtol=1e-4, atol=1e-4):
    """Compiled vs eager for every M; every graph must really be compiled (an eager fallback
    computes the right numbers too)."""
    torch.manual_seed(123)
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in ms:
            x = torch.randn(m, k, dtype=dtype)
            with torch.no_grad():
                y, ref = compiled(x), model(x)
            assert y.shape == ref.shape and y.dtype == ref.dtype
            torch.testing.assert_close(y, ref, rtol=rtol, atol=atol, msg=lambda s: f"M={m}: {s}")
    fallback = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert not fallback, fallback
    assert_compiled(spy)


def assert_compiled(spy: Spy) -> None:
    entries = [e for c in spy.callables for e in c.cache.values()]
    assert entries and all(isinstance(c, LowbitCallable) for c in spy.callables)
    for e in entries:
        assert isinstance(e, BoundGraph), f"a graph ran in eager: {e}"
        inner = e.inner
        if isinstance(inner, PartitionedGraph):
            assert not inner.unsupported, inner.unsupported
            parts = [getattr(m, "compiled", m) for m in inner.gm.children()]
            assert parts and all(isinstance(p, CompiledGraph) for p in parts), parts
        else:
            assert isinstance(inner, CompiledGraph), inner


def _targets(bound: BoundGraph) -> list:
    return [n.target for n in bound.captured.graph_module.graph.nodes if n.op == "call_function"]


def _assert_state_consumed(bound: BoundGraph, model: nn.Module, consumed: list[torch.Tensor]):
    """No tensor that binding packed is still a graph input; packed bytes are inputs instead."""
    cap = bound.captured
    placeholders = [n for n in cap.graph_module.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(cap.input_indices)
    sources = set(bound.binding.sources)
    assert sources, "nothing was bound"
    assert not sources & set(cap.input_indices), "a packed weight's source tensor is still a graph input"
    assert any(p.name.startswith(("lowbit_packed_", "lowbit_dense_")) for p in placeholders)
    for p in placeholders:
        val = p.meta.get("val")
        for w in consumed:
            assert not (isinstance(val, torch.Tensor) and val.is_floating_point()
                        and tuple(val.shape) in (tuple(w.shape), tuple(w.shape[::-1]))), \
                f"fp weight-shaped placeholder {p.name} {tuple(val.shape)} remains"


@pytest.mark.parametrize("kind", ["ternary", "int2"])
def test_qat_fp_weights_are_bound(kind):
    make = ternary_ if kind == "ternary" else int2_
    model = MLP(make(nn.Linear(128, 256), 1), make(nn.Linear(256, 64, bias=False), 2)).eval()
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, 128)
    bound = spy.bound()
    assert bound, "nothing was compiled with bound weights"
    for b in bound:
        assert _targets(b).count(packed_linear) == 2
        assert aten_mm_count(b) == 0
        _assert_state_consumed(b, model, [model.up.weight, model.down.weight])
        formats = [l.spec.weight_format for l in b.binding.layers]
        assert formats == (["ternary", "ternary"] if kind == "ternary" else ["int2_sym", "int2_sym"])
        assert {l.origin for l in b.binding.layers} == {"fp-weights"}


def aten_mm_count(bound: BoundGraph) -> int:
    return sum(t in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) for t in _targets(bound))


def test_dequant_subgraph_weights_are_bound():
    model = MLP(Packed2BitLinear(128, 256, seed=1), Packed2BitLinear(256, 64, seed=2)).eval()
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, 128)
    for b in spy.bound():
        assert _targets(b).count(packed_linear) == 2
        assert {l.origin for l in b.binding.layers} == {"dequant-subgraph"}
        # The unpacking subgraph (shifts, masks) is gone with the storage buffers it read.
        assert torch.ops.aten.bitwise_and.Scalar not in _targets(b)
        assert torch.ops.aten.__rshift__.Scalar not in _targets(b)
        cap = b.captured
        for p in cap.graph_module.graph.nodes:
            if p.op == "placeholder":
                assert p.meta["val"].dtype != torch.uint8, f"storage buffer {p.name} is still an input"
        assert not set(b.binding.sources) & set(cap.input_indices)


def test_lowbit_linear_layers_are_bound():
    model = MLP(nn.Linear(128, 256), nn.Linear(256, 64, bias=False)).eval()
    lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary", activations="int8"))
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, 128, rtol=1e-3, atol=1e-3)
    for b in spy.bound():
        assert _targets(b).count(packed_linear) == 2
        assert torch.ops.lowbit.linear.default not in _targets(b)
        assert {l.origin for l in b.binding.layers} == {"lowbit.linear"}
        assert [l.spec.act_format for l in b.binding.layers] == ["int8", "int8"]


@pytest.mark.parametrize("kind", ["lowbit_linear", "qat"])
def test_layers_in_a_row_are_bound(kind):
    """A layer whose input is the previous layer's output, with nothing in between: the
    second packed_linear must read the first one's replacement, not the erased node."""
    model = nn.Sequential(nn.Linear(96, 80), nn.Linear(80, 80), nn.Linear(80, 40)).eval()
    if kind == "qat":
        for i, layer in enumerate(model):
            ternary_(layer, i)
    else:
        lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary", activations="int8"))
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, 96, rtol=1e-3, atol=1e-3)
    for b in spy.bound():
        assert _targets(b).count(packed_linear) == 3


def test_a_recompile_shares_packed_weights():
    """Dynamo's dynamic recompile adds size inputs, so every weight sits at another graph
    position: binding must still find its packed layers and panels, not pack a second copy."""
    model = MLP(nn.Linear(128, 256), nn.Linear(256, 64, bias=False)).eval()
    lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary", activations="int8"), filter_fn=lambda m, fqn: fqn == "up")
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, 128, ms=(3, 17), rtol=1e-3, atol=1e-3)
    first, second = spy.bound()
    assert first.captured.input_indices != second.captured.input_indices, "positions did not move"
    assert [l.packed for l in first.binding.layers] and all(
        a.packed is b.packed for a, b in zip(first.binding.layers, second.binding.layers, strict=True))
    panels = [[t for t in b.binding.derived if t.dtype == torch.float32] for b in (first, second)]
    assert panels[0] and all(a is b for a, b in zip(*panels, strict=True))


def test_siblings_merge_into_one_packed_linear():
    model = QKV().eval()
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, 128)
    for b in spy.bound():
        targets = _targets(b)
        assert targets.count(packed_linear) == 1
        assert targets.count(torch.ops.aten.slice.Tensor) == 3
        (layer,) = b.binding.layers
        assert layer.spec.out_features == 192 and len(layer.names) == 3
        entries = [e for e in b.binding.report if e.get("result") == "recognized"]
        assert len(entries) == 1 and entries[0]["merged"] == 3


def test_siblings_with_n_tail_split_where_blocks_end():
    """A member other than the last must keep whole 64-row blocks: N = 40 ends a group."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ternary_(nn.Linear(128, 40, bias=False), 1)
            self.b = ternary_(nn.Linear(128, 64, bias=False), 2)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], -1)

    model = M().eval()
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, 128)
    for b in spy.bound():
        assert sorted(l.spec.out_features for l in b.binding.layers) == [40, 64]


def test_explain_lists_every_bound_layer_with_isa():
    from lowbit.runtime import current_isa

    model = MLP(ternary_(nn.Linear(128, 256), 1), ternary_(nn.Linear(256, 64), 2)).eval()
    compiled, _ = _compile(model)
    with torch.no_grad():
        compiled(torch.randn(3, 128))
    matmuls = lowbit.explain(model).matmuls()
    recognized = [e for e in matmuls if e.get("result", "").startswith("recognized")]
    assert len(recognized) == 2, matmuls
    for e in recognized:
        assert e["isa"] == current_isa()
        assert e["origin"] == "fp-weights" and e["format"].startswith("ternary")
        assert "tiles" in e and e["packed_bytes"] > 0
    assert "ternary" in str(lowbit.explain(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_weights_become_packed_matmul(dtype):
    torch.manual_seed(0)
    model = MLP(nn.Linear(128, 256, bias=False), nn.Linear(256, 64, bias=False)).eval().to(dtype)
    compiled, spy = _compile(model)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    _run_ms(spy, compiled, model, 128, dtype=dtype, **tol)
    bound = spy.bound()
    assert bound
    for b in bound:
        assert _targets(b).count(packed_matmul) == 2
        assert not b.binding.layers
        dense = [e for e in b.binding.report if e.get("origin") == "dense"]
        assert [e["format"] for e in dense] == [str(dtype).replace("torch.", "")] * 2
        _assert_state_consumed(b, model, [model.up.weight, model.down.weight])


@pytest.mark.parametrize("kind", ["ternary", "dense"])
def test_odd_k_and_n(kind):
    """K = 70 and N = 40 / 24: no multiple of the 4-wide K granule, the 64-row kernel block or
    the 32-wide panel (the activations are zero-padded to the packed K).
    Ternary layers take N and K tails in the kernels; a dense weight whose N is not a multiple
    of the panel width is not pre-packed and stays an ordinary matmul (still compiled)."""
    torch.manual_seed(0)
    up, down = nn.Linear(70, 40), nn.Linear(40, 24, bias=False)
    if kind == "ternary":
        ternary_(up, 1), ternary_(down, 2)
    model = MLP(up, down).eval()
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, 70)
    for b in spy.bound():
        targets = _targets(b)
        if kind == "ternary":
            assert targets.count(packed_linear) == 2
        else:
            assert packed_matmul not in targets and aten_mm_count(b) == 2


def test_inplace_update_with_version_bump_recompiles_with_warning():
    model = MLP(ternary_(nn.Linear(128, 256), 1), ternary_(nn.Linear(256, 64), 2)).eval()
    compiled, spy = _compile(model)
    x = torch.randn(3, 128)
    with torch.no_grad():
        compiled(x)
        with torch.no_grad():
            model.up.weight.mul_(2)  # still exactly ternary x scale: bound again, not eager
        with pytest.warns(RuntimeWarning, match="changed after compilation"):
            y = compiled(x)
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no recompiling on every call
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_rebinding_a_parameter_is_seen():
    model = MLP(ternary_(nn.Linear(128, 256), 1), ternary_(nn.Linear(256, 64), 2)).eval()
    compiled, _ = _compile(model)
    x = torch.randn(3, 128)
    with torch.no_grad():
        compiled(x)
        model.down.weight = nn.Parameter(model.down.weight * -1.0, requires_grad=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y = compiled(x)
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)


def test_inplace_update_through_data_is_seen():
    model = MLP(ternary_(nn.Linear(128, 256), 1), ternary_(nn.Linear(256, 64), 2)).eval()
    compiled, _ = _compile(model)
    x = torch.randn(3, 128)
    with torch.no_grad():
        compiled(x)
    model.up.weight.data.mul_(2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = compiled(x)
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)


def test_inplace_update_of_a_dense_packed_weight_recompiles():
    """Dense weights are pre-packed too (BRGEMM panels): the same guard applies."""
    torch.manual_seed(0)
    model = MLP(nn.Linear(64, 128, bias=False), nn.Linear(128, 64, bias=False)).eval()
    compiled, _ = _compile(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        compiled(x)
        model.down.weight.mul_(-0.5)
        with pytest.warns(RuntimeWarning, match="changed after compilation"):
            y = compiled(x)
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)


def test_state_that_is_not_packed_is_read_at_run_time():
    """A norm weight stays a graph input: an in-place change is seen without recompiling."""

    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(128)
            self.proj = ternary_(nn.Linear(128, 64, bias=False), 1)

        def forward(self, x):
            return self.proj(self.norm(x))

    model = Normed().eval()
    compiled, spy = _compile(model)
    x = torch.randn(3, 128)
    with torch.no_grad():
        compiled(x)
        model.norm.weight.mul_(3.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no recompile, no warning
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert sum(len(c.cache) for c in spy.callables) == 1


def test_qat_bf16_weights_are_bound():
    """A bf16 QAT checkpoint: the weight reaches the matmul through a dtype cast; still an
    fp-weights layer (not a dequant subgraph), bound and run in the kernels."""
    model = MLP(ternary_(nn.Linear(128, 256), 1), ternary_(nn.Linear(256, 64, bias=False), 2)).eval()
    model = model.to(torch.bfloat16)
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, 128, dtype=torch.bfloat16, rtol=2e-2, atol=2e-2)
    for b in spy.bound():
        assert _targets(b).count(packed_linear) == 2
        assert {l.origin for l in b.binding.layers} == {"fp-weights"}
        _assert_state_consumed(b, model, [model.up.weight, model.down.weight])


def test_packed_linear_eager_op():
    """The eager implementation of `lowbit.packed_linear` (what a graph part that falls back to
    eager runs) on a bound layer: any leading dims, bf16, empty x; bad operands raise."""
    model = MLP(ternary_(nn.Linear(128, 256), 1), ternary_(nn.Linear(256, 64, bias=False), 2)).eval()
    compiled, spy = _compile(model)
    with torch.no_grad():
        compiled(torch.randn(3, 128))
    layer = spy.bound()[0].binding.layers[0]
    s = layer.spec
    attrs = (s.weight_format, s.granularity, s.group_size, s.in_features, s.out_features, layer.kblock,
             s.act_format)
    op = torch.ops.lowbit.packed_linear
    # The Linear's bias may stay a separate add in the graph (mm + add): then the layer has none.
    w, b = model.up.weight, (model.up.bias if layer.bias is not None else None)
    for shape in ((5, 128), (2, 3, 128), (128,)):
        x = torch.randn(shape)
        torch.testing.assert_close(op(x, layer.packed, layer.bias, *attrs), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    xb = torch.randn(4, 128, dtype=torch.bfloat16)
    yb = op(xb, layer.packed, layer.bias, *attrs)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), F.linear(xb.float(), w, b), rtol=2e-2, atol=2e-2)
    assert op(torch.randn(0, 128), layer.packed, layer.bias, *attrs).shape == (0, 256)
    with pytest.raises(ValueError, match="bytes, the layout needs"):
        op(torch.randn(2, 128), layer.packed[:-1], layer.bias, *attrs)
    with pytest.raises(ValueError, match="shape"):
        op(torch.randn(2, 64), layer.packed, layer.bias, *attrs)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        op(torch.randn(2, 128).double(), layer.packed, layer.bias, *attrs)
    with pytest.raises(ValueError, match="bias"):
        op(torch.randn(2, 128), layer.packed, torch.zeros(3), *attrs)


# ----------------------------------------------------------------------------- the code-table proof
#
# A weight computed elementwise from 8-bit integer codes (Hugging Face BitNet: uint8 codes,
# `float(c) - 1`) is proven on the table of its codes (`compiler/code_table.py`). It must
# decide exactly what the full proof (`find_exact_format` on the evaluated weight) decides:
# same spec, same codes, same scale, or no decision at all (the full proof then runs).

from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

from lowbit.compiler.bind import _ConstantEvaluator, _first_nonzero  # noqa: E402
from lowbit.compiler.code_table import prove_per_tensor_ternary  # noqa: E402
from lowbit.passes.lib_recognize import DEFAULT_FORMATS, DEFAULT_GROUP_SIZES, find_exact_format  # noqa: E402


def _codes(shape, values, dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(values), shape, generator=g)
    return torch.tensor(values, dtype=torch.int16)[pick].to(dtype)


def _unpack_bitnet(packed):
    """transformers' BitNet `unpack_weights` (codes 0..2, 4 per byte along rows), as a function."""
    n4, k = packed.shape
    out = torch.zeros((4 * n4, k), dtype=torch.uint8)
    for i in range(4):
        out[i * n4:(i + 1) * n4] = (packed & (3 << 2 * i)) >> 2 * i
    return out


def _table_vs_full(fn, codes, formats=DEFAULT_FORMATS, act="none"):
    """(table result, full result) for the weight `fn(codes)` ([K, N] as a matmul reads it)."""
    gm = make_fx(torch.func.functionalize(fn))(codes)  # as export gives it
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    w = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    table = prove_per_tensor_ternary(w, _ConstantEvaluator(gm, {ph: codes}), list(formats), act)
    w_nk = fn(codes).t().to(torch.float32).contiguous().numpy()
    spec, qw, _ = find_exact_format(w_nk, list(formats), list(DEFAULT_GROUP_SIZES), act)
    return table, (spec, qw)


def _assert_same(table, full):
    spec, qw = full
    assert table is not None and spec is not None, (table, spec)
    t_spec, t_q, t_s = table
    assert t_spec == spec
    assert torch.equal(t_q, qw.q)
    assert torch.equal(t_s.view(torch.int32), qw.scales.reshape(1, 1).view(torch.int32))


_BITNET_PACKED = _codes((24, 72), list(range(0, 256, 1)))  # any byte: codes 0..3 per 2 bits


@pytest.mark.parametrize("case", [
    "bitnet", "bitnet-unpacked", "scaled", "int8-div", "rsub", "neg", "not-transposed", "bf16", "odd-shape",
    "late-zero"])
def test_code_table_proves_what_the_full_proof_finds(case):
    fp, sc = torch.float32, 0.25
    shape = (100, 72) if case == "odd-shape" else (64, 96)
    c = _codes(shape, [0, 1, 2])
    fn = {
        "bitnet": lambda c: (c.to(fp) - 1).t(),
        "scaled": lambda c: ((c.to(fp) - 1) * sc).t(),
        "int8-div": lambda c: (c.to(fp) * 3.0 / 7.0).t(),
        "rsub": lambda c: (1 - c.to(fp)).t(),
        "neg": lambda c: (-(c.to(fp) - 1.0) * 0.5).t(),
        "not-transposed": lambda c: c.to(fp) - 1,
        "bf16": lambda c: ((c.to(torch.bfloat16) - 1) * 0.1).t(),
        "odd-shape": lambda c: (c.to(fp) - 1).permute(1, 0),
    }.get(case)
    if case == "int8-div":
        c = _codes(shape, [-1, 0, 1], dtype=torch.int8)
    if case == "late-zero":  # one zero, in the last row: int1 is ruled out only by it
        c = _codes(shape, [0, 2])
        c[-1, 5] = 1
        fn = lambda c: (c.to(fp) - 1).t()  # noqa: E731
    if case == "bitnet-unpacked":  # the codes come out of the model's own shifts and masks
        c = (_BITNET_PACKED % 3).to(torch.uint8)
        c = (c | (c << 2) | (c << 4) | (c << 6))  # four 2-bit codes per byte, each 0..2
        fn = lambda p: (_unpack_bitnet(p).to(fp) - 1).t()  # noqa: E731
    _assert_same(*_table_vs_full(fn, c))


@pytest.mark.parametrize("case", ["no-zero-int1-first", "four-values", "non-finite", "all-zero",
                                  "per-row-scale", "plain-float"])
def test_code_table_leaves_undecided_cases_to_the_full_proof(case):
    fp = torch.float32
    c = _codes((64, 96), [0, 1, 2])
    fn = lambda c: (c.to(fp) - 1).t()  # noqa: E731
    if case == "no-zero-int1-first":  # {-1, 1}: int1 per channel comes first in the order
        c = _codes((64, 96), [0, 2])
    elif case == "four-values":
        c = _codes((64, 96), [0, 1, 2, 3])
        fn = lambda c: (c.to(fp) - 1.5).t()  # noqa: E731
    elif case == "non-finite":
        fn = lambda c: ((c.to(fp) - 1) / 0.0).t()  # noqa: E731
    elif case == "all-zero":
        c = torch.ones((64, 96), dtype=torch.uint8)
    elif case == "per-row-scale":
        scale = torch.rand(64, 1) + 0.5
        fn = lambda c: ((c.to(fp) - 1) * scale).t()  # noqa: E731
    elif case == "plain-float":
        c = torch.randint(-1, 2, (64, 96)).to(fp)
        fn = lambda w: w.t()  # noqa: E731
    table, (spec, _) = _table_vs_full(fn, c)
    assert table is None
    if case == "no-zero-int1-first":
        assert spec is not None and spec.weight_format == "int1", spec
        # without int1 among the formats the table decides, and agrees
        _assert_same(*_table_vs_full(fn, c, formats=("ternary", "int2_sym")))
    if case == "non-finite":
        assert spec is None


def test_first_nonzero_is_the_row_major_first():
    g = torch.Generator().manual_seed(3)
    for shape, first in [((50, 33), (37, 5)), ((7, 9), (0, 0)), ((40, 8), (39, 7))]:
        q = torch.zeros(shape, dtype=torch.int8)
        q[first] = -1
        tail = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
        flat = q.reshape(-1)
        at = first[0] * shape[1] + first[1]
        flat[at + 1:] = tail.reshape(-1)[at + 1:]
        assert _first_nonzero(q) == tuple(int(i) for i in q.nonzero()[0]) == first
    assert _first_nonzero(torch.zeros(20, 5, dtype=torch.int8)) == ()


class BitNetLikeLinear(nn.Module):
    """transformers' BitLinear weight path: ternary codes packed 4 per byte along rows (uint8),
    unpacked in forward to `float(c) - 1`, scaled after the matmul."""

    def __init__(self, in_features: int, out_features: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q = torch.randint(0, 3, (out_features, in_features), dtype=torch.uint8, generator=g)
        n4 = out_features // 4
        packed = torch.zeros((n4, in_features), dtype=torch.uint8)
        for i in range(4):
            packed |= q[i * n4:(i + 1) * n4] << (2 * i)
        self.register_buffer("weight", packed)
        self.register_buffer("weight_scale", torch.tensor([0.125]))

    def forward(self, x):
        n4 = self.weight.shape[0]
        w = torch.zeros((4 * n4, self.weight.shape[1]), dtype=torch.uint8)
        for i in range(4):
            w[i * n4:(i + 1) * n4] = (self.weight & (3 << 2 * i)) >> 2 * i
        return F.linear(x, w.to(x.dtype) - 1) * self.weight_scale


@pytest.mark.parametrize("k,n", [(128, 256), (72, 100)])
def test_bitnet_like_layers_bind_by_the_code_table_to_the_full_proofs_bytes(k, n, monkeypatch):
    """Compiled vs eager (odd K and N too), every layer proven on the code table, and the
    packed bytes identical to what the full proof packs with the table turned off."""
    import lowbit.compiler.code_table as code_table
    from lowbit.compiler import bind

    model = MLP(BitNetLikeLinear(k, n, seed=1), BitNetLikeLinear(n, 64, seed=2)).eval()
    hits = []
    real = code_table.prove_per_tensor_ternary

    def counting(*a, **kw):
        out = real(*a, **kw)
        hits.append(out is not None)
        return out

    monkeypatch.setattr(code_table, "prove_per_tensor_ternary", counting)
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, k)
    bound = spy.bound()
    for b in bound:
        assert [l.spec.describe() for l in b.binding.layers] == ["ternary/tensor a=none"] * 2
    assert hits and all(hits), hits
    table_bytes = [t.clone() for t in bound[0].binding.derived]

    torch._dynamo.reset()
    bind._LAYERS.clear()
    bind._MATCHES.clear()
    monkeypatch.setattr(code_table, "prove_per_tensor_ternary", lambda *a, **kw: None)
    compiled, spy = _compile(model)
    _run_ms(spy, compiled, model, k, ms=(3,))
    full_bytes = spy.bound()[0].binding.derived
    assert len(full_bytes) == len(table_bytes)
    assert all(torch.equal(x, y) for x, y in zip(table_bytes, full_bytes))


def test_explain_does_not_report_a_dead_models_graphs_for_a_new_model():
    """A compiled graph that outlives its model is not reported for a new module whose tensor
    got one of the dead model's ids (CPython hands a freed object's id to the next one)."""
    import gc

    from lowbit.compiler import report as rep
    m = torch.nn.Sequential(torch.nn.Linear(32, 16))
    lowbit.quantize_(m, lowbit.QuantConfig(weights="ternary", activations="int8"))
    compiled = torch.compile(m, backend="lowbit")
    with torch.no_grad():
        compiled(torch.randn(2, 32))
    assert lowbit.explain(m).matmuls()
    keep = list(rep._REGISTRY)  # graphs outliving the model (a cache, a test's reference)
    old = {id(t) for t in (*m.parameters(), *m.buffers())}
    del m, compiled
    torch._dynamo.reset()
    gc.collect()
    fresh = []
    for _ in range(10000):
        t = torch.zeros(3)
        if id(t) in old:
            break
        fresh.append(t)  # kept: the next tensor gets another id
    else:
        pytest.skip("CPython did not reuse a freed tensor's id here; nothing to check")
    holder = torch.nn.Module()
    holder.register_buffer("t", t)
    assert keep and not lowbit.explain(holder).entries
