"""The compile cache's weight digest (native XXH64 pair, `compile_cache.fast_digest`) and its
per-process memo: the reference algorithm, sensitivity to every change, and that a weight
changed in any way between two compiles misses the whole-program cache instead of reusing
packed buffers derived from the old weights."""
import random

import pytest
import torch

from lowbit.compiler import compile_cache
from lowbit.compiler.compile_log import counters

M = (1 << 64) - 1
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
                      0x27D4EB2F165667C5)


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M


def _round(acc, v):
    return (_rotl((acc + v * P2) & M, 31) * P1) & M


def xxh64_reference(data: bytes, seed: int) -> int:
    """XXH64 written from its specification (xxhash_spec.md), in plain Python."""
    n, p = len(data), 0
    if n >= 32:
        v = [(seed + P1 + P2) & M, (seed + P2) & M, seed, (seed - P1) & M]
        while p + 32 <= n:
            for i in range(4):
                v[i] = _round(v[i], int.from_bytes(data[p + 8 * i:p + 8 * i + 8], "little"))
            p += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M
        for x in v:
            h = ((h ^ _round(0, x)) * P1 + P4) & M
    else:
        h = (seed + P5) & M
    h = (h + n) & M
    while p + 8 <= n:
        h ^= _round(0, int.from_bytes(data[p:p + 8], "little"))
        h = (_rotl(h, 27) * P1 + P4) & M
        p += 8
    if p + 4 <= n:
        h ^= (int.from_bytes(data[p:p + 4], "little") * P1) & M
        h = (_rotl(h, 23) * P2 + P3) & M
        p += 4
    while p < n:
        h ^= (data[p] * P5) & M
        h = (_rotl(h, 11) * P1) & M
        p += 1
    h ^= h >> 33
    h = (h * P2) & M
    h ^= h >> 29
    h = (h * P3) & M
    return h ^ (h >> 32)


def test_reference_matches_published_vectors():
    # XXH64 of "", "a", "abc" with seed 0 (xxHash's own sanity values)
    assert xxh64_reference(b"", 0) == 0xEF46DB3751D8E999
    assert xxh64_reference(b"a", 0) == 0xD24EC4F1A98C6E5B
    assert xxh64_reference(b"abc", 0) == 0x44BC2CF5AD770999


def test_native_digest_is_two_xxh64():
    rng = random.Random(5)
    for n in list(range(0, 70)) + [127, 128, 129, 1000, 4099]:
        data = bytes(rng.randrange(256) for _ in range(n))
        want = f"{xxh64_reference(data, compile_cache._SEEDS[0]):016x}{xxh64_reference(data, compile_cache._SEEDS[1]):016x}"
        assert compile_cache.fast_digest(data) == want, n
        # by address, from an unaligned offset inside a larger buffer
        buf = torch.frombuffer(bytearray(b"\0" * 3 + data), dtype=torch.uint8)
        assert compile_cache.fast_digest(buf.data_ptr() + 3, n) == want


def test_every_bit_flip_changes_the_digest():
    data = bytearray(torch.randint(0, 256, (4096 + 13,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)).numpy().tobytes())
    base = compile_cache.fast_digest(bytes(data))
    seen = {base}
    for pos in range(0, len(data), 97):
        for bit in (0, 7):
            data[pos] ^= 1 << bit
            seen.add(compile_cache.fast_digest(bytes(data)))
            data[pos] ^= 1 << bit
    assert len(seen) == 1 + 2 * len(range(0, len(data), 97))
    assert compile_cache.fast_digest(bytes(data)) == base
    assert compile_cache.fast_digest(bytes(data[:-1])) != base  # length matters
    with pytest.raises(ValueError, match="nbytes"):
        compile_cache.fast_digest(0)


def test_state_digest_covers_dtype_shape_and_layout():
    t = torch.arange(12, dtype=torch.float32)
    d = compile_cache._state_bytes_digest
    assert d(t) != d(t.view(3, 4)) != d(t.view(torch.int32))
    assert d(t.view(3, 4).t()) == d(t.view(3, 4).t().contiguous())  # logical order
    assert d(t.view(3, 4).t()) != d(t.view(4, 3))


@pytest.mark.parametrize("change", ["inplace", "view", "set_", "data_assign", "resize"])
def test_memo_notices_every_change(change):
    p = torch.nn.Parameter(torch.randn(64, 33), requires_grad=False)
    before = compile_cache._state_digest(p)
    assert compile_cache._state_digest(p) == before  # memo hit
    with torch.no_grad():
        if change == "inplace":
            p.mul_(2)
        elif change == "view":
            p[3, 4:9].add_(1)                   # through a view: shared version counter
        elif change == "set_":
            p.set_(torch.randn(64, 33))
        elif change == "data_assign":
            p.data = torch.randn(64, 33)
        else:
            p.resize_(33, 64)
    after = compile_cache._state_digest(p)
    assert after != before
    assert after == compile_cache._state_bytes_digest(p)


def test_inference_tensors_are_hashed_every_time(monkeypatch):
    with torch.inference_mode():
        t = torch.randn(100)
    calls = []
    real = compile_cache._state_bytes_digest
    monkeypatch.setattr(compile_cache, "_state_bytes_digest", lambda x: calls.append(1) or real(x))
    compile_cache._state_digest(t)
    compile_cache._state_digest(t)
    assert len(calls) == 2


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", "1")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    return compile_cache.cache_dir()


@pytest.mark.parametrize("how", ["inplace_view", "reassigned"])
def test_changed_packed_weights_miss_the_program_cache(cache, how):
    """Two compiles in one process (the memo is live): after changing a low-bit layer's
    weights, the second compile must not reuse the first one's packed buffers."""
    import dataclasses

    import lowbit
    from lowbit.generate import PRESETS, build_llama

    cfg = dataclasses.replace(PRESETS["tiny"], n_layers=1, max_seq_len=16)
    model, _ = build_llama(cfg)
    tokens, pos = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0)), torch.arange(5)

    def compiled():
        torch._dynamo.reset()
        lowbit.models.reset_caches(model)
        with torch.no_grad():
            return torch.compile(model, backend="lowbit")(tokens, pos)

    compiled()
    hits = counters["program_cache_hits"]
    compiled()
    assert counters["program_cache_hits"] == hits + 1  # same weights: a hit
    layer = model.layers[0].feed_forward.w1
    with torch.no_grad():
        if how == "inplace_view":
            layer.scales.view(-1)[:1].mul_(3.0)  # through a view (the scales are [1, 1])
        else:
            layer.scales = layer.scales * 3.0  # a new tensor in the buffer slot
    hits = counters["program_cache_hits"]
    got = compiled()
    assert counters["program_cache_hits"] == hits  # a miss: compiled for the new weights
    with torch.no_grad():
        lowbit.models.reset_caches(model)
        want = model(tokens, pos)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
