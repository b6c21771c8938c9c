"""Fused attention (issue 10, item 3): the runtime kernel, `lowbit::attention` and the compiled path.

* the kernel (`lowbit.compiler.attention_op.fused_attention`) against eager
  `F.scaled_dot_product_attention` on decode/prefill shapes, odd lengths, S not a multiple of
  the key block, GQA, causal and boolean masks of every rank, all-false rows, fp32 and bf16,
  on every ISA path this CPU has (forced with `lowbit.runtime.set_isa`);
* the op's eager implementation and argument checks;
* compiled graphs: SDPA becomes the kernel call (the report names it), one shape-generic
  compile serves several T and S; forms the kernel does not take (a float mask) keep the
  decomposition; a TinyLlama's logits and greedy tokens match eager.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.compiler.attention_op import fused_attention, last_isa
from lowbit.compiler.partition import UnsupportedOpWarning, forget_warnings
from lowbit.runtime.library import current_isa, set_isa, supported_isas

ISAS = ["avx512", "avx2", "scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    name = request.param
    if name not in supported_isas():
        pytest.skip(f"this CPU has no {name} path (supported: {', '.join(supported_isas())})")
    before = current_isa()
    set_isa(name)
    yield name
    set_isa(before)


# (B, H, Hkv, T, S, D)
SHAPES = [
    (1, 4, 4, 1, 256, 128),    # decode, one block multiple
    (2, 4, 2, 7, 70, 64),      # odd T, S one block + 6, GQA 2:1
    (1, 2, 1, 130, 300, 33),   # T over many query blocks, S not a multiple of 64, odd D
    (1, 20, 5, 3, 65, 128),    # the 2B4T head layout
    (3, 1, 1, 5, 1, 8),        # a single key
    (1, 3, 3, 64, 64, 17),     # D not a multiple of any vector width
]


def _inputs(shape, dtype, seed=0):
    b, h, hkv, t, s, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    return q, k, v


def _masks(shape, seed=0):
    """Name -> mask (None, [T, S] random with an all-false row, [B, 1, T, S], [1, S] prefix)."""
    b, h, _, t, s, _ = shape
    g = torch.Generator().manual_seed(seed + 1)
    rand = torch.rand(t, s, generator=g) < 0.6
    rand[t // 2] = False
    per_batch = torch.rand(b, 1, t, s, generator=g) < 0.5
    per_batch[0, 0, 0] = False
    prefix = (torch.arange(s) < max(1, s // 3))[None]   # [1, S]: only the first positions are valid
    return {"none": None, "random": rand, "batch": per_batch, "prefix": prefix}


def _reference(q, k, v, mask, scale, causal):
    """Eager SDPA in fp32 on the same (rounded) inputs."""
    qf, kf, vf = q.float(), k.float(), v.float()
    if causal:
        tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        mask = tri if mask is None else mask & tri
    return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _all_false_rows(q, k, mask, causal):
    """[B, H, T] True where eager masks every key (kernel and eager give zeros there)."""
    b, h, t, _ = q.shape
    s = k.shape[2]
    full = torch.ones(b, h, t, s, dtype=torch.bool)
    if mask is not None:
        full = full & mask
    if causal:
        full = full & torch.ones(t, s, dtype=torch.bool).tril()
    return ~full.any(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_eager_sdpa(isa, shape, dtype):
    q, k, v = _inputs(shape, dtype)
    scale = 1.0 / shape[-1] ** 0.5
    for name, mask in _masks(shape).items():
        for causal in (False, True):
            got = fused_attention(q, k, v, mask, scale=scale, causal=causal)
            assert last_isa() == isa
            assert got.dtype == dtype and got.shape == q.shape
            ref = _reference(q, k, v, mask, scale, causal)
            what = f"{isa} {dtype} mask={name} causal={causal}"
            if dtype == torch.float32:
                torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5, msg=what)
            else:
                # fp32 accumulation, one rounding of the output: within bf16's half-ulp of eager-in-fp32
                torch.testing.assert_close(got.float(), ref, atol=4e-3, rtol=8e-3, msg=what)
            dead = _all_false_rows(q, k, mask, causal)
            if dead.any():
                assert torch.equal(got[dead].float(), torch.zeros_like(got[dead].float())), what
                # eager (the op as the user calls it, in the input dtype) also gives zeros there
                eager = F.scaled_dot_product_attention(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                                       v.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                                       attn_mask=mask if not causal else None,
                                                       is_causal=causal and mask is None, scale=scale)
                if not (causal and mask is not None):
                    assert torch.equal(eager[dead].float(), got[dead].float()), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_kernel_decode_shapes(isa, dtype):
    """Decode (T = 1..4 queries, each a register-blocked path) over caches whose visible
    keys end anywhere in a group of 4 and of 64 (S = 1, 5, 63, 66, 129), the 953M (16/16 x 128)
    and 2B4T (20/5 x 128) head layouts and a head dim with a vector tail (40): the decode
    mask (key s visible to query t iff s <= pos + t), a random mask with an all-false row,
    a per-head mask (a GQA group's heads share K/V rows but not mask rows), and the decode
    mask as a causal flag with a prefix mask. One call covers all heads, so query blocks
    span the heads of a KV group."""
    for h, hkv, d in ((16, 16, 128), (20, 5, 128), (4, 2, 40)):
        for t in (1, 2, 3, 4):
            for s in (1, 5, 63, 66, 129):
                shape = (1, h, hkv, t, s, d)
                q, k, v = _inputs(shape, dtype, seed=s * 7 + t)
                pos = max(0, s - t)
                decode = torch.arange(s)[None] <= (pos + torch.arange(t))[:, None]
                rand = torch.rand(t, s, generator=torch.Generator().manual_seed(s + t)) < 0.5
                rand[t - 1] = False
                per_head = torch.rand(1, h, t, s, generator=torch.Generator().manual_seed(s * t)) < 0.5
                per_head[0, h - 1, 0] = False
                for name, mask, causal in (("decode", decode, False), ("random", rand, False),
                                           ("per-head", per_head, False), ("prefix+causal", decode[-1:], True)):
                    got = fused_attention(q, k, v, mask, causal=causal)
                    assert last_isa() == isa
                    ref = _reference(q, k, v, mask, 1.0 / d ** 0.5, causal)
                    what = f"{isa} {dtype} H={h}/{hkv} D={d} T={t} S={s} mask={name}"
                    if dtype == torch.float32:
                        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5, msg=what)
                    else:
                        torch.testing.assert_close(got.float(), ref, atol=4e-3, rtol=8e-3, msg=what)
                    dead = _all_false_rows(q, k, mask, causal)
                    assert torch.equal(got[dead].float(), torch.zeros_like(got[dead].float())), what


def test_kernel_head_ranges(isa):
    """Compiled code calls the kernel per head range; a range that starts or ends inside a
    GQA group computes exactly its heads (and the same values as one call over all)."""
    from lowbit.compiler.attention_op import _kernel, DTYPE_CODES
    q, k, v = _inputs((2, 6, 2, 3, 70, 24), torch.float32, seed=11)
    mask = torch.rand(2, 6, 3, 70, generator=torch.Generator().manual_seed(12)) < 0.6
    whole = fused_attention(q, k, v, mask)
    for begin, end in ((0, 1), (1, 5), (2, 3), (4, 12), (0, 12)):
        out = torch.full_like(q, 7.0)
        rc = _kernel().lowbit_attention_invoke(DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                               mask.data_ptr(), out.data_ptr(), 2, 6, 2, 3, 70, 24,
                                               2, 6, 3, 70, 24 ** -0.5, 0, begin, end)
        assert rc == 0
        flat, ref = out.view(12, 3, 24), whole.view(12, 3, 24)
        assert torch.equal(flat[begin:end], ref[begin:end]), (begin, end)
        assert bool((flat[:begin] == 7.0).all()) and bool((flat[end:] == 7.0).all()), (begin, end)


def test_kernel_bf16_matches_eager_bf16(isa):
    """Against eager bf16 SDPA itself (which rounds probabilities to bf16 internally): close."""
    q, k, v = _inputs((1, 8, 8, 17, 200, 64), torch.bfloat16, seed=3)
    mask = torch.rand(17, 200, generator=torch.Generator().manual_seed(4)) < 0.7
    got = fused_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_masked_positions_do_not_contribute(isa):
    """Decode over a cache whose invalid rows hold garbage (huge values, inf): the visible
    prefix alone decides the result (the kernel skips those rows; they are never multiplied)."""
    q, k, v = _inputs((1, 4, 4, 1, 256, 64), torch.float32, seed=5)
    valid = 9
    k2, v2 = k.clone(), v.clone()
    k2[:, :, valid:] = float("inf")
    v2[:, :, valid:] = 1e30
    mask = (torch.arange(256) < valid)[None]
    got = fused_attention(q, k2, v2, mask)
    ref = F.scaled_dot_product_attention(q, k[:, :, :valid], v[:, :, :valid])
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_op_eager_implementation_and_checks():
    q, k, v = _inputs((2, 6, 3, 5, 11, 16), torch.float32, seed=6)
    mask = torch.rand(5, 11, generator=torch.Generator().manual_seed(7)) < 0.5
    out = torch.ops.lowbit.attention(q, k, v, mask, 0.3, True)
    torch.testing.assert_close(out, _reference(q, k, v, mask, 0.3, True))
    torch.testing.assert_close(fused_attention(q, k, v, mask, scale=0.3, causal=True), out, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="not a multiple"):
        fused_attention(q, torch.randn(2, 4, 11, 16), torch.randn(2, 4, 11, 16))
    with pytest.raises(ValueError, match="must be bool"):
        fused_attention(q, k, v, mask.float())
    with pytest.raises(ValueError, match="does not broadcast"):
        fused_attention(q, k, v, torch.ones(4, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="share a dtype"):
        fused_attention(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="not supported"):
        fused_attention(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="4-D"):
        fused_attention(q[0], k[0], v[0])


# ---------------------------------------------------------------------------------------
# compiled graphs


@pytest.fixture
def no_fallback():
    """Compiled vs eager proves nothing if a graph fell back to eager."""
    torch._dynamo.reset()
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    torch._dynamo.reset()
    fallback = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert not fallback, fallback


class Sdpa(torch.nn.Module):
    """SDPA with module state (an exact gain of one), so that `lowbit.explain(module)` finds
    the compiled graphs."""

    def __init__(self, **kw):
        super().__init__()
        self.kw = kw
        self.register_buffer("gain", torch.ones(()))

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw) * self.gain


def _attention_entries(module):
    return [e for e in lowbit.explain(module).entries if e.get("kind") == "attention"]


def test_compiled_sdpa_uses_the_kernel_for_every_length(no_fallback):
    """One shape-generic compile (T and S dynamic, as lowbit.generate marks them) serves
    every length >= 2; T = 1 (dynamo specializes sizes 0/1) is one more compile."""
    from lowbit.compiler.compile_log import counters
    model = Sdpa()
    compiled = torch.compile(model, backend="lowbit")
    before = counters.copy()
    with torch.no_grad():
        for t, s in ((5, 40), (33, 130), (2, 97), (1, 64), (1, 200)):
            q, k, v = _inputs((1, 4, 4, t, s, 32), torch.float32, seed=t + s)
            mask = torch.rand(t, s, generator=torch.Generator().manual_seed(s)) < 0.6
            mask[0] = False
            if t > 1:
                for x, d in ((q, 2), (k, 2), (v, 2), (mask, 0), (mask, 1)):
                    torch._dynamo.mark_dynamic(x, d)
            else:
                for x, d in ((k, 2), (v, 2), (mask, 1)):
                    torch._dynamo.mark_dynamic(x, d)
            got = compiled(q, k, v, mask)
            torch.testing.assert_close(got, model(q, k, v, mask), atol=2e-6, rtol=1e-5)
    assert counters["backend_compiles"] - before["backend_compiles"] == 2
    entries = _attention_entries(model)
    assert entries and all(e["result"] == "fused kernel" for e in entries), entries


def test_compiled_sdpa_bf16_gqa_causal(no_fallback):
    model = Sdpa(is_causal=True, enable_gqa=True, scale=0.2)
    compiled = torch.compile(model, backend="lowbit")
    q, k, v = _inputs((2, 8, 2, 9, 9, 64), torch.bfloat16, seed=8)
    with torch.no_grad():
        got = compiled(q, k, v)
        ref = model(q, k, v)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert _attention_entries(model)


def test_float_mask_keeps_the_decomposition(no_fallback):
    """An additive float mask is not the kernel's form: the previous lowering still runs."""
    model = Sdpa()
    compiled = torch.compile(model, backend="lowbit")
    q, k, v = _inputs((1, 2, 2, 4, 12, 16), torch.float32, seed=9)
    mask = torch.randn(4, 12, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, mask), model(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert not _attention_entries(model)


def test_tiny_llama_logits_and_tokens_match_eager(no_fallback):
    from lowbit.generate import PRESETS, build_llama
    from lowbit.models import reset_caches
    cfg = dataclasses.replace(PRESETS["tiny"], max_seq_len=32)
    model, _ = build_llama(cfg, 0, "ternary", "int8")
    compiled = torch.compile(model, backend="lowbit")
    prompt = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(11))

    def run(fn):
        reset_caches(model)
        outs = [fn(prompt, torch.arange(7))]
        for i in range(4):
            nxt = outs[-1][:, -1:].argmax(-1)
            outs.append(fn(nxt, torch.tensor([7 + i])))
        return outs

    with torch.no_grad():
        got, ref = run(compiled), run(model)
    for i, (y, r) in enumerate(zip(got, ref)):
        err = (y - r).abs().max().item()
        assert err <= 1e-3 * r.abs().max().item(), f"call {i}: max |compiled - eager| = {err:.3g}"
        assert torch.equal(y[:, -1].argmax(-1), r[:, -1].argmax(-1)), f"call {i}: greedy token differs"
    entries = _attention_entries(model)
    assert entries and all(e["result"] == "fused kernel" for e in entries), entries


# Head layouts (H, Hkv): GQA ratios 1, 2, 4, 5 and MQA. Calls (B, T, S): T <= 4 (work units
# are KV-head groups, split over the threads when there are fewer groups than threads) and
# T > 4 (single heads); odd S; the last stays under min-parallel-work (one call on the
# calling thread).
UNIT_LAYOUTS = [(4, 4), (6, 3), (8, 2), (20, 5), (10, 2), (5, 1), (4, 1)]
UNIT_CALLS = [(1, 1, 257), (2, 1, 129), (1, 3, 131), (1, 4, 70), (2, 2, 129), (1, 9, 65), (1, 1, 5)]


@pytest.mark.parametrize("form", ["mask", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compiled_work_units_match_eager(form, dtype):
    """lowbit-lower-attention's work units (KV-head groups or parts of them, or single heads)
    cover every head exactly once: one compile of one SDPA per head layout (B, T and S
    dynamic), run on 1, 2 and 3 threads (3 splits a 5-head group 1 + 2 + 2) against eager
    SDPA. A head no unit covered would keep the uninitialized output."""
    from torch.export import Dim
    from lowbit.compiler import threads
    from lowbit.compiler.compile import compile_function

    causal = form == "causal"

    def fn(m, *qkv):
        return tuple(F.scaled_dot_product_attention(qkv[i], qkv[i + 1], qkv[i + 2], attn_mask=None if causal else m,
                                                    is_causal=causal, enable_gqa=True)
                     for i in range(0, len(qkv), 3))

    def inputs(b, t, s, seed):
        pos = s - t   # decode rows: query i sees keys <= pos + i; one row masks everything
        m = torch.arange(s)[None] <= (pos + torch.arange(t))[:, None]
        if t > 1:
            m[1] = False
        qkv = [x for j, (h, hkv) in enumerate(UNIT_LAYOUTS)
               for x in _inputs((b, h, hkv, t, s, 64), dtype, seed=seed * 31 + j)]
        return [m, *qkv]

    B, T, S = Dim("B", min=1, max=64), Dim("T", min=1, max=4096), Dim("S", min=1, max=4096)
    dynamic = {0: {0: T, 1: S}}
    for i in range(len(UNIT_LAYOUTS)):
        dynamic[1 + 3 * i] = {0: B, 2: T}
        dynamic[2 + 3 * i] = dynamic[3 + 3 * i] = {0: B, 2: S}
    graph = compile_function(fn, inputs(2, 3, 40, seed=0), dynamic_dims=dynamic)
    fused = [e for e in graph.report if e.get("kind") == "attention" and e.get("result") == "fused kernel"]
    assert len(fused) == len(UNIT_LAYOUTS), graph.report
    before = threads.get_num_threads()
    try:
        for nt in (1, 2, 3):
            threads.set_num_threads(nt)
            threads.configure()
            for c, (b, t, s) in enumerate(UNIT_CALLS):
                m, *qkv = inputs(b, t, s, seed=c + 1)
                with torch.no_grad():
                    outs = graph(m, *qkv)
                for j, (h, hkv) in enumerate(UNIT_LAYOUTS):
                    q, k, v = qkv[3 * j:3 * j + 3]
                    ref = _reference(q, k, v, None if causal else m, 1.0 / 8, causal)
                    what = f"{form} {dtype} threads={nt} B={b} H={h}/{hkv} T={t} S={s}"
                    if dtype == torch.float32:
                        torch.testing.assert_close(outs[j], ref, atol=2e-6, rtol=1e-5, msg=what)
                    else:
                        torch.testing.assert_close(outs[j].float(), ref, atol=4e-3, rtol=8e-3, msg=what)
    finally:
        threads.set_num_threads(before)
        threads.configure()


def test_disabling_the_pass_keeps_the_previous_decomposition(no_fallback, monkeypatch):
    """LOWBIT_DISABLE_PASSES=lowbit-convert-attention compiles SDPA as before the kernel
    (torch-mlir's decomposition), not an op nothing lowers (which would run eager)."""
    monkeypatch.setenv("LOWBIT_DISABLE_PASSES", "lowbit-convert-attention")
    model = Sdpa()
    compiled = torch.compile(model, backend="lowbit")
    q, k, v = _inputs((1, 4, 4, 3, 20, 16), torch.float32, seed=13)
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(14)) < 0.7
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, mask), model(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert not _attention_entries(model)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (8, 1), (6, 3), (4, 4)])
def test_repeated_kv_heads_are_read_in_place(no_fallback, heads, kv_heads):
    """Keys/values repeated per query head before SDPA (unsqueeze, expand, reshape: Llama's and
    transformers' repeat_kv) reach the kernel as the kv_heads-head cache, not a copy."""
    class RepeatKv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("gain", torch.ones(()))  # explain() finds graphs by their state

        def forward(self, q, k, v, mask):
            b, hkv, s, d = k.shape
            rep = q.shape[1] // hkv
            k = k[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hkv * rep, s, d)
            v = v[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hkv * rep, s, d)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * self.gain

    model = RepeatKv()
    compiled = torch.compile(model, backend="lowbit", dynamic=False)
    with torch.no_grad():
        for t, s in ((1, 37), (5, 64)):
            q, k, v = _inputs((1, heads, kv_heads, t, s, 32), torch.float32, seed=heads + t)
            mask = torch.rand(t, s, generator=torch.Generator().manual_seed(s)) < 0.7
            torch.testing.assert_close(compiled(q, k, v, mask), model(q, k, v, mask), atol=2e-6, rtol=1e-5)
    entries = _attention_entries(model)
    assert entries and {e["heads"] for e in entries} == {f"{heads} query / {kv_heads} kv"}, entries
