"""lowbit: a compiler that runs PyTorch models with 1/1.58/2-bit weights at the limit of the CPU."""
__version__ = "0.1.0"

from lowbit.quant import LowBitLinear, QuantConfig, quantize_  # noqa: E402  (public API re-exports)
