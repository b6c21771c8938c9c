"""Differential OpInfo suite: PyTorch's op database through torch.compile(backend="lowbit") vs eager.

The CI subset (21 op/dtype pairs over every category, ~30-90 s on 2 cores) runs by default;
the full run (every elementwise, reduction, matmul, view/index and normalization OpInfo in
float32/bfloat16/int64, two samples each) is marked `slow`:

    python -m pytest -q test/python/reliability/test_opinfo.py                 # CI subset
    python -m pytest -q -m slow test/python/reliability/test_opinfo.py         # full run
    python test/python/reliability/opinfo_runner.py --full --json out.json     # full, with a table

Every wrong answer, error or crash fails the test unless `opinfo_runner.EXPECTED` explains it.
Results and the fallback list: docs/reliability.md.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("expecttest", reason="torch's OpInfo database needs the expecttest package "
                    "(pip install expecttest; part of the test extras)")

import opinfo_runner as runner  # noqa: E402


def _check(results):
    assert results, "no cases ran"
    bad = [r for r in results if r["outcome"] in ("wrong", "error", "crash") and not runner.expected_reason(r["case"])]
    assert not bad, "\n".join(f"{r['outcome']}: {r['case']}: {r.get('detail', '')}" for r in bad)


def test_ci_subset():
    cases = runner.select("ci", 1)
    assert len(cases) == len(runner.CI_SUBSET)
    results = runner.run(cases)
    _check(results)
    # the subset is chosen so that lowbit compiles every case itself
    not_compiled = [r["case"] for r in results if r["outcome"] != "pass"]
    assert not not_compiled, not_compiled


@pytest.mark.slow
def test_full_opinfo_run():
    _check(runner.run(runner.select("full", 2)))


def test_comparison_catches_differences():
    """The comparison the suite relies on is not vacuous."""
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert runner._compare(a.clone(), a, "float32") is None
    assert "max abs diff" in runner._compare(a + 1e-3, a, "float32")
    assert runner._compare(a.to(torch.float64), a, "float32").startswith("output 0: torch.float64")
    assert "differs at" in runner._compare(torch.tensor([1, 2]), torch.tensor([1, 3]), "int64")
    assert "structure" in runner._compare((a, a), a, "float32")
    assert runner._compare(torch.tensor([1.0, 2.0]).bfloat16(), torch.tensor([1.0, 2.004]).bfloat16(), "bfloat16") is None


def test_a_crashing_case_is_reported_not_fatal(monkeypatch):
    """A worker that dies inside a case yields outcome 'crash' for it, and the rest still run."""
    import subprocess
    import sys
    real_popen = subprocess.Popen

    def popen(cmd, **kw):  # the worker segfaults when it reaches the 2nd case
        code = ("import os, sys, json\n"
                "for c in sys.argv[1:]:\n"
                "    print('START ' + c, flush=True)\n"
                "    if c == 'b': os.kill(os.getpid(), 11)\n"
                "    print('RESULT ' + json.dumps({'case': c, 'outcome': 'pass'}), flush=True)\n")
        return real_popen([sys.executable, "-c", code, *cmd[3:]], **kw)
    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    results = runner.run(["a", "b", "c"])
    assert [r["outcome"] for r in results] == ["pass", "crash", "pass"]
    assert "-11" in results[1]["detail"]
