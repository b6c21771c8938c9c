"""How many threads compiled code uses, set on the OpenMP runtime that runs its loops.

Compiled `scf.forall` loops become `omp.parallel` regions executed by libiomp5 (loaded by
`lowbit.runtime.load_openmp()`), a different thread pool from PyTorch's own. The count is

    LOWBIT_NUM_THREADS (if set and > 0)  >  set_num_threads(n)  >  torch.get_num_threads()

Counts are bounded by `lowbit.compiler.env.max_num_threads()` (max(1024, 4 x CPUs)):
libiomp5 accepts any count and aborts the whole process ("OMP: Error #34") when it cannot
create the threads, so a bad value must fail here, with an error naming it.

`configure()` pushes that count to libiomp5 (`omp_set_num_threads`) for the calling thread
(an OpenMP setting is per calling thread) and sets a short block time
(`kmp_set_blocktime`): libiomp5's workers stop spinning right after a parallel region, so
they do not compete with torch's pool when eager ops run between compiled calls. It is
cheap when nothing changed (one dict lookup), so call it before every compiled call.
"""
from __future__ import annotations

import threading

from lowbit.compiler import env

_lock = threading.Lock()
_override: int | None = None
_applied: dict[int, tuple[int, int]] = {}   # python thread id -> (threads, blocktime) applied

# Milliseconds libiomp5 workers spin after a region before sleeping. A little spinning
# keeps back-to-back compiled regions cheap; 0 would make every region wake threads.
DEFAULT_BLOCKTIME_MS = 1


class ThreadConfigError(ValueError):
    """LOWBIT_NUM_THREADS or a requested thread count is not an accepted integer."""


class ThreadEnvironmentError(ThreadConfigError, env.EnvironmentVariableError):
    """LOWBIT_NUM_THREADS holds a value outside what it accepts."""


def _env_threads() -> int | None:
    try:
        return env.get("LOWBIT_NUM_THREADS")
    except env.EnvironmentVariableError as e:
        raise ThreadEnvironmentError(str(e)) from None


def set_num_threads(n: int | None) -> None:
    """Threads for compiled code in this process (None: follow torch.get_num_threads())."""
    global _override
    limit = env.max_num_threads()
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limit):
        raise ThreadConfigError(f"thread count must be an int in [1, {limit}] or None, got {n!r}")
    with _lock:
        _override = n


def get_num_threads() -> int:
    """The thread count compiled code will use (see module docstring for the order)."""
    from_env = _env_threads()
    if from_env is not None:
        return from_env
    if _override is not None:
        return _override
    import torch
    return max(1, min(torch.get_num_threads(), env.max_num_threads()))


def configure(blocktime_ms: int = DEFAULT_BLOCKTIME_MS) -> int:
    """Apply the current thread count to libiomp5 for the calling thread; returns it."""
    n = get_num_threads()
    key = threading.get_ident()
    if _applied.get(key) == (n, blocktime_ms):
        return n
    from lowbit.runtime.library import load_openmp
    omp = load_openmp()
    omp.omp_set_num_threads(int(n))
    if hasattr(omp, "kmp_set_blocktime"):  # libiomp5 / LLVM libomp extension
        omp.kmp_set_blocktime(int(blocktime_ms))
    _applied[key] = (n, blocktime_ms)
    return n


def openmp_max_threads() -> int:
    """What the OpenMP runtime will use for the next region started by this thread."""
    from lowbit.runtime.library import load_openmp
    return int(load_openmp().omp_get_max_threads())
