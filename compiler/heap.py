"""Give memory a compile freed back to the operating system.

A compile allocates and frees many mid-sized buffers (weight codes while packing, fake and
real tensors while capturing, IR text). glibc's malloc keeps freed chunks in its heap
instead of returning them, so a process's resident size after compiling stays near its
compile-time peak although the memory is free. `release()` asks glibc to return free pages
(`malloc_trim(0)`, which also releases pages in the middle of the heap); it is a no-op
where the C library has no `malloc_trim` (musl, macOS).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("lowbit.compile")


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release() -> bool:
    """Return free heap pages to the OS; True if the C library supports it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
