"""Hugging Face models through lowbit: `lowbit.hf.prepare`, forward and `generate()` vs eager.

Skipped when transformers is not installed (`pip install 'lowbit[hf]'`). Models are tiny
random-weight configs built locally (no hub): BitNet through transformers' own
`replace_with_bitnet_linear` (packed uint8 ternary weights, int8 activations) and Llama with
exact-ternary fp weights (a QAT export).
"""
from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install 'lowbit[hf]'")

from lowbit import hf  # noqa: E402
from lowbit.generate import CompileCounter, generate  # noqa: E402

log = logging.getLogger("lowbit.test.hf")
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


# Found while writing these tests: a decoder block whose q, k AND v weights are all
# recognised as ternary (exact-ternary floats of a QAT export at 7f94388; BitNet's packed
# BitLinear too on the tree of ~20:40 UTC) compiles to wrong results for prompts of more than
# one token (rel. error ~0.8; any two of the three, or M=1, are exact; with
# LOWBIT_DISABLE_PASSES=lowbit-tile-qlinear it is exact). Reported to the compiler's owner. On
# a mismatch the tests recompile with that pass disabled: exact then -> xfail (this bug),
# still wrong -> fail (another bug). Once the bug is fixed they simply pass.
QKV_BUG = "compiler bug: q/k/v linears all recognised as ternary give wrong results for M > 1"


def _known_tile_bug(monkeypatch, rerun) -> None:
    """Called on a mismatch: xfail if it is the known lowbit-tile-qlinear bug, else fail.

    ``rerun()`` compiles afresh and returns True when the result then matches eager; with
    the pass disabled the bug disappears, any other cause does not.
    """
    torch._dynamo.reset()
    monkeypatch.setenv("LOWBIT_DISABLE_PASSES", "lowbit-tile-qlinear")
    ok = rerun()
    torch._dynamo.reset()
    if ok:
        pytest.xfail(QKV_BUG + " (exact with lowbit-tile-qlinear disabled)")
    pytest.fail("compiled result differs from eager even with lowbit-tile-qlinear disabled")


def _bitnet(seed=0):
    return hf.make_bitnet(hf.bitnet_config(**TINY), seed=seed)


def _llama(seed=0):
    return hf.make_llama(hf.llama_config(**TINY), seed=seed)


def _ids(n=6, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(5))


def test_prepare_unwraps_nested_compiled_helpers():
    """In a fresh process: importing lowbit's backend (any torch.compile(backend="lowbit")
    in this pytest worker) unwraps transformers' helpers process-wide, so a model made here
    may have none left for `prepare` to unwrap."""
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from transformers.integrations.bitnet import BitLinear\n"
        "from lowbit import hf\n"
        "model = hf.make_bitnet(hf.bitnet_config(vocab_size=128, hidden_size=64, intermediate_size=128,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))\n"
        "before = hf.nested_compiled_helpers(model)\n"
        "assert any(name.endswith('.activation_quant') for name in before), before\n"
        "state = {k: v.clone() for k, v in model.state_dict().items()}\n"
        "assert hf.prepare(model) is model\n"
        "assert hf.nested_compiled_helpers(model) == []\n"
        "hf.prepare(model)  # idempotent\n"
        "layer = model.model.layers[0].self_attn.q_proj\n"
        "assert isinstance(layer, BitLinear) and type(layer).__name__ == 'BitLinear'\n"
        "after = model.state_dict()\n"
        "assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_prepare_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        hf.prepare(object())


