"""Replay of a compiled program's native calls (runtime/replay.py).

A compiled decode step is recorded on its first call and replayed afterwards (one runtime
call for all entries). These tests check that a replayed step computes what the Python path
and eager compute, that what the caller gets is fresh per call, that buffers the plan
depends on may move, that run-time checks still raise, that concurrent callers are served,
and that programs the plan cannot prove the same are never replayed.
"""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from lowbit.generate import _LlamaRunner, build_llama
from lowbit.models import LlamaConfig
from lowbit.runtime import replay

CFG = LlamaConfig(dim=128, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=256, n_layers=2, max_seq_len=32)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _replayers(fn) -> list[replay.Replayer]:
    """Every Replayer behind a torch.compile'd callable's lowbit entries."""
    import gc

    from lowbit.compiler.backend import LowbitCallable
    gc.collect()
    found = []
    for obj in gc.get_objects():
        if type(obj) is LowbitCallable:
            for entry in obj.cache.values():
                r = getattr(entry, "_replay", None) or getattr(getattr(entry, "_body", None), "_replay", None)
                if r is not None:
                    found.append(r)
    return found


def _decode(runner, prompt, n):
    runner.reset()
    tok = int(runner.prefill(prompt).argmax())
    toks, logits = [tok], []
    for i in range(n):
        out = runner.step(tok, len(prompt) + i)
        logits.append(out)
        tok = int(out.argmax())
        toks.append(tok)
    return toks, logits


def _models(seed=0, cfg=CFG):
    model, _ = build_llama(cfg, seed, "ternary", "int8", torch.float32, head="int8")
    return model


@torch.no_grad()
def test_replayed_decode_matches_the_python_path_and_eager(monkeypatch):
    prompt = torch.arange(3, 9)
    model = _models()
    eager_toks, eager_logits = _decode(_LlamaRunner(model, model), prompt, 8)

    monkeypatch.setenv("LOWBIT_REPLAY", "0")
    torch._dynamo.reset()
    plain = torch.compile(model, backend="lowbit")
    plain_toks, plain_logits = _decode(_LlamaRunner(model, plain), prompt, 8)
    assert all(r.plan is None and r.replays == 0 for r in _replayers(plain))

    monkeypatch.setenv("LOWBIT_REPLAY", "1")
    torch._dynamo.reset()
    fn = torch.compile(model, backend="lowbit")
    toks, logits = _decode(_LlamaRunner(model, fn), prompt, 8)
    replayed = [r for r in _replayers(fn) if r.replays]
    assert len(replayed) == 1 and replayed[0].replays >= 6  # decode: recorded once, then replayed
    assert replayed[0].plan.n >= 3  # embedding / layers / head: several entries in one call
    assert toks == plain_toks == eager_toks
    for a, b, e in zip(logits, plain_logits, eager_logits):
        assert torch.equal(a, b)  # same code, same buffers: bit-identical
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_results_are_fresh_tensors_per_call():
    model = _models()
    fn = torch.compile(model, backend="lowbit")
    runner = _LlamaRunner(model, fn)
    runner.reset()
    runner.prefill(torch.arange(4))
    outs = [runner.step(5 + i, 4 + i) for i in range(4)]
    kept = [o.clone() for o in outs]
    assert len({o.data_ptr() for o in outs}) == 4
    for o, k in zip(outs, kept):
        assert torch.equal(o, k)  # later replays did not write into an earlier result


@torch.no_grad()
def test_a_moved_cache_buffer_is_followed():
    """Replacing a KV cache with another tensor of the same layout (what a user resetting caches
    by assignment does): the replayed step reads and updates the new buffer."""
    model = _models()
    fn = torch.compile(model, backend="lowbit")
    runner = _LlamaRunner(model, fn)
    ref = _LlamaRunner(model, model)
    prompt = torch.arange(2, 8)
    _decode(runner, prompt, 4)  # recorded and replayed with the first buffers
    cache = model.layers[0].attention.cache
    old_k, old_v = cache.k, cache.v
    cache.k, cache.v = torch.zeros_like(old_k), torch.zeros_like(old_v)
    toks, logits = _decode(runner, prompt, 4)
    eager_toks, eager_logits = _decode(ref, prompt, 4)
    assert toks == eager_toks
    for a, e in zip(logits, eager_logits):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    assert cache.k.abs().sum() > 0 and cache.k.data_ptr() != old_k.data_ptr()


