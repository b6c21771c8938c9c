"""Every op a Llama-style decoder block needs, compiled vs eager, fp32 and bf16.

Each test compiles ONE graph that applies the op to 10+ independently shaped inputs
(sizes 1, 3, 17, 127, 4097 among them), so a shape costs no extra compilation. The
reference is the op evaluated in fp64 on the same (rounded) inputs; the compiled
result may be at most a few ulps worse than eager PyTorch in the same dtype:

    |compiled - ref64| <= 2 |eager - ref64| + (4 + 2 sqrt(K)) ulp(ref64) + atol

with ulp = 2^-23 |ref| (fp32) or 2^-8 |ref| (bf16), atol = 1e-6 (fp32) / 2^-10 (bf16)
times the largest |ref| of the case, and K the length of the op's reductions (1 for
elementwise ops): compiled loops sum sequentially, eager sums pairwise, and the
expected rounding error of a sequential K-term sum grows like sqrt(K) ulps. bf16 sums and means accumulate in fp32,
as eager does (see lowbit.compiler.decompositions).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lowbit.compiler.compile import compile_function

DTYPES = [torch.float32, torch.bfloat16]

_EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8}
_ATOL = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -10}


def _rand(gen, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _to64(a):
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def assert_matches(out, eager, ref, dtype, what, reduction=1):
    assert out.dtype == eager.dtype, f"{what}: dtype {out.dtype} != eager {eager.dtype}"
    assert out.shape == eager.shape, f"{what}: shape {tuple(out.shape)} != eager {tuple(eager.shape)}"
    if not out.is_floating_point():
        assert torch.equal(out, eager), what
        return
    out, eager, ref = out.double(), eager.double(), ref.double()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    ulps = 4 + 2 * math.sqrt(reduction)
    bound = 2 * (eager - ref).abs() + ulps * _EPS[dtype] * ref.abs() + _ATOL[dtype] * scale
    excess = (out - ref).abs() - bound
    assert torch.isfinite(out).all() == torch.isfinite(ref).all(), f"{what}: non-finite values differ"
    worst = excess.max().item() if excess.numel() else 0.0
    assert worst <= 0, (f"{what}: compiled error exceeds the bound by {worst:.3g} "
                        f"(max |compiled-ref| {(out - ref).abs().max().item():.3g}, "
                        f"max |eager-ref| {(eager - ref).abs().max().item():.3g})")


def check_op(fn, cases, dtype, name, reduction=lambda *args: 1):
    """Compile `fn` applied to every argument tuple in `cases` as one graph and compare.

    `reduction(*case)` is the length of the longest sum the op computes for that case."""
    counts = [len(c) for c in cases]
    flat = [a for c in cases for a in c]

    def many(*args):
        outs, i = [], 0
        for n in counts:
            outs.append(fn(*args[i:i + n]))
            i += n
        return tuple(outs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_function(many, [a.clone() if isinstance(a, torch.Tensor) else a for a in flat])
    outs = compiled(*flat)
    assert len(outs) == len(cases)
    for case, out in zip(cases, outs):
        eager = fn(*case)
        ref = fn(*[_to64(a) for a in case])
        shapes = [tuple(a.shape) for a in case if isinstance(a, torch.Tensor)]
        assert_matches(out, eager, ref, dtype, f"{name} {dtype} {shapes}", reduction(*case))


# Row counts and feature sizes covering 1, odd sizes and a large non-power-of-two.
ROWS = [1, 3, 17, 127, 1, 2, 5, 4, 8, 3, 1]
COLS = [1, 3, 17, 127, 4097, 64, 33, 256, 7, 512, 300]


def _mk(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(dtype):
    g = _mk(1)
    dims = [(1, 1, 1), (3, 17, 5), (17, 3, 127), (1, 4097, 3), (127, 8, 17), (2, 64, 64),
            (5, 33, 1), (1, 256, 96), (4, 7, 4097), (9, 31, 13)]
    cases = [(_rand(g, (m, k), dtype), _rand(g, (n, k), dtype, k ** -0.5), _rand(g, (n,), dtype))
             for m, k, n in dims]
    check_op(lambda x, w, b: F.linear(x, w, b), cases, dtype, "linear", lambda a, *rest: a.shape[-1])
    # Without bias, with a leading batch dim (the shape a transformer's linear sees).
    cases = [(_rand(g, (2, m, k), dtype), _rand(g, (n, k), dtype, k ** -0.5)) for m, k, n in dims]
    check_op(lambda x, w: F.linear(x, w), cases, dtype, "linear-nobias", lambda a, *rest: a.shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_and_bmm(dtype):
    g = _mk(2)
    dims = [(1, 1, 1), (3, 17, 5), (17, 3, 127), (1, 4097, 3), (127, 8, 17), (2, 64, 64),
            (5, 33, 1), (1, 256, 96), (4, 7, 4097), (9, 31, 13)]
    cases = [(_rand(g, (m, k), dtype), _rand(g, (k, n), dtype)) for m, k, n in dims]
    check_op(torch.matmul, cases, dtype, "matmul-2d", lambda a, *rest: a.shape[-1])
    cases = [(_rand(g, (3, m, k), dtype), _rand(g, (k, n), dtype)) for m, k, n in dims]
    check_op(torch.matmul, cases, dtype, "matmul-broadcast", lambda a, *rest: a.shape[-1])
    cases = [(_rand(g, (b, m, k), dtype), _rand(g, (b, k, n), dtype))
             for b, (m, k, n) in zip([1, 2, 3, 1, 2, 4, 1, 5, 1, 3], dims)]
    check_op(torch.bmm, cases, dtype, "bmm", lambda a, *rest: a.shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_arithmetic(dtype):
    g = _mk(3)
    cases = []
    for r, c in zip(ROWS, COLS):
        cases.append((_rand(g, (r, c), dtype), _rand(g, (c,), dtype), _rand(g, (r, 1), dtype)))

    def arith(a, b, c):
        return (a + b) * c - a / (b.abs() + 0.5) + 2.0 * a - b.neg() * 0.25 + (a - 1.0) ** 2
    check_op(arith, cases, dtype, "arith")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(dtype):
    g = _mk(4)
    cases = [(_rand(g, (r, c), dtype, 3.0), 1 + 0.1 * _rand(g, (c,), dtype)) for r, c in zip(ROWS, COLS)]

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    check_op(rmsnorm, cases, dtype, "rmsnorm", lambda a, *rest: a.shape[-1])

    def rmsnorm_fp32(x, w):  # Llama's form: normalise in fp32, cast back
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * w
    check_op(rmsnorm_fp32, cases, dtype, "rmsnorm-fp32", lambda a, *rest: a.shape[-1])


ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "squared_relu": lambda x: F.relu(x).square(),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation(name, dtype):
    g = _mk(5)
    cases = [(_rand(g, (r, c), dtype, 4.0),) for r, c in zip(ROWS, COLS)]
    check_op(ACTIVATIONS[name], cases, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(dtype):
    g = _mk(6)
    cases = [(_rand(g, (r, c), dtype, 5.0),) for r, c in zip(ROWS, COLS)]
    check_op(lambda x: torch.softmax(x, -1), cases, dtype, "softmax-last", lambda x: x.shape[-1])
    cases = [(_rand(g, (c, r), dtype, 5.0),) for r, c in zip(ROWS, COLS) if c < 1000]
    check_op(lambda x: torch.softmax(x, 0), cases, dtype, "softmax-dim0", lambda x: x.shape[0])


SDPA_DIMS = [  # batch, heads, q_len, kv_len, head_dim
    (1, 1, 1, 1, 8), (1, 2, 3, 3, 16), (2, 2, 17, 17, 8), (1, 1, 1, 127, 64), (1, 4, 5, 17, 4),
    (1, 1, 1, 4097, 8), (2, 3, 7, 7, 32), (1, 2, 16, 16, 128), (1, 1, 127, 127, 8), (3, 1, 1, 9, 12),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_dot_product_attention(dtype):
    g = _mk(7)
    attention_sums = lambda q, k, *rest: max(k.shape[2], q.shape[-1])  # noqa: E731

    def qkv(b, h, lq, lk, d):
        return (_rand(g, (b, h, lq, d), dtype), _rand(g, (b, h, lk, d), dtype), _rand(g, (b, h, lk, d), dtype))

    cases = [qkv(*dims) for dims in SDPA_DIMS]
    check_op(F.scaled_dot_product_attention, cases, dtype, "sdpa", attention_sums)
    causal = [qkv(b, h, lq, lq, d) for b, h, lq, _, d in SDPA_DIMS if lq < 1000]
    check_op(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), causal, dtype,
             "sdpa-causal", attention_sums)
    masked = []
    for dims in SDPA_DIMS:
        q, k, v = qkv(*dims)
        mask = torch.rand((dims[2], dims[3]), generator=g) > 0.3
        mask[:, 0] = True  # every query sees at least one key (an all-masked row is NaN in eager)
        masked.append((q, k, v, mask))
    check_op(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), masked, dtype,
             "sdpa-bool-mask", attention_sums)
    additive = [(q, k, v, _rand(g, (q.shape[2], k.shape[2]), dtype)) for q, k, v in cases]
    check_op(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), additive, dtype,
             "sdpa-float-mask", attention_sums)


def _rope(x, pos, inv_freq):
    angles = pos.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_slice_cat_sincos_index(dtype):
    g = _mk(8)
    dims = [(1, 1, 1, 2), (1, 2, 3, 4), (1, 4, 17, 8), (1, 1, 127, 16), (2, 3, 5, 64),
            (1, 2, 1, 128), (1, 8, 9, 32), (3, 1, 4, 6), (1, 1, 33, 10), (2, 2, 2, 18)]
    cases = []
    for b, h, t, d in dims:
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        pos = torch.randint(0, 4097, (t,), generator=g)
        cases.append((_rand(g, (b, h, t, d), dtype), pos, inv_freq))
    check_op(_rope, cases, dtype, "rope")

    # Table lookup form: precomputed cos/sin rows gathered with the positions.
    def rope_table(x, pos, table):
        cos, sin = table.cos()[pos].to(x.dtype), table.sin()[pos].to(x.dtype)
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    cases = [(x, pos, _rand(g, (4097, x.shape[-1]), torch.float32)) for x, pos, _ in cases]
    check_op(rope_table, cases, dtype, "rope-table")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(dtype):
    g = _mk(9)
    cases = []
    for vocab, dim, n in [(1, 1, 1), (3, 4, 3), (17, 8, 17), (127, 16, 5), (4097, 3, 9), (10, 64, 1),
                          (50, 127, 2), (2, 2, 33), (256, 32, 127), (7, 5, 4)]:
        cases.append((torch.randint(0, vocab, (1, n), generator=g), _rand(g, (vocab, dim), dtype)))
    check_op(lambda ids, w: F.embedding(ids, w), cases, dtype, "embedding")


CACHE_DIMS = [  # batch, kv heads, max_len, head_dim, new tokens
    (1, 1, 1, 1, 1), (1, 2, 3, 4, 1), (1, 2, 17, 8, 3), (1, 1, 127, 16, 17), (2, 2, 9, 4, 2),
    (1, 4, 4097, 2, 1), (1, 1, 64, 64, 64), (2, 1, 33, 8, 5), (1, 3, 5, 6, 5), (1, 2, 128, 32, 127),
]


def _cache_cases(g, dtype):
    cases = []
    for b, h, s, d, t in CACHE_DIMS:
        pos = torch.randperm(s, generator=g)[:t]
        cases.append((_rand(g, (b, h, s, d), dtype), pos, _rand(g, (b, h, t, d), dtype)))
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["index_copy", "index_put", "slice"])
def test_kv_cache_update(form, dtype):
    """In-place cache writes: the compiled graph writes the new cache back into the input."""
    g = _mk(10)
    cases = _cache_cases(g, dtype)
    if form == "slice":
        # Slice assignment at a static start (dynamo specialises Python ints).
        cases = [(c, int(pos.min().clamp(max=c.shape[2] - v.shape[2])), v) for c, pos, v in cases]

    def update(cache, pos, v):
        if form == "index_copy":
            cache.index_copy_(2, pos, v)
        elif form == "index_put":
            cache[:, :, pos] = v
        else:
            cache[:, :, pos:pos + v.shape[2]] = v
        return cache.sum(-1)

    flat = [a for c in cases for a in c]

    def many(*args):
        return tuple(update(*args[i:i + 3]) for i in range(0, len(args), 3))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_function(many, [a.clone() if isinstance(a, torch.Tensor) else a for a in flat])
    run_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in flat]
    outs = compiled(*run_args)
    for i, (cache, pos, v) in enumerate(cases):
        expected_cache = cache.clone()
        expected = update(expected_cache, pos, v)
        assert torch.equal(run_args[3 * i], expected_cache), f"{form} {dtype} case {i}: cache not updated"
        assert_matches(outs[i], expected, update(cache.double(), pos, v.double()), dtype, f"{form} case {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_index_put_negative_positions(dtype):
    g = _mk(11)
    cases = [(_rand(g, (2, s, 3), dtype), torch.tensor(p), _rand(g, (2, len(p), 3), dtype))
             for s, p in [(5, [-1]), (9, [-2, 0]), (17, [16, -17]), (4, [0, 1, 2, 3])]]
    check_op(lambda c, p, v: torch.ops.aten.index_put(c, [None, p], v), cases, dtype, "index_put-negative")


@pytest.mark.parametrize("dtype", DTYPES)
def test_view_reshape_transpose_permute_expand_cat(dtype):
    g = _mk(12)
    cases = [(_rand(g, (r, 2, c), dtype), _rand(g, (r, 1, c), dtype)) for r, c in zip(ROWS, COLS)]

    def shapes(x, y):
        r, _, c = x.shape
        a = x.view(r, 2 * c).reshape(2 * r, c)                     # view / reshape
        b = x.transpose(0, 2).permute(2, 1, 0).contiguous()       # transpose / permute
        e = y.expand(r, 3, c)                                     # expand a size-1 dim
        out = torch.cat((b, e, x.flip(1)), dim=1)                 # cat of mixed sources
        return out.reshape(r, -1) + a.view(r, 2 * c).sum(-1, keepdim=True)
    check_op(shapes, cases, dtype, "views", lambda x, y: 2 * x.shape[-1])
    # A graph whose result is a view of the input (no arithmetic at all).
    check_op(lambda x, y: x.permute(2, 0, 1).reshape(-1, x.shape[0]), cases, dtype, "pure-view")


_BF16_RELU = """
import torch
from lowbit.compiler.compile import compile_function
x = torch.randn(3, 3).bfloat16()
assert torch.equal(compile_function(torch.relu, (x,))(x)[0], torch.relu(x))
"""


def test_bf16_elementwise_codegen_does_not_abort():
    """Regression: LLVM once aborted the process on vectorized bf16 relu of shape [3, 3]."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _BF16_RELU], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit code {done.returncode}: {done.stderr.strip()[-300:]}"