@pytest.mark.parametrize("backend", ["eager", "lowbit"])
def test_bitnet_forward_compiled_vs_eager(backend, monkeypatch):
    model = _bitnet()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        hf.prepare(model)
        forward = model.forward

        def run():
            model.forward = torch.compile(forward, backend=backend)
            out = model(ids).logits
            return ((out - ref).abs().max() / ref.abs().max()).item(), out

        err, out = run()
        if err >= 1e-4 and backend == "lowbit":
            _known_tile_bug(monkeypatch, lambda: run()[0] < 1e-4)
    assert err < 1e-4, err
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_llama_qat_forward_lowbit_vs_eager(monkeypatch):
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        hf.prepare(model)
        forward = model.forward

        def run():
            model.forward = torch.compile(forward, backend="lowbit")
            out = model(ids).logits
            return ((out - ref).abs().max() / ref.abs().max()).item(), out

        err, out = run()
        if err >= 1e-4:
            _known_tile_bug(monkeypatch, lambda: run()[0] < 1e-4)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def _hf_generate(model, ids, n, backend, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_bitnet_hf_generate_lowbit_same_tokens_as_eager(cache, monkeypatch):
    """``lowbit.hf.compile`` + ``model.generate()``: eager's tokens, at most 2 compiles for two
    generations with different prompt lengths (prefill graph + decode graph; before the sequence
    dims were marked dynamic: 3-4 with the dynamic cache, one more per new prompt length)."""
    import warnings
    from lowbit.compiler.partition import UnsupportedOpWarning, forget_warnings
    model = _bitnet()
    prompts = [_ids(5), _ids(9)]
    # transformers sizes a static cache per call unless `max_cache_len` sets a ceiling (its own
    # advice against recompiles, #46424): a new cache size is a new static shape.
    kw = {"cache_implementation": "static", "max_cache_len": 32} if cache == "static" else {}
    n = 4
    refs = [_hf_generate(model, ids, n, "eager", **kw) for ids in prompts]
    counter = CompileCounter("lowbit")
    hf.compile(model, backend=counter)
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [_hf_generate(model, ids, n, "lowbit", **kw) for ids in prompts]
    # a graph or a region (a decoder layer) run in eager would make the comparison meaningless;
    # the static cache's prefill layers did, unnoticed (their capture lost the query's range)
    whole = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)
             and ("cannot compile the graph" in str(w.message) or "cannot compile a region" in str(w.message))]
    assert not whole, whole
    if got != refs:
        def rerun():
            hf.compile(model, backend="lowbit")
            return [_hf_generate(model, ids, n, "lowbit", **kw) for ids in prompts] == refs
        _known_tile_bug(monkeypatch, rerun)
    log.info("HF BitNet generate(%s cache, 2 prompts, %d new tokens): %s", cache, n, counter.as_dict())
    assert 1 <= counter.compiles <= 2, counter.as_dict()
    assert counter.graphs <= 2, counter.as_dict()



@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_bitnet_generate_layers_compile_once_per_graph(cache, monkeypatch):
    """Three decoder layers, ``generate()`` with either cache: every layer region compiled (none
    in eager), once per graph. Two bugs this found (the 1-layer tests have no regions):

    - DynamicCache: every layer's keys/values carry a dynamo symbol of their own, so the
      decode graph's layers had the same structure over different symbols and each compiled
      its own copy (30 at 2B4T size); regions now key symbols up to renaming.
    - static cache: a prefill layer re-exported alone lost the query length's upper bound
      (``max_cache_len - 1``), export failed on transformers' ``q_len != max_cache_len``
      guard ("Constraints violated") and every prefill layer ran in eager."""
    import warnings
    from lowbit.compiler.compile_log import counters
    from lowbit.compiler.partition import UnsupportedOpWarning, forget_warnings
    monkeypatch.setenv("LOWBIT_CACHE", "0")  # count the pipelines, not cache hits
    vocab = 136 if cache == "dynamic" else 140  # configs of their own: regions are shared process-wide
    model = hf.make_bitnet(hf.bitnet_config(**dict(TINY, num_hidden_layers=3, vocab_size=vocab)))
    ids = _ids(5, vocab=vocab)
    kw = {"cache_implementation": "static", "max_cache_len": 32} if cache == "static" else {}
    ref = _hf_generate(model, ids, 3, "eager", **kw)
    counter = CompileCounter("lowbit")
    hf.compile(model, backend=counter)
    before = counters.copy()
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _hf_generate(model, ids, 3, "lowbit", **kw)
    eager = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert not eager, eager
    assert got == ref
    assert counter.compiles == 2, counter.as_dict()
    # prefill and decode: glue (embedding), one layer for all three, glue (norm + head) -- not 3 + 5
    assert counters["pipelines"] - before["pipelines"] == 6, dict(counters)
    assert counters["region_reuses"] - before["region_reuses"] == 4, dict(counters)


def test_bitnet_static_cache_logits_match_eager():
    """Logits, not only tokens: a static cache read up to the current length is a strided view
    of the cache buffer; passed to the attention kernel cast to the identity layout, it read
    the wrong rows (prefill logits 40% off while the greedy tokens still agreed).
    lowbit-contiguous-call-operands copies such views."""
    model = _bitnet()
    ids = _ids(5)
    kw = {"cache_implementation": "static", "max_cache_len": 32}

    def logits():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True, **kw)
        return [step[0] for step in out.logits]

    ref = logits()
    hf.compile(model)
    got = logits()
    for step, (a, b) in enumerate(zip(ref, got)):
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5, step

