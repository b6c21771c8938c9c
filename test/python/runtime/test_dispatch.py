"""Kernel-table dispatch: repeated descriptions are cheap, stable and thread-safe.

Compiled code calls lowbit_qgemm_dispatch / lowbit_brgemm_dispatch at run time (the token
count M of a call selects the tile shape), from several threads at once.
"""
import ctypes
import threading

import numpy as np
import pytest

from lowbit.runtime import qgemm as Q
from lowbit.runtime.brgemm import _lib as _brgemm_lib  # noqa: F401  (signatures)

QW_TERNARY, QT_INT8, QT_F32 = 1, 1, 2
E_TABLE_FULL = 6


def _qgemm_descs(m_values, n=256, kblock=2048, ldc_extra=0):
    _, kbb, nbb, nkb = Q.packed_layout("ternary", n, kblock, kblock)
    rows = [[QW_TERNARY, QT_INT8, QT_F32, m, n, kblock, kblock, nbb, n + ldc_extra, kblock, kbb,
             nkb, 0] for m in m_values]
    return np.ascontiguousarray(np.array(rows, dtype=np.int64))


def _brgemm_descs(m_values, n=64, k=128, ldc_extra=0):
    rows = [[1, m, n, k, k, n, n + ldc_extra, m * k, k * n, 0, 0, 0, 0] for m in m_values]
    return np.ascontiguousarray(np.array(rows, dtype=np.int64))


def _run(kind, descs, rounds):
    handles = np.zeros(len(descs), dtype=np.int64)
    rc = Q._lib().lowbit_qbench_dispatch(kind, descs.ctypes.data, len(descs), rounds,
                                         handles.ctypes.data)
    return rc, handles


@pytest.mark.parametrize("kind", [0, 1], ids=["qgemm", "brgemm"])
def test_more_distinct_descriptions_than_the_old_table_and_stable_handles(kind):
    # The old qgemm table held 4096 descriptions; dynamic M alone can exceed that.
    make = _qgemm_descs if kind == 0 else _brgemm_descs
    descs = make(range(1, 6001), ldc_extra=7 + kind)
    rc, handles = _run(kind, descs, rounds=3)
    assert rc >= 0, f"dispatch failed with {rc}"
    assert len(set(handles.tolist())) == len(descs)
    assert (handles > 0).all()
    # A second pass (another call site, same descriptions) gets the very same handles.
    rc2, again = _run(kind, descs, rounds=2)
    assert rc2 >= 0 and (again == handles).all()


def test_dispatched_handles_run_after_many_inserts():
    rng = np.random.default_rng(0)
    q = rng.integers(-1, 2, size=(64, 256)).astype(np.int8)
    pw = Q.pack_weight(q, np.ones((64, 1), np.float32), "ternary", kblock=256)
    descs = _qgemm_descs(range(1, 300), n=64, kblock=256, ldc_extra=3)
    rc, handles = _run(0, descs, rounds=1)
    assert rc >= 0
    k = Q.dispatch_for(pw, m=5)
    import torch
    x = torch.randn(5, 256)
    xq, s, rs = Q.quantize_activations(x, 256)
    c = torch.empty(5, 64)
    k(xq, pw.data, c, count=1, a_scale=s, a_sum=rs)
    ref = (xq.double() @ torch.from_numpy(q).double().T) / s.double()[:, None]
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", [0, 1], ids=["qgemm", "brgemm"])
def test_concurrent_first_dispatches_agree(kind):
    # 4 threads race to insert the same 1500 new descriptions (each in a rotated order per
    # round, so inserts interleave), then keep re-dispatching them: every thread must see
    # one handle per description, the same in every thread and round.
    make = _qgemm_descs if kind == 0 else _brgemm_descs
    descs = make(range(1, 1501), ldc_extra=101 + kind)
    results = [None] * 4

    def work(t):
        results[t] = _run(kind, descs, rounds=40)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rc, handles in results:
        assert rc >= 0, f"dispatch failed or a handle changed between rounds ({rc})"
        assert (handles == results[0][1]).all()
    assert len(set(results[0][1].tolist())) == len(descs)


def test_invalid_descriptions_are_not_cached():
    bad = _qgemm_descs([0])  # m = 0
    for _ in range(2):
        rc, _ = _run(0, bad, rounds=1)
        assert rc == -2  # -LOWBIT_E_SHAPE every time


def test_repeated_dispatch_is_fast(capsys):
    # A repeated description is one hash probe: well under a microsecond (the old
    # linear scan of the table took ~10-40 us once it was full). Measured with the table
    # holding thousands of entries (earlier tests in this process add more).
    descs = _qgemm_descs(range(1, 129), ldc_extra=11)
    _run(0, _qgemm_descs(range(1, 5000), ldc_extra=13), rounds=1)
    per_call = []
    for _ in range(5):
        rc, _ = _run(0, descs, rounds=201)
        assert rc >= 0
        per_call.append(rc / (200 * len(descs)))
    ns = float(np.median(per_call))
    with capsys.disabled():
        print(f"\nrepeated lowbit_qgemm_dispatch: {ns:.1f} ns/call (median of 5 x 25600)")
    assert ns < 1000


def test_dispatch_and_invoke_from_many_threads_match_one_thread():
    """Compiled code dispatches a tile per call (dynamic M) and invokes it from several
    threads at once: results equal the single-threaded ones bit for bit."""
    import torch
    rng = np.random.default_rng(3)
    n, k = 200, 300
    q = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    pw = Q.pack_weight(q, np.full((n,), 0.5, np.float32), "ternary", kblock=100)
    xs = {m: torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)) for m in (1, 2, 5, 7, 13, 31)}
    want = {m: Q.qlinear(x, pw) for m, x in xs.items()}
    errors = []

    def work(t):
        try:
            for i in range(60):
                m = list(xs)[(t + i) % len(xs)]
                xq, sx, rs = Q.quantize_activations(xs[m], pw.kblock)
                y = torch.empty(m, n)
                Q.dispatch_for(pw, m)(xq, pw.data, y, count=pw.num_kblocks, a_scale=sx, a_sum=rs)
                if not torch.equal(y, want[m]):
                    errors.append((t, i, m))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append((t, repr(e)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
