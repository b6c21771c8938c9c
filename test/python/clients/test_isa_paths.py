"""The client-library paths on every ISA the CPU allows (set_isa): a float zero point (hqq-style
offsets folded as group sums of x) and an act-order GPTQ layer, odd shapes, T = 1 and 5."""
import pytest
import torch

from lowbit.runtime import current_isa, set_isa, supported_isas

from clients_helpers import compile_and_compare, recognized
from gptq_style import GPTQStyleLinear


class FloatZeroLinear(torch.nn.Module):
    """`(q - z) * s` with a float z per group, as hqq computes it (fp16 dequant)."""

    def __init__(self, k, n, bits, group, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        groups = -(-k // group)
        self.register_buffer("q", torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8))
        self.register_buffer("s", (torch.rand(n, groups, generator=g) * 0.05 + 0.01).half())
        self.register_buffer("z", (torch.rand(n, groups, generator=g) * (2 ** bits - 1)).half())
        self.group = group

    def forward(self, x):
        s = self.s.repeat_interleave(self.group, 1)[:, : self.q.shape[1]]
        z = self.z.repeat_interleave(self.group, 1)[:, : self.q.shape[1]]
        w = ((self.q.half() - z) * s).to(x.dtype)
        return x @ w.t()


@pytest.fixture(params=[i for i in ("scalar", "avx2", "avx512") if i in supported_isas()])
def isa(request):
    before = current_isa()
    set_isa(request.param)
    yield request.param
    set_isa(before)


def test_float_zero_and_act_order_on_every_isa(isa):
    model = torch.nn.Sequential(FloatZeroLinear(200, 67, 2, 64, seed=1), torch.nn.ReLU(),
                                GPTQStyleLinear(67, 33, 4, 32, seed=2, act_order=True))
    for t in (1, 5):
        report, _ = compile_and_compare(model, (torch.randn(t, 200),), dequant_dtype=torch.float16, k_max=200)
    rows = recognized(report, count=2)
    assert any("float zero" in r["numerics"] for r in rows) and any("act-order" in r["numerics"] for r in rows), report
