"""Environment variables: every LOWBIT_* value is validated by lowbit.compiler.env, and a bad one
raises an error naming the variable, its value and the accepted values -- never a deep
"invalid literal for int()", a silent eager fallback or an aborted process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lowbit.compiler import env, threads
from lowbit.compiler.target import Target, host_target

GOOD = [
    ("LOWBIT_TARGET", "l1=48K,l2=1M,l3=32M,cores=2", {"l1d": 48 << 10, "l2": 1 << 20, "l3": 32 << 20, "cores": 2}),
    ("LOWBIT_TARGET", " L2 = 1.5MiB , cores=8 ", {"l2": 3 << 19, "cores": 8}),
    ("LOWBIT_TARGET", "l3=32768", {"l3": 32768}),
    ("LOWBIT_NUM_THREADS", "0", None),
    ("LOWBIT_NUM_THREADS", "3", 3),
    ("LOWBIT_NUM_THREADS", "1024", 1024),
    ("LOWBIT_ISA", "AVX2", "avx2"),
    ("LOWBIT_ISA", "scalar", "scalar"),
    ("LOWBIT_REPORT", "1", True),
    ("LOWBIT_REPORT", "off", False),
    ("LOWBIT_DISABLE_PASSES", "lowbit-fuse-qlinear-epilogue", frozenset({"lowbit-fuse-qlinear-epilogue"})),
    ("LOWBIT_LOG", "Compile", "compile"),
    ("LOWBIT_ALLOC_CACHE_MB", "0", 0),
    ("LOWBIT_ALLOC_CACHE_MB", "2048", 2048),
]

BAD = [
    ("LOWBIT_TARGET", "ABC", "bad item 'ABC'"),
    ("LOWBIT_TARGET", "l1=ABC", "'ABC' is not a size"),
    ("LOWBIT_TARGET", "l2=0", "must be > 0"),
    ("LOWBIT_TARGET", "l4=1M", "key one of l1, l2, l3, cores"),
    ("LOWBIT_TARGET", "cores=two", "cores='two'"),
    ("LOWBIT_TARGET", "cores=0", "cores='0'"),
    ("LOWBIT_TARGET", "l1=48K,l1=32K", "given twice"),
    ("LOWBIT_TARGET", "l1=-48K", "is not a size"),
    ("LOWBIT_NUM_THREADS", "two", "not a non-negative integer"),
    ("LOWBIT_NUM_THREADS", "-1", "not a non-negative integer"),
    ("LOWBIT_NUM_THREADS", "1.5", "not a non-negative integer"),
    ("LOWBIT_NUM_THREADS", "99999", "more than the maximum"),
    ("LOWBIT_ISA", "avx1024", "not an ISA lowbit knows"),
    ("LOWBIT_REPORT", "maybe", "not a boolean"),
    ("LOWBIT_DISABLE_PASSES", "lowbit-no-such-pass", "unknown lowbit pass"),
    ("LOWBIT_LOG", "verbose", "not a log selection"),
    ("LOWBIT_ALLOC_CACHE_MB", "abc", "not an integer"),
    ("LOWBIT_ALLOC_CACHE_MB", "-5", "not an integer"),
]


@pytest.mark.parametrize("name,raw,value", GOOD)
def test_accepted_values(monkeypatch, name, raw, value):
    monkeypatch.setenv(name, raw)
    assert env.get(name) == value


@pytest.mark.parametrize("name,raw,why", BAD)
def test_rejected_values_name_the_variable_and_the_accepted_values(monkeypatch, name, raw, why):
    monkeypatch.setenv(name, raw)
    with pytest.raises(env.EnvironmentVariableError) as e:
        env.get(name)
    msg = str(e.value)
    assert msg.startswith(f"{name}={raw!r} is not valid") and why in msg
    assert "Accepted: " + env.VARIABLES[name].accepted in msg
    with pytest.raises(env.EnvironmentVariableError):
        env.validate()


def test_unset_and_blank_give_defaults(monkeypatch):
    for name, var in env.VARIABLES.items():
        monkeypatch.delenv(name, raising=False)
        assert env.get(name) == var.default
        monkeypatch.setenv(name, "  ")
        assert env.get(name) == var.default


def test_every_lowbit_variable_the_code_reads_is_documented():
    """grep the sources for LOWBIT_<NAME> read from the environment: each is in env.VARIABLES."""
    import re
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    pattern = re.compile(r"""(?:environ(?:\.get)?\(?\[?|getenv\()\s*["'](LOWBIT_[A-Z0-9_]+)["']""")
    found = set()
    for top in ("compiler", "passes", "runtime", "quant", "lowbit", "benchmarks", "setup.py"):
        path = os.path.join(root, top)
        files = [path] if path.endswith(".py") else [
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".py", ".cpp", ".h"))]
        for f in files:
            with open(f, errors="replace") as fh:
                found |= set(pattern.findall(fh.read()))
    assert found, "the pattern found nothing: the test is broken"
    assert found <= set(env.VARIABLES), sorted(found - set(env.VARIABLES))


def test_malformed_target_raises_from_host_target(monkeypatch):
    """Before: ValueError "invalid literal for int() with base 10: 'ABC'" deep in a pass."""
    monkeypatch.setenv("LOWBIT_TARGET", "cores=ABC")
    with pytest.raises(env.EnvironmentVariableError, match=r"^LOWBIT_TARGET='cores=ABC' is not valid"):
        host_target()
    monkeypatch.setenv("LOWBIT_TARGET", "l2=2M,cores=3")
    t = host_target()
    assert t.l2 == 2 << 20 and t.cores == 3
    with pytest.raises(ValueError, match="bad target description 'l9=1'"):
        Target.from_spec("l9=1")
    assert Target.from_spec("l1=64K", Target()).l1d == 64 << 10


def test_thread_count_is_bounded(monkeypatch):
    monkeypatch.setenv("LOWBIT_NUM_THREADS", "99999")
    with pytest.raises(threads.ThreadConfigError, match="LOWBIT_NUM_THREADS='99999'.*maximum"):
        threads.get_num_threads()
    with pytest.raises(threads.ThreadConfigError, match="LOWBIT_NUM_THREADS"):
        threads.configure()
    monkeypatch.delenv("LOWBIT_NUM_THREADS")
    for bad in (0, 99999, True, 2.0):
        with pytest.raises(threads.ThreadConfigError):
            threads.set_num_threads(bad)
    assert env.max_num_threads() >= 1024


def _run(code: str, **extra_env) -> subprocess.CompletedProcess:
    e = dict(os.environ, **extra_env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=e)


COMPILED_CALL = """
    import torch, lowbit
    m = torch.nn.Linear(8, 4)
    c = torch.compile(m, backend="lowbit")
    try:
        with torch.no_grad():
            c(torch.randn(2, 8))
        print("RAN")
    except Exception as e:
        print("RAISED", type(e).__name__, e)
"""


def test_huge_thread_count_raises_instead_of_aborting_the_process():
    """Before: the first compiled call aborted the process with OMP: Error #34."""
    proc = _run(COMPILED_CALL, LOWBIT_NUM_THREADS="99999")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "OMP: Error" not in proc.stderr
    assert "RAISED" in proc.stdout and "LOWBIT_NUM_THREADS='99999'" in proc.stdout, proc.stdout


def test_malformed_target_reaches_the_user_through_torch_compile():
    proc = _run(COMPILED_CALL, LOWBIT_TARGET="l1=ABC")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RAISED" in proc.stdout and "LOWBIT_TARGET='l1=ABC' is not valid" in proc.stdout, proc.stdout


def test_env_command_prints_the_table_and_checks_the_environment():
    ok = subprocess.run([sys.executable, "-m", "lowbit.compiler.env"], capture_output=True, text=True,
                        timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")})
    assert ok.returncode == 0 and "| `LOWBIT_TARGET` |" in ok.stdout and "no LOWBIT_* set" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lowbit.compiler.env"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, LOWBIT_ALLOC_CACHE_MB="lots"))
    assert bad.returncode == 1 and "LOWBIT_ALLOC_CACHE_MB='lots' is not valid" in bad.stderr