def test_hf_compile_marks_only_growing_dims():
    from transformers import DynamicCache
    model = _bitnet()
    cache = DynamicCache(config=model.config)
    k = torch.zeros(1, 2, 7, 16)
    cache.update(k, k.clone(), 0)
    kwargs = dict(input_ids=torch.zeros(1, 7, dtype=torch.long), attention_mask=torch.ones(1, 7),
                  cache_position=torch.arange(7), position_ids=torch.arange(1).view(1, 1), past_key_values=cache)
    hf.mark_seq_dims(kwargs)
    dyn = lambda t: getattr(t, "_dynamo_weak_dynamic_indices", set()) | getattr(t, "_dynamo_dynamic_indices", set())
    assert dyn(kwargs["input_ids"]) == {1} and dyn(kwargs["attention_mask"]) == {1}
    assert dyn(kwargs["cache_position"]) == {0}
    assert dyn(kwargs["position_ids"]) == set()  # size 1 stays static (dynamo specialises it)
    assert dyn(cache.layers[0].keys) == {2} and dyn(cache.layers[0].values) == {2}
    with pytest.raises(TypeError, match="nn.Module"):
        hf.compile(object())


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_llama_generate_api_matches_eager_in_two_compiles(tmp_path, monkeypatch, cache):
    model = _llama()
    path = hf.save_pretrained(model, tmp_path / "llama")
    eager = generate(str(path), [5, 9, 11, 3], 4, backend="eager", cache=cache)
    compiled = generate(str(path), [5, 9, 11, 3], 4, backend="lowbit", cache=cache)
    if compiled.tokens != eager.tokens:
        _known_tile_bug(monkeypatch, lambda: generate(str(path), [5, 9, 11, 3], 4, backend="lowbit",
                                                      cache=cache).tokens == eager.tokens)
    # prefill (length marked dynamic) + decode, warm-up and timed run included
    assert 1 <= compiled.compile_counts["compiles"] <= 2 and compiled.compile_s > 0
    print(f"lowbit.generate HF Llama static cache: {compiled.compile_counts}")


def _decode(runner, prompt, n=5):
    runner.reset()
    logits = [runner.prefill(prompt)]
    for i in range(n):
        logits.append(runner.step(int(logits[-1].argmax()), prompt.numel() + i))
    return logits


def test_static_cache_decode_steps_call_the_graph_directly():
    """`lowbit.generate`'s HF runner: with a StaticCache, decode steps after a sequence's first
    call its compiled graph directly (past dynamo), with the same logits as going through
    dynamo every step and eager's tokens; with a DynamicCache (Python-side list updates)
    they never do, nor when dynamo's code around the graph changes the cache's Python state."""
    from lowbit.generate import _HFRunner
    model = _llama()
    model.eval().requires_grad_(False)
    prompt = _ids(5)[0]
    with torch.no_grad():
        eager = _decode(_HFRunner(model, model.forward, "static", 32), prompt)
        counter = CompileCounter("lowbit")
        fn = torch.compile(model.forward, backend=counter)
        through = _decode(_HFRunner(model, fn, "static", 32), prompt)
        runner = _HFRunner(model, fn, "static", 32, counter=counter)
        for _ in range(2):
            direct = _decode(runner, prompt)
            assert runner._direct is not None
            for a, b in zip(direct, through):
                assert torch.equal(a, b)
        assert [int(x.argmax()) for x in direct] == [int(x.argmax()) for x in eager]
        calls = []
        inner = runner._direct.fn
        runner._direct.fn = lambda *a: calls.append(1) or inner(*a)
        runner.step(7, 20)
        assert calls == [1]
        runner.reset()
        assert runner._direct is None

        dynamic = _HFRunner(model, fn, "dynamic", 32, counter=counter)
        _decode(dynamic, prompt)
        assert dynamic._direct is None

        # A Python-level side effect on the cache in dynamo's code around the graph: a direct
        # call would skip it, so steps keep going through dynamo.
        def counting_forward(**kwargs):
            kwargs[seen.cache_arg].steps += 1
            return model.forward(**kwargs)

        torch._dynamo.reset()
        seen = _HFRunner(model, torch.compile(counting_forward, backend=counter), "static", 32, counter=counter)
        seen.cache.steps = 0
        seen.prefill(prompt)
        for i in range(3):
            seen.step(5, prompt.numel() + i)
        assert seen._direct is None and seen.cache.steps == 4


