"""torchao (real package) weight-only int1/int2/int4 and int8-dynamic-activation + intx weight:
tensor-subclass parameters are flattened before capture and their dequant is bound."""
import pytest
import torch

pytest.importorskip("torchao")
from torchao.quantization import IntxWeightOnlyConfig, quantize_  # noqa: E402
from torchao.quantization.granularity import PerAxis, PerGroup  # noqa: E402
from torchao.quantization.quant_primitives import MappingType  # noqa: E402

from clients_helpers import compile_and_compare, recognized  # noqa: E402


def _mlp(seed=0):
    torch.manual_seed(seed)
    # K must be a multiple of torchao's group size; N odd
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 37))


@pytest.mark.parametrize("dtype,fmt", [(torch.int1, "ternary"), (torch.int2, "int2_sym"), (torch.int4, "int4_")])
@pytest.mark.parametrize("granularity", [PerGroup(32), PerAxis(0)], ids=["group32", "axis0"])
def test_weight_only(dtype, fmt, granularity):
    model = _mlp()
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity))
    report, seconds = compile_and_compare(model, (torch.randn(3, 96),), dequant_dtype=torch.float32, k_max=96)
    recognized(report, count=2, fmt=fmt)


def test_explain_finds_bias_free_subclass_layers():
    model = torch.nn.Sequential(torch.nn.Linear(64, 40, bias=False))
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(32)))
    report, _ = compile_and_compare(model, (torch.randn(2, 64),), dequant_dtype=torch.float32, k_max=64)
    recognized(report, count=1, fmt="int2_sym/group32")


def test_weight_only_asymmetric_bf16():
    model = _mlp(1).to(torch.bfloat16)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(32),
                                          mapping_type=MappingType.ASYMMETRIC))
    report, _ = compile_and_compare(model, (torch.randn(5, 96, dtype=torch.bfloat16),),
                                    dequant_dtype=torch.bfloat16, k_max=96, act_dtype=torch.bfloat16)
    recognized(report, count=2, fmt="int2_")


def test_int8_dynamic_activation_intx_weight():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    model = _mlp(2)
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int2, weight_granularity=PerGroup(32)))
    report, _ = compile_and_compare(model, (torch.randn(4, 96),), dequant_dtype=torch.float32, k_max=96)
    recognized(report, count=2, fmt="int2_sym")


def test_small_llama_int2():
    from lowbit.models import LlamaConfig, make_tiny_llama
    model = make_tiny_llama(LlamaConfig(dim=128, n_heads=4, n_kv_heads=2, hidden_dim=352, n_layers=2,
                                        vocab_size=96, max_seq_len=32), seed=0)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(32)),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "layers" in fqn)
    tokens = torch.randint(0, 96, (1, 7))
    report, _ = compile_and_compare(model, (tokens, torch.arange(7)), dequant_dtype=torch.float32, k_max=352, calls=1)
    recognized(report, fmt="int2_sym")


def test_dynamic_lengths_compile_twice():
    """Dynamo's dynamic-shape recompile works through the flattened subclass graph."""
    import warnings

    from lowbit.compiler.compile_log import counters
    from lowbit.compiler.partition import UnsupportedOpWarning
    model = _mlp(3)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(32)))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowbit")
    before = counters["backend_compiles"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        for t in (1, 5, 9, 17, 3):
            x = torch.randn(t, 96)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counters["backend_compiles"] - before <= 3
