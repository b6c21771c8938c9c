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


class IsaEnvironmentError(ValueError):
    """LOWBIT_ISA names no ISA, or one this CPU (or this build) cannot run."""


# LOWBIT_CPU_* bits of lowbit_rt_cpu_features (lowbit/runtime.h).
CPU_FEATURE_BITS = {
    "avx2": 1 << 0, "fma": 1 << 1, "avx512f": 1 << 2, "avx512bw": 1 << 3, "avx512vl": 1 << 4,
    "avx512_vnni": 1 << 5, "avx512vbmi": 1 << 6, "avx512_bf16": 1 << 7, "avx_vnni": 1 << 8,
    "amx_tile": 1 << 9, "amx_int8": 1 << 10, "amx_bf16": 1 << 11,
}
ACCEPTED_ISAS = ("scalar", "avx2", "avx512", "amx")
_ISA_NEEDS = {"avx2": "AVX2 + FMA", "avx512": "AVX-512 F/BW/VL/VNNI/VBMI + FMA",
              "amx": "AMX-INT8 (with AVX-512)"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "this CPU"


def _isa_problem(lib: ctypes.CDLL, raw: str) -> IsaEnvironmentError | None:
    """Why LOWBIT_ISA=`raw` cannot be honoured (None if it can)."""
    name = raw.strip().lower()
    if not name:
        return None
    accepted = ", ".join(ACCEPTED_ISAS)
    if name not in ACCEPTED_ISAS:
        return IsaEnvironmentError(
            f"LOWBIT_ISA={raw!r} is not an ISA lowbit knows; accepted values: {accepted} "
            "(case-insensitive), or unset it to use the best one this CPU supports")
    have = [n for i, n in ISA_NAMES.items() if lib.lowbit_rt_isa_supported(i)]
    if name == "amx":
        feats = lib.lowbit_rt_cpu_features()
        if not feats & CPU_FEATURE_BITS["amx_int8"]:
            return IsaEnvironmentError(
                f"LOWBIT_ISA=amx: this CPU ({_cpu_model()}) lacks AMX-INT8 (no amx_int8 in "
                f"CPUID, or the OS did not enable the tile state); it supports {', '.join(have)}")
        if "amx" not in have:
            return IsaEnvironmentError(
                "LOWBIT_ISA=amx: this CPU has AMX-INT8 but Linux refused this process the tile "
                f"state (arch_prctl ARCH_REQ_XCOMP_PERM); use one of {', '.join(have)}")
        return None
    if name not in have:
        return IsaEnvironmentError(
            f"LOWBIT_ISA={raw!r}: this CPU ({_cpu_model()}) lacks {_ISA_NEEDS.get(name, name)}; "
            f"it supports {', '.join(have)}")
    return None


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
    lib.lowbit_rt_cpu_features.restype = ctypes.c_int32
    lib.lowbit_rt_run_calls.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.lowbit_rt_run_calls.restype = ctypes.c_int64
    lib.lowbit_rt_decode_calls.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.lowbit_rt_decode_calls.restype = ctypes.c_int64
    # Validate LOWBIT_ISA once, with one error naming the variable (the native side only
    # falls back to the best ISA and records lowbit_rt_isa_error()). Not cached on failure:
    # every later use raises the same error.
    raw = os.environ.get("LOWBIT_ISA")
    problem = _isa_problem(lib, raw) if raw is not None else None
    if problem is None and lib.lowbit_rt_isa_error() != 0:  # keep both sides in agreement
        problem = IsaEnvironmentError(f"LOWBIT_ISA={raw!r} was rejected by the native runtime "
                                      f"({error_string_of(lib, lib.lowbit_rt_isa_error())})")
    if problem is not None:
        raise problem
    return lib


def error_string_of(lib: ctypes.CDLL, code: int) -> str:
    return lib.lowbit_rt_error_string(code).decode()


def cpu_features() -> set[str]:
    """CPU features the runtime detected (CPUID and OS-enabled state): names as in
    /proc/cpuinfo (avx512_vnni, avx512_bf16, amx_int8, ...)."""
    mask = load_runtime().lowbit_rt_cpu_features()
    return {name for name, bit in CPU_FEATURE_BITS.items() if mask & bit}


ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "amx"}
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
    lib = load_runtime()
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "amx" and (problem := _isa_problem(lib, "amx")) is not None:
        raise RuntimeError(str(problem).replace("LOWBIT_ISA=amx", "set_isa('amx')"))
    if key not in ISA_IDS:
        raise ValueError(f"unknown ISA {name!r}; expected one of {list(ACCEPTED_ISAS)}")
    if lib.lowbit_rt_set_isa(ISA_IDS[key]) != 0:
        raise RuntimeError(f"ISA {name!r} is not supported on this CPU (have {supported_isas()})")


def error_string(code: int) -> str:
    return load_runtime().lowbit_rt_error_string(code).decode()