def test_bitnet_directory_roundtrip_and_generate_dynamic_eager(tmp_path):
    model = _bitnet(seed=1)
    path = hf.save_pretrained(model, tmp_path / "bitnet")
    loaded = hf.load_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    a = generate(str(path), ids[0].tolist(), 3, backend="eager", cache="dynamic")
    b = generate(str(path), ids[0].tolist(), 3, backend="eager", cache="static")
    assert a.tokens == b.tokens == _hf_generate(model, ids, 3, "eager")


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(tmp_path)
    path = hf.save_pretrained(_llama(), tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf.load_pretrained(path)
    other = hf.save_pretrained(_bitnet(), tmp_path / "b")
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not match"):
        hf.load_pretrained(path)


def test_patch_transformers_fixes_models_compiled_without_prepare():
    import subprocess
    import sys
    # a fresh process: patching transformers' classes must not leak into the other tests
    code = (
        "import torch\n"
        "from lowbit import hf\n"
        "m = hf.make_bitnet(hf.bitnet_config(vocab_size=128, hidden_size=64, intermediate_size=128,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))\n"
        "assert hf.nested_compiled_helpers(m)\n"
        "names = hf.patch_transformers()\n"
        "assert 'BitLinear.activation_quant' in names, names\n"
        "assert hf.nested_compiled_helpers(m) == [], hf.nested_compiled_helpers(m)\n"
        "ids = torch.arange(3, 9).view(1, -1)\n"
        "with torch.no_grad():\n"
        "    ref = m(ids).logits\n"
        "    m.forward = torch.compile(m.forward, backend='eager')\n"
        "    assert torch.equal(m(ids).logits, ref)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_plain_torch_compile_of_a_bitnet_just_works():
    """No `prepare`, no `lowbit.hf` call: `torch.compile(model.forward, backend="lowbit")` as
    transformers documents it; the backend's import unwraps transformers' nested compiles."""
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from lowbit import hf\n"
        "m = hf.make_bitnet(hf.bitnet_config(vocab_size=128, hidden_size=64, intermediate_size=128,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()\n"
        "assert hf.nested_compiled_helpers(m)  # BitLinear's nested torch.compile helpers\n"
        "ids = torch.arange(3, 9).view(1, -1)\n"
        "with torch.no_grad():\n"
        "    ref = m(ids).logits\n"
        "    m.forward = torch.compile(m.forward, backend='lowbit')\n"
        "    out = m(ids).logits\n"
        "torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(__import__("os").environ, LOWBIT_CACHE="0"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_bitlinear_runs_on_the_int8_kernels_bit_exact(isa):
    """transformers' BitLinear (activations quantized by the model with `127 * (1 / max)`, result
    rescaled by `r / (s_x * weight_scale)`): compiled, its int8 activations go to the integer
    kernels as they are (act_format int8_unit) and the output equals eager bit for bit, for
    M in {1, 3, 17}, K with a tail, activations from 1e-7 to 1e3, on every ISA."""
    from transformers.integrations.bitnet import BitLinear, pack_weights
    import lowbit
    from lowbit.runtime import library
    if isa not in library.supported_isas():
        pytest.skip(f"{isa} not supported by this CPU")
    before = library.current_isa()
    library.set_isa(isa)
    try:
        g = torch.Generator().manual_seed(4)
        for k, n in ((64, 64), (200, 72)):
            layer = BitLinear(k, n, bias=False, device="cpu", dtype=torch.float32)
            with torch.no_grad():
                layer.weight.copy_(pack_weights(torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)))
                layer.weight_scale.fill_(8.0)
            hf.prepare(layer).eval().requires_grad_(False)
            compiled = torch.compile(layer, backend="lowbit")
            for m in (1, 3, 17):
                x = torch.randn(1, m, k, generator=g) * torch.logspace(-7, 3, m).view(1, m, 1)
                with torch.no_grad():
                    assert torch.equal(compiled(x), layer(x)), (k, n, m)
            formats = [e.get("format") for e in lowbit.explain(layer).matmuls() if e.get("result") == "recognized"]
            assert formats and all(f == "ternary/tensor a=int8_unit" for f in formats), formats
            torch._dynamo.reset()
    finally:
        library.set_isa(before)


def test_bitnet_explain_every_bitlinear_on_the_int8_path():
    import lowbit
    model = _bitnet()
    ids = _ids(7)
    with torch.no_grad():
        ref = model(ids).logits
        hf.compile(model)
        out = model(ids).logits
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    recognized = [e for e in lowbit.explain(model).matmuls() if e.get("result") == "recognized"
                  and e.get("origin") == "dequant-subgraph"]
    n_bitlinear = 7 * model.config.num_hidden_layers
    assert len(recognized) == n_bitlinear, recognized
    assert all(e["format"] == "ternary/tensor a=int8_unit" for e in recognized), recognized


B2B4T = dict(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
             num_attention_heads=20, num_key_value_heads=5, max_position_embeddings=128, rope_theta=500000.0)


@pytest.mark.slow
def test_bitnet_2b4t_sized_generate_matches_eager_with_the_static_cache():
    """Issue 10's "done when" at real size: a BitNet-b1.58-2B4T-sized ``BitNetForCausalLM``
    (random ternary weights) generates eager's greedy tokens through ``generate()`` with the
    static cache in at most two compiles, every BitLinear on the int8 kernels. ~15 minutes on
    2 cores (peak RSS ~7.4 GiB); run with ``-m slow``. The dynamic cache: the test below.

    Tokens: this random-weight model amplifies rounding (BitNet quantizes every layer's input
    to int8 per token, so a 1-ulp difference before a ``round()`` becomes a whole int8 step):
    eager's own logits move by ~0.2 when its embedding output moves by 1 ulp, and compiled
    logits differ from eager's by ~0.3 from the prefill on, while eager's top two at the sixth
    step are 0.14 apart (sessions 11 and 13: five of six tokens equal, the sixth that near
    tie). So the test asks what rounding can explain and a bug would not: at every step up to
    the first differing token the compiled logits are within twice eager's own 1-ulp movement
    of eager's, and a differing token is one eager itself ranks within that distance of its
    pick."""
    import lowbit
    model = hf.make_bitnet(hf.bitnet_config(**B2B4T), seed=0)
    ids = _ids(7, vocab=B2B4T["vocab_size"])
    n = 6
    kw = {"cache_implementation": "static", "max_cache_len": 32}
    eager = _eager_and_nudged(model, ids, n, **kw)
    counter = CompileCounter("lowbit")
    hf.compile(model, backend=counter)
    got = _hf_generate_logits(model, ids, n, **kw)
    log.info("2B4T-sized BitNet, static cache: %s; compiles %s", _check_within_eager_rounding(got, *eager),
             counter.as_dict())
    assert 1 <= counter.compiles <= 2, counter.as_dict()
    recognized = [e for e in lowbit.explain(model).matmuls() if e.get("result") == "recognized"
                  and e.get("origin") == "dequant-subgraph"]
    assert len(recognized) >= 7, len(recognized)
    assert all(e["format"] == "ternary/tensor a=int8_unit" for e in recognized), recognized[:3]


def _hf_generate_logits(model, ids, n, **kw):
    """Greedy tokens and each step's fp32 logits from ``generate()``."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True, **kw)
    return out.sequences[0, ids.shape[1]:].tolist(), [step[0].float() for step in out.logits]


def _eager_and_nudged(model, ids, n, **kw):
    """Eager's greedy tokens and logits, and the same with its embedding output nudged by 1 ulp."""
    ref = _hf_generate_logits(model, ids, n, **kw)
    handle = _nudged_embeddings(model)
    nudged = _hf_generate_logits(model, ids, n, **kw)
    handle.remove()
    return ref, nudged


def _check_within_eager_rounding(got, ref, nudged) -> str:
    """The 2B4T tests' token criterion: what rounding can explain and a bug would not. Each of
    `got`, `ref`, `nudged` is (tokens, per-step logits). Up to the first token where the
    compiled run differs (its inputs equal eager's until then) the compiled logits are within
    twice eager's own 1-ulp movement of eager's, and a differing token is one eager ranks within
    that distance of its pick. Returns a summary for the log."""
    (g_tok, g_log), (r_tok, r_log), (n_tok, n_log) = got, ref, nudged
    same = _leading_matches(g_tok, r_tok)
    steps = min(same + 1, len(r_tok))
    moved = max(float((a - b).abs().max()) for a, b in zip(r_log[:min(steps, _leading_matches(n_tok, r_tok) + 1)], n_log))
    dev = max(float((a - b).abs().max()) for a, b in zip(r_log[:steps], g_log))
    summary = (f"lowbit {g_tok}, eager {r_tok}, eager nudged {n_tok}; logits: lowbit - eager {dev:.3g}, "
               f"eager's own 1-ulp movement {moved:.3g}")
    assert dev <= 2 * moved, summary
    if same < len(r_tok):
        gap = float(r_log[same][r_tok[same]] - r_log[same][g_tok[same]])
        assert gap <= 2 * moved, (gap, summary)
    return summary


def _nudged_embeddings(model):
    """A forward hook moving every element of the embedding output 1 ulp up or down (fixed
    random directions): eager's own sensitivity to rounding, the size of the differences any
    other arithmetic (compiled norms, reductions) introduces. Returns the hook's handle."""
    def hook(module, args, out):
        g = torch.Generator().manual_seed(out.shape[1])
        away = (torch.randint(0, 2, out.shape, generator=g) * 2 - 1).to(out.dtype) * float("inf")
        return torch.nextafter(out, away)
    return model.get_input_embeddings().register_forward_hook(hook)


def _leading_matches(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_rounding_criterion_of_the_2b4t_tests():
    """The 2B4T tests' token criterion accepts a flip at a near-tie of eager's when the compiled
    logits stay within eager's own 1-ulp movement, and rejects larger deviations and flips of
    a token eager prefers clearly."""
    ref_log = [torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, 0.95])]
    ref, nudged = ([0, 1], ref_log), ([0, 1], [x + torch.tensor([0.05, 0.0, 0.0]) for x in ref_log])
    _check_within_eager_rounding(([0, 2], [ref_log[0] + 0.02, torch.tensor([0.0, 0.97, 0.98])]), ref, nudged)
    with pytest.raises(AssertionError):  # logits 1.0 away
        _check_within_eager_rounding(([0, 1], [ref_log[0] + 1.0, ref_log[1]]), ref, nudged)
    with pytest.raises(AssertionError):  # eager prefers token 0 by 0.5 at the first step
        _check_within_eager_rounding(([1, 1], [ref_log[0], ref_log[1]]), ref, nudged)


