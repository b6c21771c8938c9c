"""hqq (real package) HQQLinear 1/2/4-bit: scales and float zero points live in the module's
`meta` dict (bound as module state), dequant `(q - z) * s` with a float z (folded as per-group
offsets)."""
import pytest
import torch

pytest.importorskip("hqq")
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear  # noqa: E402

from clients_helpers import compile_and_compare, recognized  # noqa: E402


def _hqq(lin, nbits, group, dtype):
    return HQQLinear(lin, BaseQuantizeConfig(nbits=nbits, group_size=group), compute_dtype=dtype, device="cpu")


@pytest.mark.parametrize("nbits,fmt", [(1, "int1"), (2, "int2_sym"), (4, "int4_sym")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hqq_mlp(nbits, fmt, dtype):
    torch.manual_seed(nbits)
    model = torch.nn.Sequential(_hqq(torch.nn.Linear(128, 72), nbits, 64, dtype), torch.nn.SiLU(),
                                _hqq(torch.nn.Linear(72, 40, bias=False), nbits, 24, dtype))
    for t in (1, 6):
        report, _ = compile_and_compare(model, (torch.randn(t, 128, dtype=dtype),), dequant_dtype=dtype,
                                        k_max=128, act_dtype=dtype)
    rows = recognized(report, count=2, fmt=fmt)
    assert all("float zero point" in r["numerics"] for r in rows), report


def test_meta_dict_change_is_seen():
    """The meta-dict scales are bound with the same change detection as parameters."""
    torch.manual_seed(0)
    layer = _hqq(torch.nn.Linear(64, 64), 2, 32, torch.float32)
    x = torch.randn(2, 64)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="lowbit")
    with torch.no_grad():
        compiled(x)
        layer.meta["scale"].mul_(2)
        with pytest.warns(RuntimeWarning, match="changed after compilation"):
            out = compiled(x)
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
