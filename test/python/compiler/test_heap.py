"""`lowbit.compiler.heap.release` returns freed heap memory to the OS (glibc's malloc_trim).

Runs in a subprocess: the measured process must not share its heap with pytest's."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch
    from lowbit.compiler import heap

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    # Freeing one mmapped 3 MB block raises glibc's mmap threshold above 3 MB, so the next
    # ones come from the heap: freed in between kept ones, they stay resident (fragmentation).
    first = torch.ones(3_000_000, dtype=torch.uint8)
    del first
    blocks = [torch.ones(3_000_000, dtype=torch.uint8) for _ in range(100)]
    kept = blocks[::10]
    del blocks
    before = rss_mib()
    ok = heap.release()
    print(ok, before, rss_mib(), len(kept))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures /proc/self/statm and glibc")
def test_release_returns_freed_heap_pages():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, before, after, _ = out.stdout.split()
    assert ok == "True"
    # 90 freed 3 MB blocks (~257 MiB) in the heap: most of them go back
    assert float(before) - float(after) > 150, out.stdout
