"""KV-cache updates compiled in place (lowbit.compiler.index_put_rows, passes/convert_index_put.py,
passes/inplace_results.py): same values as eager, in every update form, dtype and length; the
cache's own buffer written (no copy of the cache per call); inputs that are not mutated never
written."""
from __future__ import annotations

import warnings

import pytest
import torch

from lowbit.compiler.compile import compile_function


def _update(form: str):
    def f(cache, pos, kv):
        if form == "index_copy":
            cache.index_copy_(2, pos, kv)
        else:
            cache[:, :, pos] = kv
        return (cache * 0.5).sum(2)
    return f


def _compile(fn, examples, dynamic_dims=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would be a warning
        return compile_function(fn, examples, dynamic_dims=dynamic_dims)


@pytest.mark.parametrize("form", ["index_copy", "setitem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_decode_steps_match_eager(form, dtype):
    torch.manual_seed(0)
    shape = (1, 3, 13, 5)  # odd sizes
    make = (lambda *s: torch.randint(-9, 9, s, dtype=dtype)) if dtype == torch.int64 else \
        (lambda *s: torch.randn(*s).to(dtype))
    cache, ref = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    fn = _update(form)
    compiled = _compile(fn, (cache.clone(), torch.tensor([0]), make(1, 3, 1, 5)))
    assert compiled.jit.alias_outputs, "the cache's new value should be the cache itself"
    ptr = cache.data_ptr()
    for pos in [0, 1, 12, 7, 7, 3]:
        kv = make(1, 3, 1, 5)
        out = compiled(cache, torch.tensor([pos]), kv)[0]
        expected = fn(ref, torch.tensor([pos]), kv)
        torch.testing.assert_close(out, expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-5)
        assert torch.equal(cache, ref)
    assert cache.data_ptr() == ptr


@pytest.mark.parametrize("form", ["index_copy", "setitem"])
def test_dynamic_lengths_match_eager(form):
    """One compile for every prompt length (odd lengths, the whole cache, repeats: last wins)."""
    torch.manual_seed(1)
    fn = _update(form)
    cache, ref = torch.zeros(2, 2, 17, 3), torch.zeros(2, 2, 17, 3)
    compiled = _compile(fn, (cache.clone(), torch.arange(4), torch.randn(2, 2, 4, 3)),
                        dynamic_dims={1: {0: "T"}, 2: {2: "T"}})
    for idx in [torch.arange(1), torch.arange(3), torch.arange(17), torch.tensor([16, 0, 5]),
                torch.arange(5, 12), torch.tensor([2, 9, 2])]:
        kv = torch.randn(2, 2, idx.numel(), 3)
        out = compiled(cache, idx, kv)[0]
        expected = fn(ref, idx, kv)
        torch.testing.assert_close(out, expected)
        assert torch.equal(cache, ref), idx


def test_negative_positions_wrap_like_index_put():
    fn = _update("setitem")
    cache, ref = torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2)
    compiled = _compile(fn, (cache.clone(), torch.tensor([0]), torch.ones(1, 1, 1, 2)))
    for pos in [-1, -6, 2]:
        kv = torch.full((1, 1, 1, 2), float(pos))
        compiled(cache, torch.tensor([pos]), kv)
        fn(ref, torch.tensor([pos]), kv)
    assert torch.equal(cache, ref)


def test_out_of_range_raises_index_error_and_writes_nothing():
    fn = _update("index_copy")
    cache = torch.zeros(1, 2, 8, 4)
    compiled = _compile(fn, (cache.clone(), torch.tensor([0]), torch.ones(1, 2, 1, 4)))
    for pos in [8, -9, 1000]:
        with pytest.raises(IndexError, match="index out of range"):
            compiled(cache, torch.tensor([pos]), torch.ones(1, 2, 1, 4))
        assert torch.count_nonzero(cache) == 0


def test_non_contiguous_cache_is_updated():
    """A strided cache is passed as a contiguous copy; its new value is written back."""
    fn = _update("index_copy")
    base, ref_base = torch.zeros(1, 2, 5, 9), torch.zeros(1, 2, 5, 9)
    cache, ref = base.transpose(2, 3), ref_base.transpose(2, 3)  # [1, 2, 9, 5], not contiguous
    compiled = _compile(fn, (cache.contiguous(), torch.tensor([0]), torch.ones(1, 2, 1, 5)))
    for pos in [4, 0, 8]:
        kv = torch.randn(1, 2, 1, 5)
        torch.testing.assert_close(compiled(cache, torch.tensor([pos]), kv)[0], fn(ref, torch.tensor([pos]), kv))
    assert torch.equal(base, ref_base)


def test_inputs_that_are_not_mutated_are_never_written():
    """A functional index_put of a user input gives a new tensor: the input stays as it was
    (bufferization may only write the graph's mutated inputs)."""
    def f(x, pos, v):
        return torch.index_put(x, (pos,), v) * 2

    x = torch.randn(7, 3)
    before = x.clone()
    compiled = _compile(f, (x.clone(), torch.tensor([2]), torch.ones(1, 3)))
    assert not compiled.jit.alias_outputs
    out = compiled(x, torch.tensor([2]), torch.ones(1, 3))[0]
    torch.testing.assert_close(out, f(before, torch.tensor([2]), torch.ones(1, 3)))
    assert torch.equal(x, before)


def test_an_updated_input_sharing_memory_with_another_input_is_copied_first():
    """The code writes the cache in place; another input on the same storage must still read
    the old values (the graph's functional meaning), so the JIT passes a copy."""
    def f(cache, other, pos, kv):
        cache.index_copy_(0, pos, kv)
        return other * 1

    cache = torch.zeros(4, 3)
    compiled = _compile(f, (cache.clone(), torch.zeros(4, 3), torch.tensor([1]), torch.ones(1, 3)))
    assert compiled.jit.alias_outputs
    new_cache, other = compiled.jit(cache, cache, torch.tensor([1]), torch.ones(1, 3))
    assert torch.count_nonzero(other) == 0
    assert torch.equal(new_cache[1], torch.ones(3)) and new_cache.data_ptr() != cache.data_ptr()


def test_regions_update_their_caches_in_place(monkeypatch):
    """A decoder compiled by region (one compiled layer for all layers): each layer's caches
    are updated in place by its region (`regions.donate_updates`), nothing is copied back
    after a call, and greedy tokens equal eager's."""
    import dataclasses

    import lowbit.compiler.frontend as frontend
    from lowbit.compiler import regions
    from lowbit.generate import PRESETS, _LlamaRunner, build_llama, greedy_reference

    cfg = dataclasses.replace(PRESETS["tiny"], n_layers=3, max_seq_len=40)
    model, _ = build_llama(cfg, seed=3)
    prompt = torch.arange(5, 17)
    ref = greedy_reference(model, prompt, 8)
    donated = []
    real_donate = regions.donate_updates
    monkeypatch.setattr(regions, "donate_updates", lambda *a: donated.append(real_donate(*a)) or donated[-1])
    copies = []
    real_write_back = frontend.write_back
    monkeypatch.setattr(frontend, "write_back",
                        lambda dst, src: (copies.append(src.data_ptr() != dst.data_ptr()), real_write_back(dst, src)))
    runner = _LlamaRunner(model, torch.compile(model, backend="lowbit"))
    with torch.no_grad():
        runner.reset()
        tokens = [int(runner.prefill(prompt).argmax())]
        for i in range(7):
            tokens.append(int(runner.step(tokens[-1], prompt.numel() + i).argmax()))
    assert tokens == ref
    assert donated and all(n == 2 * cfg.n_layers for n in donated), donated  # k and v of every layer
    assert copies and not any(copies), "a KV cache was copied back after a call"
