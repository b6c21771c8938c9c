"""`LowBitEmbedding`: int8 / int4 embedding tables through ``quantize_``; eager lookups equal the
dequantized table, compiled lookups equal eager bit for bit, bad configurations raise."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.quant import LowBitEmbedding, QuantConfig, quantize_, save_quantized


def _select_embeddings(module, fqn):
    return isinstance(module, nn.Embedding)


CONFIGS = [QuantConfig(weights="int8"), QuantConfig(weights="int8", group_size=32),
           QuantConfig(weights="int4_sym"), QuantConfig(weights="int4_sym", group_size=32)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.weights}-{c.group_size}")
@pytest.mark.parametrize("vocab,dim", [(1, 64), (37, 96), (1000, 128)])
def test_lookup_is_the_quantized_table(config, vocab, dim):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, dim))
    weight = model[0].weight.detach().clone()
    quantize_(model, config, filter_fn=_select_embeddings)
    emb = model[0]
    assert isinstance(emb, LowBitEmbedding)
    packed_width = dim // 2 if config.weights == "int4_sym" else dim
    assert emb.codes.shape == (vocab, packed_width) and emb.codes.dtype == torch.int8
    table = emb.dequantize()
    # the codes and scales reproduce the format's rule: |error| <= half a step per row/group
    qmax = 127 if config.weights == "int8" else 7
    group = config.group_size or dim
    step = weight.abs().unflatten(1, (-1, group)).amax(-1, keepdim=True) / qmax
    assert ((table - weight).abs().unflatten(1, (-1, group)) <= step * 0.5 + 1e-6).all()
    ids = torch.randint(0, vocab, (3, 11))
    assert torch.equal(emb(ids), table[ids])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.weights}-{c.group_size}")
def test_compiled_lookup_equals_eager(config):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(211, 64))
    quantize_(model, config, filter_fn=_select_embeddings)
    compiled = torch.compile(model, backend="lowbit")
    for shape in [(1, 1), (2, 17), (5,)]:
        ids = torch.randint(0, 211, shape)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no op may fall back to eager
            out = compiled(ids)
        assert torch.equal(out, model(ids)), shape


def test_bf16_table_keeps_its_dtype():
    model = nn.Sequential(nn.Embedding(50, 32).to(torch.bfloat16))
    quantize_(model, QuantConfig(weights="int8"), filter_fn=_select_embeddings)
    assert model(torch.tensor([[3, 4]])).dtype == torch.bfloat16


def test_default_filter_leaves_embeddings_alone():
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 8))
    quantize_(model, QuantConfig(weights="int8"))
    assert type(model[0]) is nn.Embedding and isinstance(model[1], lowbit.LowBitLinear)


@pytest.mark.parametrize("config,match", [
    (QuantConfig(weights="ternary"), "int8 or int4_sym"),
    (QuantConfig(weights="int8", activations="int8"), "no activations"),
    (QuantConfig(weights="int2"), "int8 or int4_sym"),
])
def test_unsupported_configs_raise(config, match):
    model = nn.Sequential(nn.Embedding(10, 16))
    with pytest.raises(ValueError, match=match):
        quantize_(model, config, filter_fn=_select_embeddings)


def test_odd_dim_int4_and_max_norm_raise():
    with pytest.raises(ValueError, match="odd"):
        quantize_(nn.Sequential(nn.Embedding(10, 15)), QuantConfig(weights="int4_sym"), filter_fn=_select_embeddings)
    with pytest.raises(ValueError, match="max_norm"):
        quantize_(nn.Sequential(nn.Embedding(10, 16, max_norm=1.0)), QuantConfig(weights="int8"),
                  filter_fn=_select_embeddings)


def test_save_quantized_names_the_unsupported_layer(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 16))
    quantize_(model, QuantConfig(weights="int8"), filter_fn=_select_embeddings)
    with pytest.raises(NotImplementedError, match="LowBitEmbedding"):
        save_quantized(model, tmp_path / "m.safetensors")


@pytest.mark.parametrize("embedding", ["int8", "int4"])
def test_generate_with_a_quantized_embedding_matches_eager(embedding):
    """The tiny preset with its embedding quantized: compiled greedy tokens equal eager's on the
    same (quantized) model, and the table takes 1/4 (int8) or ~1/7 (int4 + scales) of fp32."""
    from lowbit.generate import PRESETS, build_llama, greedy_reference
    import dataclasses
    cfg = dataclasses.replace(PRESETS["tiny"], max_seq_len=32)
    model, _ = build_llama(cfg, seed=0, embedding=embedding)
    emb = model.tok_embeddings
    assert isinstance(emb, LowBitEmbedding)
    table_bytes = emb.codes.numel() + emb.scales.numel() * 4
    assert table_bytes <= cfg.vocab_size * cfg.dim * 4 / (3.9 if embedding == "int8" else 6)
    prompt = torch.arange(3, 10)
    ref = greedy_reference(model, prompt, 6)
    result = lowbit.generate(model, prompt_tokens=prompt.tolist(), max_new_tokens=6)
    assert result.tokens == ref
