"""benchmarks/peaks.py's native loops: they run, count what they claim, and report AMX
honestly. (Rates are only sanity-checked: the machine is shared.)"""
import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

from lowbit.runtime import cpu_features

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import peaks  # noqa: E402

needs_avx512 = pytest.mark.skipif(not {"avx512f", "avx512_vnni", "avx512vl"} <= cpu_features(),
                                  reason="the peak loops need AVX-512 F/VL/VNNI")


def test_unknown_kind_and_bad_arguments_are_rejected():
    lib = peaks.native()
    assert lib.lowbit_qbench_peak(7, 10, 1, None) == -1
    assert lib.lowbit_qbench_peak(0, 10, 0, None) == -1
    buf = np.ones(64, np.uint64)
    assert lib.lowbit_qbench_read(buf.ctypes.data, 8, 2, 1) == -1


@needs_avx512
def test_measure_reports_every_peak_and_amx_honestly():
    res = peaks.measure(rounds=1, burst_ms=2, bandwidth=False, log=lambda *a: None)
    feats = cpu_features()
    for name, (_, _, need, _) in peaks.KINDS.items():
        entry = res["peaks"][name]
        if need <= feats:
            for t in (1, 2):
                rate = entry[f"{t}t"]["mac_per_s"]["median"]
                ipc = entry[f"{t}t"]["instructions_per_cycle_per_core"]["median"]
                assert rate > 1e9, (name, t, rate)
                # a pipe count, not a timing artefact; a tile instruction takes >= 16 cycles
                lo, hi = (0.005, 1) if name.startswith("amx") else (0.2, 8)
                assert lo < ipc < hi, (name, t, ipc)
        else:
            assert "absent" in entry
    for name in ("amx_int8", "amx_bf16"):
        if name not in feats:
            assert "absent" in res["peaks"][name] and "lacks" in res["peaks"][name]["absent"]
    assert 0.5e9 < res["clock_hz"][1]["median"] < 7e9
    table = peaks.format_table(res)
    for name in ("amx_int8", "amx_bf16"):
        line = next(line for line in table.splitlines() if line.startswith(name))
        assert ("absent" in line) == (name not in feats), line


@needs_avx512
def test_each_thread_gets_its_cpu_time():
    lib = peaks.native()
    cpu = (ctypes.c_int64 * 2)()
    wall = lib.lowbit_qbench_peak(0, 20000, 2, cpu)
    assert wall > 0 and cpu[0] > 0 and cpu[1] > 0
    # 24 x 20000 vpdpbusd per thread cannot take less than 20000 * 24 / 8 cycles at 8 GHz
    assert min(cpu) > 20000 * 24 / 8 / 8


def test_read_probe_reads_the_buffer():
    lib = peaks.native()
    buf = np.ones((4 << 20) // 8, np.uint64)
    ns = lib.lowbit_qbench_read(buf.ctypes.data, buf.nbytes, 2, 3)
    assert ns > 0
    gbs = 3 * buf.nbytes / ns
    assert 0.1 < gbs < 2000
