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
        module = importer.module
        stages = default_stages()
        for stage in stages:
            if stage.name == "lower-to-llvm":
                stage.passes = ["convert-func-to-llvm" if p == BARE_PTR else p for p in stage.passes]
        pipeline = Pipeline(stages=stages)
        self.ir_after: dict[str, str] = {}
        for stage in pipeline.stages:
            if stage.name == "lower-to-llvm":
                with module.context:
                    for op in module.body.operations:
                        if op.operation.name == "func.func" and op.operation.attributes["sym_name"].value == "main":
                            op.operation.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
            pipeline.run_stage(module, stage.name)
            self.ir_after[stage.name] = str(module)
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
    for t in SIZES:
        x = (torch.randn(1, t, dim, generator=g) * 3).to(dtype)
        w = torch.randn(dim, generator=g).to(dtype)
        _close(*norm(x, w), dtype)
        a, b = [(torch.randn(t, hidden, generator=g) * 3).to(dtype) for _ in range(2)]
        _close(*mlp(a, b), dtype)


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
