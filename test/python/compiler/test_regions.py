"""Compile a repeated block once (`lowbit.compiler.regions`).

A `lowbit.models` TinyLlama's decoder layers are structurally identical once their weights are
bound as runtime buffers: the graph is cut into glue (embedding) / layer 0 / layer 1 / ... / glue
(final norm, head) and each distinct structure runs the MLIR pipeline once. Compiled regions are
shared process-wide by structure and compile context, so a second model of the same config (other
weights) compiles nothing, and still computes with its own weights.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import lowbit
from lowbit.compiler.compile_log import counters
from lowbit.compiler.partition import UnsupportedOpWarning, forget_warnings
from lowbit.models import DecoderBlock, LlamaConfig, init_weights_, make_tiny_llama, reset_caches

CFG = LlamaConfig(dim=128, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=64, vocab_size=256, n_layers=3)
PROMPT = 5


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _quantized(seed: int, cfg: LlamaConfig = CFG):
    model = make_tiny_llama(cfg, seed=seed)
    # Ternary weights + int8 activations in every decoder layer; embedding and head stay fp32.
    lowbit.quantize_(model.layers, lowbit.QuantConfig(weights="ternary", activations="int8"))
    return model


def _tokens(seed: int, t: int = PROMPT, vocab: int = CFG.vocab_size):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, t), generator=g), torch.arange(t)


def _close(y, ref, rel=1e-3):
    err = (y - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max |compiled - eager| = {err:.3g} vs max |eager| = {scale:.3g}"


def _compiled_vs_eager(model, compiled, tokens, pos):
    forget_warnings()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reset_caches(model)
        y = compiled(tokens, pos)
        reset_caches(model)
        ref = model(tokens, pos)
    fallback = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert not fallback, fallback  # eager gives eager's numbers: the comparison would prove nothing
    _close(y, ref)
    return y, ref


def _own(**changes) -> LlamaConfig:
    """A config no other test compiles: compiled regions are shared process-wide, so a test that
    counts pipelines must not find another test's regions still alive (the embedding glue
    depends on vocab_size and dim only, the layers on max_seq_len too)."""
    return dataclasses.replace(CFG, **changes)


def test_identical_layers_compile_once():
    cfg = _own(max_seq_len=40, vocab_size=320)
    model = _quantized(seed=0, cfg=cfg)
    compiled = torch.compile(model, backend="lowbit")
    before = counters.copy()
    _compiled_vs_eager(model, compiled, *_tokens(0, vocab=cfg.vocab_size))
    # glue (embedding), one decoder layer for all three, glue (final norm + head) -- not 5
    assert counters["pipelines"] - before["pipelines"] == 3
    assert counters["region_reuses"] - before["region_reuses"] == 2
    assert counters["backend_compiles"] - before["backend_compiles"] == 1
    report = lowbit.explain(model).matmuls()
    # One compiled layer's report serves all three: q/k/v merged, gate/up merged, wo, w2.
    assert any(e.get("merged") == 3 for e in report), report


def test_two_models_of_one_config_share_compiled_code():
    a, b = _quantized(seed=1), _quantized(seed=2)
    ca = torch.compile(a, backend="lowbit")
    tokens, pos = _tokens(1)
    ya, ref_a = _compiled_vs_eager(a, ca, tokens, pos)
    before = counters.copy()
    cb = torch.compile(b, backend="lowbit")
    yb, ref_b = _compiled_vs_eager(b, cb, tokens, pos)
    assert counters["pipelines"] == before["pipelines"], "the second model ran the MLIR pipeline again"
    assert counters["region_reuses"] - before["region_reuses"] >= 3
    # Shared code, own weights: the two models really differ, and each matches its eager result.
    assert (ref_a - ref_b).abs().max() > 1e-2 * ref_a.abs().max()
    with torch.no_grad():  # model a still computes with a's weights after b was bound
        reset_caches(a)
        _close(ca(tokens, pos), ref_a)


def test_layers_that_differ_compile_separately():
    cfg = _own(max_seq_len=48, vocab_size=384)
    model = _quantized(seed=3, cfg=cfg)
    wide = dataclasses.replace(cfg, hidden_dim=320)
    block = init_weights_(DecoderBlock(wide), seed=4).eval().requires_grad_(False)
    lowbit.quantize_(block, lowbit.QuantConfig(weights="ternary", activations="int8"))
    model.layers[1] = block
    compiled = torch.compile(model, backend="lowbit")
    before = counters.copy()
    _compiled_vs_eager(model, compiled, *_tokens(3, vocab=cfg.vocab_size))
    # glue, layers 0 and 2 (one structure), layer 1 (another), glue
    assert counters["pipelines"] - before["pipelines"] == 4
    assert counters["region_reuses"] - before["region_reuses"] == 1


def test_regions_off_compiles_one_graph():
    model = _quantized(seed=5)
    compiled = torch.compile(model, backend="lowbit")
    before = counters.copy()
    with lowbit.options(regions=False):
        _compiled_vs_eager(model, compiled, *_tokens(5))
    assert counters["pipelines"] - before["pipelines"] == 1
    assert counters["region_reuses"] == before["region_reuses"]
