"""AMX-BF16 dense BRGEMM tiles (runtime/native/src/brgemm_amx.cpp) against float64 torch, the
AVX-512 tiles and exact integers; the dispatch rule; threads with torch's own AMX in between;
the compiled path reaching them. Run only on a CPU with AMX-BF16 that Linux lets this process
use; skipped elsewhere with the reason.

Tolerances: bf16 x bf16 products are exact in fp32, so the only error is fp32 accumulation
(|err| <= 2 k u sum|a||b|, u = 2^-24, test_brgemm._check_close) plus, for a bf16 C, one final
rounding of 2^-8 relative. AMX and AVX-512 are each held to that bound against fp64 and to
the sum of both bounds against each other; not bitwise: the summation orders differ
(TDPBF16PS sums a 32-k step's even and odd products in two chains, VDPBF16PS adds each pair to
the accumulator, and the AMX path adds the old C after the sum).
"""
from __future__ import annotations

import itertools
import threading

import pytest
import torch

from lowbit.runtime import brgemm as bg
from lowbit.runtime import cpu_features, supported_isas
from isa_paths import use_isa
from test_brgemm import _check_close, _rand, _reference, _run_case

pytestmark = pytest.mark.skipif(
    "amx" not in supported_isas() or "amx_bf16" not in cpu_features(),
    reason=("this CPU lacks AMX-BF16" if "amx_bf16" not in cpu_features() else
            "Linux refused this process the AMX tile state") + "; the AMX-BF16 tiles cannot run here")

MS = [1, 7, 16, 17, 33, 130]
NS = [1, 15, 16, 17, 64, 100]
KS = [1, 2, 31, 32, 33, 64, 97, 520]
FLAGS = list(itertools.product([0, 1], [False, True], [False, True]))  # beta, packed, bf16 C


@pytest.mark.parametrize("beta,packed,c_bf16", FLAGS,
                         ids=[f"beta{b}-{'packed' if p else 'rowmajor'}-{'cbf16' if c else 'cf32'}"
                              for b, p, c in FLAGS])
