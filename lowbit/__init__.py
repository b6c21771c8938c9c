"""lowbit: a compiler that runs PyTorch models with 1/1.58/2-bit weights at the limit of the CPU."""
__version__ = "0.1.0"

from lowbit.quant import LowBitLinear, QuantConfig, quantize_  # noqa: E402  (public API re-exports)


def __getattr__(name: str):
    # `lowbit.backend` is the torch.compile backend (also registered as backend="lowbit");
    # imported lazily so `import lowbit` does not load torch-mlir.
    if name == "backend":
        from lowbit.compiler.backend import lowbit_backend
        return lowbit_backend
    if name == "explain":
        from lowbit.compiler.report import explain
        return explain
    if name == "generate":
        # `lowbit.generate(...)`; importing the submodule binds it here too, and the module
        # itself is callable (forwards to the function), so both spellings work.
        import lowbit.generate as _generate_module
        return _generate_module
    if name in ("runtime", "compiler", "passes", "quant", "aot", "hf"):
        import importlib
        return importlib.import_module(f"lowbit.{name}")
    if name == "options":
        from lowbit.compiler.backend import options
        return options
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
