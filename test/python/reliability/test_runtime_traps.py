"""Run-time faults of compiled code raise eager's exception (passes/guard_traps.py).

Before: integer division or remainder by zero (trunc div, remainder, fmod) killed the
process with SIGFPE, floor division divided by 1 instead of raising, embedding/gather
aborted the process through torch-mlir's `cf.assert`, and index_select / `w[i]` read out of
bounds. Each scenario runs in a subprocess, so a regression fails a test instead of killing
pytest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


def _run(script: str, timeout: int = 900) -> dict:
    env = dict(os.environ, LOWBIT_CACHE="0")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"the process died ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


DIVISION = r'''
import json, threading, warnings, torch, lowbit
warnings.simplefilter("error", UserWarning)  # an eager fallback would make the test vacuous

def ops(x, y):
    return (torch.div(x, y, rounding_mode="trunc"), torch.div(x, y, rounding_mode="floor"),
            torch.remainder(x, y), torch.fmod(x, y), x // y)

def eager_or_error(f, *a):
    try:
        return f(*a), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"

out = {}
g = torch.Generator().manual_seed(0)
for dt in (torch.int8, torch.int16, torch.int32, torch.int64):
    info = torch.iinfo(dt)
    compiled = torch.compile(ops, backend="lowbit", dynamic=False)
    for n in (37, 5):
        x = torch.randint(info.min, info.max, (n,), dtype=torch.int64, generator=g).to(dt)
        y = torch.randint(1, 100, (n,), dtype=torch.int64, generator=g).to(dt)
        y = torch.where(torch.arange(n) % 2 == 0, y, -y)
        # INT_MIN / -1 at position 0: eager wraps floor division to INT_MIN and gives remainder
        # and fmod 0 (its own trunc division traps there for int32/int64, so eager is compared
        # on the other positions); compiled code wraps trunc division to INT_MIN as well.
        x[0], y[0] = info.min, -1
        got = compiled(x, y)
        want = ops(x[1:], y[1:])
        out[f"{dt} n={n} values"] = [bool(torch.equal(a[1:], b)) for a, b in zip(got, want)]
        out[f"{dt} n={n} min/-1 values"] = [int(a[0]) == v for a, v in zip(got, (info.min, info.min, 0, 0, info.min))]
        y0 = y.clone(); y0[n // 2] = 0
        _, eager_err = eager_or_error(ops, x[1:], y0[1:])
        _, compiled_err = eager_or_error(compiled, x, y0)
        out[f"{dt} n={n} zero"] = [eager_err, compiled_err]
        # the graph still works after it raised
        out[f"{dt} n={n} again"] = bool(torch.equal(compiled(x, y)[2][1:], want[2]))

scalar = torch.compile(lambda x: x // 0, backend="lowbit", dynamic=False)
out["scalar zero"] = [eager_or_error(lambda x: x // 0, torch.arange(5))[1], eager_or_error(scalar, torch.arange(5))[1]]

# dynamic lengths: one compile, the guard holds for every length
dyn = torch.compile(torch.fmod, backend="lowbit", dynamic=True)
res = []
for n in (5, 37, 64):
    x = torch.arange(n, dtype=torch.int32) - 7
    y = torch.arange(n, dtype=torch.int32) % 5 + 1
    res.append(bool(torch.equal(dyn(x, y), torch.fmod(x, y))))
    y[-1] = 0
    res.append(eager_or_error(dyn, x, y)[1])
out["dynamic"] = res

# threads: only the call that divides by zero raises
f = torch.compile(lambda x, y: torch.remainder(x, y) + 1, backend="lowbit", dynamic=False)
x = torch.arange(-50, 50, dtype=torch.int32)
good, bad = torch.arange(1, 101, dtype=torch.int32), torch.arange(0, 100, dtype=torch.int32)
want = torch.remainder(x, good) + 1
f(x, good)
errors = {0: 0, 1: 0}; wrong = [0]
def worker(i):
    for _ in range(40):
        try:
            r = f(x, bad if i == 0 else good)
            if i == 0 or not torch.equal(r, want):
                wrong[0] += 1
        except RuntimeError as e:
            errors[0 if i == 0 else 1] += 1
ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
out["threads"] = [errors[0], errors[1], wrong[0]]
print(json.dumps(out))
'''


def test_integer_division_by_zero_raises_as_eager_and_edge_values_match():
    out = _run(DIVISION)
    for key, value in out.items():
        if key.endswith("values"):
            assert all(value), (key, value)
        elif key.endswith("zero"):
            eager_err, compiled_err = value
            assert eager_err == "RuntimeError: ZeroDivisionError" and compiled_err == eager_err, (key, value)
        elif key.endswith("again"):
            assert value, key
    assert out["dynamic"] == [True, "RuntimeError: ZeroDivisionError"] * 3, out["dynamic"]
    assert out["threads"] == [40, 0, 0], out["threads"]


INDEXING = r'''
import json, warnings, torch, lowbit
warnings.simplefilter("error", UserWarning)
g = torch.Generator().manual_seed(1)
cases = {
    "embedding": lambda w, i: torch.nn.functional.embedding(i, w),
    "gather": lambda w, i: torch.gather(w, 0, i[:, None].expand(-1, w.shape[1])),
    "index_select": lambda w, i: torch.index_select(w, 0, i),
    "index_select_dim1": lambda w, i: torch.index_select(w.t(), 1, i),
    "getitem": lambda w, i: w[i] * 2,
}
out = {}
for name, f in cases.items():
    for rows in (10, 33):
        w = torch.randn(rows, 5, generator=g)
        compiled = torch.compile(f, backend="lowbit", dynamic=False)
        ok = torch.tensor([0, rows - 1, 3, -1 if name == "getitem" else 2])
        out[f"{name} {rows} valid"] = bool(torch.equal(compiled(w, ok), f(w, ok)))
        for bad in ([0, rows, 1, 2], [0, -rows - 1, 1, 2], [0, 1 << 40, 1, 2]):
            idx = torch.tensor(bad)
            try:
                f(w, idx)
                eager = None
            except (IndexError, RuntimeError) as e:
                eager = type(e).__name__
            try:
                compiled(w, idx)
                got = None
            except (IndexError, RuntimeError) as e:
                got = type(e).__name__
            out[f"{name} {rows} {bad[1]}"] = [eager, got]
print(json.dumps(out))
'''


def test_out_of_range_indices_raise_instead_of_aborting_or_reading_out_of_bounds():
    out = _run(INDEXING)
    for key, value in out.items():
        if key.endswith("valid"):
            assert value, key
        else:
            eager, got = value
            assert eager is not None, key  # eager rejects every one of these
            assert got == "IndexError", (key, value)
