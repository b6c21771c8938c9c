"""Thread stress: compiled models called from many Python threads at once give eager's answers.

Issue 13 found ~0.5% garbage results (values up to 1e35) from one compiled model called by
4 threads. test/python/compiler/test_call_threads.py holds the focused regression tests;
this one hammers a low-bit model (bound packed weights, fused epilogue), a model whose
compiled code carries trap checks (integer division: a per-module flag, so its calls
serialize) and first calls racing, all at once. Quick by default; `-m slow` runs it long.
"""
from __future__ import annotations

import threading

import pytest
import torch

import lowbit


def _lowbit_model(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 40)).eval()
    lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary"))
    return model


def _division(x, y):
    return torch.remainder(x, y) * 3 + torch.div(x, y, rounding_mode="floor")


def _stress(threads: int, calls: int, n_models: int) -> None:
    torch._dynamo.reset()
    models = [_lowbit_model(seed) for seed in range(n_models)]
    compiled = [torch.compile(m, backend="lowbit") for m in models]
    division = torch.compile(_division, backend="lowbit", dynamic=False)
    g = torch.Generator().manual_seed(7)
    inputs = [torch.randn(3, 64, generator=g) for _ in range(threads)]
    ints = [(torch.randint(-1000, 1000, (29,), generator=g), torch.randint(1, 50, (29,), generator=g))
            for _ in range(threads)]
    with torch.no_grad():
        want = [[m(x) for x in inputs] for m in models]
    want_div = [_division(*a) for a in ints]
    failures: list[str] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            start.wait()  # first calls (compiles) race too
            with torch.no_grad():
                for i in range(calls):
                    which = (t + i) % n_models
                    got = compiled[which](inputs[t])
                    if not torch.allclose(got, want[which][t], rtol=1e-4, atol=1e-4):
                        failures.append(f"thread {t} call {i} model {which}: max diff "
                                        f"{(got - want[which][t]).abs().max().item():.3g}")
                    if i % 3 == 0 and not torch.equal(division(*ints[t]), want_div[t]):
                        failures.append(f"thread {t} call {i}: division differs")
        except Exception as e:  # noqa: BLE001 - any exception is a failure of the test
            failures.append(f"thread {t}: {type(e).__name__}: {e}")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures, "\n".join(failures[:10])


def test_threads_quick():
    _stress(threads=4, calls=20, n_models=1)


@pytest.mark.slow
def test_threads_long():
    _stress(threads=8, calls=1500, n_models=2)
