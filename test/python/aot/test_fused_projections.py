"""Fused q/k/v (`wqkv`) and w1/w3 (`w13`) in `lowbit.models`: the same model in fewer tensors.

`lowbit.generate` builds presets fused (fewer tensors per layer for dynamo to wrap, lift and
guard in every compile: see docs/aot.md). Checked here: the same seed gives the same weights
in either layout; eager outputs are identical for quantized layers (bit for bit) and fp ones;
`fuse_projections_` keeps formats and per-part scales (as per-row scales when they differ);
`build_llama(fused=True)` gives the tokens and logits of the unfused preset, compiled too;
every cache-update mode, GQA and tracing each layer still work; bad inputs raise.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import lowbit
from lowbit.generate import PRESETS, block_linear_names, block_tensors, build_llama
from lowbit.models import (LlamaConfig, fuse_projections_, logical_weights, make_decoder_block, make_tiny_llama,
                           reset_caches)

CFG = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=90, vocab_size=50, n_layers=2, max_seq_len=16)


def _tensors_per_layer(model) -> int:
    layer = model.layers[0]
    return len(list(layer.parameters())) + len([b for b in layer.buffers() if b is not None])


def _run(model, tokens, steps=2):
    """Prefill then `steps` decode steps from a fresh cache: every output, and the caches."""
    reset_caches(model)
    with torch.no_grad():
        n = tokens.shape[1]
        outs = [model(tokens, torch.arange(n))]
        for i in range(steps):
            outs.append(model(outs[-1][:, -1:].argmax(-1), torch.tensor([n + i])))
    caches = [b.clone() for name, b in model.named_buffers() if ".cache." in name]
    return outs, caches


def test_same_seed_same_weights_in_both_layouts():
    plain, fused = make_tiny_llama(CFG, seed=3), make_tiny_llama(CFG, seed=3, fused=True)
    assert not hasattr(fused.layers[0].attention, "wq") and fused.layers[0].attention.wqkv.out_features == 64 + 2 * 32
    assert fused.layers[1].feed_forward.w13.out_features == 2 * 90
    want, got = dict(plain.named_parameters()), logical_weights(fused)
    assert logical_weights(plain).keys() == want.keys() and got.keys() == want.keys()
    for name, p in want.items():
        assert torch.equal(got[name], p), name
    block, fblock = make_decoder_block(CFG, seed=1), make_decoder_block(CFG, seed=1, fused=True)
    assert all(torch.equal(logical_weights(fblock)[n], p) for n, p in block.named_parameters())


def test_fp_layers_fused_in_place_give_the_same_outputs():
    plain = make_tiny_llama(CFG, seed=4)
    fused = copy.deepcopy(plain)
    assert fuse_projections_(fused) == 4 and fuse_projections_(fused) == 0  # 2 layers x (attention, MLP); idempotent
    assert _tensors_per_layer(plain) == 20 - 7 and _tensors_per_layer(fused) == 20 - 7 - 3  # fp: 1 tensor per linear
    tokens = torch.randint(0, CFG.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    (want, wc), (got, gc) = _run(plain, tokens), _run(fused, tokens)
    for w, g in zip(want + wc, got + gc):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)  # fp matmuls of other widths may round differently


@pytest.mark.parametrize("weights, granularity", [("ternary", "tensor"), ("int2", "channel"), ("int4", "group")])
def test_quantized_layers_fuse_bit_exactly(weights, granularity):
    model = make_tiny_llama(CFG, seed=5)
    config = lowbit.QuantConfig(weights=weights, activations="int8", group_size=32 if granularity == "group" else None)
    lowbit.quantize_(model, config, filter_fn=lambda m, fqn: fqn.startswith("layers."))
    fused = copy.deepcopy(model)
    fuse_projections_(fused)
    per_linear = 3 if weights == "int2" else 2  # packed, scales (and zero points: int2 is asymmetric)
    assert _tensors_per_layer(model) - _tensors_per_layer(fused) == 3 * per_linear  # 7 linears -> 4
    att, ffn = fused.layers[0].attention, fused.layers[0].feed_forward
    q, k, v = (getattr(model.layers[0].attention, n) for n in ("wq", "wk", "wv"))
    if weights == "ternary":  # absmean scales of different tensors differ: one per row now, each its part's
        assert att.wqkv.spec.granularity == "channel" and att.wqkv.scales.shape == (128, 1)
        assert torch.equal(att.wqkv.scales[:64], q.scales.expand(64, 1))
        assert torch.equal(att.wqkv.scales[96:], v.scales.expand(32, 1))
    else:
        assert att.wqkv.spec == dataclasses.replace(q.spec, out_features=128)
    assert torch.equal(att.wqkv.int_weight(), torch.cat([m.int_weight() for m in (q, k, v)]))
    assert torch.equal(ffn.w13.dequantized_weight(), torch.cat([model.layers[0].feed_forward.w1.dequantized_weight(),
                                                                model.layers[0].feed_forward.w3.dequantized_weight()]))
    tokens = torch.randint(0, CFG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    (want, wc), (got, gc) = _run(model, tokens), _run(fused, tokens)
    for w, g in zip(want + wc, got + gc):
        assert torch.equal(g, w)


def test_equal_ternary_scales_stay_one_scale():
    # the presets: every part of q/k/v (and of w1/w3) has fan-in dim, hence the same power-of-two scale
    cfg = dataclasses.replace(PRESETS["tiny"], n_layers=1, max_seq_len=8)
    model, _ = build_llama(cfg, 2, fused=True)
    for lin in (model.layers[0].attention.wqkv, model.layers[0].feed_forward.w13):
        assert lin.spec.granularity == "tensor" and lin.scales.shape == (1, 1)
    codes = block_tensors(cfg, 0, 2)
    want = torch.cat([codes[f"layers.0.attention.{n}.weight"][0] for n in ("wq", "wk", "wv")])
    assert torch.equal(model.layers[0].attention.wqkv.int_weight().to(torch.int8), want)
    assert len(block_linear_names(cfg, 0)) == 7  # what block_tensors / the GGUF export see is unchanged


@pytest.mark.parametrize("mode", ["index_copy", "index_put", "slice"])
@pytest.mark.parametrize("trace_once", [True, False])
def test_build_llama_fused_matches_unfused_eager_and_compiled(mode, trace_once, monkeypatch):
    monkeypatch.setattr(lowbit.models.DecoderBlock, "trace_once", trace_once)
    cfg = dataclasses.replace(PRESETS["tiny"], n_layers=2, max_seq_len=16, cache_update=mode)
    plain, _ = build_llama(cfg, 7)
    fused, _ = build_llama(cfg, 7, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    (want, wc), (got, gc) = _run(plain, tokens), _run(fused, tokens)
    assert all(torch.equal(g, w) for g, w in zip(got + gc, want + wc))
    if mode != "index_copy" or not trace_once:
        return  # one compiled comparison (the preset's path) is enough for the test's time
    outs = []
    for model in (plain, fused):
        torch._dynamo.reset()
        outs.append(_run(torch.compile(model, backend="lowbit"), tokens))
    (want, wc), (got, gc) = outs
    assert all(torch.equal(g, w) for g, w in zip(got + gc, want + wc))  # logits and KV caches, bit for bit
    torch.testing.assert_close(got[0], _run(fused, tokens)[0][0], rtol=1e-4, atol=1e-4)


def test_fuse_rejects_parts_it_cannot_concatenate():
    model = make_tiny_llama(CFG, seed=6)
    lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary"), filter_fn=lambda m, fqn: fqn.endswith("attention.wq"))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wqkv.*LowBitLinear"):
        fuse_projections_(model)
    model = make_tiny_llama(CFG, seed=6)
    lowbit.quantize_(model, lowbit.QuantConfig(weights="int4", group_size=32), filter_fn=lambda m, fqn: "w1" in fqn)
    lowbit.quantize_(model, lowbit.QuantConfig(weights="int2"), filter_fn=lambda m, fqn: "w3" in fqn)
    with pytest.raises(ValueError, match=r"feed_forward\.w13.*differ in format"):
        fuse_projections_(model)
    model = make_tiny_llama(CFG, seed=6)
    model.layers[0].attention.wk = nn.Linear(CFG.dim, 32, bias=True)
    with pytest.raises(ValueError, match="bias"):
        fuse_projections_(model)
