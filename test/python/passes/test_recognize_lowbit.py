"""End to end: low-bit matmuls written in plain PyTorch are recognised and compute like eager.

Each model is compiled once through the full pipeline; the report of the `lowbit` stage
says what was recognised, and the compiled function is compared with eager PyTorch.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.compiler.compile import ENTRY, CompiledGraph
from lowbit.compiler.frontend import capture, import_graph
from lowbit.compiler.jit import JitFunction
from lowbit.compiler.pipeline import Pipeline
from lowbit.passes.qlinear import read_report


def compile_with_report(model: nn.Module, x: torch.Tensor):
    """Compile `model(x)`; return (compiled callable, report entries of the lowbit stage)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, (x,))
        pipeline = Pipeline()
        module = import_graph(captured, func_name=ENTRY)
        pipeline.run(module, stop="lowbit")
        report = read_report(module)
        pipeline.run(module, start="bufferize")
        jit = JitFunction(module, ENTRY, captured.input_specs, captured.output_specs)
    return CompiledGraph(captured, jit, pipeline), report


def matmul_entries(report):
    return [e for e in report if e.get("kind") == "matmul"]


def pack_2bit_high_first(codes: torch.Tensor) -> torch.Tensor:
    """The model's own order: 4 codes per byte along K, the first code in the HIGH bits."""
    n, k = codes.shape
    c = F.pad(codes, (0, (-k) % 4)).view(n, -1, 4).to(torch.uint8)
    return (c[..., 0] << 6) | (c[..., 1] << 4) | (c[..., 2] << 2) | c[..., 3]


