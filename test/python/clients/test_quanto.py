"""optimum-quanto (real package) qint2/qint4 weights: WeightQBitsTensor subclasses flattened;
quanto's dispatch cannot be traced by export, so the weight is rebuilt and `.dequantize()`d
inside the graph; the uint8 codes, scale and float shift are recognised."""
import pytest
import torch

pytest.importorskip("optimum.quanto")
from optimum.quanto import freeze, qint2, qint4, quantize  # noqa: E402

from clients_helpers import compile_and_compare, recognized  # noqa: E402


@pytest.mark.parametrize("qtype,fmt", [(qint2, "int2_sym"), (qint4, "int4_sym")], ids=["qint2", "qint4"])
def test_quanto_mlp(qtype, fmt):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 72), torch.nn.ReLU(), torch.nn.Linear(72, 40))
    quantize(model, weights=qtype)
    freeze(model)
    for t in (1, 5):
        report, _ = compile_and_compare(model, (torch.randn(t, 128),), dequant_dtype=torch.float32, k_max=128)
    recognized(report, count=2, fmt=fmt)
