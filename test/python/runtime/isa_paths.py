"""Forcing a kernel ISA in-process, shared by the runtime tests of the low-bit tiles."""
from __future__ import annotations

import contextlib

from lowbit.runtime import current_isa, qgemm, set_isa


@contextlib.contextmanager
def use_isa(name: str):
    """Force an ISA; `amx` also runs AMX tiles from one row and any K-block (by default only
    from qgemm.amx_min_rows() rows and qgemm.amx_min_kblock() values), so every shape of a
    test reaches the AMX path."""
    prev = current_isa()
    set_isa(name)
    rule = (qgemm.amx_min_rows(1), qgemm.amx_min_kblock(1)) if name == "amx" else None
    try:
        yield
    finally:
        if rule is not None:
            qgemm.amx_min_rows(rule[0])
            qgemm.amx_min_kblock(rule[1])
        set_isa(prev)


def tile_isa(isa: str, int8_activations: bool = True) -> str:
    """The path a tile dispatched under `isa` runs: AMX has int8 tiles only."""
    return "avx512" if isa == "amx" and not int8_activations else isa
