"""Dense BRGEMM microkernels (lowbit.runtime.brgemm) on every ISA path x dtype, against
torch.matmul in float64 on randomized shapes with tails, leading dims, offsets and batches."""
from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.runtime import brgemm as bg
from lowbit.runtime import supported_isas
from isa_paths import dense_isa, use_isa

ISAS = supported_isas()
DTYPES = [torch.float32, torch.bfloat16]
SIZES = [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 47, 64, 127]


@pytest.fixture(params=ISAS)
def isa(request):
    """Every ISA path; under `amx` the bf16 kernels run the AMX tiles at every shape."""
    with use_isa(request.param):
        yield request.param


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def _reference(a_list, b_list, c0):
    """sum_i A_i @ B_i (+ C0) in float64, and sum_i |A_i| @ |B_i| for the error bound."""
    ref = sum(torch.matmul(a.double(), b.double()) for a, b in zip(a_list, b_list))
    mag = sum(torch.matmul(a.double().abs(), b.double().abs()) for a, b in zip(a_list, b_list))
    if c0 is not None:
        ref = ref + c0.double()
        mag = mag + c0.double().abs()
    return ref, mag


def _check_close(out, ref, mag, k_total, c_dtype):
    # fp32 accumulation: |err| <= k * u * sum|a||b| (u = 2^-24, a factor 2 of slack);
    # a bf16 C adds one rounding of 2^-8 relative to the result.
    bound = 2 * k_total * 2.0 ** -24 * mag + 1e-30
    if c_dtype == torch.bfloat16:
        bound = bound + 2.0 ** -8 * ref.abs()
    err = (out.double() - ref).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds the fp32 accumulation bound"


case = st.fixed_dictionaries({
    "m": st.sampled_from(SIZES + [130]),
    "n": st.sampled_from(SIZES + [65, 96, 100]),
    "k": st.sampled_from(SIZES + [256, 300, 513]),
    "batch": st.integers(1, 3),
    "pad_a": st.integers(0, 3),
    "pad_b": st.integers(0, 3),
    "pad_c": st.integers(0, 3),
    "off_c": st.integers(0, 5),
    "beta": st.sampled_from([0, 1]),
    "packed": st.booleans(),
    "c_bf16": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})


def _run_case(dtype, p):
    gen = torch.Generator().manual_seed(p["seed"])
    m, n, k, batch = p["m"], p["n"], p["k"], p["batch"]
    c_dtype = torch.bfloat16 if (dtype == torch.bfloat16 and p["c_bf16"]) else torch.float32
    lda, ldc = k + p["pad_a"], n + p["pad_c"]
    a_mats = [_rand((m, k), dtype, gen) for _ in range(batch)]
    b_mats = [_rand((k, n), dtype, gen) for _ in range(batch)]

    # A_i live in one buffer with row padding, stride_a apart.
    stride_a = m * lda + 5
    a_buf = torch.full((batch * stride_a,), float("nan"), dtype=dtype)
    for i, a in enumerate(a_mats):
        a_buf[i * stride_a:i * stride_a + m * lda].view(m, lda)[:, :k] = a

    if p["packed"]:
        packed = [bg.pack_b(b) for b in b_mats]
        ldb = bg.padded_k(dtype, k) * bg.NB
        stride_b = packed[0].numel()
        b_buf = torch.cat(packed)
    else:
        ldb = n + p["pad_b"]
        stride_b = k * ldb + 3
        b_buf = torch.full((batch * stride_b,), float("nan"), dtype=dtype)
        for i, b in enumerate(b_mats):
            b_buf[i * stride_b:i * stride_b + k * ldb].view(k, ldb)[:, :n] = b

    # C sits at an offset inside a sentinel-filled buffer: nothing outside the tile may change.
    sentinel = 12345.0
    c_buf = torch.full((p["off_c"] + m * ldc + 7,), sentinel, dtype=c_dtype)
    c_view = c_buf[p["off_c"]:p["off_c"] + m * ldc].view(m, ldc)[:, :n]
    c0 = _rand((m, n), c_dtype, gen)
    c_view.copy_(c0)

    kern = bg.Brgemm(dtype, m, n, k, lda=lda, ldb=ldb, ldc=ldc, stride_a=stride_a, stride_b=stride_b,
                     beta=p["beta"], b_packed=p["packed"], c_dtype=c_dtype)
    kern(a_buf, b_buf, c_buf, batch=batch, c_offset=p["off_c"])

    ref, mag = _reference(a_mats, b_mats, c0 if p["beta"] else None)
    _check_close(c_view, ref, mag, k * batch, c_dtype)
    outside = torch.ones_like(c_buf, dtype=torch.bool)
    outside[p["off_c"]:p["off_c"] + m * ldc].view(m, ldc)[:, :n] = False
    assert bool((c_buf[outside] == sentinel).all()), "kernel wrote outside the C tile"
    return kern, c_view


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=case)
def test_brgemm_random(isa, dtype, p):
    _run_case(dtype, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 17, 127), (127, 3, 17), (17, 127, 3),
                                   (1, 4096, 64), (128, 64, 1024), (14, 32, 2)])
