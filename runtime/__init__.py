"""lowbit.runtime: the native microkernel library and the Python side that loads it."""
from .library import (
    IsaEnvironmentError,
    cpu_features,
    current_isa,
    error_string,
    load_openmp,
    load_runtime,
    runtime_library_path,
    set_isa,
    supported_isas,
)

__all__ = [
    "IsaEnvironmentError", "cpu_features", "current_isa", "error_string", "load_openmp",
    "load_runtime", "runtime_library_path", "set_isa", "supported_isas",
]