class Packed2Bit(nn.Module):
    """Plain PyTorch 2-bit layer: uint8 buffer of codes packed 4 per byte (high bits first),
    dequantized in forward as (code - offset) * scale with per-row or per-group scales."""

    def __init__(self, n: int, k: int, offset: float = 2.0, group: int = 0, style: str = "linear",
                 seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.k, self.offset, self.group, self.style = k, offset, group, style
        codes = torch.randint(0, 4, (n, k), generator=g)
        self.register_buffer("packed", pack_2bit_high_first(codes))
        groups = -(-k // group) if group else 1
        self.register_buffer("scale", (torch.rand(n, groups, generator=g) + 0.25).to(torch.float32))

    def weight(self) -> torch.Tensor:
        p = self.packed
        q = torch.stack([(p >> 6) & 3, (p >> 4) & 3, (p >> 2) & 3, p & 3], dim=-1)
        q = q.reshape(p.shape[0], -1)[:, : self.k]
        s = self.scale
        if self.group:
            s = s.repeat_interleave(self.group, dim=1)[:, : self.k]
        return (q.to(torch.float32) - self.offset) * s

    def forward(self, x):
        w = self.weight()
        if self.style == "linear":
            return F.linear(x, w)
        if self.style == "matmul_t":
            return x @ w.t()
        return torch.matmul(x, w.T)


class QATTernary(nn.Module):
    """An nn.Linear checkpoint from quantization-aware training: fp weights = {-1,0,1} * s."""

    def __init__(self, n: int, k: int, per_row: bool, bias: bool, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(k, n, bias=bias)
        s = torch.rand(n, 1, generator=g) + 0.1 if per_row else torch.tensor(0.37)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randint(-1, 2, (n, k), generator=g).float() * s)
            if bias:
                self.lin.bias.copy_(torch.randn(n, generator=g))

    def forward(self, x):
        return self.lin(x)


def assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# The acceptance case: its own packing order, per-row and per-group scales, the
# three ways PyTorch code writes the matmul, odd sizes and tails.
@pytest.mark.parametrize("n,k,group,style,xshape", [
    (8, 16, 0, "linear", (3,)),
    (17, 127, 0, "matmul_t", (1,)),
    (3, 64, 32, "matmul", (2, 5)),
    (1, 33, 0, "linear", (4,)),
    (64, 256, 64, "linear", (17,)),
])
def test_packed_2bit_model_recognized_and_equal_to_eager(n, k, group, style, xshape):
    model = Packed2Bit(n, k, group=group, style=style, seed=n * 1000 + k)
    x = torch.randn(*xshape, k, generator=torch.Generator().manual_seed(k))
    compiled, report = compile_with_report(model, x)
    (entry,) = matmul_entries(report)
    assert entry["result"] == "recognized", entry
    assert entry["origin"] == "dequant-subgraph"
    assert entry["format"].startswith("int2_sym/"), entry
    expected_gran = "channel" if not group else f"group{group}"
    # A group whose codes are all equal may still fit a coarser scale; never a finer one.
    assert entry["format"].split()[0].split("/")[1] in ("channel", expected_gran)
    assert_close(compiled(x)[0], model(x))


def test_packed_2bit_codes_are_recovered_exactly():
    model = Packed2Bit(5, 12)
    x = torch.randn(2, 12)
    captured = capture(model, (x,))
    module = import_graph(captured, func_name=ENTRY)
    Pipeline().run(module, stop="torch-to-linalg")
    from lowbit.compiler.passmanager import run_pipeline
    from lowbit.passes.qlinear import qlinear_functions, read_weights, spec_from_attr, QLINEAR_ATTR
    run_pipeline(module, "builtin.module(lowbit-recognize-lowbit-weights)")
    (func,) = qlinear_functions(module)
    spec, origin = spec_from_attr(func.attributes[QLINEAR_ATTR])
    w = read_weights(func)
    assert (spec.weight_format, spec.granularity) == ("int2_sym", "channel")
    torch.testing.assert_close(torch.from_numpy(w.q.astype("float32")) * torch.from_numpy(w.scales),
                               model.weight(), rtol=0, atol=0)


@pytest.mark.parametrize("n,k,per_row,bias,xshape", [
    (6, 8, False, True, (3,)),
    (17, 3, True, False, (1,)),
    (32, 127, True, True, (2, 7)),
    (1, 1, False, True, (5,)),
])
def test_qat_ternary_fp_weights_recognized(n, k, per_row, bias, xshape):
    model = QATTernary(n, k, per_row, bias, seed=n + k)
    x = torch.randn(*xshape, k)
    compiled, report = compile_with_report(model, x)
    (entry,) = matmul_entries(report)
    assert entry["result"] == "recognized", entry
    assert entry["origin"] == "fp-weights"
    # Lowest bit width first: a row without zeros may be int1; otherwise ternary.
    assert entry["format"].split("/")[0] in ("ternary", "int1")
    assert entry["format"].endswith("a=none")  # fp activations stay fp
    if bias:
        assert entry["bias"] == "absorbed"
    assert_close(compiled(x)[0], model(x))


class Dense(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        return x @ self.w.t()


@pytest.mark.parametrize("name,weight", [
    ("five values per row", torch.arange(-2.0, 3.0).repeat(4, 4)[:, :17]),
    ("random fp", torch.randn(9, 13)),
    ("half offset codes", (torch.randint(0, 4, (6, 8)).float() - 1.5) * 0.5),
])
def test_non_fitting_weights_fall_back_with_a_reason(name, weight):
    model = Dense(weight)
    x = torch.randn(3, weight.shape[1])
    compiled, report = compile_with_report(model, x)
    (entry,) = matmul_entries(report)
    assert entry["result"] == "not recognized"
    assert "not exactly" in entry["reason"]
    assert_close(compiled(x)[0], model(x))


class BitNetLinear(nn.Module):
    """Per-token int8 activation quantization written in the model (BitNet a8), ternary W."""

    def __init__(self, n, k, true_division: bool, bias: bool = False, round_fn=torch.round, hi=127):
        super().__init__()
        g = torch.Generator().manual_seed(n * k)
        self.register_buffer("w", torch.randint(-1, 2, (n, k), generator=g).float() * 0.05)
        self.b = nn.Parameter(torch.randn(n, generator=g)) if bias else None
        self.true_division, self.round_fn, self.hi = true_division, round_fn, hi

    def forward(self, x):
        a = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        s = torch.full_like(a, 127.0) / a if self.true_division else 127 / a
        xq = self.round_fn(x * s).clamp(-128, self.hi)
        y = F.linear(xq, self.w) / s
        return y + self.b if self.b is not None else y


def _act_entry(report):
    entries = [e for e in report if e.get("kind") == "act-quant"]
    return entries[0] if entries else None


@pytest.mark.parametrize("n,k,xshape,bias", [(6, 8, (3,), False), (17, 127, (1,), True), (5, 64, (2, 3), True)])
def test_act_quant_absorbed_when_exactly_documented(n, k, xshape, bias):
    model = BitNetLinear(n, k, true_division=True, bias=bias)
    x = torch.randn(*xshape, k)
    x.view(-1, k)[0].zero_()  # a zero row
    compiled, report = compile_with_report(model, x)
    entry = _act_entry(report)
    assert entry is not None and entry["result"] == "absorbed", report
    assert entry["format"].endswith("a=int8") and entry["numerics"] == "exact"
    assert entry["bias"] == ("absorbed" if bias else "none")
    assert_close(compiled(x)[0], model(x))


@pytest.mark.parametrize("variant,why", [
    (dict(true_division=False), "ulp"),                       # 127 / t is 127 * (1 / t) in PyTorch
    (dict(true_division=True, round_fn=lambda t: torch.floor(t + 0.5)), "quantized input"),
    (dict(true_division=True, hi=126), "quantized input"),    # a different clamp
])
def test_act_quant_not_absorbed_when_it_differs(variant, why):
    # (clamp(-127, 127) is absorbed, rightly: with s = 127 / max|x|, x * s >= -127 always.)
    model = BitNetLinear(6, 24, **variant)
    x = torch.randn(4, 24) * 3
    compiled, report = compile_with_report(model, x)
    entry = _act_entry(report)
    assert entry is not None and entry["result"] == "not absorbed", report
    assert why in entry["reason"]
    assert matmul_entries(report)[0]["result"] == "recognized"  # the weight still is
    assert_close(compiled(x)[0], model(x))


def _ternary_rows(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (n, k), generator=g).float()
    s = torch.rand(n, 1, generator=g) + 0.5
    return q * s


def test_row_sample_prefilter_is_exact():
    # The recognizer rejects specs on a sample of rows first (per-channel / per-group rows
    # are independent). A row outside the sample that breaks the format must still be
    # caught by the full check, and zero rows in the sample must not reject a fitting weight.
    import numpy as np

    from lowbit.passes.lib_recognize import SAMPLE_ROWS, find_exact_format

    n, k = 64, 96
    sampled = set(np.unique(np.linspace(0, n - 1, SAMPLE_ROWS).astype(np.int64)).tolist())
    outside = next(r for r in range(n) if r not in sampled)
    w = _ternary_rows(n, k)
    spec, qw, _ = find_exact_format(w.numpy(), ["ternary"], [32])
    assert spec is not None and spec.granularity == "channel"
    bad = w.clone()
    bad[outside, 5] = 0.123
    spec, qw, reason = find_exact_format(bad.numpy(), ["ternary"], [32])
    assert spec is None and "not exactly" in reason
    zeros = w.clone()
    zeros[sorted(sampled)] = 0.0
    spec, qw, _ = find_exact_format(zeros.numpy(), ["ternary"], [32])
    assert spec is not None and spec.granularity == "channel"
    deq = qw.q.float() * qw.scales.reshape(n, 1)
    assert torch.equal(deq, zeros)
