"""Memory of a running process, read from `/proc/<pid>/status` (shared by the benchmarks
that watch child processes: scale.py, e2e.py)."""
from __future__ import annotations


def status_bytes(pid: int | str, field: str = "VmRSS") -> int:
    """`field` (VmRSS: resident now, VmHWM: peak resident) of process `pid` in bytes; 0 if
    the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