def test_amx_every_shape_against_fp64(beta, packed, c_bf16):
    """Every M x N x K of the grid (tails of 16 rows, 16/32 columns, 32-k steps, odd K with a
    half-padded last pair, K chunks of 512 + a tail), batches of 1-3 with strides, padded
    leading dims and NaN in every padding: within the fp32 accumulation bound of fp64."""
    with use_isa("amx"):
        n0 = bg.amx_invocations()
        for j, (m, n, k) in enumerate(itertools.product(MS, NS, KS)):
            p = dict(m=m, n=n, k=k, batch=1 + j % 3, pad_a=j % 4, pad_b=(j // 4) % 3, pad_c=j % 3,
                     off_c=j % 5, beta=beta, packed=packed, c_bf16=c_bf16, seed=j)
            kern, _ = _run_case(torch.bfloat16, p)
            assert kern.isa == "amx", (m, n, k, kern.isa)
        assert bg.amx_invocations() - n0 == len(MS) * len(NS) * len(KS)


@pytest.mark.parametrize("m,n,k,batch", [
    (257, 40, 64, 1),     # two passes of rows (256 + 1)
    (70, 33, 4096, 3),    # 8 K chunks per batch element, lda a multiple of 4 KiB
    (40, 300, 130, 2),    # row-major B over two panels of 8 n-blocks, the second a tail
    (128, 64, 1024, 1),   # full row pairs over two K chunks
    (33, 1030, 97, 2),    # wide: 33 n-blocks, K tail
    (20, 1024, 64, 1),
])
@pytest.mark.parametrize("packed", [False, True], ids=["rowmajor", "packed"])
def test_amx_passes_chunks_and_panels(m, n, k, batch, packed):
    with use_isa("amx"):
        for beta, c_bf16 in ((0, False), (1, True)):
            kern, _ = _run_case(torch.bfloat16, dict(m=m, n=n, k=k, batch=batch, pad_a=1, pad_b=3, pad_c=2,
                                                     off_c=3, beta=beta, packed=packed, c_bf16=c_bf16,
                                                     seed=m + n + k))
            assert kern.isa == "amx"


@pytest.mark.parametrize("packed", [False, True], ids=["rowmajor", "packed"])
def test_amx_integer_sums_exact(packed):
    """Small integers are exact in bf16 and their sums (< 2^24) exact in fp32: the AMX result
    equals fp64 bit for bit, whatever the summation order (a dropped, doubled or misplaced
    product or pair half shows here as a wrong integer)."""
    gen = torch.Generator().manual_seed(1)
    for m, n, k in [(33, 100, 97), (16, 64, 520), (130, 17, 33), (17, 15, 1)]:
        a = torch.randint(-8, 9, (m, k), generator=gen).to(torch.bfloat16)
        b = torch.randint(-8, 9, (k, n), generator=gen).to(torch.bfloat16)
        with use_isa("amx"):
            kern = bg.Brgemm(torch.bfloat16, m, n, k, beta=0, b_packed=packed)
            c = torch.full((m, n), float("nan"))
            kern(a, bg.pack_b(b) if packed else b, c)
        assert kern.isa == "amx"
        assert torch.equal(c.double(), a.double() @ b.double()), (m, n, k)


@pytest.mark.parametrize("packed", [False, True], ids=["rowmajor", "packed"])
@pytest.mark.parametrize("c_bf16", [False, True], ids=["cf32", "cbf16"])
def test_amx_agrees_with_avx512(packed, c_bf16):
    gen = torch.Generator().manual_seed(2)
    c_dtype = torch.bfloat16 if c_bf16 else torch.float32
    for m, n, k, batch in [(17, 100, 97, 2), (130, 64, 520, 1), (33, 17, 33, 3)]:
        a_list = [_rand((m, k), torch.bfloat16, gen) for _ in range(batch)]
        b_list = [_rand((k, n), torch.bfloat16, gen) for _ in range(batch)]
        c0 = _rand((m, n), c_dtype, gen)
        a = torch.cat([x.flatten() for x in a_list])
        b = torch.cat([bg.pack_b(x) if packed else x.flatten() for x in b_list])
        outs = {}
        for isa in ("amx", "avx512"):
            with use_isa(isa):
                kern = bg.Brgemm(torch.bfloat16, m, n, k, stride_a=m * k, stride_b=b.numel() // batch,
                                 b_packed=packed, c_dtype=c_dtype)
                assert kern.isa == isa
                outs[isa] = kern(a, b, c0.clone(), batch=batch)
        ref, mag = _reference(a_list, b_list, c0)
        for out in outs.values():
            _check_close(out, ref, mag, k * batch, c_dtype)
        # Each path is within the bound of fp64, so within twice it of the other.
        _check_close(outs["amx"], outs["avx512"].double(), 2 * mag + outs["avx512"].double().abs(), 2 * k * batch,
                     c_dtype)


def test_dispatch_rule_and_thresholds():
    rows, k = bg.amx_min_rows(), bg.amx_min_k()
    assert rows >= 1 and k >= 1
    with use_isa("amx"):  # forced: everything bf16 on AMX
        assert bg.Brgemm(torch.bfloat16, 1, 1, 1).isa == "amx"
        assert bg.Brgemm(torch.float32, 128, 64, 64).isa == "avx512"  # fp32 stays on AVX-512
    assert (bg.amx_min_rows(), bg.amx_min_k()) == (rows, k)  # restored
    with use_isa("avx512"):
        assert bg.Brgemm(torch.bfloat16, 128, 64, 64).isa == "avx512"
    from lowbit.runtime import current_isa, set_isa
    before = current_isa()
    set_isa("amx")
    try:
        assert bg.Brgemm(torch.bfloat16, rows, 64, k).isa == "amx"
        assert bg.Brgemm(torch.bfloat16, rows - 1, 64, k).isa == ("amx" if rows == 1 else "avx512")
        assert bg.Brgemm(torch.bfloat16, rows, 64, k - 1).isa == ("amx" if k == 1 else "avx512")
        assert bg.Brgemm(torch.float32, 4 * rows, 64, 4 * k).isa == "avx512"
        prev = bg.amx_min_rows(rows + 5)
        assert prev == rows
        try:
            assert bg.Brgemm(torch.bfloat16, rows + 4, 64, k).isa == "avx512"
            assert bg.Brgemm(torch.bfloat16, rows + 5, 64, k).isa == "amx"
        finally:
            bg.amx_min_rows(prev)
    finally:
        set_isa(before)
    for bad in (0, -3):
        with pytest.raises(bg.BrgemmError, match=">= 1"):
            bg.amx_min_rows(bad)
        with pytest.raises(bg.BrgemmError, match=">= 1"):
            bg.amx_min_k(bad)


def test_amx_threads_with_onednn_amx_between_calls():
    """Two threads alternate AMX BRGEMMs with torch's bf16 matmuls (oneDNN, itself on AMX here,
    with tile configurations of its own): every result equals the first one bit for bit."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(37, 70, 97), (128, 64, 256)]
    data = [(_rand((m, k), torch.bfloat16, gen), _rand((k, n), torch.bfloat16, gen)) for m, n, k in shapes]
    with use_isa("amx"):
        kerns = [bg.Brgemm(torch.bfloat16, m, n, k, beta=0, b_packed=True) for m, n, k in shapes]
        packed = [bg.pack_b(b) for _, b in data]
        first = [kern(a, pb, torch.empty(kern.m, kern.n)) for kern, (a, _), pb in zip(kerns, data, packed)]
        torch_first = [torch.matmul(a, b) for a, b in data]
        errors = []

        def work(t):
            try:
                for it in range(30):
                    j = (t + it) % len(shapes)
                    a, b = data[j]
                    tm = torch.matmul(a, b)
                    out = kerns[j](a, packed[j], torch.empty(kerns[j].m, kerns[j].n))
                    if not torch.equal(out, first[j]) or not torch.equal(tm, torch_first[j]):
                        errors.append((t, it, j))
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(repr(e))

        ths = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    assert not errors, errors
    for out, (a, b) in zip(first, data):
        ref, mag = _reference([a], [b], None)
        _check_close(out, ref, mag, a.shape[1], torch.float32)


@pytest.mark.parametrize("tokens", [67, 1])
def test_compiled_bf16_linear_runs_amx_tiles(tokens):
    """With the AMX ISA and its default rule, a compiled bf16 model's matmuls run the AMX dense
    tiles for enough rows (the invocation counter grows) and AVX-512 below amx_min_rows()."""
    from test_brgemm_compiled import TOL, compile_dense

    from lowbit.runtime import current_isa, set_isa
    torch.manual_seed(tokens)
    m = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.SiLU(), torch.nn.Linear(160, 64)).to(torch.bfloat16)
    x = torch.randn(tokens, 96, dtype=torch.bfloat16)
    before = current_isa()
    set_isa("amx")
    try:
        compiled, ir_text = compile_dense(m, (x,))
        assert "call @lowbit_brgemm_invoke" in ir_text
        n0 = bg.amx_invocations()
        with torch.no_grad():
            out = compiled(x)[0]
            ref = m(x)
        ran = bg.amx_invocations() - n0
    finally:
        set_isa(before)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    # The compiler may split M into tiles: AMX runs for tiles of at least amx_min_rows() rows,
    # which 67 tokens give and one token (a decode step) does not.
    assert (ran > 0) == (tokens >= bg.amx_min_rows()), (tokens, ran)
