"""A whole Llama-style decoder block (and a 2-layer TinyLlama) through torch.compile.

Prefill then several decode steps, with the static KV cache updated in place by the
compiled graphs. Every graph must compile completely (no eager fallback). Accuracy is
measured against the same model in fp64: the compiled model's error may be at most
twice eager PyTorch's in the same dtype plus a small absolute slack, for the outputs
and for the cache contents.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lowbit.compiler.backend import LowbitCallable, lowbit_backend
from lowbit.compiler.compile import CompiledGraph
from lowbit.compiler.partition import BoundGraph, PartitionedGraph, UnsupportedOpWarning
from lowbit.models import KVCache, LlamaConfig, make_decoder_block, make_tiny_llama

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


class RecordingBackend:
    """The lowbit backend, remembering what it returned so tests can inspect it."""

    def __init__(self):
        self.callables = []

    def __call__(self, gm, example_inputs):
        fn = lowbit_backend(gm, example_inputs)
        self.callables.append(fn)
        return fn

    def assert_fully_compiled(self):
        assert self.callables, "the backend was never called"
        for fn in self.callables:
            assert isinstance(fn, LowbitCallable), f"graph ran in eager: {fn}"
            for entry in fn.cache.values():
                for graph in _compiled_graphs(entry):
                    assert isinstance(graph, CompiledGraph), f"part of a graph fell back to eager: {graph}"


def _compiled_graphs(entry):
    """What runs for one cache entry: one compiled graph, or (weights bound and the decoder
    layers compiled as regions, lowbit.compiler.regions) the compiled region of every part."""
    if isinstance(entry, BoundGraph):
        entry = entry.inner
    if not isinstance(entry, PartitionedGraph):
        return [entry]
    assert not entry.unsupported, f"ops ran in eager: {entry.unsupported}"
    eager = [n for n in entry.gm.graph.nodes if n.op == "call_function" and n.target.__name__ != "getitem"]
    assert not eager, f"nodes ran in eager between the compiled regions: {eager}"
    return [getattr(m, "compiled", m) for m in entry.gm.children()]


def _caches(model):
    return [(m.k, m.v) for m in model.modules() if isinstance(m, KVCache)]


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _check(compiled, eager, ref, dtype, what):
    e_c, e_e = _err(compiled, ref), _err(eager, ref)
    assert e_c <= 2 * e_e + ATOL[dtype], f"{what}: compiled error {e_c:.3g} vs eager error {e_e:.3g}"


def run_and_compare(model, dtype, prompt_len, decode_steps, make_input, seed=0):
    """Prefill `prompt_len` tokens, then decode; compare compiled/eager/fp64 each step."""
    torch._dynamo.reset()  # dynamo's recompile limit counts per code object, across tests
    eager_model = copy.deepcopy(model)
    ref_model = copy.deepcopy(model).double()
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    steps = [torch.arange(prompt_len)] + [torch.tensor([prompt_len + i]) for i in range(decode_steps)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        for i, pos in enumerate(steps):
            x = make_input(gen, len(pos))
            x64 = x.double() if x.is_floating_point() else x
            out, out_eager, out_ref = compiled(x, pos), eager_model(x, pos), ref_model(x64, pos)
            what = "prefill" if i == 0 else f"decode step {i}"
            _check(out, out_eager, out_ref, dtype, f"{dtype} {what} output")
            for (k, v), (ke, ve), (kr, vr) in zip(_caches(model), _caches(eager_model), _caches(ref_model)):
                _check(k, ke, kr, dtype, f"{dtype} {what} key cache")
                _check(v, ve, vr, dtype, f"{dtype} {what} value cache")
    backend.assert_fully_compiled()
    return backend


SMALL = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=32)
# Odd sizes everywhere: head_dim 12, one KV head shared by 5 query heads, hidden 127.
ODD = LlamaConfig(dim=60, n_heads=5, n_kv_heads=1, hidden_dim=127, max_seq_len=17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_block_prefill_and_decode(dtype):
    block = make_decoder_block(SMALL, dtype, seed=1)
    backend = run_and_compare(block, dtype, prompt_len=7, decode_steps=3,
                              make_input=lambda g, t: torch.randn(1, t, SMALL.dim, generator=g).to(dtype))
    # One graph for prefill, one for decode: decode steps reuse the compiled decode graph.
    assert sum(len(fn.cache) for fn in backend.callables) == 2


def test_decoder_block_odd_sizes():
    dtype = torch.float32
    block = make_decoder_block(ODD, dtype, seed=2)
    run_and_compare(block, dtype, prompt_len=13, decode_steps=2,
                    make_input=lambda g, t: torch.randn(1, t, ODD.dim, generator=g))


@pytest.mark.parametrize("cache_update", ["index_put", "slice"])
def test_decoder_block_cache_update_forms(cache_update):
    cfg = LlamaConfig(dim=32, n_heads=2, n_kv_heads=1, hidden_dim=48, max_seq_len=16, cache_update=cache_update)
    block = make_decoder_block(cfg, torch.float32, seed=3)
    run_and_compare(block, torch.float32, prompt_len=5, decode_steps=1,
                    make_input=lambda g, t: torch.randn(1, t, cfg.dim, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama_with_embedding(dtype):
    cfg = LlamaConfig(dim=48, n_heads=4, n_kv_heads=2, hidden_dim=80, max_seq_len=24, vocab_size=97, n_layers=1)
    model = make_tiny_llama(cfg, dtype, seed=4)
    run_and_compare(model, dtype, prompt_len=9, decode_steps=1,
                    make_input=lambda g, t: torch.randint(0, cfg.vocab_size, (1, t), generator=g))


def test_backend_entry_point_by_name():
    """`backend="lowbit"` resolves through the torch_dynamo_backends entry point."""
    block = make_decoder_block(LlamaConfig(dim=16, n_heads=2, n_kv_heads=1, hidden_dim=24, max_seq_len=8), seed=5)
    eager = copy.deepcopy(block)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="lowbit")
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, torch.arange(3)), eager(x, torch.arange(3)), rtol=1e-5, atol=1e-5)
    import lowbit
    assert lowbit.backend is lowbit_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reset_caches_zeroes_every_cache(dtype):
    """reset_caches clears each layer's keys and values (a memset for contiguous CPU caches,
    zero_() otherwise), so a reset sequence equals a fresh one."""
    from lowbit.models import _zero, reset_caches
    cfg = LlamaConfig(dim=48, n_heads=4, n_kv_heads=2, hidden_dim=80, max_seq_len=24, vocab_size=97, n_layers=2)
    model = make_tiny_llama(cfg, dtype, seed=3)
    caches = _caches(model)
    assert len(caches) == 2
    for k, v in caches:
        k.fill_(float("nan"))
        v.fill_(-7.0)
    reset_caches(model)
    assert all(not k.any() and not v.any() for k, v in caches)
    strided = torch.ones(4, 6, dtype=dtype)[:, ::2]  # not contiguous: zero_() path
    _zero(strided)
    assert not strided.any()
