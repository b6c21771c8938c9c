"""One compile for every length (issue 9 item 3): graphs with dynamic dims.

`capture(..., dynamic_dims=...)` keeps chosen input dims symbolic; the compiled code is
shape-generic and the JIT binds the sizes per call. A Llama decoder block whose KV cache
is passed as inputs is compiled once and serves decode (T=1) and prefill of any length up
to the cache size; accuracy is judged as in test_decoder.py (compiled error vs an fp64
reference at most twice eager's, plus a small absolute slack). Calls whose sizes do not
fit the compiled signature raise `InputError` naming the input, dim and relation.
"""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch.export import Dim

from lowbit.compiler.compile import CompiledGraph, compile_captured, compile_function
from lowbit.compiler.frontend import (FrontendError, capture, dynamic_dims_from_dynamo,
                                      dynamic_dims_from_meta)
from lowbit.compiler.jit import InputError
from lowbit.models import LlamaConfig, make_decoder_block

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
CFG = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=144)


class BlockWithCacheInputs(torch.nn.Module):
    """`DecoderBlock` whose key/value caches are arguments (updated in place)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, input_pos, k_cache, v_cache):
        state = {"attention.cache.k": k_cache, "attention.cache.v": v_cache}
        return torch.func.functional_call(self.block, state, (x, input_pos))


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _check(compiled, eager, ref, dtype, what):
    e_c, e_e = _err(compiled, ref), _err(eager, ref)
    assert e_c <= 2 * e_e + ATOL[dtype], f"{what}: compiled error {e_c:.3g} vs eager error {e_e:.3g}"


@functools.lru_cache(maxsize=None)  # compiled once per module run; the block is never mutated
def _compile_block(dtype, example_len=3):
    model = BlockWithCacheInputs(make_decoder_block(CFG, dtype, seed=11))
    shape = (1, CFG.n_kv_heads, CFG.max_seq_len, CFG.head_dim)
    example = (torch.randn(1, example_len, CFG.dim).to(dtype), torch.arange(example_len),
               torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    seq = Dim("T", min=1, max=CFG.max_seq_len)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, example, dynamic_dims={0: {1: seq}, 1: {0: "T"}})
        compiled = compile_captured(captured)
    return model, captured, compiled


# (length, first position): decode at a late position, odd prefills, the whole cache.
LENGTHS = [(1, 57), (3, 10), (17, 0), (127, 5), (CFG.max_seq_len, 0), (1, CFG.max_seq_len - 1)]


# The fp32 graph is exported from a decode-sized example (T=1), the bf16 one from T=3.
@pytest.mark.parametrize("dtype, example_len", [(torch.float32, 1), (torch.bfloat16, 3)])
def test_decoder_block_one_compile_serves_every_length(dtype, example_len):
    model, captured, compiled = _compile_block(dtype, example_len)
    assert captured.is_dynamic and isinstance(compiled, CompiledGraph)
    assert str(captured.input_specs[0]) == f"{str(dtype)[6:]}[1, T, {CFG.dim}]"
    assert captured.symbol_ranges == {"T": (1, CFG.max_seq_len)}
    ref_model = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(0)
    shape = (1, CFG.n_kv_heads, CFG.max_seq_len, CFG.head_dim)
    with torch.no_grad():
        for t, start in LENGTHS:
            # Earlier positions hold values, so attention reads the cache as in decode.
            k, v = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
            x = torch.randn(1, t, CFG.dim, generator=gen).to(dtype)
            pos = torch.arange(start, start + t)
            k_e, v_e, k_r, v_r = k.clone(), v.clone(), k.double(), v.double()
            out = compiled(x, pos, k, v)[0]
            out_eager = model(x, pos, k_e, v_e)
            out_ref = ref_model(x.double(), pos, k_r, v_r)
            assert out.shape == (1, t, CFG.dim) and out.dtype == dtype
            what = f"{dtype} T={t} at {start}"
            _check(out, out_eager, out_ref, dtype, f"{what} output")
            _check(k, k_e, k_r, dtype, f"{what} key cache")
            _check(v, v_e, v_r, dtype, f"{what} value cache")


def test_decoder_block_sizes_outside_the_signature_raise_input_error():
    model, captured, compiled = _compile_block(torch.float32, 1)
    shape = (1, CFG.n_kv_heads, CFG.max_seq_len, CFG.head_dim)
    k, v = torch.zeros(shape), torch.zeros(shape)
    x5 = torch.randn(1, 5, CFG.dim)
    cases = [
        ((x5, torch.arange(4), k, v), "input 1 dim 0: expected T = 5 (T = 5 from input 0 dim 1)"),
        ((x5[0], torch.arange(5), k, v), "input 0: expected rank 3 (shape [1, T, 64]), got rank 2"),
        ((torch.randn(2, 5, CFG.dim), torch.arange(5), k, v),
         "input 0: expected shape [1, T, 64], got [2, 5, 64] (dim 0 must be 1)"),
        ((x5, torch.arange(5), torch.zeros(1, 2, 100, 16), v),
         "input 2: expected shape [1, 2, 144, 16], got [1, 2, 100, 16] (dim 2 must be 144)"),
        ((torch.randn(1, CFG.max_seq_len + 1, CFG.dim), torch.arange(CFG.max_seq_len + 1), k, v),
         f"input 0 dim 1: T = {CFG.max_seq_len + 1} is outside the compiled range 1 <= T <= {CFG.max_seq_len}"),
        ((torch.randn(1, 0, CFG.dim), torch.arange(0), k, v),
         "input 0 dim 1: T = 0 is outside the compiled range"),
        ((x5.double(), torch.arange(5), k, v), "input 0: expected dtype torch.float32, got torch.float64"),
        ((x5, torch.arange(5).int(), k, v), "input 1: expected dtype torch.int64, got torch.int32"),
    ]
    for args, message in cases:
        assert not compiled.accepts(args)
        with pytest.raises(InputError) as info:
            compiled(*args)
        assert message in str(info.value)
    assert compiled.accepts((x5, torch.arange(5), k, v))
    with pytest.raises(InputError, match="expected 4 tensor inputs, got 3"):
        compiled.jit(x5, torch.arange(5), k)


def _attention_like(x, w):
    scores = torch.softmax((x @ w) @ x.transpose(-1, -2) / 4, -1)
    return scores @ x + x.mean(-2, keepdim=True), x.shape[-2] * x[..., :1]


@pytest.mark.parametrize("example_len", [1, 2, 6])
def test_example_of_any_length_gives_one_generic_graph(example_len):
    """An example of length 1 (torch would specialize it) still exports generically."""
    w = torch.randn(8, 8)
    compiled = compile_function(_attention_like, (torch.randn(2, example_len, 8), w), freezable=(1,),
                                dynamic_dims={0: {1: "T"}})
    assert compiled.captured.symbol_ranges["T"][0] == 1
    for t in (1, 2, 3, 17, 40):
        x = torch.randn(2, t, 8)
        outs = compiled(x, w)
        for got, want in zip(outs, _attention_like(x, w)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shared_symbol_and_derived_output_shapes():
    """Two inputs sharing a size; outputs whose shapes are expressions of the symbols."""
    def f(a, b):
        return torch.cat([a, b], 0), (a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1])

    compiled = compile_function(f, (torch.randn(3, 5), torch.randn(4, 5)),
                                dynamic_dims={0: {0: "M", 1: "K"}, 1: {0: "N", 1: "K"}})
    spec0, spec1 = compiled.captured.output_specs
    assert str(spec0) == "float32[M + N, K]" and str(spec1) == "float32[M*N, K]"
    for m, n, k in [(1, 1, 1), (2, 7, 3), (9, 4, 16)]:
        a, b = torch.randn(m, k), torch.randn(n, k)
        for got, want in zip(compiled(a, b), f(a, b)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)
    with pytest.raises(InputError, match=r"input 1 dim 1: expected K = 3 \(K = 3 from input 0 dim 1\)"):
        compiled(torch.randn(2, 3), torch.randn(2, 4))


def test_data_dependent_sizes_are_still_rejected():
    with pytest.raises(FrontendError, match="data-dependent shape"):
        compile_function(lambda x: torch.nonzero(x > 0), (torch.randn(6, 3),), dynamic_dims={0: {0: "N"}})


def test_bad_dynamic_dims_are_named():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="input 0 has rank 2, no dim 2"):
        capture(lambda x: x + 1, (x,), dynamic_dims={0: {2: "T"}})
    with pytest.raises(ValueError, match="input position 1 is out of range"):
        capture(lambda x: x + 1, (x,), dynamic_dims={1: {0: "T"}})
    with pytest.raises(ValueError, match="is not a Python identifier"):
        capture(lambda x: x + 1, (x,), dynamic_dims={0: {0: "T-1"}})


def test_recapture_with_dims_read_from_an_exported_graph():
    """`dynamic_dims_from_meta`: a captured graph's placeholders say which dims are
    symbolic, so a graph made from it (as the partitioner does) stays generic."""
    def f(x, y):
        return torch.relu(x) * y.sum(0)

    first = capture(f, (torch.randn(4, 6), torch.randn(3, 6)), dynamic_dims={0: {0: "A"}, 1: {0: "B"}})
    phs = first.graph_module.graph.find_nodes(op="placeholder")
    dims = dynamic_dims_from_meta(phs)
    assert sorted(dims) == [0, 1] and list(dims[0]) == [0] and list(dims[1]) == [0]
    assert dims[0][0] != dims[1][0]
    again = compile_captured(capture(first.graph_module, (torch.randn(4, 6), torch.randn(3, 6)),
                                     dynamic_dims=dims))
    for a, b in [(1, 1), (5, 2), (2, 9)]:
        x, y = torch.randn(a, 6), torch.randn(b, 6)
        torch.testing.assert_close(again(x, y)[0], f(x, y))


class _DynamicBackend:
    """What the lowbit backend does with dynamo's dynamic dims: read them from the graph
    (`dynamic_dims_from_dynamo`) and compile once, while dynamo compiles (with dynamo's
    SymInt example inputs) or lazily at the first call (with real inputs)."""

    def __init__(self, lazy: bool):
        self.lazy = lazy
        self.compiled: list[CompiledGraph] = []
        self.dims: list[dict] = []

    def __call__(self, gm, example_inputs):
        from lowbit.compiler.backend import freezable_positions
        dims = dynamic_dims_from_dynamo(gm, example_inputs)
        self.dims.append(dims)
        freezable = freezable_positions(gm, example_inputs)
        box: list[CompiledGraph] = []

        def compile_for(args):
            box.append(compile_captured(capture(gm, args, freezable, dynamic_dims=dims)))
            self.compiled.append(box[0])

        if not self.lazy:
            compile_for(example_inputs)

        def call(*args):
            if not box:
                compile_for(args)
            return box[0](*args)

        return call


@pytest.mark.parametrize("lazy", [True, False])
def test_mark_dynamic_through_torch_compile_compiles_once_for_prefill_lengths(lazy):
    """Dynamo's symbolic sizes (tensor dims and the SymInt inputs it adds) become the
    graph's dims: one compiled graph for every prefill length. Dynamo itself
    specializes length 1 (its 0/1 rule), so decode is one more graph. Capturing while
    dynamo compiles must not add guards to dynamo's shape env (which failed its own
    guards: "Guard failed on the same frame it was created")."""
    cfg = LlamaConfig(dim=32, n_heads=2, n_kv_heads=1, hidden_dim=48, max_seq_len=40)
    block = make_decoder_block(cfg, torch.float32, seed=3)
    eager = copy.deepcopy(block)
    backend = _DynamicBackend(lazy)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = 0
        for t in (5, 3, 17, 1, 1, 2):
            x, pos = torch.randn(1, t, cfg.dim), torch.arange(start, start + t)
            torch._dynamo.mark_dynamic(x, 1)
            torch._dynamo.mark_dynamic(pos, 0)
            torch.testing.assert_close(compiled(x, pos), eager(x, pos), rtol=1e-5, atol=2e-5)
            start += t
        torch.testing.assert_close(block.attention.cache.k, eager.attention.cache.k, rtol=1e-5, atol=2e-5)
    dynamic = [c for c in backend.compiled if c.captured.is_dynamic]
    assert len(dynamic) == 1 and len(backend.compiled) == 2, [c.captured.input_specs for c in backend.compiled]
    assert any(d for d in backend.dims)


def test_growing_cache_as_in_a_dynamic_kv_cache():
    """Hugging Face's default cache concatenates: the past length S and the new length T
    are both symbols and the new cache has length S + T. One compile serves every step."""
    heads, hd = 2, 8

    def step(x, past_k, wq, wk):
        b, t, _ = x.shape
        q = (x @ wq).view(b, t, heads, hd).transpose(1, 2)
        k = torch.cat([past_k, (x @ wk).view(b, t, heads, hd).transpose(1, 2)], dim=2)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1)
        return att @ k, k

    wq, wk = torch.randn(16, heads * hd), torch.randn(16, heads * hd)
    compiled = compile_function(step, (torch.randn(1, 4, 16), torch.randn(1, heads, 3, hd), wq, wk),
                                freezable=(2, 3), dynamic_dims={0: {1: "T"}, 1: {2: "S"}})
    assert str(compiled.captured.output_specs[1]) == f"float32[1, {heads}, S + T, {hd}]"
    past = torch.randn(1, heads, 1, hd)
    for t in (5, 1, 1, 3, 1):              # prefill, then decode steps and a second prompt
        x = torch.randn(1, t, 16)
        out, new_past = compiled(x, past, wq, wk)
        want_out, want_past = step(x, past, wq, wk)
        torch.testing.assert_close(new_past, want_past)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
        past = new_past
    assert past.shape[2] == 12


def test_torch_compile_with_size_oblivious_sizes_shares_decode_and_prefill():
    """Dynamo specializes size 1 unless torch's `backed_size_oblivious` is on while it
    traces; then decode (T=1) and prefill use the one dynamic graph."""
    import torch.fx.experimental._config as fx_config
    cfg = LlamaConfig(dim=32, n_heads=2, n_kv_heads=1, hidden_dim=48, max_seq_len=40)
    block = make_decoder_block(cfg, torch.float32, seed=4)
    eager = copy.deepcopy(block)
    backend = _DynamicBackend(lazy=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend)
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = 0
        for t in (5, 1, 3, 1, 2):
            x, pos = torch.randn(1, t, cfg.dim), torch.arange(start, start + t)
            torch._dynamo.mark_dynamic(x, 1)
            torch._dynamo.mark_dynamic(pos, 0)
            torch.testing.assert_close(compiled(x, pos), eager(x, pos), rtol=1e-5, atol=2e-5)
            start += t
    assert len(backend.compiled) == 1 and backend.compiled[0].captured.is_dynamic


def test_scalar_inputs_the_graph_was_specialised_to_are_checked():
    """Export bakes a Python scalar into the graph; another value used to be ignored
    silently (a wrong result). Now it raises InputError."""
    compiled = compile_function(lambda x, n: x * n, (torch.randn(3), 3))
    x = torch.randn(3)
    torch.testing.assert_close(compiled(x, 3)[0], x * 3)
    assert not compiled.accepts((x, 4))
    with pytest.raises(InputError, match="input 1: the compiled graph is specialised to the value 3, got 4"):
        compiled(x, 4)


def test_part_of_a_graph_whose_input_size_is_an_expression():
    """A part fed by a `cat` has an input of size `S + T`: it stays dynamic (named
    `expr0`); the part's own size inputs (S and T as ints) are specialised and checked."""
    from torch.fx.passes.split_module import split_module

    def f(x, past):
        kv = torch.cat([past, x * 2], 1)
        return torch.softmax(kv, -1) * kv.shape[1]

    first = capture(f, (torch.randn(1, 3, 8), torch.randn(1, 5, 8)), dynamic_dims={0: {1: "T"}, 1: {1: "S"}})
    gm = first.graph_module
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cat = next(n for n in gm.graph.nodes if n.op == "call_function" and "cat" in str(n.target))
    part = split_module(gm, None, lambda n: 0 if order[n] <= order[cat] else 1).submod_1
    phs = part.graph.find_nodes(op="placeholder")
    dims = dynamic_dims_from_meta(phs)
    assert dims == {0: {1: "expr0"}}
    example = (torch.randn(1, 8, 8), *[3, 5][:len(phs) - 1])
    compiled = compile_captured(capture(part, example, dynamic_dims=dims))
    assert str(compiled.captured.input_specs[0]) == "float32[1, expr0, 8]"
    kv = torch.randn(1, 8, 8)
    torch.testing.assert_close(compiled(kv, *example[1:])[0], torch.softmax(kv, -1) * 8)
    if len(phs) > 1:  # the part reads S + T from its int inputs: other values must not pass
        with pytest.raises(InputError, match="specialised to the value"):
            compiled(torch.randn(1, 4, 8), 1, 3)


