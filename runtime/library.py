"""Finds and loads the native runtime library and the OpenMP runtime the JIT needs."""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent


class RuntimeNotBuiltError(ImportError):
    pass


def runtime_library_path() -> Path:
    """Path of the built native runtime (`LOWBIT_RUNTIME_LIB` overrides)."""
    override = os.environ.get("LOWBIT_RUNTIME_LIB")
    if override:
        return Path(override)
    found = sorted(glob.glob(str(_HERE / "_lowbit_rt*.so")))
    if not found:
        raise RuntimeNotBuiltError(
            f"lowbit's native runtime is not built (no _lowbit_rt*.so in {_HERE}); "
            "run `pip install -e .` from the repository root")
    return Path(found[0])


@functools.lru_cache(maxsize=None)
def openmp_library_path() -> Path | None:
    """An OpenMP runtime exporting the `__kmpc_*` entry points (LLVM/Intel ABI).

    MLIR's `convert-scf-to-openmp` lowers to `__kmpc_fork_call` and friends; gcc's
    libgomp does not provide them. `LOWBIT_OPENMP_LIB` overrides the search.
    """
    override = os.environ.get("LOWBIT_OPENMP_LIB")
    if override:
        return Path(override)
    candidates = []
    for prefix in {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))}:
        candidates += [Path(prefix) / "lib" / "libiomp5.so", Path(prefix) / "lib" / "libomp.so"]
    candidates += [Path(p) for p in glob.glob("/usr/lib/x86_64-linux-gnu/libomp.so*")]
    candidates += [Path(p) for p in glob.glob("/usr/lib/llvm-*/lib/libomp.so*")]
    for c in candidates:
        if c.exists():
            return c
    return None


@functools.lru_cache(maxsize=None)
def load_openmp() -> ctypes.CDLL:
    path = openmp_library_path()
    if path is None:
        raise RuntimeError(
            "no OpenMP runtime with __kmpc_* symbols found (expected libiomp5.so from the "
            "`intel-openmp` package under sys.prefix/lib, or set LOWBIT_OPENMP_LIB)")
    # RTLD_GLOBAL so that code JIT-compiled later resolves __kmpc_* against it.
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


@functools.lru_cache(maxsize=None)
def load_runtime() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(runtime_library_path()), mode=ctypes.RTLD_GLOBAL)
    lib.lowbit_rt_isa.restype = ctypes.c_int32
    lib.lowbit_rt_isa_supported.argtypes = [ctypes.c_int32]
    lib.lowbit_rt_isa_supported.restype = ctypes.c_int32
    lib.lowbit_rt_set_isa.argtypes = [ctypes.c_int32]
    lib.lowbit_rt_set_isa.restype = ctypes.c_int32
    lib.lowbit_rt_isa_name.argtypes = [ctypes.c_int32]
    lib.lowbit_rt_isa_name.restype = ctypes.c_char_p
    lib.lowbit_rt_isa_error.restype = ctypes.c_int32
    lib.lowbit_rt_error_string.argtypes = [ctypes.c_int64]
    lib.lowbit_rt_error_string.restype = ctypes.c_char_p
    lib.lowbit_rt_abi_version.restype = ctypes.c_int32
    if lib.lowbit_rt_isa_error() != 0:
        import warnings
        warnings.warn(
            f"LOWBIT_ISA={os.environ.get('LOWBIT_ISA')!r} is not available on this CPU; "
            f"using {isa_name(lib.lowbit_rt_isa())}", RuntimeWarning, stacklevel=2)
    return lib


ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}
ISA_IDS = {v: k for k, v in ISA_NAMES.items()}


def isa_name(isa: int) -> str:
    return ISA_NAMES.get(isa, "unknown")


def current_isa() -> str:
    """The ISA path the runtime's kernels use now."""
    return isa_name(load_runtime().lowbit_rt_isa())


def supported_isas() -> list[str]:
    lib = load_runtime()
    return [name for i, name in ISA_NAMES.items() if lib.lowbit_rt_isa_supported(i)]


def set_isa(name: str) -> None:
    """Force an ISA path for this process (tests use it to cover every path)."""
    if name not in ISA_IDS:
        raise ValueError(f"unknown ISA {name!r}; expected one of {sorted(ISA_IDS)}")
    if load_runtime().lowbit_rt_set_isa(ISA_IDS[name]) != 0:
        raise RuntimeError(f"ISA {name!r} is not supported on this CPU (have {supported_isas()})")


def error_string(code: int) -> str:
    return load_runtime().lowbit_rt_error_string(code).decode()
