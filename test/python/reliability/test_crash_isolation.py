"""Crash isolation: MLIR runs in the compile worker (compiler/worker.py, compiler/isolation.py).

A crash inside MLIR used to kill the user's process (torch-to-linalg on an int8 `mm`,
SIGSEGV). Now the worker dies instead, the op that crashes it alone is found and runs in
eager with a warning naming it, and the next compile starts a new worker. The crashing
scenarios run in a subprocess so that a regression fails a test instead of killing pytest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from lowbit.compiler import isolation as isolation_mod
from lowbit.compiler import worker as worker_mod
from lowbit.compiler.worker import CompileWorker, Crashed


def _run(script: str, timeout: int = 600) -> dict:
    env = dict(os.environ, LOWBIT_CACHE="0")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"the process died ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


CRASHING_MM = r'''
import json, os, signal, warnings, torch, lowbit
import lowbit.compiler.frontend as frontend
from lowbit.compiler.worker import shared_worker

# Without lowbit's decomposition, torch-mlir's own torch-to-linalg lowering of an int8 mm
# (and of any static zero-K product) dies with SIGSEGV: a real MLIR crash to contain.
frontend.lowbit_decompositions = lambda base: base

def f(a, b, c):
    return torch.mm(a, b) + 1, torch.relu(c) * 2

g = torch.Generator().manual_seed(0)
a = torch.randint(-100, 100, (5, 7), dtype=torch.int8, generator=g)
b = torch.randint(-100, 100, (7, 3), dtype=torch.int8, generator=g)
c = torch.randn(9, generator=g)
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = torch.compile(f, backend="lowbit", dynamic=False)(a, b, c)
out["warnings"] = [str(w.message) for w in caught if "lowbit" in str(w.message)]
out["equal"] = all(torch.equal(x, y) for x, y in zip(got, f(a, b, c)))
out["starts_after_crash"] = shared_worker().starts

# a worker killed from outside is replaced at the next compile
os.kill(shared_worker().pid, signal.SIGKILL)
h = lambda x: torch.tanh(x) + x
x = torch.randn(3, 5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out["after_kill_equal"] = torch.allclose(torch.compile(h, backend="lowbit", dynamic=False)(x), h(x), atol=1e-6)
out["after_kill_warnings"] = [str(w.message) for w in caught if "lowbit" in str(w.message)]
out["starts"] = shared_worker().starts
print(json.dumps(out))
'''


def test_mlir_crash_becomes_an_eager_fallback_naming_the_op():
    out = _run(CRASHING_MM)
    assert out["equal"]
    mm = [w for w in out["warnings"] if "aten.mm" in w]
    assert mm and "SIGSEGV" in mm[0] and "torch-to-linalg" in mm[0], out["warnings"]
    # only the crashing op runs in eager: relu/mul/add are compiled
    assert not [w for w in out["warnings"] if "the graph" in w], out["warnings"]
    assert out["starts_after_crash"] >= 2  # restarted after the crash
    assert out["after_kill_equal"] and not out["after_kill_warnings"], out
    assert out["starts"] > out["starts_after_crash"]


def test_worker_reports_a_crash_and_restarts():
    """A crash while parsing (MLIR's recursive parser overflows the stack on deep nesting)."""
    w = CompileWorker()
    try:
        deep = "module {" + "scf.execute_region {" * 20000 + "}" * 20000 + "}"
        with pytest.raises(Crashed) as info:
            w.run(deep.encode(), [])
        assert info.value.stage is None and info.value.returncode is not None and info.value.returncode < 0
        first = w.starts
        ok = w.run(b'func.func @f(%a: i32) -> i32 { return %a : i32 }', [("cse", ["cse"])])
        assert ok.module_bytes[:4] == b"ML\xefR"  # MLIR bytecode back
        assert w.starts == first + 1
    finally:
        w.stop()


def test_stage_errors_keep_their_message_and_stage():
    w = CompileWorker()
    try:
        with pytest.raises(worker_mod.StageFailed) as info:
            w.run(b'func.func @f(%a: i32) -> i32 { return %a : i32 }', [("bad", ["no-such-pass"])])
        assert info.value.stage == "bad" and "no-such-pass" in info.value.message
        # the same worker serves the next request (an error is not a crash)
        pid = w.pid
        w.run(b'func.func @f(%a: i32) -> i32 { return %a : i32 }', [("cse", ["cse"])])
        assert w.pid == pid
    finally:
        w.stop()


def test_worker_off_compiles_in_process(monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE_WORKER", "0")

    def refuse():
        raise AssertionError("the worker must not be used with LOWBIT_COMPILE_WORKER=0")

    monkeypatch.setattr(worker_mod, "shared_worker", refuse)
    monkeypatch.setattr(isolation_mod, "shared_worker", refuse)
    torch._dynamo.reset()
    f = lambda x: torch.sigmoid(x) * 3  # noqa: E731
    x = torch.randn(4, 9)
    assert torch.allclose(torch.compile(f, backend="lowbit", dynamic=False)(x), f(x), atol=1e-6)


@pytest.mark.parametrize("raw", ["2", "maybe"])
def test_worker_variable_is_validated(monkeypatch, raw):
    from lowbit.compiler import env
    monkeypatch.setenv("LOWBIT_COMPILE_WORKER", raw)
    with pytest.raises(env.EnvironmentVariableError, match="LOWBIT_COMPILE_WORKER"):
        env.validate()


def test_unimportable_dtypes_fall_back_naming_the_op():
    """torch-mlir's importer has no complex128 dtype code (KeyError): a fallback, not an error."""
    torch._dynamo.reset()
    f = lambda x: (x.to(torch.complex128) * 2).real + 1  # noqa: E731
    x = torch.randn(5, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(f, backend="lowbit", dynamic=False)(x)
    assert torch.equal(got, f(x))
    messages = [str(w.message) for w in caught if "lowbit" in str(w.message)]
    assert any("prims.convert_element_type" in m and "complex128" in m for m in messages), messages


FORK = r'''
import json, os, torch, lowbit
from lowbit.compiler.worker import shared_worker
x = torch.randn(3, 4)
f = torch.compile(lambda x: torch.tanh(x) * 2, backend="lowbit", dynamic=False)
out = {"parent": bool(torch.allclose(f(x), torch.tanh(x) * 2, atol=1e-6))}
w0 = shared_worker()
pid = os.fork()
if pid == 0:
    g = torch.compile(lambda x: torch.sin(x) + 1, backend="lowbit", dynamic=False)
    ok = torch.allclose(g(x), torch.sin(x) + 1, atol=1e-6) and shared_worker() is not w0
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
out["child"] = os.waitstatus_to_exitcode(status)
h = torch.compile(lambda x: torch.cos(x) + 1, backend="lowbit", dynamic=False)
out["parent_after"] = bool(torch.allclose(h(x), torch.cos(x) + 1, atol=1e-6)) and shared_worker() is w0
print(json.dumps(out))
'''


def test_a_forked_child_gets_its_own_worker():
    """The inherited pipes belong to the parent's requests: a child sharing them would mix
    its frames into the parent's."""
    assert _run(FORK) == {"parent": True, "child": 0, "parent_after": True}
