"""The runtime's allocator for compiled code's buffers (memref_alloc.cpp): alignment,
reuse of large blocks across calls (a shared, bounded cache) and of small ones (per thread,
a few per size class), and release."""
from __future__ import annotations

import ctypes
import threading

import pytest
import torch

from lowbit.compiler import threads
from lowbit.compiler.compile import compile_function
from lowbit.runtime.library import load_runtime


@pytest.fixture()
def rt():
    lib = load_runtime()
    lib._mlir_memref_to_llvm_aligned_alloc.restype = ctypes.c_void_p
    lib._mlir_memref_to_llvm_aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    lib._mlir_memref_to_llvm_alloc.restype = ctypes.c_void_p
    lib._mlir_memref_to_llvm_alloc.argtypes = [ctypes.c_size_t]
    lib._mlir_memref_to_llvm_free.argtypes = [ctypes.c_void_p]
    lib.lowbit_rt_cached_memory.restype = ctypes.c_int64
    lib.lowbit_rt_release_cached_memory()
    yield lib
    lib.lowbit_rt_release_cached_memory()


@pytest.mark.parametrize("align", [1, 8, 64, 128, 4096])
@pytest.mark.parametrize("size", [1, 63, 4097, 64 * 1024, 3 * 1024 * 1024 + 5])
def test_alignment_and_writable(rt, align, size):
    p = rt._mlir_memref_to_llvm_aligned_alloc(align, size)
    assert p and p % max(align, 64) == 0
    ctypes.memset(p, 0xAB, size)
    rt._mlir_memref_to_llvm_free(p)
    q = rt._mlir_memref_to_llvm_alloc(size)
    assert q and q % 64 == 0
    rt._mlir_memref_to_llvm_free(q)


def test_large_blocks_are_reused_small_ones_stay_outside_the_shared_cache(rt):
    big = 2 * 1024 * 1024
    p = rt._mlir_memref_to_llvm_aligned_alloc(64, big)
    rt._mlir_memref_to_llvm_free(p)
    assert rt.lowbit_rt_cached_memory() == big
    q = rt._mlir_memref_to_llvm_aligned_alloc(64, big - 100)  # same page-rounded class
    assert q == p and rt.lowbit_rt_cached_memory() == 0
    rt._mlir_memref_to_llvm_free(q)
    small = rt._mlir_memref_to_llvm_alloc(1000)
    rt._mlir_memref_to_llvm_free(small)
    assert rt.lowbit_rt_cached_memory() == big
    rt.lowbit_rt_release_cached_memory()
    assert rt.lowbit_rt_cached_memory() == 0


def test_small_blocks_are_reused_per_thread_a_few_per_class(rt):
    # 900 and 1000 bytes share the 1 KiB class; 16 blocks per class are kept, last freed first.
    p = rt._mlir_memref_to_llvm_alloc(1000)
    rt._mlir_memref_to_llvm_free(p)
    q = rt._mlir_memref_to_llvm_alloc(900)
    assert q == p
    ctypes.memset(q, 0x5A, 1024)
    rt._mlir_memref_to_llvm_free(q)
    blocks = [rt._mlir_memref_to_llvm_alloc(1000) for _ in range(20)]
    assert len(set(blocks)) == 20 and all(b % 64 == 0 for b in blocks)
    for b in blocks:
        rt._mlir_memref_to_llvm_free(b)
    again = [rt._mlir_memref_to_llvm_alloc(1000) for _ in range(16)]
    assert again == blocks[:16][::-1]
    for b in again:
        rt._mlir_memref_to_llvm_free(b)
    # other classes and larger alignments are separate
    r = rt._mlir_memref_to_llvm_alloc(5000)
    assert r not in blocks[:16]  # the cached ones (the last 4 went back to malloc)
    rt._mlir_memref_to_llvm_free(r)
    assert rt._mlir_memref_to_llvm_aligned_alloc(128, 1000) not in blocks[:16]


def test_a_small_block_freed_by_another_thread_is_reused_there(rt):
    got = {}

    def worker():
        got["p"] = rt._mlir_memref_to_llvm_alloc(3000)
        # this thread's cache holds one block of another class, released at its exit
        rt._mlir_memref_to_llvm_free(rt._mlir_memref_to_llvm_alloc(100))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    rt._mlir_memref_to_llvm_free(got["p"])
    assert rt._mlir_memref_to_llvm_alloc(2500) == got["p"]


def test_compiled_graph_reuses_its_buffers(rt, monkeypatch):
    # One thread: with two, per-task buffers of a parallel loop may be live at once in
    # one call and not in another, so the cache's size would depend on timing.
    monkeypatch.setenv("LOWBIT_NUM_THREADS", "1")
    threads.configure()

    def f(x):  # [16, 128, 256] intermediates of 2 MiB each
        return torch.softmax(x * 0.5, -1) + torch.exp(x)

    x = torch.randn(16, 128, 256)
    compiled = compile_function(f, [x])
    want = f(x)
    torch.testing.assert_close(compiled(x)[0], want)
    held = rt.lowbit_rt_cached_memory()
    assert held > 0
    for _ in range(3):
        torch.testing.assert_close(compiled(x)[0], want)
        assert rt.lowbit_rt_cached_memory() == held  # steady state: nothing new allocated
    monkeypatch.delenv("LOWBIT_NUM_THREADS")
    threads.configure()