@pytest.mark.parametrize("packed", [False, True], ids=["rowmajor", "packed"])
def test_brgemm_edge_shapes(isa, dtype, m, n, k, packed):
    _run_case(dtype, dict(m=m, n=n, k=k, batch=2, pad_a=1, pad_b=2, pad_c=3, off_c=1, beta=1,
                          packed=packed, c_bf16=False, seed=m * 1000 + n * 10 + k))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["rowmajor", "packed"])
def test_brgemm_aliasing_lda_k_chunks(isa, dtype, packed):
    """lda a multiple of 2 KiB (rows in one L1 set) with m > MR and k > KC: balanced m-blocks
    over k chunks of each batch element (the second element checks A_i is offset right)."""
    _run_case(dtype, dict(m=40, n=70, k=1024, batch=2, pad_a=0, pad_b=1, pad_c=2, off_c=3, beta=1,
                          packed=packed, c_bf16=dtype == torch.bfloat16, seed=5))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_packed_column_and_k_blocks(isa, dtype):
    """The compiler's view of a packed weight: output columns [n0, n0 + w) at
    packed_offset(n0), K split into blocks reduced as a batch with stride_b = kb * NB."""
    gen = torch.Generator().manual_seed(7)
    m, k, n, kb = 5, 96, 100, 32
    a = _rand((m, k), dtype, gen)
    w = _rand((n, k), dtype, gen)  # Linear weight layout: B = w^T
    packed = bg.pack_b(w, transposed=True)
    panel_stride = bg.padded_k(dtype, k) * bg.NB
    full = torch.matmul(a.double(), w.double().t())
    for n0, width in [(0, 32), (32, 64), (96, 4)]:
        c = torch.zeros(m, width)
        kern = bg.Brgemm(dtype, m, width, kb, lda=k, ldb=panel_stride, ldc=width, stride_a=kb,
                         stride_b=kb * bg.NB, beta=0, b_packed=True)
        kern(a.contiguous(), packed, c, batch=k // kb, b_offset=bg.packed_offset(dtype, k, n0))
        ref = full[:, n0:n0 + width]
        mag = torch.matmul(a.double().abs(), w.double().abs().t())[:, n0:n0 + width]
        _check_close(c, ref, mag, k, torch.float32)


def test_pack_layout_matches_documentation():
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        k, n = 5, 40
        b = _rand((k, n), dtype, gen)
        packed = bg.pack_b(b)
        kp = bg.padded_k(dtype, k)
        assert packed.numel() == bg.packed_size(dtype, k, n) == 2 * bg.NB * kp
        expect = torch.zeros_like(packed)
        for kk in range(k):
            for col in range(n):
                panel, j = divmod(col, bg.NB)
                if dtype == torch.bfloat16:
                    idx = panel * kp * bg.NB + (kk // 2) * 2 * bg.NB + 2 * j + kk % 2
                else:
                    idx = panel * kp * bg.NB + kk * bg.NB + j
                expect[idx] = b[kk, col]
        assert torch.equal(packed, expect)
        assert torch.equal(bg.pack_b(b.t().contiguous(), transposed=True), packed)


def test_bf16_odd_k_ignores_partner_row(isa):
    """k odd inside a packed bf16 matrix: the pair's other row (here inf) must not leak in."""
    k_full, n, m = 4, 32, 3
    b = torch.ones(k_full, n, dtype=torch.bfloat16)
    b[3] = float("inf")
    a = torch.ones(m, 3, dtype=torch.bfloat16)
    out = torch.zeros(m, n)
    kern = bg.Brgemm(torch.bfloat16, m, n, 3, ldb=k_full * bg.NB, beta=0, b_packed=True)
    kern(a, bg.pack_b(b), out)
    assert torch.equal(out, torch.full((m, n), 3.0))


def test_beta0_ignores_garbage_c(isa):
    a, b = torch.ones(4, 8), torch.ones(8, 20)
    c = torch.full((4, 20), float("nan"))
    bg.Brgemm(torch.float32, 4, 20, 8, beta=0)(a, b, c)
    assert torch.equal(c, torch.full((4, 20), 8.0))


def test_dispatch_is_pure_and_records_isa(isa):
    k1 = bg.Brgemm(torch.float32, 8, 16, 32)
    k2 = bg.Brgemm(torch.float32, 8, 16, 32)
    k3 = bg.Brgemm(torch.float32, 8, 16, 33)
    assert k1.handle == k2.handle != k3.handle
    assert bg.Brgemm(torch.bfloat16, 2, 2, 2).isa == dense_isa(isa, torch.bfloat16)
    assert k1.isa == dense_isa(isa, torch.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype=torch.float16, m=2, n=2, k=2), "dtype"),
    (dict(dtype=torch.float32, m=0, n=2, k=2), "invalid size"),
    (dict(dtype=torch.float32, m=2, n=-1, k=2), "invalid size"),
    (dict(dtype=torch.float32, m=2, n=2, k=4, lda=3), "leading dimension"),
    (dict(dtype=torch.float32, m=2, n=8, k=4, ldb=7), "leading dimension"),
    (dict(dtype=torch.float32, m=2, n=8, k=4, ldc=7), "leading dimension"),
    (dict(dtype=torch.float32, m=2, n=8, k=4, stride_a=-1), "invalid size"),
    (dict(dtype=torch.float32, m=2, n=8, k=4, b_packed=True, ldb=4 * 32 + 1), "multiple"),
    (dict(dtype=torch.float32, m=2, n=8, k=4, b_packed=True, ldb=3 * 32), "leading dimension"),
    (dict(dtype=torch.bfloat16, m=2, n=8, k=4, b_packed=True, stride_b=32), "multiple"),
    (dict(dtype=torch.float32, m=2, n=8, k=4, c_dtype=torch.bfloat16), "unsupported"),
    (dict(dtype=torch.float32, m=2, n=8, k=4, beta=2), "beta"),
])
def test_dispatch_rejects_bad_descriptions(kwargs, match):
    with pytest.raises(bg.BrgemmError, match=match):
        bg.Brgemm(**kwargs)


