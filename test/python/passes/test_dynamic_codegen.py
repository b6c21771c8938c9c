"""Shape-generic codegen: graphs exported with dynamic dims (token count T, KV length S) go
through the whole pipeline once and run for many sizes (1, 3, 17, 64, 127, 300) against
eager PyTorch; the IR must really be parallel (scf.forall), vectorized and, for matmuls,
BRGEMM calls -- not scalar loops that happen to give the right numbers.

The compiled code is called through MLIR's C interface (`llvm.emit_c_interface`, memref
descriptors built by `torch_mlir.runtime` from numpy arrays, `ExecutionEngine.invoke`): the
project's own JIT entry uses bare pointers and static shapes until the dynamic calling
convention lands in the frontend, so this file carries its own small runner.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim
from torch_mlir import ir
from torch_mlir.execution_engine import ExecutionEngine
from torch_mlir.extras.fx_decomp_util import get_decomposition_table
from torch_mlir.extras.fx_importer import FxImporter
from torch_mlir.runtime import get_ranked_memref_descriptor

from lowbit.compiler import threads
from lowbit.compiler.decompositions import lowbit_decompositions
from lowbit.compiler.jit import _shared_libs
from lowbit.compiler.passmanager import new_context
from lowbit.compiler.pipeline import Pipeline, default_stages

SIZES = [1, 3, 17, 64, 127, 300]
_FRESH = itertools.count()
BARE_PTR = "convert-func-to-llvm{use-bare-ptr-memref-call-conv=1}"


class DynamicFunction:
    """`fn` exported with dynamic dims, compiled by the default pipeline with the
    descriptor-based C interface, callable on numpy arrays of any size of those dims.

    `dynamic[i]` maps input i's dims to symbol names (equal names are one symbol).
    `ir_after[stage]` keeps the IR text after each stage for the structural assertions.
    """

    def __init__(self, fn, example: list[torch.Tensor], dynamic: list[dict[int, str]]):
        self.fn = fn
        symbols: dict[str, Dim] = {}
        spec = tuple({d: symbols.setdefault(name, Dim(name, min=1, max=8192)) for d, name in dims.items()} or None
                     for dims in dynamic)

        class Wrapped(torch.nn.Module):
            def forward(self, *args):
                return fn(*args)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(Wrapped(), tuple(example), dynamic_shapes=(spec,), strict=False)
            ep = ep.run_decompositions(lowbit_decompositions(get_decomposition_table()))
        importer = FxImporter(context=new_context())
        importer.import_stateless_graph(ep.graph_module.graph, func_name="main")
        self._compile(importer.module, start=None)

    @classmethod
    def from_mlir(cls, text: str, reference) -> "DynamicFunction":
        """A linalg-on-tensors module (`func.func @main`) compiled from the lowbit stage on;
        `reference(*args)` gives the expected outputs."""
        self = cls.__new__(cls)
        self.fn = reference
        self._compile(ir.Module.parse(text, context=new_context()), start="lowbit")
        return self

    def _compile(self, module: ir.Module, start: str | None) -> None:
        stages = default_stages()
        for stage in stages:
            if stage.name == "lower-to-llvm":
                stage.passes = ["convert-func-to-llvm" if p == BARE_PTR else p for p in stage.passes]
        pipeline = Pipeline(stages=stages)
        self.ir_after: dict[str, str] = {}
        names = [s.name for s in pipeline.stages]
        for name in names[names.index(start) if start else 0:]:
            if name == "lower-to-llvm":
                with module.context:
                    for op in module.body.operations:
                        if op.operation.name == "func.func" and op.operation.attributes["sym_name"].value == "main":
                            op.operation.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
            pipeline.run_stage(module, name)
            self.ir_after[name] = str(module)
        self.engine = ExecutionEngine(module, opt_level=3, shared_libs=_shared_libs())
        self.engine.initialize()

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            want = self.fn(*args)
        want = list(want) if isinstance(want, (tuple, list)) else [want]
        outs = [np.empty(w.shape, dtype=_np_dtype(w.dtype)) for w in want]
        arrays = [_to_numpy(a) for a in args] + outs
        descs = [ctypes.pointer(ctypes.pointer(get_ranked_memref_descriptor(a))) for a in arrays]
        threads.configure()
        self.engine.invoke("main", *descs)
        return [_from_numpy(o, w.dtype) for o, w in zip(outs, want)], want


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.int64: np.int64,
            torch.int32: np.int32}[dtype]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.int16).view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _close(got, want, dtype, scale_tol=None):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        scale = max(1.0, w.float().abs().max().item()) if w.numel() else 1.0
        atol = (scale_tol or {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]) * scale
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=0)


def _no_scalar_loops(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "lowbit.vectorize" and "scalar loops" in r.getMessage()]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def nthreads(request, monkeypatch):
    monkeypatch.setenv("LOWBIT_NUM_THREADS", str(request.param))
    return request.param


# -- elementwise ops and reductions (lowbit-fuse-parallel, lowbit-vectorize) ----------------

def rmsnorm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def silu_mul(a, b):
    return F.silu(a) * b


def softmax_rows(x):
    return torch.softmax(x, -1)


def masked_scores_softmax(s, mask):
    # attention's softmax over a dynamic KV length S with a boolean mask
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rmsnorm_silu_dynamic_tokens(dtype, nthreads, caplog):
    dim, hidden = 1024, 2816
    g = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.INFO, logger="lowbit.vectorize"):
        norm = DynamicFunction(rmsnorm, [torch.randn(1, 5, dim).to(dtype), torch.randn(dim).to(dtype)],
                               [{1: "T"}, {}])
        mlp = DynamicFunction(silu_mul, [torch.randn(5, hidden).to(dtype), torch.randn(5, hidden).to(dtype)], [{0: "T"}, {0: "T"}])
    assert not _no_scalar_loops(caplog)
    for f in (norm, mlp):
        text = f.ir_after["lowbit"]
        assert "?x" in text and "scf.forall" in text and "vector.transfer_read" in text, text[:3000]
        assert "linalg.generic" not in text
    # the RMSNorm's sum of squares keeps vector partials along the row
    assert "vector.multi_reduction <add>" in norm.ir_after["lowbit"]
    # below two tasks' worth of rows (decode) the groups run without an OpenMP region
    assert "scf.if" in norm.ir_after["lowbit"] and "scf.if" in mlp.ir_after["lowbit"]
    for t in SIZES:
        x = (torch.randn(1, t, dim, generator=g) * 3).to(dtype)
        w = torch.randn(dim, generator=g).to(dtype)
        _close(*norm(x, w), dtype)
        a, b = [(torch.randn(t, hidden, generator=g) * 3).to(dtype) for _ in range(2)]
        _close(*mlp(a, b), dtype)


def rotate_half_rope(q, cos, sin):
    # Llama's RoPE: the concatenation of the two rotated halves is a buffer copy per half
    half = q.shape[-1] // 2
    rot = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    return q * cos + rot * sin


def test_rope_concat_copies_run_in_parallel(nthreads):
    """The concatenation's copies are split over the threads (lowbit-parallel-copy) when
    they are large, copied serially when small; exact for every token count."""
    heads, d = 16, 128
    f = DynamicFunction(rotate_half_rope, [torch.randn(1, heads, 5, d), torch.randn(5, d), torch.randn(5, d)],
                        [{2: "T"}, {0: "T"}, {0: "T"}])
    text = f.ir_after["runtime-calls"]
    assert "call @lowbit_parallel_copy_" in text and "scf.forall" in text
    g = torch.Generator().manual_seed(4)
    for t in SIZES + [1000]:  # 1000 tokens: 4 MiB per half, far above the threshold
        q = torch.randn(1, heads, t, d, generator=g)
        cos, sin = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)
        got, want = f(q, cos, sin)
        assert torch.equal(got[0], want[0]), t


def test_softmax_over_dynamic_kv_length(nthreads, caplog):
    with caplog.at_level(logging.INFO, logger="lowbit.vectorize"):
        sm = DynamicFunction(masked_scores_softmax,
                             [torch.randn(4, 5, 7), torch.ones(5, 7, dtype=torch.bool)],
                             [{1: "T", 2: "S"}, {0: "T", 1: "S"}])
    assert not _no_scalar_loops(caplog)
    text = sm.ir_after["lowbit"]
    assert "tensor<4x?x?xf32>" in text and "scf.forall" in text
    # max and sum along the dynamic S keep vector partials (loop-carried vectors)
    assert "vector.multi_reduction <maximumf>" in text and "vector.multi_reduction <add>" in text
    assert "-> (vector<" in text and "linalg.generic" not in text
    g = torch.Generator().manual_seed(1)
    for t, s in [(1, 1), (1, 300), (3, 17), (17, 64), (64, 127), (127, 3), (300, 300)]:
        x = torch.randn(4, t, s, generator=g) * 4
        mask = torch.rand(t, s, generator=g) > 0.3
        mask[:, 0] = True  # a row of all -inf is NaN in eager and here; keep rows finite
        _close(*sm(x, mask), torch.float32)


def test_softmax_rows_static_inner_dynamic_rows(nthreads):
    sm = DynamicFunction(softmax_rows, [torch.randn(5, 4097)], [{0: "T"}])
    assert "scf.forall" in sm.ir_after["lowbit"]
    g = torch.Generator().manual_seed(2)
    for t in SIZES:
        _close(*sm(torch.randn(t, 4097, generator=g) * 5), torch.float32)


# -- dense matmuls (lowbit-dense-tile, lowbit-dense-brgemm-calls) ---------------------------

DENSE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _dense_close(got, want, dtype):
    _close(got, want, dtype, {torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype])


def _kernel_table_size() -> int:
    """How many BRGEMM descriptions the runtime has handed out (handles are 1..count)."""
    from lowbit.runtime import brgemm as bg
    lib = bg._lib()
    lo, hi = 0, 1
    while lib.lowbit_brgemm_isa(hi) >= 0:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if lib.lowbit_brgemm_isa(mid) >= 0 else (lo, mid)
    return lo


def _brgemm_ir(f: DynamicFunction) -> str:
    text = f.ir_after["runtime-calls"]
    assert "call @lowbit_brgemm_invoke" in text, "no BRGEMM tile"
    assert "scf.forall" in text
    # no matmul left for scalar loops, except the guarded fallback in a dynamic tile's else
    lowbit = f.ir_after["lowbit"]
    assert lowbit.count('lowbit.brgemm = "') >= 1
    return text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [48, 100, 256])
def test_linear_weight_argument_dynamic_tokens(dtype, n, nthreads):
    # nn.Linear with its weight passed as an argument (bound at run time), T dynamic.
    k = 96
    lin = DynamicFunction(lambda x, w: F.linear(x, w), [torch.randn(5, k).to(dtype), torch.randn(n, k).to(dtype)],
                          [{0: "T"}, {}])
    _brgemm_ir(lin)
    g = torch.Generator().manual_seed(n)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    for t in SIZES:
        x = torch.randn(t, k, generator=g).to(dtype)
        _dense_close(*lin(x, w), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_matmuls_dynamic_t_and_kv_length(dtype, nthreads):
    # scores = q @ k^T over a dynamic KV length S, out = p @ v with K = S dynamic.
    def attn(q, k, v):
        return (q @ k.transpose(-1, -2)) @ v

    h, d = 4, 64
    f = DynamicFunction(attn, [torch.randn(h, 5, d).to(dtype), torch.randn(h, 6, d).to(dtype),
                               torch.randn(h, 6, d).to(dtype)],
                        [{1: "T"}, {1: "S"}, {1: "S"}])
    text = _brgemm_ir(f)
    assert text.count("call @lowbit_brgemm_invoke") >= 2
    g = torch.Generator().manual_seed(3)
    # A size never dispatched before: the tiles' run-time descriptions reach the runtime
    # (new kernel-table entries), so they ran as BRGEMM invokes, not the loop fallback.
    before = _kernel_table_size()
    fresh = 211 + next(_FRESH)  # T and S sizes no earlier test of this process used
    q, k, v = (torch.randn(h, n_, d, generator=g).to(dtype) for n_ in (fresh, fresh + 17, fresh + 17))
    _close(*f(q, k, v), dtype, {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype])
    assert _kernel_table_size() > before
    # S = 0: no score tiles; p @ v has K = 0, which the runtime rejects (k <= 0): the
    # guarded fallback leaves the zero init, as eager does.
    for t, s_len in [(3, 0), (1, 1), (1, 300), (3, 17), (17, 64), (64, 127), (127, 3), (300, 300)]:
        q = torch.randn(h, t, d, generator=g).to(dtype)
        k = torch.randn(h, s_len, d, generator=g).to(dtype)
        v = (torch.randn(h, s_len, d, generator=g) / s_len ** 0.5).to(dtype)
        got, want = f(q, k, v)
        scale = d ** 0.5
        _close([got[0] / scale], [want[0] / scale], dtype, {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype])
        if s_len == 0:
            assert torch.count_nonzero(got[0]) == 0


PACKED_ARG = """
#a = affine_map<(d0, d1, d2, d3) -> (d0, d3)>
#b = affine_map<(d0, d1, d2, d3) -> (d1, d3, d2)>
#c = affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>
func.func @main(%x: tensor<?x{k}xf32>, %p: tensor<{np}x{k}x32xf32>) -> tensor<?x{n}xf32> {{
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x{k}xf32>
  %e = tensor.empty(%m) : tensor<?x{n}xf32>
  %e3 = tensor.expand_shape %e [[0], [1, 2]] output_shape [%m, {np}, 32] : tensor<?x{n}xf32> into tensor<?x{np}x32xf32>
  %r = linalg.contract indexing_maps = [#a, #b, #c] {{lowbit.brgemm = "packed", lowbit.brgemm_beta0}}
      ins(%x, %p : tensor<?x{k}xf32>, tensor<{np}x{k}x32xf32>) outs(%e3 : tensor<?x{np}x32xf32>) -> tensor<?x{np}x32xf32>
  %y = tensor.collapse_shape %r [[0], [1, 2]] : tensor<?x{np}x32xf32> into tensor<?x{n}xf32>
  return %y : tensor<?x{n}xf32>
}}
"""

PACKED_ARG_BF16 = """
#a = affine_map<(d0, d1, d2, d3, d4) -> (d0, d3, d4)>
#b = affine_map<(d0, d1, d2, d3, d4) -> (d1, d3, d2, d4)>
#c = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2)>
func.func @main(%x: tensor<?x{k}xbf16>, %p: tensor<{np}x{k2}x32x2xbf16>) -> tensor<?x{n}xbf16> {{
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x{k}xbf16>
  %x3 = tensor.expand_shape %x [[0], [1, 2]] output_shape [%m, {k2}, 2] : tensor<?x{k}xbf16> into tensor<?x{k2}x2xbf16>
  %e = tensor.empty(%m) : tensor<?x{n}xbf16>
  %e3 = tensor.expand_shape %e [[0], [1, 2]] output_shape [%m, {np}, 32] : tensor<?x{n}xbf16> into tensor<?x{np}x32xbf16>
  %r = linalg.contract indexing_maps = [#a, #b, #c] {{lowbit.brgemm = "packed", lowbit.brgemm_beta0}}
      ins(%x3, %p : tensor<?x{k2}x2xbf16>, tensor<{np}x{k2}x32x2xbf16>) outs(%e3 : tensor<?x{np}x32xbf16>) -> tensor<?x{np}x32xbf16>
  %y = tensor.collapse_shape %r [[0], [1, 2]] : tensor<?x{np}x32xbf16> into tensor<?x{n}xbf16>
  return %y : tensor<?x{n}xbf16>
}}
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_weight_argument_dynamic_m(dtype, nthreads):
    # The form the low-bit passes emit for a weight packed at bind time: the blocked
    # contraction of lowbit-dense-tile over a packed B that is a function argument.
    from lowbit.runtime import brgemm as bg
    n, k = 96, 128
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    packed = bg.pack_b(w, transposed=True)
    if dtype == torch.float32:
        text = PACKED_ARG.format(k=k, n=n, np=n // 32)
        packed = packed.reshape(n // 32, k, 32)
    else:
        text = PACKED_ARG_BF16.format(k=k, k2=k // 2, n=n, np=n // 32)
        packed = packed.reshape(n // 32, k // 2, 32, 2)

    def reference(x, p):
        return F.linear(x.float(), w.float()).to(dtype)

    f = DynamicFunction.from_mlir(text, reference)
    assert "scf.forall" in f.ir_after["lowbit"] and "call @lowbit_brgemm_invoke" in f.ir_after["runtime-calls"]
    for t in SIZES:
        x = torch.randn(t, k, generator=g).to(dtype)
        _dense_close(*f(x, packed), dtype)


@pytest.mark.parametrize("shapes", [((2, 3, 0), (2, 0, 5)), ((2, 0, 4), (2, 4, 5)), ((3, 0), (0, 5))],
                         ids=["zero_k_bmm", "zero_m_bmm", "zero_k_mm"])
def test_empty_matmuls_compile_and_run(shapes):
    # Issue 13: a lowbit pass raised "integer division or modulo by zero" planning BRGEMM
    # tiles for a zero-K batched matmul. Empty products are left to loops (nothing to do).
    fn = torch.bmm if len(shapes[0]) == 3 else torch.mm
    a, b = (torch.randn(s) for s in shapes)
    f = DynamicFunction(fn, [a, b], [{}, {}])
    assert 'lowbit.brgemm = "' not in f.ir_after["lowbit"]
    got, want = f(a, b)
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_linear_dynamic_tokens(dtype, nthreads, tmp_path, monkeypatch):
    # A frozen (constant) Linear weight with a dynamic token count, through the project's
    # own shape-generic capture: B packed at compile time, M tiles with run-time tails;
    # bf16 folds the zero init and the rounding into the tile (beta 0, bf16 C).
    from lowbit.compiler.compile import compile_function
    n, k = 160, 96
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)

    def lin(x, weight):
        return F.linear(x, weight)

    monkeypatch.setenv("LOWBIT_DUMP_IR", str(tmp_path))
    compiled = compile_function(lin, [torch.randn(5, k).to(dtype), w], freezable=[1], dynamic_dims={0: {0: "T"}})
    lowbit_ir = next(tmp_path.glob("*-lowbit.mlir")).read_text()
    assert 'lowbit.brgemm = "packed"' in lowbit_ir and "tensor<?x" in lowbit_ir
    if dtype == torch.bfloat16:
        assert "lowbit.brgemm_beta0" in lowbit_ir and "xbf16>) -> tensor<?x" in lowbit_ir
    for t in SIZES:
        x = torch.randn(t, k, generator=g).to(dtype)
        threads.configure()
        got = compiled(x, w)[0]
        _dense_close([got], [lin(x, w)], dtype)
