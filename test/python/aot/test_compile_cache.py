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
