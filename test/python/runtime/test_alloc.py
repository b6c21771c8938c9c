"""The runtime's allocator for compiled code's buffers (memref_alloc.cpp): alignment,
reuse of large blocks across calls, a bounded cache, and release."""
from __future__ import annotations

import ctypes

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


def test_large_blocks_are_reused_small_are_not_cached(rt):
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