def test_invoke_rejects_bad_operands():
    kern = bg.Brgemm(torch.float32, 4, 8, 16, beta=0)
    a, b, c = torch.zeros(4, 16), torch.zeros(16, 8), torch.zeros(4, 8)
    with pytest.raises(bg.BrgemmError, match="A has 63 elements"):
        kern(a.flatten()[:63], b, c)
    with pytest.raises(bg.BrgemmError, match="B has 128 elements"):
        bg.Brgemm(torch.float32, 4, 8, 16, stride_b=128)(a, b, c, batch=2)
    with pytest.raises(bg.BrgemmError, match="C has"):
        kern(a, b, c, c_offset=1)
    with pytest.raises(bg.BrgemmError, match="dtype"):
        kern(a.double(), b, c)
    with pytest.raises(bg.BrgemmError, match="contiguous"):
        kern(torch.zeros(16, 4).t(), b, c)
    with pytest.raises(bg.BrgemmError, match="batch"):
        kern(a, b, c, batch=0)
    with pytest.raises(bg.BrgemmError, match="not even"):
        bg.Brgemm(torch.bfloat16, 1, 8, 2, b_packed=True)(
            torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(200, dtype=torch.bfloat16),
            torch.zeros(1, 8), b_offset=1)


def test_native_invoke_rejects_unknown_handle_and_batch():
    lib = bg._lib()
    buf = (ctypes.c_float * 4)()
    assert lib.lowbit_brgemm_invoke(0, buf, 0, buf, 0, buf, 0, 1) < 0
    assert lib.lowbit_brgemm_invoke(1 << 40, buf, 0, buf, 0, buf, 0, 1) < 0
    h = bg.Brgemm(torch.float32, 1, 1, 1).handle
    assert lib.lowbit_brgemm_invoke(h, buf, 0, buf, 0, buf, 0, 0) < 0


