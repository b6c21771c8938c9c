"""One compiled model for every prompt length (issue 9, item 3).

A 2-layer `lowbit.models` TinyLlama (ternary weights + int8 activations in the decoder layers,
static KV cache) compiled once serves prefill at T in {1, 3, 17, near max_seq_len} with decode
steps after each prompt, against eager; compiles are counted with
`lowbit.compiler.compile_log.counters`.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import lowbit
from lowbit.compiler.compile_log import counters
from lowbit.compiler.partition import UnsupportedOpWarning, forget_warnings
from lowbit.models import LlamaConfig, make_tiny_llama, reset_caches

CFG = LlamaConfig(dim=128, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=64, vocab_size=256, n_layers=2)
DECODE_STEPS = 3


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _model(seed: int = 0):
    model = make_tiny_llama(CFG, seed=seed)
    lowbit.quantize_(model.layers, lowbit.QuantConfig(weights="ternary", activations="int8"))
    return model


def _run(fn, model, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill `prompt` from empty caches, then `steps` greedy decode steps; logits of each call."""
    reset_caches(model)
    t = prompt.shape[1]
    outs = [fn(prompt, torch.arange(t))]
    for i in range(steps):
        nxt = outs[-1][:, -1:].argmax(-1)
        outs.append(fn(nxt, torch.tensor([t + i])))
    return outs


@pytest.fixture(autouse=True)
def _no_eager_fallback():
    """Compiled vs eager proves nothing if a graph fell back to eager."""
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallback = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert not fallback, fallback


def _close(y, ref, what, rel=1e-3):
    err = (y - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"{what}: max |compiled - eager| = {err:.3g} vs max |eager| = {scale:.3g}"


def test_one_compiled_model_serves_every_length():
    model = _model()
    compiled = torch.compile(model, backend="lowbit")
    g = torch.Generator().manual_seed(0)
    before = counters.copy()
    lengths = (1, 3, 17, CFG.max_seq_len - DECODE_STEPS - 1)
    with torch.no_grad():
        for t in lengths:
            prompt = torch.randint(0, CFG.vocab_size, (1, t), generator=g)
            got = _run(compiled, model, prompt, DECODE_STEPS)
            ref = _run(model, model, prompt, DECODE_STEPS)
            for i, (y, r) in enumerate(zip(got, ref)):
                assert y.shape == r.shape
                _close(y, r, f"T={t}, " + ("prefill" if i == 0 else f"decode step {i}"))
    compiles = counters["backend_compiles"] - before["backend_compiles"]
    # What dynamo does with automatic dynamic shapes: the first call (T = 1) compiles a static
    # graph, which every decode step (also T = 1) reuses; T = 3 differs from it, so dynamo marks
    # the length dynamic and compiles once more, a graph whose symbol has the range [2, ...]
    # (dynamo specializes sizes 0 and 1) and serves T = 17 and T = 60. Decode steps after those
    # prompts go back to the static T = 1 graph. No compile per length, none per decode step.
    assert compiles == 2, f"{compiles} backend compiles for {len(lengths)} prompt lengths"


def test_greedy_generation_matches_eager():
    model = _model(seed=1)
    compiled = torch.compile(model, backend="lowbit")
    prompt = torch.randint(0, CFG.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))

    def tokens(fn) -> list[int]:
        logits = _run(fn, model, prompt, 15)  # prefill gives the first new token: 16 in all
        return [int(l[0, -1].argmax()) for l in logits]

    with torch.no_grad():
        before = counters.copy()
        got = tokens(compiled)
        ref = tokens(model)
    assert len(got) == 16
    assert got == ref
    assert counters["backend_compiles"] - before["backend_compiles"] <= 2


def test_runner_marks_the_length_dynamic_two_compiles_from_any_first_length():
    """`lowbit.generate`'s runner marks the prompt length dynamic before the first trace, so a
    first prompt of T >= 2 compiles the shape-generic prefill graph at once: prefill at every
    length + decode = 2 compiles whatever the order (left to dynamo, a first prompt of 17 is
    compiled static and the second length compiles again: 3)."""
    from lowbit.generate import _LlamaRunner, mark_seq_dynamic
    model = _model(seed=2)
    runner = _LlamaRunner(model, torch.compile(model, backend="lowbit"))
    ref_runner = _LlamaRunner(model, model, dynamic=False)
    g = torch.Generator().manual_seed(2)
    before = counters.copy()
    with torch.no_grad():
        for t in (17, 3, 1, CFG.max_seq_len - 2):
            prompt = torch.randint(0, CFG.vocab_size, (t,), generator=g)
            runner.reset()
            y = runner.prefill(prompt)
            tok = int(y.argmax())
            y2 = runner.step(tok, t)
            ref_runner.reset()
            _close(y, ref_runner.prefill(prompt), f"T={t} prefill")
            _close(y2, ref_runner.step(tok, t), f"T={t} decode")
    compiles = counters["backend_compiles"] - before["backend_compiles"]
    assert compiles == 2, f"{compiles} backend compiles"
    one = torch.zeros(1, 1)
    mark_seq_dynamic(one, 1)  # size 1 is left alone (dynamo would specialise it anyway)
    assert not getattr(one, "_dynamo_weak_dynamic_indices", None)
