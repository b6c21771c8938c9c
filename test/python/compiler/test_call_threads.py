"""Compiled code called from several Python threads at once (issue 13).

Every call gets its own argument array, so concurrent calls of one compiled function
never read each other's pointers; first calls that compile at the same time in several
threads neither fail inside torch.export/dynamo nor return wrong results.
"""
from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F

from lowbit.compiler.compile import compile_function

THREADS = 4


def _run_threads(work, n=THREADS):
    """Run `work(thread_index)` in `n` threads released together; re-raise the first error."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(k):
        try:
            start.wait()
            work(k)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _mlp(x, w1, w2):
    return F.silu(x @ w1) @ w2 + x.sum(-1, keepdim=True)


def _make_inputs(k, i, rows=5):
    g = torch.Generator().manual_seed(1000 * k + i)
    return torch.randn(rows, 24, generator=g)


def test_one_compiled_function_from_four_threads_matches_eager():
    w1, w2 = torch.randn(24, 40), torch.randn(40, 24)
    compiled = compile_function(_mlp, (torch.randn(5, 24), w1, w2), freezable=(1, 2))
    calls = 300
    bad = []

    def work(k):
        for i in range(calls):
            x = _make_inputs(k, i)
            out = compiled(x, w1, w2)[0]
            if not torch.allclose(out, _mlp(x, w1, w2), rtol=1e-4, atol=1e-4):
                bad.append((k, i, (out - _mlp(x, w1, w2)).abs().max().item()))

    _run_threads(work)
    assert not bad, f"{len(bad)} of {THREADS * calls} concurrent calls were wrong, e.g. {bad[:3]}"


def test_dynamic_compiled_function_from_four_threads_with_different_lengths():
    w = torch.randn(24, 24)

    def f(x, w):
        return torch.softmax(x @ w, -1) * x.shape[0]

    compiled = compile_function(f, (torch.randn(6, 24), w), freezable=(1,), dynamic_dims={0: {0: "T"}})
    bad = []

    def work(k):
        for i in range(150):
            x = _make_inputs(k, i, rows=1 + (7 * k + i) % 13)   # each thread its own lengths
            out = compiled(x, w)[0]
            if out.shape != x.shape or not torch.allclose(out, f(x, w), rtol=1e-4, atol=1e-4):
                bad.append((k, i, tuple(out.shape)))

    _run_threads(work)
    assert not bad, f"wrong concurrent dynamic calls: {bad[:3]}"


def test_two_compiled_models_in_parallel():
    a = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    b = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh()).eval()
    with torch.no_grad():
        ca = compile_function(a, (torch.randn(3, 16),))
        cb = compile_function(b, (torch.randn(3, 16),))
    bad = []

    def work(k):
        model, compiled = (a, ca) if k % 2 == 0 else (b, cb)
        with torch.no_grad():
            for i in range(200):
                x = _make_inputs(k, i, rows=3)[:, :16].contiguous()
                if not torch.allclose(compiled(x)[0], model(x), rtol=1e-4, atol=1e-4):
                    bad.append((k, i))

    _run_threads(work)
    assert not bad, f"wrong results from parallel models: {bad[:3]}"


def test_simultaneous_first_calls_through_torch_compile():
    """Four threads make the first calls of two compiled models at once: each call
    compiles (capture runs torch.export) while other threads call dynamo-compiled code.
    This used to raise "symbolically trace a dynamo-optimized function" or
    "KeyError: 'custom'" (torch.export's global tracing state seen by other threads)."""
    torch._dynamo.reset()
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
              for _ in range(2)]
    compiled = [torch.compile(m, backend="lowbit") for m in models]
    results = {}

    def work(k):
        m, c = models[k % 2], compiled[k % 2]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(20):
                x = _make_inputs(k, i, rows=2 + k % 2)[:, :8].contiguous()
                out = c(x)
                results[(k, i)] = torch.allclose(out, m(x), rtol=1e-4, atol=1e-4)

    _run_threads(work)
    assert len(results) == THREADS * 20 and all(results.values())


def test_calls_while_another_thread_captures():
    """Calls of an already compiled model keep working while another thread compiles."""
    torch._dynamo.reset()
    ready = torch.nn.Linear(8, 8).eval()
    ready_c = torch.compile(ready, backend="lowbit")
    x = torch.randn(2, 8)
    with torch.no_grad():
        ready_c(x)  # compiled before the race starts
    stop = threading.Event()
    failures = []

    def caller():
        with torch.no_grad():
            while not stop.is_set():
                try:
                    if not torch.allclose(ready_c(x), ready(x), rtol=1e-5, atol=1e-5):
                        failures.append("wrong result")
                except Exception as e:  # noqa: BLE001
                    failures.append(f"{type(e).__name__}: {e}")
                    return

    t = threading.Thread(target=caller)
    t.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for rows in (3, 4, 5):
                compile_function(lambda a: torch.tanh(a) * 2, (torch.randn(rows, 8),))
    finally:
        stop.set()
        t.join()
    assert not failures, failures[:3]