def test_pack_rejects_bad_input():
    with pytest.raises(bg.BrgemmError, match="2-D"):
        bg.pack_b(torch.zeros(4))
    with pytest.raises(bg.BrgemmError, match="dtype"):
        bg.pack_b(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(bg.BrgemmError, match="empty"):
        bg.pack_b(torch.zeros(0, 4))
    with pytest.raises(bg.BrgemmError, match="multiple of the panel"):
        bg.packed_offset(torch.float32, 8, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_matmul_helper(dtype):
    gen = torch.Generator().manual_seed(11)
    a, b = _rand((17, 33), dtype, gen), _rand((33, 70), dtype, gen)
    ref, mag = _reference([a], [b], None)
    _check_close(bg.matmul(a, b, out_dtype=torch.float32), ref, mag, 33, torch.float32)
    _check_close(bg.matmul(a, bg.pack_b(b), b_packed=True, n=70, out_dtype=torch.float32), ref, mag, 33,
                 torch.float32)
    out = bg.matmul(a, b)
    assert out.dtype == dtype
    _check_close(out, ref, mag, 33, dtype)
    with pytest.raises(bg.BrgemmError, match="do not chain"):
        bg.matmul(a, b.t())


@pytest.mark.parametrize("at_end", [True, False], ids=["guard_after", "guard_before"])
def test_kernels_stay_in_bounds(isa, at_end):
    """Every operand holds exactly the elements the kernel may touch (Brgemm.extent_*) and
    sits flush against an inaccessible page: a read or write one element out faults (guard
    pages see AVX-512 masked accesses and AMX tile loads, which ASan does not)."""
    from test_qgemm import GuardedArena
    arena = GuardedArena()
    gen = torch.Generator().manual_seed(13)
    for dtype in DTYPES:
        for m, n, k in [(1, 1, 1), (17, 15, 33), (33, 100, 97), (5, 40, 520)]:
            for packed in (False, True):
                batch = 2
                b_list = [_rand((k, n), dtype, gen) for _ in range(batch)]
                b = torch.cat([bg.pack_b(x) if packed else x.flatten() for x in b_list])
                for beta, c_dtype in ((0, torch.float32), (1, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)):
                    kern = bg.Brgemm(dtype, m, n, k, stride_a=m * k, stride_b=b.numel() // batch, beta=beta,
                                     b_packed=packed, c_dtype=c_dtype)
                    a = arena.place(_rand((kern.extent_a(batch),), dtype, gen), at_end)
                    bb = arena.place(b[:kern.extent_b(batch)].contiguous(), at_end)
                    c = arena.place(torch.zeros(kern.extent_c(), dtype=c_dtype), at_end)
                    kern(a, bb, c, batch=batch)