def test_size_outputs_are_computed_per_call():
    """A graph (e.g. a part of a split graph) may return sizes: `x.shape[1] + 1`."""
    from torch.fx.passes.split_module import split_module

    def f(x):
        y = torch.tanh(x)
        return y * (y.shape[1] + 1)

    first = capture(f, (torch.randn(2, 5),), dynamic_dims={0: {1: "T"}})
    gm = first.graph_module
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    tanh = next(n for n in gm.graph.nodes if n.op == "call_function" and "tanh" in str(n.target))
    head = split_module(gm, None, lambda n: 0 if order[n] <= order[tanh] else 1).submod_0
    dims = dynamic_dims_from_meta(head.graph.find_nodes(op="placeholder"))
    compiled = compile_captured(capture(head, (torch.randn(2, 5),), dynamic_dims=dims))
    assert compiled.captured.size_outputs and not compiled.captured.specialized
    for t in (1, 4, 9):
        x = torch.randn(2, t)
        outs = compiled(x)
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        sizes = [o for o in outs if isinstance(o, int)]
        torch.testing.assert_close(tensors[0], torch.tanh(x))
        assert sizes and all(s in (t, t + 1) for s in sizes), outs


def test_lowbit_backend_with_mark_dynamic_compiles_once_for_prefill_lengths():
    """The real backend (`backend="lowbit"`) routes dynamo's symbolic dims to a dynamic
    capture: one cache entry serves every prefill length (decode T=1 is dynamo's own
    specialization, one more)."""
    from lowbit.compiler.backend import LowbitCallable, lowbit_backend

    made = []

    def backend(gm, example_inputs):
        fn = lowbit_backend(gm, example_inputs)
        made.append(fn)
        return fn

    cfg = LlamaConfig(dim=32, n_heads=2, n_kv_heads=1, hidden_dim=48, max_seq_len=40)
    block = make_decoder_block(cfg, torch.float32, seed=6)
    eager = copy.deepcopy(block)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = 0
        for t in (5, 3, 17, 2, 1):
            x, pos = torch.randn(1, t, cfg.dim), torch.arange(start, start + t)
            torch._dynamo.mark_dynamic(x, 1)
            torch._dynamo.mark_dynamic(pos, 0)
            torch.testing.assert_close(compiled(x, pos), eager(x, pos), rtol=1e-5, atol=2e-5)
            start += t
    callables = [fn for fn in made if isinstance(fn, LowbitCallable)]
    dynamic = [fn for fn in callables if fn.dynamic_dims]
    assert len(dynamic) == 1 and len(dynamic[0].cache) == 1, [fn.dynamic_dims for fn in callables]
    assert sum(len(fn.cache) for fn in callables) == 2
