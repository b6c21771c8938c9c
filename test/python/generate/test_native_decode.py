"""Greedy decoding in one native loop (`runner.decode` -> `runtime.replay.Plan.decode`)."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from lowbit.generate import CompileCounter, _LlamaRunner, build_llama, greedy_decode
from lowbit.models import LlamaConfig
from lowbit.runtime import replay

SMALL = LlamaConfig(dim=128, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=256, n_layers=2)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _runner(cfg, head="none"):
    model, _ = build_llama(cfg, 0, "ternary", "int8", head=head)
    counter = CompileCounter("lowbit")
    return model, _LlamaRunner(model, torch.compile(model, backend=counter), counter=counter)


def _python_steps(runner, tok, pos, n):
    out = []
    for i in range(n):
        tok = int(runner.step(tok, pos + i).argmax())
        out.append(tok)
    return out


@pytest.fixture
def count_native(monkeypatch):
    """Steps run by Plan.decode (the native loop), per call ("raised" for a call that raised)."""
    calls = []
    real = replay.Plan.decode

    def counted(self, *a, **kw):
        try:
            out = real(self, *a, **kw)
        except BaseException:
            calls.append("raised")
            raise
        if isinstance(out, tuple):
            calls.append(len(out[0]))
        return out

    monkeypatch.setattr(replay.Plan, "decode", counted)
    return calls


@pytest.mark.parametrize("head", ["none", "int8"])
def test_native_loop_gives_the_step_by_step_tokens(count_native, head):
    """Same tokens as one `step` per token and as eager; all steps after the first (which
    goes through dynamo and makes the direct call) run in one native loop."""
    cfg = dataclasses.replace(SMALL, max_seq_len=40)
    model, runner = _runner(cfg, head)
    eager = _LlamaRunner(model, model)
    prompt = torch.arange(5, 12)
    n = 20
    with torch.no_grad():
        eager.reset()
        first = int(eager.prefill(prompt).argmax())
        expected = _python_steps(eager, first, prompt.numel(), n)
        for _ in range(2):  # the second sequence starts from a reset runner
            runner.reset()
            assert int(runner.prefill(prompt).argmax()) == first
            seen = []
            got = runner.decode(first, prompt.numel(), n, seen.append)
            assert got == expected and seen == got
        assert count_native == [n - 1, n - 1]
        runner.reset()
        runner.prefill(prompt)
        assert _python_steps(runner, first, prompt.numel(), n) == expected


def test_replay_off_decodes_step_by_step(count_native, monkeypatch):
    monkeypatch.setenv("LOWBIT_REPLAY", "0")
    cfg = dataclasses.replace(SMALL, max_seq_len=24)
    model, runner = _runner(cfg)
    eager = _LlamaRunner(model, model)
    prompt = torch.arange(3, 7)
    with torch.no_grad():
        eager.reset()
        first = int(eager.prefill(prompt).argmax())
        runner.reset()
        runner.prefill(prompt)
        assert runner.decode(first, 4, 8) == _python_steps(eager, first, 4, 8)
    assert count_native == []


def test_an_error_in_on_token_stops_the_loop_and_propagates(count_native):
    cfg = dataclasses.replace(SMALL, max_seq_len=24)
    _, runner = _runner(cfg)
    prompt = torch.arange(3, 7)
    seen = []

    def on_token(t):
        seen.append(t)
        if len(seen) == 4:
            raise KeyboardInterrupt("stop")

    with torch.no_grad():
        runner.reset()
        first = int(runner.prefill(prompt).argmax())
        with pytest.raises(KeyboardInterrupt, match="stop"):
            runner.decode(first, 4, 12, on_token)
    assert len(seen) == 4
    assert count_native == ["raised"]  # step 1 through dynamo, steps 2-4 native, then the error


def test_weights_changed_by_on_token_are_seen_by_the_next_step(count_native):
    """`on_token` may change a weight in place: the loop checks the compiled graph's frozen
    tensors after it, stops, and the next step goes through the graph's own checks (which
    recompile): the tokens are eager's with the same change at the same point."""
    cfg = dataclasses.replace(SMALL, max_seq_len=32)
    prompt = torch.arange(3, 9)
    n, at = 12, 5

    def run(runner, model):
        done = []

        def on_token(t):
            done.append(t)
            if len(done) == at:
                with torch.no_grad():  # a tensor the packed weights were made from
                    model.layers[0].feed_forward.w2.scales.mul_(4)
        runner.reset()
        first = int(runner.prefill(prompt).argmax())
        return runner.decode(first, prompt.numel(), n, on_token)

    with torch.no_grad():
        model_e, _ = build_llama(cfg, 0, "ternary", "int8")
        expected = run(_LlamaRunner(model_e, model_e), model_e)
        model_c, runner = _runner(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "changed after compilation; recompiling"
            got = run(runner, model_c)
    assert got == expected
    assert count_native and count_native[0] == at - 1  # stopped right after the change


def test_greedy_decode_of_a_runner_without_direct_steps():
    """Any runner: eager models decode step by step through the same function."""
    cfg = dataclasses.replace(SMALL, max_seq_len=20)
    model, _ = build_llama(cfg, 0, "ternary", "int8")
    eager = _LlamaRunner(model, model)
    prompt = torch.arange(4)
    with torch.no_grad():
        eager.reset()
        first = int(eager.prefill(prompt).argmax())
        a = greedy_decode(eager, first, 4, 6)
        eager.reset()
        eager.prefill(prompt)
        assert a == _python_steps(eager, first, 4, 6)


@pytest.mark.parametrize("trust", [False, True])
def test_the_weight_check_after_on_token_runs_unless_trusted(count_native, monkeypatch, trust):
    from lowbit.compiler.compile import FrozenGuard
    checks = []
    real = FrozenGuard.changed
    monkeypatch.setattr(FrozenGuard, "changed", lambda self, args: checks.append(1) or real(self, args))
    cfg = dataclasses.replace(SMALL, max_seq_len=24)
    _, runner = _runner(cfg)
    prompt = torch.arange(3, 7)
    with torch.no_grad():
        runner.reset()
        first = int(runner.prefill(prompt).argmax())
        runner.step(first, 4)  # the direct step exists from here on
        checks.clear()
        runner.decode(first, 5, 9, lambda t: None, trust_on_token=trust)
    assert count_native == [9]
    assert len(checks) == (1 if trust else 1 + 9)  # the lookup's own check, then one per token


def test_hugging_face_static_cache_decodes_in_the_native_loop(count_native):
    """transformers' StaticCache advances a 0-dim step counter that the compiled step writes
    back after the call: replay records that copy as an entry, so HF decode steps replay and
    run in the native loop too, with eager's tokens."""
    pytest.importorskip("transformers")
    from lowbit import generate, hf
    cfg = hf.bitnet_config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=128)
    model = hf.make_bitnet(cfg, 0)
    got = generate(model, [1, 5, 9, 3], 12, backend="lowbit", cache="static").tokens
    assert count_native == [10]  # prefill, the first decode step through dynamo, then 10 native
    assert got == generate(model, [1, 5, 9, 3], 12, backend="eager", cache="static").tokens
