"""lowbit.quant: low-bit weight formats, `quantize_`, `LowBitLinear` and `torch.ops.lowbit.linear`.

The formats and the op's exact semantics are specified in docs/formats.md; the eager op
defined here is the reference every compiled path is checked against.
"""
from .api import quantize_
from .config import QuantConfig
from .formats import (
    ACTIVATION_FORMATS,
    GRANULARITIES,
    WEIGHT_FORMAT_ALIASES,
    WEIGHT_FORMATS,
    LowBitSpec,
    WeightFormat,
    canonical_weight_format,
    get_weight_format,
)
from .embedding import LowBitEmbedding
from .module import LowBitLinear
from .op import reference_linear
from .packing import CorruptPackedWeightError, pack_codes, unpack_codes
from .quantizers import (
    QuantizedWeight,
    dequantize_weight,
    exact_representation,
    quantize_activations_int8,
    quantize_weight,
)
from .serialization import CheckpointError, load_quantized, read_quantized, save_quantized

__all__ = [
    "ACTIVATION_FORMATS", "GRANULARITIES", "WEIGHT_FORMAT_ALIASES", "WEIGHT_FORMATS",
    "CheckpointError", "CorruptPackedWeightError", "LowBitEmbedding", "LowBitLinear", "LowBitSpec", "QuantConfig",
    "QuantizedWeight", "WeightFormat", "canonical_weight_format", "dequantize_weight",
    "exact_representation", "get_weight_format", "load_quantized", "pack_codes",
    "quantize_", "quantize_activations_int8", "quantize_weight", "read_quantized",
    "reference_linear", "save_quantized", "unpack_codes",
]
