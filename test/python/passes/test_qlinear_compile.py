"""End to end: lowbit.linear layers compiled through the qlinear passes to the microkernels.

Every case checks the compiled result against the eager reference op, that the report
says the kernels ran (not the generic loops), and for one case per format the
differential "kernels vs reference body lowered to loops" result.
"""
import itertools

import pytest
import torch

import lowbit
from lowbit.compiler.compile import compile_captured, compile_function
from lowbit.compiler.frontend import capture
from lowbit.compiler.pipeline import Pipeline
from lowbit.runtime import set_isa, supported_isas, current_isa

FORMATS = [("ternary", None), ("ternary", 32), ("int1", None), ("int2_sym", 64), ("int2_asym", 32),
           ("int4_sym", None), ("int4_asym", 32), ("int8", None)]


def _layer(k, n, fmt, group, act, bias=True, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias))
    lowbit.quantize_(m, lowbit.QuantConfig(weights=fmt, activations=act, group_size=group))
    return m


def _check(c, m, x, rtol=2e-5):
    ref = m(x)
    out = c(x)[0]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = ref.abs().max().item() + 1e-6
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= rtol * scale * max(1, x.shape[-1] ** 0.5), (err, scale)


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("act", ["none", "int8"])
def test_formats_run_on_kernels(fmt, group, act):
    m = _layer(96, 70, fmt, group, act)
    x = torch.randn(5, 96)
    with torch.no_grad():
        c = compile_function(m, (x,))
        _check(c, m, x)
    (entry,) = [e for e in c.report if e.get("kind") == "matmul"]
    assert entry["result"] == "recognized" and entry["isa"] == current_isa(), entry
    assert entry["packed_bytes"] > 0


@pytest.mark.parametrize("shape,k,n", [((1,), 64, 64), ((3,), 17, 5), ((17,), 127, 129),
                                        ((2, 3), 40, 100), ((130,), 256, 65), ((1,), 4097, 3)])
def test_tails_and_leading_dims(shape, k, n):
    for act in ("int8", "none"):
        m = _layer(k, n, "ternary", None, act, seed=k)
        x = torch.randn(*shape, k)
        with torch.no_grad():
            c = compile_function(m, (x,))
            _check(c, m, x)
        assert all(e["isa"] != "generic (loops)" for e in c.report if e.get("kind") == "matmul"), c.report


def test_bf16_activations():
    m = _layer(64, 48, "ternary", None, "none")  # fp32 scales and bias, bf16 activations
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        c = compile_function(m, (x,))
        ref, out = m(x).float(), c(x)[0].float()
    assert c(x)[0].dtype == torch.bfloat16
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_isa_path(isa):
    if isa not in supported_isas():
        pytest.skip(f"{isa} not supported here")
    m = _layer(72, 80, "int2_asym", 8, "int8")
    x = torch.randn(3, 72)
    before = current_isa()
    try:
        set_isa(isa)
        with torch.no_grad():
            c = compile_function(m, (x,))
            _check(c, m, x)
        assert c.report[0]["isa"] == isa
    finally:
        set_isa(before)


def test_compiled_prefill_runs_amx_tiles():
    """With the AMX ISA, compiled int8 layers run AMX tiles for enough tokens (bitwise equal to
    the AVX-512 build of the same graph) and AVX-512 for a few tokens."""
    if "amx" not in supported_isas():
        pytest.skip("this CPU lacks AMX-INT8 (or Linux refused the tile state): no AMX tiles to reach")
    from lowbit.runtime import qgemm
    m = torch.nn.Sequential(torch.nn.Linear(300, 130), torch.nn.SiLU(), torch.nn.Linear(130, 70))
    lowbit.quantize_(m, lowbit.QuantConfig(weights="ternary", activations="int8"))
    before = current_isa()
    outs = {}
    try:
        for isa in ("amx", "avx512"):
            set_isa(isa)
            for t in (67, 5):
                x = torch.randn(t, 300, generator=torch.Generator().manual_seed(t))
                with torch.no_grad():
                    c = compile_function(m, (x,))
                    n0 = qgemm.amx_invocations()
                    _check(c, m, x)
                    outs[isa, t] = c(x)[0]
                    ran = qgemm.amx_invocations() - n0
                assert (ran > 0) == (isa == "amx" and t >= qgemm.amx_min_rows()), (isa, t, ran)
    finally:
        set_isa(before)
    for t in (67, 5):
        assert torch.equal(outs["amx", t], outs["avx512", t])