@pytest.mark.slow
def test_bitnet_2b4t_sized_generate_matches_eager_with_the_dynamic_cache(monkeypatch):
    """The dynamic-cache twin of the static test above: a BitNet-b1.58-2B4T-sized
    ``BitNetForCausalLM`` through ``generate()`` with transformers' default ``DynamicCache``,
    at most two compiles, no graph or layer in eager, every BitLinear of both graphs on the
    int8 kernels, peak RSS far below the machine (each layer's cache used to get its own
    compile in decode; docs/generation.md). ~15 minutes on 2 cores, peak ~7.6 GiB.

    Tokens: as in the static test (`_check_within_eager_rounding`): eager's own logits move
    when its embedding output moves by 1 ulp (BitNet's per-token int8 activation rounding
    amplifies any rounding difference), so compiled logits must stay within twice that
    movement of eager's, and a differing token must be a near-tie of eager's. (It asked for
    equal tokens as long as nudged eager kept its tokens; in session 13 nudged eager kept all
    six and lowbit differed at the sixth, a 0.143 near-tie, as with the static cache.)"""
    import resource
    import warnings
    import lowbit
    from lowbit.compiler.partition import UnsupportedOpWarning, forget_warnings
    monkeypatch.setenv("LOWBIT_CACHE", "0")  # measure the compile, not a cache hit
    model = hf.make_bitnet(hf.bitnet_config(**B2B4T), seed=0)
    ids = _ids(7, vocab=B2B4T["vocab_size"])
    n = 6
    eager = _eager_and_nudged(model, ids, n)
    counter = CompileCounter("lowbit")
    hf.compile(model, backend=counter)
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _hf_generate_logits(model, ids, n)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    log.info("2B4T-sized BitNet, dynamic cache: %s; compiles %s; peak RSS %.2f GiB",
             _check_within_eager_rounding(got, *eager), counter.as_dict(), peak_gib)
    in_eager = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert not in_eager, in_eager
    assert 1 <= counter.compiles <= 2 and counter.graphs <= 2, counter.as_dict()
    recognized = [e for e in lowbit.explain(model).matmuls() if e.get("result") == "recognized"
                  and e.get("origin") == "dequant-subgraph"]
    assert len(recognized) == 2 * 7 * B2B4T["num_hidden_layers"], len(recognized)  # prefill and decode graphs
    assert all(e["format"] == "ternary/tensor a=int8_unit" for e in recognized), recognized[:3]
    assert peak_gib < 12, peak_gib
