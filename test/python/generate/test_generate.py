"""`lowbit.generate` and the `lowbit generate` command on the built-in Llama-style models.

The compiled runs check the greedy tokens against the same model in eager PyTorch (the
reference op for low-bit layers), and that the figures are real measurements (positive,
consistent with the token counts). Small configs keep each compile to seconds.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lowbit
from lowbit import cli
from lowbit.generate import (PRESETS, CompileCounter, GenerationError, GenerationResult, block_linear_names,
                             block_tensors, build_llama, generate, greedy_reference, ternary_scale)
from lowbit.models import LlamaConfig

SMALL = LlamaConfig(dim=128, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=256, n_layers=1)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _reference_tokens(cfg, weights, activations, prompt, n, seed=0):
    cfg = dataclasses.replace(cfg, max_seq_len=len(prompt) + n)
    model, _ = build_llama(cfg, seed, weights, activations)
    return greedy_reference(model, torch.tensor(prompt), n)


def test_lowbit_generate_matches_eager_and_reports_figures():
    streamed = []
    r = generate(SMALL, 8, 6, on_token=streamed.append, threads=2)
    assert isinstance(r, GenerationResult)
    assert r.tokens == streamed and len(r.tokens) == 6
    assert r.tokens == _reference_tokens(SMALL, "ternary", "int8", r.prompt_tokens, 6)
    assert (r.weights, r.activations, r.backend) == ("ternary", "int8", "lowbit")
    assert r.compile_s is not None and r.compile_s > 0
    assert r.prefill_s > 0 and r.decode_s > 0 and r.decode_steps == 5
    assert r.prefill_tok_s == pytest.approx(8 / r.prefill_s)
    assert r.decode_tok_s == pytest.approx(5 / r.decode_s)
    assert r.peak_rss_bytes > 50 * 2 ** 20
    # prefill (8 tokens) and decode (1 token) are different signatures: at least two compiles
    assert r.compile_counts["graphs"] >= 1 and r.compile_counts["compiles"] >= 2
    text = r.summary()
    for key in ("prompt eval", "eval time", "compile time", "peak RSS", "tokens per second"):
        assert key in text


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_quantized_head_runs_on_the_integer_kernels_and_matches_eager(head):
    """``head=`` quantizes the output projection through QuantConfig (int8 activations); the
    compiled model gives the eager model's tokens (same quantized head) with 2 compiles, and
    the head is a recognised low-bit layer in explain."""
    from lowbit.generate import head_config
    prompt, n = list(range(3, 12)), 5
    r = generate(SMALL, prompt, n, head=head, threads=2)
    assert r.head == head and "head " + head in r.summary()
    cfg = dataclasses.replace(SMALL, max_seq_len=len(prompt) + n)
    model, _ = build_llama(cfg, 0, "ternary", "int8", head=head)
    assert isinstance(model.output, lowbit.LowBitLinear)
    assert model.output.spec.weight_format == head_config(head).weights
    assert r.tokens == greedy_reference(model, torch.tensor(prompt), n)
    assert r.compile_counts["compiles"] == 2
    compiled = torch.compile(model, backend="lowbit")
    with torch.no_grad():
        compiled(torch.tensor([prompt]), torch.arange(len(prompt)))
    entries = [e for e in lowbit.explain(model).entries if e.get("kind") == "matmul"
               and e.get("result") == "recognized"]
    assert any(str(e.get("format", "")).startswith(head_config(head).weights) for e in entries), entries


def test_eager_backend_fp_weights():
    r = generate(SMALL, [5, 6, 7, 8], 5, weights="none", backend="eager")
    assert r.compile_s is None and r.compile_counts is None
    assert r.prompt_tokens == [5, 6, 7, 8]
    assert r.tokens == _reference_tokens(SMALL, "none", "none", [5, 6, 7, 8], 5)


def test_callable_module_and_function_agree():
    import lowbit.generate as module
    assert lowbit.generate is module or lowbit.generate is generate
    a = module(SMALL, 4, 3, weights="none", backend="eager")
    b = generate(SMALL, 4, 3, weights="none", backend="eager")
    assert a.tokens == b.tokens and a.prompt_tokens == b.prompt_tokens


def test_preset_weights_are_exact_ternary_and_quantize_losslessly():
    cfg = dataclasses.replace(SMALL, max_seq_len=16)
    fp, _ = build_llama(cfg, 3, "none", "none")
    q, _ = build_llama(cfg, 3, "ternary", "int8")
    tensors = block_tensors(cfg, 0, 3)
    for name, (out_f, in_f) in block_linear_names(cfg, 0).items():
        codes, scale = tensors[name]
        assert scale == ternary_scale(in_f) and codes.shape == (out_f, in_f)
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
        assert torch.equal(fp.get_parameter(name), codes.float() * scale)
        layer = q.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(layer, lowbit.LowBitLinear)
        assert torch.equal(layer.int_weight().to(torch.int8), codes)
    # different seeds give different weights
    other, _ = build_llama(cfg, 4, "none", "none")
    assert not torch.equal(other.layers[0].attention.wq.weight, fp.layers[0].attention.wq.weight)


def test_presets_have_the_documented_sizes():
    assert (PRESETS["1b"].dim, PRESETS["1b"].n_layers, PRESETS["1b"].n_heads, PRESETS["1b"].hidden_dim,
            PRESETS["1b"].vocab_size) == (2048, 16, 16, 5632, 32000)
    b = PRESETS["2b4t"]
    assert (b.dim, b.n_layers, b.n_heads, b.n_kv_heads, b.hidden_dim, b.vocab_size) == (2560, 30, 20, 5, 6912, 128256)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(model_or_config="nope"), ValueError, "neither a preset"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(prompt_tokens=[1, 999]), ValueError, r"\[0, 256\)"),
    (dict(prompt_tokens=[1.5, 2.0]), TypeError, "integer token ids"),
    (dict(prompt_tokens=[]), ValueError, "empty"),
    (dict(prompt_tokens="hello"), ValueError, "tokenizer"),
    (dict(dtype="float16"), ValueError, "dtype"),
    (dict(weights="none", activations="int8"), ValueError, "needs low-bit weights"),
    (dict(weights="int3"), ValueError, "weights must be one of"),
    (dict(backend="tvm"), ValueError, "backend must be one of"),
    (dict(threads=0), ValueError, "threads"),
    (dict(model_or_config=3.5), TypeError, "preset name"),
    (dict(head="q6_k"), ValueError, "head must be one of"),
])
def test_bad_input_raises_clear_errors(kwargs, exc, match):
    args = dict(model_or_config=SMALL, prompt_tokens=4, max_new_tokens=2, backend="eager")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        generate(args.pop("model_or_config"), args.pop("prompt_tokens"), args.pop("max_new_tokens"), **args)


def test_prebuilt_model_with_too_small_cache_is_rejected():
    model, _ = build_llama(dataclasses.replace(SMALL, max_seq_len=8), 0, "none", "none")
    with pytest.raises(ValueError, match="exceeds the model's KV cache"):
        generate(model, 6, 4, backend="eager")


def test_failing_backend_is_reported():
    def broken(gm, example_inputs):
        raise RuntimeError("backend exploded")
    with pytest.raises(GenerationError, match="backend exploded"):
        generate(SMALL, 4, 2, weights="none", backend=broken, count_compiles=False)


def test_compile_counter_counts_eager_backend_graphs():
    counter = CompileCounter("eager")
    r = generate(SMALL, 4, 3, weights="none", backend=counter, count_compiles=False)
    assert counter.graphs >= 1 and counter.compiles == counter.graphs
    assert r.tokens == _reference_tokens(SMALL, "none", "none", r.prompt_tokens, 3)


def test_cli_generate_eager(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["generate", "--preset", "tiny", "--set", "n_layers=1", "--backend", "eager", "--weights", "none",
                   "-n", "4", "--prompt", "1,2,3", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["prompt_tokens"] == [1, 2, 3] and len(data["tokens"]) == 4
    assert " ".join(map(str, data["tokens"])) in text
    assert "prompt eval" in text and "eval time" in text and data["decode_tok_s"] > 0


def test_cli_generate_builtin_model_compiled(capsys):
    """The README's first command, on the smallest preset (the demo preset takes longer to compile)."""
    rc = cli.main(["generate", "--preset", "tiny", "--set", "n_layers=1", "-n", "4", "--prompt-len", "8", "-t", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "backend lowbit" in text and "compile time" in text and "graph(s)" in text


def test_cli_errors(capsys):
    assert cli.main(["generate", "--preset", "tiny", "--backend", "eager", "--prompt", "1,2,99999"]) == 1
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--preset", "tiny", "--set", "nonsense=3"])
    assert cli.main([]) == 2


@torch.no_grad()
def test_decode_steps_go_straight_to_the_compiled_graph():
    """After a sequence's first decode step (through dynamo, tapped), the runner calls the
    compiled graph directly: same tokens and logits as eager, dynamo not entered again until
    the next sequence (`reset`), and the direct call is dropped when the grad mode differs."""
    from lowbit.generate import _LlamaRunner
    cfg = dataclasses.replace(SMALL, max_seq_len=24)
    model, _ = build_llama(cfg, 0, "ternary", "int8")
    counter = CompileCounter("lowbit")
    runner = _LlamaRunner(model, torch.compile(model, backend=counter), counter=counter)
    ref = _LlamaRunner(model, model)
    prompt = torch.arange(3, 9)

    def decode(r, n=6):
        r.reset()
        tok, out = int(r.prefill(prompt).argmax()), []
        for i in range(n):
            logits = r.step(tok, prompt.numel() + i)
            out.append(logits)
            tok = int(logits.argmax())
        return out

    expected = decode(ref)
    for _ in range(2):
        got = decode(runner)
        assert runner._direct is not None
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    runner.reset()
    assert runner._direct is None
    runner.prefill(prompt)
    runner.step(1, prompt.numel())
    direct = runner._direct
    assert direct is not None
    seen = []
    inner = direct.fn
    direct.fn = lambda *a: seen.append(len(a)) or inner(*a)
    runner.step(2, prompt.numel() + 1)
    assert seen == [len(direct.args)]
    with torch.enable_grad():  # another grad mode than it was made in: back through dynamo
        assert direct(torch.tensor([[3]]), torch.tensor([prompt.numel() + 2])) is None


def test_graph_breaks_keep_decode_steps_on_dynamo():
    """Two graphs per step (a graph break): no direct call is made; tokens still match eager."""
    from lowbit.generate import _LlamaRunner

    class Broken(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, pos):
            h = self.model(ids, pos)
            torch._dynamo.graph_break()
            return h * 1.0

    cfg = dataclasses.replace(SMALL, max_seq_len=16)
    model, _ = build_llama(cfg, 0, "ternary", "int8")
    wrapped = Broken(model)
    counter = CompileCounter("eager")
    runner = _LlamaRunner(model, torch.compile(wrapped, backend=counter), counter=counter)
    with torch.no_grad():
        runner.reset()
        tok = int(runner.prefill(torch.arange(4)).argmax())
        for i in range(3):
            tok = int(runner.step(tok, 4 + i).argmax())
            assert runner._direct is None


def test_prefill_runs_the_head_for_the_last_position_only():
    """`logits_to_keep` as transformers defines it; the runner's prefill asks for one row of the
    head (not T) and gets the full forward's last logits, eager and compiled."""
    from lowbit.generate import _LlamaRunner
    from lowbit.models import reset_caches
    cfg = dataclasses.replace(SMALL, max_seq_len=16)
    model, _ = build_llama(cfg, 0, "ternary", "int8")
    ids, pos = torch.arange(5).view(1, -1), torch.arange(5)
    with torch.no_grad():
        full = model(ids, pos)
        reset_caches(model)
        last = model(ids, pos, logits_to_keep=2)
        assert full.shape == (1, 5, cfg.vocab_size) and last.shape == (1, 2, cfg.vocab_size)
        torch.testing.assert_close(last, full[:, -2:])
        rows = []
        hook = model.output.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
        try:
            runner = _LlamaRunner(model, model)
            runner.reset()
            torch.testing.assert_close(runner.prefill(torch.arange(5)), full[0, -1])
        finally:
            hook.remove()
        assert rows == [1], rows
        counter = CompileCounter("lowbit")
        runner = _LlamaRunner(model, torch.compile(model, backend=counter), counter=counter)
        runner.reset()
        torch.testing.assert_close(runner.prefill(torch.arange(5)), full[0, -1], rtol=1e-4, atol=1e-4)
