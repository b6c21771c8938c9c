"""The persistent compile cache of torch.compile(backend="lowbit"): hits across processes and
model instances with other weights, LRU bound, damaged entries, concurrency, off switch."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowbit.compiler import compile_cache
from lowbit.compiler.compile_log import counters


class Net(torch.nn.Module):
    def __init__(self, seed=0, width=48):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(width, 37, generator=g) / 6)
        self.b = torch.nn.Parameter(torch.randn(width, generator=g))

    def forward(self, x):
        return torch.nn.functional.gelu(x @ self.w.t() + self.b).sum(-1, keepdim=True) * x[:, :1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", "1")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWBIT_CACHE_SIZE", raising=False)
    return compile_cache.cache_dir()


def _run(model, x):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="lowbit")(x)


@pytest.mark.parametrize("rows", [1, 5, 33])
def test_hit_with_other_weights(cache, rows):
    x = torch.randn(rows, 37)
    hits, runs = counters["cache_hits"], counters["pipelines"]
    torch.testing.assert_close(_run(Net(0), x), Net(0)(x), rtol=1e-5, atol=1e-5)
    assert counters["cache_hits"] == hits and len(compile_cache.entries()) >= 1
    runs = counters["pipelines"]
    other = Net(seed=7)           # same structure, other weights: the code is shared
    torch.testing.assert_close(_run(other, x), other(x), rtol=1e-5, atol=1e-5)
    assert counters["cache_hits"] > hits and counters["pipelines"] == runs


def test_whole_program_hit_same_weights(cache):
    x = torch.randn(6, 37)
    model = Net(3)
    torch.testing.assert_close(_run(model, x), model(x), rtol=1e-5, atol=1e-5)
    assert compile_cache.programs()
    hits, runs = counters["program_cache_hits"], counters["pipelines"]
    torch._dynamo.reset()
    with torch.no_grad():
        fn = torch.compile(model, backend="lowbit")
        torch.testing.assert_close(fn(x), model(x), rtol=1e-5, atol=1e-5)
        assert counters["program_cache_hits"] == hits + 1 and counters["pipelines"] == runs
        model.w.mul_(0.5)   # an in-place weight update: read at run time, or rebound if packed
        torch.testing.assert_close(fn(x), model(x), rtol=1e-5, atol=1e-5)


def test_whole_program_hit_guards_packed_weights(cache):
    import warnings
    import lowbit
    from lowbit.generate import PRESETS, build_llama
    import dataclasses
    cfg = dataclasses.replace(PRESETS["tiny"], n_layers=1, max_seq_len=16)
    model, _ = build_llama(cfg)
    tokens, pos = torch.randint(0, cfg.vocab_size, (1, 5)), torch.arange(5)
    outs = []
    for i in range(2):  # compile and store, then a whole-program hit
        torch._dynamo.reset()
        lowbit.models.reset_caches(model)
        if i:  # KV cache contents (state the program writes) are not part of the key
            model.layers[0].attention.cache.k.normal_()
        with torch.no_grad():
            fn = torch.compile(model, backend="lowbit")
            outs.append(fn(tokens, pos))
    assert counters["program_cache_hits"] >= 1
    torch.testing.assert_close(outs[1], outs[0])
    layer = model.layers[0].feed_forward.w1
    with torch.no_grad():
        layer.scales.mul_(2.0)     # in place: the packed buffers are stale
        lowbit.models.reset_caches(model)
        with pytest.warns(RuntimeWarning, match="recompiling"):
            got = fn(tokens, pos)
        lowbit.models.reset_caches(model)
        want = model(tokens, pos)
    err = (got - want).abs()
    assert err.max() <= 2e-2 * want.abs().max()


def test_off_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", "0")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    _run(Net(), torch.randn(2, 37))
    assert not (tmp_path / "cache").exists()
    monkeypatch.setenv("LOWBIT_CACHE", "maybe")
    with pytest.raises(compile_cache.CacheConfigError, match="LOWBIT_CACHE='maybe'"):
        compile_cache.enabled()
    monkeypatch.setenv("LOWBIT_CACHE_SIZE", "lots")
    with pytest.raises(compile_cache.CacheConfigError, match="LOWBIT_CACHE_SIZE='lots'"):
        compile_cache.max_bytes()


def test_damaged_entry_is_recompiled(cache, caplog):
    x = torch.randn(3, 37)
    _run(Net(), x)
    for so in cache.glob("*.so"):
        data = bytearray(so.read_bytes())
        data[len(data) // 2] ^= 0xFF
        so.write_bytes(bytes(data))
    runs = counters["pipelines"]
    with caplog.at_level("WARNING", logger="lowbit.cache"):
        torch.testing.assert_close(_run(Net(), x), Net()(x), rtol=1e-5, atol=1e-5)
    assert "damaged" in caplog.text and counters["pipelines"] > runs
    assert compile_cache.lookup(compile_cache.entries()[0]) is not None  # stored anew


def test_lru_bound(cache, monkeypatch):
    _run(Net(width=48), torch.randn(2, 37))
    first = set(compile_cache.entries())
    size = sum(p.stat().st_size for p in cache.glob(f"{next(iter(first))}.*"))
    monkeypatch.setenv("LOWBIT_CACHE_SIZE", str(int(size * 1.5)))
    _run(Net(width=80), torch.randn(2, 37))  # another structure: evicts the older entry
    now = set(compile_cache.entries())
    assert len(now) == 1 and not (now & first)


SCRIPT = """
    import json, os, sys, torch
    sys.path.insert(0, {here!r})
    from test_compile_cache import Net
    from lowbit.compiler.compile_log import counters
    x = torch.randn(9, 37, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = torch.compile(Net(), backend="lowbit")(x)
    err = float((y - Net()(x)).abs().max())
    print(json.dumps({{"hits": counters["cache_hits"], "programs": counters["program_cache_hits"],
                      "pipelines": counters["pipelines"], "err": err}}))
"""


def test_concurrent_processes_then_warm_process(cache, tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent(SCRIPT.format(here=os.path.dirname(__file__))))
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["err"] < 1e-4
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    warm = json.loads(r.stdout.strip().splitlines()[-1])
    assert warm["programs"] == 1 and warm["pipelines"] == 0 and warm["err"] < 1e-4
    assert not list(cache.glob(".build-*")) and not list(cache.glob(".*.so.*"))  # no leftovers


class IntDiv(torch.nn.Module):
    def forward(self, x, y):
        return (x * 3) // y + 1


def test_hit_keeps_run_time_checks(cache):
    x, y = torch.randint(-50, 50, (4, 9)), torch.randint(1, 7, (4, 9))
    hits, runs = counters["cache_hits"] + counters["program_cache_hits"], counters["pipelines"]
    for _ in range(2):  # store, then hit
        torch._dynamo.reset()
        with torch.no_grad():
            fn = torch.compile(IntDiv(), backend="lowbit")
            torch.testing.assert_close(fn(x, y), IntDiv()(x, y))
    # the second compile is a hit of the whole program or of its compiled part
    assert counters["cache_hits"] + counters["program_cache_hits"] > hits and counters["pipelines"] == runs + 1
    bad = y.clone()
    bad[2, 5] = 0
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        fn(x, bad)


class _Layer(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8) / 3)
        self.scale = scale

    @torch.compiler.nested_compile_region
    def forward(self, x):
        return torch.relu(x @ self.w) * self.scale


def _traced_layers(scale):
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Layer(scale), _Layer(scale), _Layer(scale)).eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(torch.randn(2, 8))
    (gm,) = graphs
    return gm


def test_graph_code_covers_nested_regions():
    """The program key's code, taken before inlining, has every nested region's code: two
    graphs whose outer code is the same and whose region differs (a constant inside it) key
    apart; and it is what the backend keys with (`LowbitCallable._key_code`)."""
    a, b = _traced_layers(2.0), _traced_layers(3.0)
    assert compile_cache._graph_code(a) == compile_cache._graph_code(b)  # the calls alone look alike
    code_a, code_b = compile_cache.graph_code(a), compile_cache.graph_code(b)
    assert "# nested graph module subgraph_0" in code_a and code_a != code_b
    assert "2.0" in code_a and "3.0" in code_b
    flat = _traced_layers(2.0)
    from lowbit.compiler.frontend import inline_nested_regions
    assert inline_nested_regions(flat) == 3
    assert compile_cache.graph_code(flat) == compile_cache._graph_code(flat) != code_a  # nothing nested left
    from lowbit.compiler.backend import lowbit_backend
    gm = _traced_layers(2.0)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_CACHE", "1")
        fn = lowbit_backend(gm, [p for p in gm.parameters()] + [torch.randn(2, 8)])
    assert fn._key_code == code_a


def test_prefetched_digests_are_the_lookup_digests():
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(300, 7, generator=g), torch.randn(6, 4, generator=g).t(), torch.randn(0, 3),
          torch.randint(0, 9, (33,), generator=g, dtype=torch.int8)]
    with torch.inference_mode():
        inference = torch.randn(4)
    compile_cache._DIGESTS.clear()
    expected = [compile_cache._state_bytes_digest(t) for t in ts]
    compile_cache.prefetch_state_digests(ts + [inference, "not a tensor"])
    compile_cache._join_prefetch()
    assert [compile_cache._DIGESTS[id(t)][2] for t in ts] == expected
    assert id(inference) not in compile_cache._DIGESTS  # no version counter: never memoized
    # a write after the prefetch: the lookup hashes again
    ts[0].add_(1)
    assert compile_cache._state_digest(ts[0]) == compile_cache._state_bytes_digest(ts[0]) != expected[0]
    # the program's weights key joins pending prefetches and equals the one computed without them
    compile_cache._DIGESTS.clear()
    direct = compile_cache.program_weights_key("p0", ts, range(len(ts)), [])
    compile_cache._DIGESTS.clear()
    compile_cache.prefetch_state_digests(ts)
    assert compile_cache.program_weights_key("p0", ts, range(len(ts)), []) == direct
    assert not compile_cache._PREFETCH
