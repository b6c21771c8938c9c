"""A Llama (prefill + decode, dynamic length) compiled to an artifact generates the JIT's tokens
in a process that cannot import torch-mlir; numpy inputs; input checking."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import lowbit.aot
from lowbit.compiler.jit import InputError
from lowbit.generate import PRESETS, _LlamaRunner, build_llama, greedy_reference
from lowbit.models import reset_caches

from conftest import PRESET_SEQ, PROMPT, run_without_compiler


def _jit_tokens(preset: str, max_seq_len: int, prompt: list[int], n: int):
    cfg = dataclasses.replace(PRESETS[preset], max_seq_len=max_seq_len)
    model, _ = build_llama(cfg)
    runner = _LlamaRunner(model, torch.compile(model, backend="lowbit"))
    with torch.no_grad():
        runner.reset()
        logits = runner.prefill(torch.tensor(prompt))
        out, first = [int(logits.argmax())], logits.clone()
        for i in range(n - 1):
            out.append(int(runner.step(out[-1], len(prompt) + i).argmax()))
    return model, out, first


def _generate_blocked(path, tmp_path, prompt, n):
    return run_without_compiler(f"""
        import json, torch
        import lowbit.aot
        llama = lowbit.aot.load_llama({str(path)!r})
        tokens = llama.generate({prompt!r}, {n})
        llama.reset()
        first = llama.prefill(torch.tensor({prompt!r}))
        print(json.dumps({{"tokens": tokens, "first": first.tolist()}}))
    """, tmp_path)


def test_tiny_llama_matches_jit_without_compiler(tiny_artifact, tmp_path):
    n = PRESET_SEQ - len(PROMPT)
    model, jit_tokens, jit_first = _jit_tokens("tiny", PRESET_SEQ, PROMPT, n)
    assert jit_tokens == greedy_reference(model, torch.tensor(PROMPT), n)
    got = _generate_blocked(tiny_artifact, tmp_path, PROMPT, n)
    assert got["tokens"] == jit_tokens
    torch.testing.assert_close(torch.tensor(got["first"]), jit_first, rtol=1e-4, atol=1e-4)


def _close_to_eager(got, want):
    # The preset quantizes activations to int8 per token: a value on a rounding boundary may
    # round the other way in compiled code than in eager (the JIT does the same; the exact
    # comparison with the JIT is test_tiny_llama_matches_jit_without_compiler).
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    err = (got - want).abs()
    assert err.max() <= 2e-2 * want.abs().max(), err.max()
    assert err.mean() <= 1e-3 * want.abs().mean(), err.mean()


def test_prompt_lengths_and_numpy(tiny_artifact):
    art = lowbit.aot.load(tiny_artifact)
    cfg = dataclasses.replace(PRESETS["tiny"], max_seq_len=PRESET_SEQ)
    model, _ = build_llama(cfg)
    for length in (1, 2, 3, 7, 17, PRESET_SEQ):  # decode-sized, odd and full-cache prompts
        tokens = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        pos = torch.arange(length)
        art.reset()
        reset_caches(model)
        with torch.no_grad():
            want = model(tokens, pos)
        got = art(tokens, pos)
        _close_to_eager(got, want)
        art.reset()
        got_np = art(tokens.numpy(), pos.numpy())
        assert isinstance(got_np, np.ndarray)
        np.testing.assert_array_equal(got_np, got.numpy())


def test_generation_loop_drives_the_loaded_module(tiny_artifact):
    import lowbit
    llama = lowbit.aot.load_llama(tiny_artifact)
    assert isinstance(llama, torch.nn.Module)
    tokens = greedy_reference(llama, torch.tensor(PROMPT), 6)   # lowbit.generate's Llama runner
    assert tokens == llama.generate(PROMPT, 6)


def test_bad_inputs(tiny_artifact):
    art = lowbit.aot.load(tiny_artifact)
    with pytest.raises(InputError, match="expected 2 inputs"):
        art(torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(InputError, match="no compiled signature .* accepts"):
        art(torch.zeros(1, 3, dtype=torch.int32), torch.arange(3))
    with pytest.raises(InputError, match="no compiled signature"):
        art(torch.zeros(3, dtype=torch.int64), torch.arange(3))
    with pytest.raises(InputError, match="torch tensor or a numpy array"):
        art([1, 2, 3], torch.arange(3))
    with pytest.raises(ValueError, match="exceeds the artifact's KV cache"):
        lowbit.aot.load_llama(tiny_artifact).generate([1, 2, 3], PRESET_SEQ)


def test_manifest_describes_the_artifact(tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    from lowbit.compiler.aot_target import TARGETS
    assert m["target"]["name"] in TARGETS
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["torch_mlir"]
    assert set(m["files"]) == {"code.so", "weights.safetensors"}
    assert [p["dynamic"] for p in m["programs"]] == [False, True]   # decode (static) first, then any length
    assert any(s["mutable"] and s["tensor"] is None for s in m["state"].values())  # zero KV caches, not stored
    # The weights are a valid safetensors file, and the packed layers are in it.
    from safetensors import safe_open
    with safe_open(str(tiny_artifact / "weights.safetensors"), "pt") as f:
        assert any(k.startswith("derived.") for k in f.keys())


@pytest.mark.slow
def test_demo_llama_matches_jit_without_compiler(tmp_path):
    seq, prompt, n = 64, list(range(3, 40, 3)), 16
    path = lowbit.aot.compile_preset("demo", tmp_path / "demo.lowbit", max_seq_len=seq)
    _, jit_tokens, jit_first = _jit_tokens("demo", seq, prompt, n)
    got = _generate_blocked(path, tmp_path, prompt, n)
    assert got["tokens"] == jit_tokens
    torch.testing.assert_close(torch.tensor(got["first"]), jit_first, rtol=1e-3, atol=1e-3)
