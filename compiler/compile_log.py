"""Compile-time visibility: what compiled, how often, and where the time went.

Every stage of the pipeline, every binding and every graph compile logs its wall time and the
process's resident/peak memory to the `lowbit.compile` logger (INFO). `LOWBIT_LOG=compile` (or `LOWBIT_LOG=debug` for every lowbit
logger) sends those records to stderr; applications can configure the logger themselves.
Long compiles show a progress bar (tqdm, only once a compile has run for a few seconds).

`counters` counts, per process: `backend_compiles` (calls that compiled: dynamo handing a
graph to the backend, or a new input signature), `pipelines` (MLIR pipeline runs, i.e. one
per compiled graph or region), `region_reuses` (regions served by already compiled code).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import resource
import sys
import time

log = logging.getLogger("lowbit.compile")
counters: collections.Counter = collections.Counter()
PROGRESS_DELAY_S = 3.0

_configured = False


def configure_from_env() -> None:
    """Apply `LOWBIT_LOG` once: "compile" (compile timings) or "debug" (all lowbit loggers)."""
    global _configured
    if _configured:
        return
    _configured = True
    value = os.environ.get("LOWBIT_LOG", "").strip().lower()
    if not value:
        return
    if value not in ("compile", "debug", "info"):
        raise ValueError(f"LOWBIT_LOG={value!r}: expected 'compile', 'info' or 'debug'")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    target = log if value == "compile" else logging.getLogger("lowbit")
    target.addHandler(handler)
    target.setLevel(logging.DEBUG if value == "debug" else logging.INFO)
    target.propagate = False  # one line per record, whatever the root logger does


def memory() -> tuple[float, float]:
    """(resident, peak resident) of this process in GiB."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        rss = 0
    return rss / 2**30, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextlib.contextmanager
def timed(what: str):
    """Log `what`, its wall time and the process's memory when the block ends (also on error)."""
    configure_from_env()
    start = time.perf_counter()
    try:
        yield
    finally:
        if log.isEnabledFor(logging.INFO):
            rss, peak = memory()
            log.info("%s: %.2f s (rss %.2f GiB, peak %.2f GiB)", what, time.perf_counter() - start, rss, peak)


def progress(items, desc: str, total: int | None = None):
    """`items`, with a progress bar on stderr if iterating takes longer than a few seconds."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; an environment without it just shows no bar
        return items
    return tqdm(items, desc=desc, total=total, delay=PROGRESS_DELAY_S, leave=False, file=sys.stderr,
                disable=None)