@torch.no_grad()
def test_run_time_checks_still_raise_when_replayed():
    model = _models()
    fn = torch.compile(model, backend="lowbit")
    runner = _LlamaRunner(model, fn)
    _decode(runner, torch.arange(4), 4)
    assert any(r.replays for r in _replayers(fn))
    with pytest.raises(IndexError, match="index out of range"):
        runner.step(CFG.vocab_size + 3, 8)
    _, logits = _decode(runner, torch.arange(4), 3)  # and the next steps are fine again
    eager = _decode(_LlamaRunner(model, model), torch.arange(4), 3)[1]
    for a, e in zip(logits, eager):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_concurrent_callers_get_their_own_results():
    """Threads calling one compiled program at once: the plan's buffers are never shared by
    two running calls (a busy plan sends the other caller down the Python path)."""
    m = _program_with(op_in_eager=False)
    fn = torch.compile(m, backend="lowbit")
    xs = [torch.randn(3, 64, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        expected = [fn(x) for x in xs]  # compiled and recorded before the threads start
        for x, e in zip(xs, expected):
            torch.testing.assert_close(e, m(x), rtol=1e-5, atol=1e-5)
    errors: list[str] = []

    def run(k):
        with torch.no_grad():
            for _ in range(200):
                if not torch.equal(fn(xs[k]), expected[k]):
                    errors.append(f"thread {k}: wrong result")
                    return

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    (r,) = _replayers(fn)
    assert r.replays > 0


@torch.no_grad()
def test_dynamic_programs_are_not_replayed():
    """Prefill (a symbolic length) is recorded once, found dynamic, and never recorded again."""
    model = _models()
    fn = torch.compile(model, backend="lowbit")
    runner = _LlamaRunner(model, fn)
    for n in (5, 7, 6, 9):
        runner.reset()
        runner.prefill(torch.arange(n))
    (r,) = _replayers(fn)
    assert r.plan is None and r.replays == 0 and r.recordings == replay.MAX_RECORDINGS


def _program_with(op_in_eager: bool):
    """A bound program: a low-bit linear, then (optionally) an op run in eager after it."""
    from lowbit.quant import QuantConfig, quantize_
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    quantize_(lin, QuantConfig(weights="ternary", activations="int8"))

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            y = self.lin(x)
            return torch.cumsum(y, 1) if op_in_eager else y * 2

    return M()


@torch.no_grad()
def test_a_program_with_an_eager_part_is_not_replayed():
    m = _program_with(op_in_eager=True)
    fn = torch.compile(m, backend="lowbit")
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match="cumsum"):
        outs = [fn(x) for _ in range(3)]
    for o in outs:
        torch.testing.assert_close(o, m(x), rtol=1e-5, atol=1e-5)
    (r,) = _replayers(fn)
    assert r.plan is None and r.replays == 0


@torch.no_grad()
def test_a_static_program_is_replayed_and_follows_new_inputs():
    m = _program_with(op_in_eager=False)
    fn = torch.compile(m, backend="lowbit")
    xs = [torch.randn(3, 64, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    for x in xs:
        torch.testing.assert_close(fn(x), m(x), rtol=1e-5, atol=1e-5)
    (r,) = _replayers(fn)
    assert r.replays == len(xs) - 1


def test_run_calls_runs_in_order_and_stops_at_a_set_trap_flag():
    """`lowbit_rt_run_calls`: entries in order, each trap flag cleared before its entry and
    read after it; the first entry that set its flag ends the sequence (its index returned)."""
    import ctypes

    from lowbit.runtime.library import load_runtime
    lib = load_runtime()
    order: list[int] = []
    flags = [ctypes.c_int32(7), ctypes.c_int32(7), ctypes.c_int32(0)]
    seen_before: list[int] = []
    proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    def entry(k, trap):
        def run(args):
            order.append(k)
            if k < 2:
                seen_before.append(flags[k].value)  # cleared by the runtime before the call
                if trap:
                    flags[k].value = 2
        return proto(run)

    def call(traps):
        fns = [entry(k, t) for k, t in enumerate(traps)]
        n = len(fns)
        argv = (ctypes.c_void_p * n)(*[None] * n)
        fptrs = (ctypes.c_void_p * n)(*[ctypes.cast(f, ctypes.c_void_p).value for f in fns])
        fl = (ctypes.c_void_p * n)(ctypes.addressof(flags[0]), ctypes.addressof(flags[1]), None)
        return lib.lowbit_rt_run_calls(n, fptrs, argv, fl)

    assert call([False, False, False]) == -1 and order == [0, 1, 2] and seen_before == [0, 0]
    order.clear()
    assert call([False, True, False]) == 1 and order == [0, 1] and flags[1].value == 2


def _decode_calls(lib, logits, steps, entries=(), traps=(), on_token=None, token=0, pos=10):
    """lowbit_rt_decode_calls over Python entries (ctypes callbacks) and a logits buffer."""
    import ctypes
    n = len(entries)
    proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    fns = [proto(e) for e in entries]
    fptrs = (ctypes.c_void_p * max(n, 1))(*[ctypes.cast(f, ctypes.c_void_p).value for f in fns])
    argv = (ctypes.c_void_p * max(n, 1))()
    fl = (ctypes.c_void_p * max(n, 1))(*[ctypes.addressof(t) if t is not None else None for t in traps])
    tok, p = ctypes.c_int64(token), ctypes.c_int64(pos)
    out = (ctypes.c_int64 * steps)()
    trapped = ctypes.c_int64(0)
    cb = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64)(on_token) if on_token else None
    done = lib.lowbit_rt_decode_calls(n, fptrs, argv, fl, steps, ctypes.byref(tok), ctypes.byref(p),
                                      logits.data_ptr(), int(logits.dtype == torch.bfloat16), logits.numel(),
                                      out, cb, ctypes.byref(trapped))
    return done, list(out[:done]), tok.value, p.value, trapped.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_calls_feed_back_torch_argmax(dtype):
    """`lowbit_rt_decode_calls`: each step runs the entries, takes torch.argmax of the logits
    (first maximum, the first NaN wins), writes it to the token slot and adds 1 to the
    position; the logits an entry writes are the ones read."""
    from lowbit.runtime.library import load_runtime
    lib = load_runtime()
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(37, generator=gen), torch.tensor([1.0, 3.0, 3.0, -1.0]), torch.tensor([2.0, float("nan"), 5.0, float("nan")]),
            torch.tensor([float("-inf"), float("-inf")]), torch.tensor([float("nan"), 1.0]), torch.full((5,), 7.0),
            torch.tensor([-2.0, float("inf"), 1.0])]
    for row in rows:
        logits = row.to(dtype)
        done, toks, tok, pos, trapped = _decode_calls(lib, logits, 3)
        expected = int(torch.argmax(logits))
        assert (done, toks, tok, pos, trapped) == (3, [expected] * 3, expected, 13, -1), row
    # an entry that writes the logits: step s puts the maximum at s
    logits = torch.zeros(6, dtype=dtype)

    def write(_args, state={"s": 0}):
        logits.zero_()
        logits[state["s"] % 6] = 1
        state["s"] += 1
    assert _decode_calls(lib, logits, 8, entries=[write], traps=[None])[1] == [0, 1, 2, 3, 4, 5, 0, 1]


def test_decode_calls_stop_at_a_trap_and_when_on_token_says_so():
    import ctypes

    from lowbit.runtime.library import load_runtime
    lib = load_runtime()
    logits = torch.tensor([0.0, 2.0, 1.0])
    flag = ctypes.c_int32(0)
    calls = []

    def entry(_args):
        calls.append(1)
        if len(calls) == 3:
            flag.value = 5
    done, toks, _, pos, trapped = _decode_calls(lib, logits, 10, entries=[entry], traps=[flag])
    assert (done, toks, pos, trapped) == (2, [1, 1], 12, 0)  # the third step trapped before its argmax
    seen = []
    done, toks, _, pos, _ = _decode_calls(lib, logits, 10, on_token=lambda t: seen.append(t) or len(seen) == 4)
    assert (done, len(toks), pos, seen) == (4, 4, 14, [1, 1, 1, 1])


def test_a_native_decode_loop_raises_run_time_checks_like_a_call(monkeypatch):
    """Decoding past the KV cache in the native loop stops with the error a step raises
    (eager's IndexError), and the runner decodes fine afterwards."""
    from lowbit.generate import CompileCounter
    raised = []
    real = replay.Plan.decode

    def decode(self, *a, **kw):
        try:
            return real(self, *a, **kw)
        except IndexError:
            raised.append(True)
            raise
    monkeypatch.setattr(replay.Plan, "decode", decode)
    model = _models()
    counter = CompileCounter("lowbit")
    runner = _LlamaRunner(model, torch.compile(model, backend=counter), counter=counter)
    eager = _LlamaRunner(model, model)
    start = CFG.max_seq_len - 4
    with torch.no_grad():
        runner.reset()
        first = int(runner.prefill(torch.arange(4)).argmax())
        with pytest.raises(IndexError):
            runner.decode(first, start, 8)
        assert raised == [True]  # raised by the native loop
        runner.reset()
        eager.reset()
        first = int(runner.prefill(torch.arange(4)).argmax())
        assert first == int(eager.prefill(torch.arange(4)).argmax())
        expected = [int(eager.step(first, 4).argmax())]
        for i in range(4):
            expected.append(int(eager.step(expected[-1], 5 + i).argmax()))
        assert runner.decode(first, 4, 5) == expected
