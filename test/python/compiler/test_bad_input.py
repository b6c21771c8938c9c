"""Wrong dtype, rank, shape, device or layout: a correct result or a clear exception.

Directly compiled functions (`compile_function`) have a fixed signature and must raise
`InputError` naming the input and the problem. Through `torch.compile` a different
dtype/rank/shape is a new signature and must simply give the right answer.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lowbit.compiler.compile import compile_function
from lowbit.compiler.frontend import FrontendError
from lowbit.compiler.jit import InputError


def f(x, w):
    return F.silu(x @ w) + 1


@pytest.fixture(scope="module")
def compiled():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_function(f, (torch.randn(3, 5), torch.randn(5, 4)))


def test_correct_call(compiled):
    x, w = torch.randn(3, 5), torch.randn(5, 4)
    torch.testing.assert_close(compiled(x, w)[0], f(x, w))


@pytest.mark.parametrize("x, message", [
    (torch.randn(3, 5, dtype=torch.float64), "input 0: expected dtype torch.float32, got torch.float64"),
    (torch.randn(3, 5).bfloat16(), "input 0: expected dtype torch.float32, got torch.bfloat16"),
    (torch.ones(3, 5, dtype=torch.int32), "input 0: expected dtype torch.float32, got torch.int32"),
    (torch.randn(15), "input 0: expected rank 2 (shape [3, 5]), got rank 1 (shape [15])"),
    (torch.randn(1, 3, 5), "input 0: expected rank 2 (shape [3, 5]), got rank 3"),
    (torch.randn(3, 6), "input 0: expected shape [3, 5], got [3, 6]"),
    (torch.randn(0, 5), "input 0: expected shape [3, 5], got [0, 5]"),
    (torch.empty(3, 5, device="meta"), "input 0: expected a CPU tensor, got device 'meta'"),
    (3.0, "input 0: expected a tensor float32[3, 5], got float"),
    (torch.randn(3, 5).numpy(), "input 0: expected a tensor"),
])
def test_mismatch_raises_naming_the_problem(compiled, x, message):
    with pytest.raises(InputError) as info:
        compiled(x, torch.randn(5, 4))
    assert message in str(info.value)


def test_wrong_number_of_inputs(compiled):
    with pytest.raises(InputError, match="expected 2 tensor inputs, got 1"):
        compiled.jit(torch.randn(3, 5))


def test_non_contiguous_inputs_give_correct_results(compiled):
    base = torch.randn(5, 3)
    x = base.t()                                   # transposed view
    w = torch.randn(4, 10)[:, ::2].t()             # strided and transposed
    assert not x.is_contiguous() and not w.is_contiguous()
    torch.testing.assert_close(compiled(x, w)[0], f(x, w))
    x_offset = torch.randn(4, 5)[1:]              # contiguous, non-zero storage offset
    torch.testing.assert_close(compiled(x_offset, w)[0], f(x_offset, w))
    expanded = torch.randn(1, 5).expand(3, 5)      # zero stride
    torch.testing.assert_close(compiled(expanded, w)[0], f(expanded, w))


def test_torch_compile_recompiles_for_new_dtype_rank_and_layout():
    torch._dynamo.reset()
    g = torch.compile(lambda x: torch.softmax(x * 2, -1), backend="lowbit")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in [torch.randn(3, 5), torch.randn(3, 5, dtype=torch.float64), torch.randn(2, 3, 5),
                  torch.randn(5, 3).t(), torch.randn(3, 5).bfloat16(), torch.randn(7)]:
            torch.testing.assert_close(g(x), torch.softmax(x * 2, -1))


def test_non_cpu_input_is_rejected_at_capture():
    with pytest.raises(FrontendError, match="on device 'meta'; lowbit compiles for the CPU only"):
        compile_function(lambda x: x + 1, (torch.empty(3, device="meta"),))


def test_compiled_kv_cache_with_wrong_cache_dtype_recompiles_correctly():
    """A cache of another dtype is a new signature through torch.compile, not a crash."""
    def update(cache, pos, v):
        cache.index_copy_(1, pos, v)
        return cache.sum()

    torch._dynamo.reset()
    g = torch.compile(update, backend="lowbit")
    for dtype in (torch.float32, torch.float64):
        cache, ref = torch.zeros(2, 6, dtype=dtype), torch.zeros(2, 6, dtype=dtype)
        pos, v = torch.tensor([5, 0]), torch.randn(2, 2, dtype=dtype)
        torch.testing.assert_close(g(cache, pos, v), update(ref, pos, v))
        torch.testing.assert_close(cache, ref)


def test_out_of_range_cache_position_never_writes_out_of_bounds():
    """Eager raises IndexError, and so does compiled code, without touching memory outside the cache."""
    def update(cache, pos, v):
        cache.index_copy_(0, pos, v)
        return cache.sum(-1)

    cache = torch.zeros(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_function(update, (cache.clone(), torch.tensor([1]), torch.ones(1, 3)))
    guard = torch.zeros(3, 4, 3)                   # cache in the middle of a larger buffer
    view = guard[1]
    with pytest.raises(IndexError, match="index out of range"):  # eager's exception
        compiled(view, torch.tensor([7]), torch.ones(1, 3))
    assert torch.count_nonzero(guard) == 0, "an out-of-range position wrote somewhere"
    compiled(view, torch.tensor([-1]), torch.ones(1, 3))  # negative wraps, as in eager
    assert torch.equal(guard[1, 3], torch.ones(3)) and torch.count_nonzero(guard) == 3


_RETURN_TWICE = """
import torch
from lowbit.compiler.compile import compile_function
x = torch.randn(4, 3)
outs = compile_function(lambda x: (x + 1, x + 1), (x,))(x)
assert all(torch.equal(o, x + 1) for o in outs) and outs[0].data_ptr() != outs[1].data_ptr()
same = compile_function(lambda x: (x, x * 2), (x,))(x)
assert torch.equal(same[0], x) and torch.equal(same[1], x * 2)
"""


def test_graph_returning_one_value_twice_does_not_crash():
    """One value returned twice once crashed buffer-results-to-out-params (a segfault); it
    runs in a subprocess so that a regression fails this test instead of the whole run."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _RETURN_TWICE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit code {done.returncode}: {done.stderr[-500:]}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.float64])
