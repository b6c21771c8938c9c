"""Dense matmuls through the whole compiler (torch -> linalg -> lowbit-dense-tile ->
bufferize -> lowbit-dense-brgemm-calls -> LLVM JIT) against eager PyTorch: Linear layers
(packed constant weights, with and without bias, N on and off the 32-column panel grid),
matmuls and bmms of activations, fp32 and bf16, odd shapes, on 1 and 2 threads."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from lowbit.compiler import threads
from lowbit.compiler.compile import ENTRY, CompiledGraph
from lowbit.compiler.frontend import capture, import_graph
from lowbit.compiler.jit import JitFunction
from lowbit.compiler.pipeline import Pipeline, default_stages
from lowbit.runtime import current_isa, set_isa, supported_isas

MATMUL_OP = re.compile(r"^\s*(%\S+ = )?linalg\.(matmul|batch_matmul|contract)\b", re.M)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def dense_pipeline() -> Pipeline:
    """The default pipeline, with the dense passes added where they belong if absent."""
    stages = default_stages()
    for s in stages:
        if s.name == "lowbit" and "lowbit-dense-tile" not in s.passes:
            s.passes.insert(0, "lowbit-dense-tile")
        if s.name == "runtime-calls" and "lowbit-dense-brgemm-calls" not in s.passes:
            s.passes.insert(0, "lowbit-dense-brgemm-calls")
    return Pipeline(stages=stages)


def compile_dense(fn, inputs) -> tuple[CompiledGraph, str]:
    """Compile `fn`; returns the compiled graph and the IR after the runtime-calls stage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(fn, inputs)
    pipeline = dense_pipeline()
    module = import_graph(captured, func_name=ENTRY)
    pipeline.run(module, stop="runtime-calls")
    ir_text = str(module)
    pipeline.run(module, start="lower-to-llvm")
    jit = JitFunction(module, ENTRY, captured.input_specs, captured.output_specs)
    return CompiledGraph(captured, jit, pipeline), ir_text


def _check(compiled, fn, inputs, dtype):
    with torch.no_grad():
        ref = fn(*inputs)
        out = compiled(*inputs)[0]
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def nthreads(request):
    before = threads.get_num_threads()
    threads.set_num_threads(request.param)
    yield request.param
    threads.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m,k,n,bias", [(1, 64, 96, False), (3, 17, 64, True), (17, 128, 32, True),
                                        (5, 33, 40, False), (127, 3, 160, True)])
def test_linear(nthreads, dtype, m, k, n, bias):
    torch.manual_seed(m * 100 + n)
    lin = torch.nn.Linear(k, n, bias=bias).to(dtype)
    x = torch.randn(m, k, dtype=dtype)
    compiled, ir_text = compile_dense(lin, (x,))
    assert "call @lowbit_brgemm_invoke" in ir_text
    assert not MATMUL_OP.search(ir_text), "a matmul was left for the loop lowering"
    packed = n % 32 == 0 and (dtype == torch.float32 or k % 2 == 0)
    # Packed weights are a constant global of [n/32, k, 32] (bf16: [n/32, k/2, 32, 2]).
    shape = f"{n // 32}x{k}x32xf32" if dtype == torch.float32 else f"{n // 32}x{k // 2}x32x2xbf16"
    assert (f"memref<{shape}>" in ir_text) == packed
    _check(compiled, lin, (x,), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("b,m,k,n", [(1, 1, 1, 1), (2, 3, 17, 5), (3, 33, 64, 48)])
def test_bmm_of_activations(nthreads, dtype, b, m, k, n):
    torch.manual_seed(b + m + k + n)
    x = torch.randn(b, m, k, dtype=dtype)
    y = torch.randn(b, k, n, dtype=dtype)
    compiled, ir_text = compile_dense(torch.bmm, (x, y))
    assert "call @lowbit_brgemm_invoke" in ir_text
    assert not MATMUL_OP.search(ir_text), "a matmul was left for the loop lowering"
    _check(compiled, torch.bmm, (x, y), dtype)


def test_matmul_of_activations_and_reuse_across_calls():
    torch.manual_seed(0)

    def fn(x, y):
        return x @ y

    x, y = torch.randn(31, 65), torch.randn(65, 47)
    compiled, ir_text = compile_dense(fn, (x, y))
    assert "call @lowbit_brgemm_invoke" in ir_text
    for _ in range(3):  # fresh data each call: nothing is cached from the first call
        x, y = torch.randn(31, 65), torch.randn(65, 47)
        _check(compiled, fn, (x, y), torch.float32)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_isa_paths(isa):
    """Kernels are chosen when the compiled code dispatches, so a forced ISA is honoured."""
    if isa not in supported_isas():
        pytest.skip(f"{isa} not supported on this CPU")
    before = current_isa()
    set_isa(isa)
    try:
        torch.manual_seed(1)
        lin = torch.nn.Linear(40, 64)
        x = torch.randn(9, 40)
        compiled, _ = compile_dense(lin, (x,))
        _check(compiled, lin, (x,), torch.float32)
    finally:
        set_isa(before)
