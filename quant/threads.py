"""torch's intra-op pool pinned to the calling thread for work made of many small tensor ops.

Quantizing a model (`quantize_`) and binding its weights (`lowbit.compiler.bind`) are long
series of memory-bound ops of a few milliseconds each. With torch's pool of 2+ threads, every
such op is a parallel region whose barrier waits for each worker; on a machine whose cores
are busy with other processes a worker is often descheduled, and each op then waits for the
scheduler. Measured on 2 cores at load ~16: the demo preset's `quantize_` took 11-49 s with 2
threads and 0.23-0.25 s with 1; binding 2 layers of 2B4T width 22-28 s vs 2.3-2.9 s. On a
quiet machine one thread costs ~1.35x for the 953M model's `quantize_` (2.1 s vs 1.5-1.65 s).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)`` and restore the count afterwards.

    The setting is process-wide while the block runs: torch ops of other Python threads run on
    one thread meanwhile."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