@pytest.mark.parametrize("shape", [(2, 4), (1, 3, 4)])
def test_linear_called_with_another_dtype_raises_eagers_error(dtype, shape):
    """Fake tensors do not check matmul operand dtypes: a compiled fp32 Linear used to
    return `m(x.float())` for an fp16/bf16/int64/bool/fp64 input. It raises what eager
    raises, directly compiled and through torch.compile."""
    m = torch.nn.Linear(4, 3).eval()
    x = torch.ones(shape, dtype=dtype)
    with pytest.raises(RuntimeError) as eager:
        m(x)
    with torch.no_grad(), pytest.raises(RuntimeError) as direct:
        compile_function(m, (x,))
    assert str(direct.value) == str(eager.value)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="lowbit")
    with torch.no_grad(), warnings.catch_warnings(), pytest.raises(RuntimeError) as through_dynamo:
        warnings.simplefilter("ignore")
        compiled(x)
    assert str(eager.value).splitlines()[0] in str(through_dynamo.value)


def test_matmul_family_with_mixed_dtypes_raises_an_error():
    """Where torch's meta kernel checks dtypes, export fails (FrontendError naming both
    dtypes); else the check above raises eager's error. Through torch.compile it is an
    error too (dynamo's own fake-tensor run raises first for bmm; else eager's error)."""
    a32, b16 = torch.randn(2, 3, 4), torch.randn(2, 4, 5).half()
    cases = [torch.bmm, torch.matmul, lambda a, b: a @ b[0],
             lambda a, b: F.scaled_dot_product_attention(a, b.transpose(1, 2), b.transpose(1, 2))]
    for fn in cases:
        with pytest.raises(RuntimeError) as eager:
            fn(a32, b16)
        with pytest.raises(RuntimeError) as direct:
            compile_function(fn, (a32, b16))
        assert str(direct.value) == str(eager.value) or (
            isinstance(direct.value, FrontendError) and ("float16" in str(direct.value) or "Half" in str(direct.value)))
        torch._dynamo.reset()
        with warnings.catch_warnings(), pytest.raises(RuntimeError) as through_dynamo:
            warnings.simplefilter("ignore")
            torch.compile(fn, backend="lowbit")(a32, b16)
        assert "Half" in str(through_dynamo.value) or "float16" in str(through_dynamo.value)
