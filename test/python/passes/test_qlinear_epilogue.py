"""Fused epilogues (lowbit-fuse-qlinear-epilogue + the kernels' LOWBIT_QF_ACT_* / BETA1):
compiled vs eager for every epilogue, fp32 and bf16, weight-only and int8 activations, odd
shapes; the report says what was fused; the reference body (generic path) agrees with the
kernels; the Llama MLP keeps its gate/up merge and fuses the residual into down."""
import os

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.compiler.compile import compile_captured, compile_function
from lowbit.compiler.frontend import capture
from lowbit.compiler.pipeline import Pipeline
from lowbit.runtime import current_isa, set_isa, supported_isas

EPILOGUES = {
    "relu": lambda y, r: torch.relu(y),
    "silu": lambda y, r: F.silu(y),
    "relu2": lambda y, r: torch.relu(y) ** 2,
    "residual": lambda y, r: y + r,
    "relu+residual": lambda y, r: r + F.relu(y),
    "silu+residual": lambda y, r: F.silu(y) + r,
}


class _Layer(torch.nn.Module):
    def __init__(self, k, n, epilogue, fmt="ternary", act="none", bias=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(k, n, bias=bias)
        self.epilogue = EPILOGUES[epilogue]
        lowbit.quantize_(self, lowbit.QuantConfig(weights=fmt, activations=act))

    def forward(self, x, r):
        return self.epilogue(self.lin(x), r)


def _compare(out, ref, k):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = ref.float().abs().max().item() + 1e-6
    err = (out.float() - ref.float()).abs().max().item()
    if ref.dtype == torch.bfloat16:
        # eager rounds the layer's output to bf16 before the activation / residual add;
        # the kernel rounds once at the end
        assert err <= 2e-2 * scale, (err, scale)
    else:
        assert err <= 2e-5 * scale * max(1, k ** 0.5), (err, scale)


def _matmuls(c):
    return [e for e in c.report if e.get("kind") == "matmul"]


SHAPES = [(1, 1, 3), (3, 17, 17), (17, 127, 65), (5, 3, 127)]


@pytest.mark.parametrize("epilogue", sorted(EPILOGUES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("act", ["none", "int8"])
def test_compiled_epilogue_matches_eager(epilogue, dtype, act):
    for i, (m, k, n) in enumerate(SHAPES):
        layer = _Layer(k, n, epilogue, act=act, bias=bool(i % 2), seed=k + n)
        x = torch.randn(m, k, dtype=dtype)
        r = torch.randn(m, n, dtype=dtype)
        r_before = r.clone()
        with torch.no_grad():
            c = compile_function(layer, (x, r))
            _compare(c(x, r)[0], layer(x, r), k)
        assert torch.equal(r, r_before), "the residual input was overwritten"
        (entry,) = _matmuls(c)
        assert entry["epilogue"] == epilogue, entry
        assert entry["isa"] == current_isa(), entry


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_isa(isa):
    if isa not in supported_isas():
        pytest.skip(f"{isa} not supported here")
    before = current_isa()
    try:
        set_isa(isa)
        for epilogue, dtype in (("silu+residual", torch.bfloat16), ("relu2", torch.float32),
                                ("silu", torch.float32), ("residual", torch.bfloat16)):
            layer = _Layer(40, 70, epilogue, fmt="int2_asym", act="int8")
            x, r = torch.randn(3, 40, dtype=dtype), torch.randn(3, 70, dtype=dtype)
            with torch.no_grad():
                c = compile_function(layer, (x, r))
                _compare(c(x, r)[0], layer(x, r), 40)
            assert _matmuls(c)[0]["isa"] == isa and _matmuls(c)[0]["epilogue"] == epilogue
    finally:
        set_isa(before)


@pytest.mark.parametrize("epilogue", ["silu+residual", "relu2"])
def test_kernels_match_reference_body(epilogue):
    """Differential: the fused function's reference body (generic loops) and the kernels."""
    layer = _Layer(48, 33, epilogue, act="int8")
    x, r = torch.randn(7, 48), torch.randn(7, 33)
    with torch.no_grad():
        fast = compile_function(layer, (x, r))
        loops = Pipeline()
        loops.stage("runtime-calls").passes.remove("lowbit-lower-qlinear")
        slow = compile_captured(capture(layer, (x, r)), pipeline=loops)
        assert slow.report[0]["isa"] == "generic (loops)" and slow.report[0]["epilogue"] == epilogue
        torch.testing.assert_close(fast(x, r)[0], slow(x, r)[0], rtol=1e-5, atol=1e-5)


def test_leading_dims_and_residual_stream():
    """[B, S, K] activations: the residual is collapsed to the call's 2-D shape."""
    layer = _Layer(64, 64, "residual", act="int8")
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        c = compile_function(layer, (x, x))
        _compare(c(x, x)[0], layer(x, x), 64)
    assert _matmuls(c)[0]["epilogue"] == "residual"


class _LlamaMLP(torch.nn.Module):
    def __init__(self, d, h, act):
        super().__init__()
        torch.manual_seed(5)
        self.gate = torch.nn.Linear(d, h, bias=False)
        self.up = torch.nn.Linear(d, h, bias=False)
        self.down = torch.nn.Linear(h, d, bias=False)
        self.o_proj = torch.nn.Linear(d, d, bias=False)
        lowbit.quantize_(self, lowbit.QuantConfig(weights="ternary", activations=act))

    def forward(self, x, attn):
        h = x + self.o_proj(attn)
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


@pytest.mark.parametrize("act", ["int8", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_llama_mlp_keeps_merge_and_fuses_residuals(act, dtype):
    mlp = _LlamaMLP(64, 96, act)
    x, attn = torch.randn(1, 5, 64, dtype=dtype), torch.randn(1, 5, 64, dtype=dtype)
    with torch.no_grad():
        c = compile_function(mlp, (x, attn))
        _compare(c(x, attn)[0], mlp(x, attn), 96)
    entries = _matmuls(c)
    merged = [e for e in entries if e["result"].startswith("recognized, merged into")]
    assert len(merged) == 2 and all(e["epilogue"] == "none" for e in merged), entries  # gate + up
    fused = sorted(e["epilogue"] for e in entries if e not in merged)
    assert fused == ["residual", "residual"], entries  # o_proj and down
    assert all(e["isa"] == current_isa() for e in entries)


def test_disable_pass_measures_the_unfused_graph(monkeypatch):
    layer = _Layer(32, 48, "silu+residual", act="int8")
    x, r = torch.randn(4, 32), torch.randn(4, 48)
    monkeypatch.setenv("LOWBIT_DISABLE_PASSES", "lowbit-fuse-qlinear-epilogue")
    with torch.no_grad():
        c = compile_function(layer, (x, r))
        _compare(c(x, r)[0], layer(x, r), 32)
    assert _matmuls(c)[0]["epilogue"] == "none"
    monkeypatch.setenv("LOWBIT_DISABLE_PASSES", "no-such-pass")
    with pytest.raises(ValueError, match="unknown lowbit passes"):
        Pipeline()


def test_not_fused_when_the_result_is_used_twice():
    class TwoUses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 24)
            lowbit.quantize_(self, lowbit.QuantConfig(weights="ternary", activations="int8"))

        def forward(self, x):
            y = self.lin(x)
            return torch.relu(y), y * 2

    m = TwoUses()
    x = torch.randn(3, 16)
    with torch.no_grad():
        c = compile_function(m, (x,))
        for o, ref in zip(c(x), m(x)):
            _compare(o, ref, 16)
    assert _matmuls(c)[0]["epilogue"] == "none"


def test_explain_shows_the_epilogue():
    # Epilogue fusion runs on qlinear functions with constant weights (weights="freeze"); layers
    # whose weights are bound as runtime buffers are not fused yet (README, known gaps).
    layer = _Layer(32, 40, "relu2", act="int8")
    compiled = torch.compile(layer, backend="lowbit")
    x, r = torch.randn(2, 32), torch.randn(2, 40)
    with torch.no_grad(), lowbit.options(weights="freeze"):
        torch.testing.assert_close(compiled(x, r), layer(x, r), rtol=1e-4, atol=1e-4)
    report = lowbit.explain(layer)
    assert [e["epilogue"] for e in report.matmuls()] == ["relu2"]
    assert "epilogue" in str(report) and "relu2" in str(report)
