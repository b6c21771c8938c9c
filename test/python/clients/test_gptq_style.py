"""GPTQ-style int32-packed weights with fp16 scales (fixture `gptq_style.py`, no package needed):
recognised within fp16 dequant rounding, compiled output vs eager; the bit-exact option rejects
them; act-order `g_idx` (permuted groups) is bound with a column permutation of x."""
import pytest
import torch

import lowbit
from gptq_style import GPTQStyleLinear
from clients_helpers import compile_and_compare, recognized


@pytest.mark.parametrize("bits,fmt", [(2, "int2_asym"), (3, "int4_"), (4, "int4_")])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_gptq_mlp_odd_shapes(bits, fmt, act_dtype):
    torch.manual_seed(bits)
    model = torch.nn.Sequential(GPTQStyleLinear(256, 72, bits, 128, seed=1), torch.nn.ReLU(),
                                GPTQStyleLinear(72, 37, bits, 32, seed=2, bias=False))
    for t in (1, 5):
        x = torch.randn(t, 256, dtype=act_dtype)
        report, _ = compile_and_compare(model, (x,), dequant_dtype=torch.float16 if act_dtype == torch.float32
                                        else torch.bfloat16, k_max=256, act_dtype=act_dtype)
    rows = recognized(report, count=2, fmt=fmt)
    assert all("dequant rounding" in r["numerics"] for r in rows), report


def test_bit_exact_option_rejects_fp16_dequant():
    model = GPTQStyleLinear(128, 64, 4, 64, seed=3)
    x = torch.randn(3, 128)
    torch._dynamo.reset()
    with torch.no_grad(), lowbit.options(dequant_numerics="bit-exact"):
        torch.compile(model, backend="lowbit")(x)
    report = lowbit.explain(model)
    rows = [e for e in report.matmuls() if e.get("origin") == "dequant-subgraph"]
    assert rows and all(e["result"] == "not recognized" for e in rows), report


def test_bad_numerics_option_raises():
    torch._dynamo.reset()
    model = GPTQStyleLinear(64, 64, 4, 32)
    with torch.no_grad(), lowbit.options(dequant_numerics="approximately"):
        with pytest.raises(Exception, match="dequant_numerics"):
            torch.compile(model, backend="lowbit")(torch.randn(2, 64))


@pytest.mark.parametrize("bits", [2, 4])
def test_act_order_g_idx(bits):
    """desc_act checkpoints: g_idx permutes K; the kernel reads x[:, perm] with groups contiguous."""
    model = torch.nn.Sequential(GPTQStyleLinear(256, 64, bits, 64, seed=4, act_order=True), torch.nn.ReLU(),
                                GPTQStyleLinear(64, 29, bits, 32, seed=5, act_order=True))
    for t in (1, 4):
        report, _ = compile_and_compare(model, (torch.randn(t, 256),), dequant_dtype=torch.float16, k_max=256)
    rows = recognized(report, count=2)
    assert all("act-order" in r["numerics"] for r in rows), report