@pytest.mark.usefixtures("fresh_dynamo")
def test_token_counts_around_the_quantization_blocks():
    """A shape-generic compile (bound weights, run-time M) quantizes the activation rows in
    blocks on threads once M exceeds one block (16384 values: 17 rows of K = 1000), with a
    partial last block; one block or less is a single call. Every count matches eager, so
    each block read its own rows of x and wrote its own scales and row sums."""
    from lowbit.passes.lower_qlinear import QUANT_TASK_ELEMENTS
    k = 1000
    rows = -(-QUANT_TASK_ELEMENTS // k)
    m = torch.nn.Sequential(torch.nn.Linear(k, 70), torch.nn.SiLU(), torch.nn.Linear(70, 33))
    lowbit.quantize_(m, lowbit.QuantConfig(weights="ternary", activations="int8"))
    compiled = torch.compile(m, backend="lowbit", dynamic=True)
    with torch.no_grad():
        for t in (1, rows - 1, rows, rows + 1, 2 * rows + 5, 100):
            x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
            x[t // 2] *= 50  # a row whose scale differs from its neighbours'
            ref, out = m(x), compiled(x)
            scale = ref.abs().max().item()
            assert (out - ref).abs().max().item() <= 2e-5 * scale * k ** 0.5, t
    assert all(e["result"] == "recognized" and e["format"] == "ternary/tensor a=int8"
               for e in lowbit.explain(m).matmuls())


def test_kernels_match_reference_loops():
    """Differential: the same module with and without lowbit-lower-qlinear."""
    m = _layer(48, 33, "ternary", 16, "int8")
    x = torch.randn(7, 48)
    with torch.no_grad():
        fast = compile_function(m, (x,))
        loops = Pipeline()
        loops.stage("runtime-calls").passes.remove("lowbit-lower-qlinear")
        slow = compile_captured(capture(m, (x,)), pipeline=loops)
        assert slow.report[0]["isa"] == "generic (loops)"
        torch.testing.assert_close(fast(x)[0], slow(x)[0], rtol=1e-5, atol=1e-5)


def test_torch_compile_and_explain():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    lowbit.quantize_(model, lowbit.QuantConfig(weights="ternary", activations="int8"))
    compiled = torch.compile(model, backend="lowbit")
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    report = lowbit.explain(model)
    assert len(report.matmuls()) == 2
    assert all(e["result"] == "recognized" and e["format"] == "ternary/tensor a=int8" for e in report.matmuls())
    assert "ternary/tensor a=int8" in str(report)


class _Siblings(torch.nn.Module):
    """q/k/v-style projections of one input, mixed biases, then a use of each."""

    def __init__(self, k, widths, act):
        super().__init__()
        torch.manual_seed(3)
        self.proj = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=(i == 1)) for i, n in enumerate(widths))
        lowbit.quantize_(self, lowbit.QuantConfig(weights="ternary", activations=act))

    def forward(self, x):
        q, k, v = (p(x) for p in self.proj)
        return q.sum(-1, keepdim=True) * k[..., :1] + v


@pytest.mark.parametrize("act", ["int8", "none"])
def test_sibling_layers_share_one_kernel_call(act):
    m = _Siblings(40, [64, 17, 33], act)
    x = torch.randn(3, 40)
    with torch.no_grad():
        c = compile_function(m, (x,))
        _check(c, m, x)
    merged = {e["function"] for e in c.report if e.get("kind") == "matmul"}
    assert len(merged) == 1, c.report
    assert all(e["result"].startswith("recognized, merged into") for e in c.report if e.get("kind") == "matmul")


def test_int8_activations_only_when_the_user_opts_in():
    """fp activations stay fp (exact up to fp32 rounding) unless lowbit.options(activations="int8")."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with torch.no_grad():
        w = m[0].weight
        s = w.abs().mean()
        w.copy_(torch.clamp(torch.round(w / s), -1, 1) * s)  # a QAT-style ternary fp weight
    x = torch.randn(4, 64)
    with torch.no_grad():
        default = compile_function(m, (x,))
        torch.testing.assert_close(default(x)[0], m(x), rtol=1e-5, atol=1e-5)
        assert default.report[0]["format"] == "ternary/tensor a=none"
        with lowbit.options(activations="int8"):
            from lowbit.compiler.backend import current_options
            opted = compile_function(m, (x,), options=current_options())
        assert opted.report[0]["format"] == "ternary/tensor a=int8"
        assert opted.report[0]["isa"] == current_isa()
    with pytest.raises(ValueError, match="activations must be"):
        Pipeline(options=lowbit.compiler.pipeline.CompileOptions(activations="int4"))


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), act=st.sampled_from(["none", "int8"]),
       m=st.integers(1, 9), k=st.integers(1, 80), n=st.integers(1, 70), hidden=st.integers(1, 40),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_differential_mlp(fmt, act, m, k, n, hidden, bias, seed):
    """Hypothesis: a two-layer low-bit MLP with arbitrary (tail) sizes equals eager."""
    weight_format, group = fmt
    if group is not None and group > min(k, hidden):
        group = None
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(k, hidden, bias=bias), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, n, bias=bias))
    lowbit.quantize_(mlp, lowbit.QuantConfig(weights=weight_format, activations=act, group_size=group))
    x = torch.randn(m, k)
    with torch.no_grad():
        c = compile_function(mlp, (x,))
        _check(c, mlp, x, rtol=1e-4)
    assert all(e["isa"] == current_isa() for e in c.report if e.get("kind") == "matmul"), c.report
