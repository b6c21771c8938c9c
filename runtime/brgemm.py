"""ctypes side of the dense BRGEMM microkernels (runtime/native/include/lowbit/brgemm.h).

    C[m x n] (+)= sum_{i < batch} A_i[m x k] @ B_i[k x n]

`Brgemm(...)` dispatches once (validating the description) and is then called on torch
tensors with element offsets, like the compiled code calls `lowbit_brgemm_invoke`. Every
call checks that each operand covers the elements the kernel will touch, so a wrong
shape raises instead of reading or writing out of bounds. `pack_b` produces the panel
layout for constant weights; `packed_offset` gives where output column n0 starts in it.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from .library import isa_name, load_runtime

NB = 32  # LOWBIT_BRGEMM_NB: column panel width of the packed B layout

DTYPE_F32 = 1
DTYPE_BF16 = 2
FLAG_BETA_0 = 1 << 0
FLAG_B_PACKED = 1 << 1
FLAG_C_BF16 = 1 << 2

_DTYPES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16}


class BrgemmError(ValueError):
    """A BRGEMM description or operand the runtime rejects; the message says why."""


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    lib = load_runtime()
    i32, i64, vp = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    lib.lowbit_brgemm_dispatch.argtypes = [i32] + [i64] * 9
    lib.lowbit_brgemm_dispatch.restype = i64
    lib.lowbit_brgemm_invoke.argtypes = [i64, vp, i64, vp, i64, vp, i64, i64]
    lib.lowbit_brgemm_invoke.restype = i32
    lib.lowbit_brgemm_packed_size.argtypes = [i32, i64, i64]
    lib.lowbit_brgemm_packed_size.restype = i64
    lib.lowbit_brgemm_pack_b.argtypes = [i32, vp, i64, i64, i64, i32, vp, i64]
    lib.lowbit_brgemm_pack_b.restype = i32
    lib.lowbit_brgemm_isa.argtypes = [i64]
    lib.lowbit_brgemm_isa.restype = i32
    lib.lowbit_brgemm_has_native_bf16.restype = i32
    for name in ("lowbit_brgemm_amx_min_rows", "lowbit_brgemm_amx_min_k"):
        getattr(lib, name).argtypes = [i64]
        getattr(lib, name).restype = i64
    lib.lowbit_brgemm_amx_invocations.argtypes = []
    lib.lowbit_brgemm_amx_invocations.restype = i64
    return lib


def _error(code: int) -> str:
    return load_runtime().lowbit_rt_error_string(code).decode()


def _dtype_code(dtype: torch.dtype, what: str) -> int:
    if dtype not in _DTYPES:
        raise BrgemmError(f"{what}: dtype {dtype} is not supported (expected torch.float32 or torch.bfloat16)")
    return _DTYPES[dtype]


def padded_k(dtype: torch.dtype, k: int) -> int:
    """Rows of the packed layout: k for fp32, k rounded up to even for bf16 (VNNI pairs)."""
    return (k + 1) // 2 * 2 if dtype == torch.bfloat16 else k


def packed_size(dtype: torch.dtype, k: int, n: int) -> int:
    """Elements of the packed layout of a [k x n] B."""
    code = _lib().lowbit_brgemm_packed_size(_dtype_code(dtype, "packed_size"), k, n)
    if code < 0:
        raise BrgemmError(f"packed_size(k={k}, n={n}): {_error(code)}")
    return code


def packed_offset(dtype: torch.dtype, k: int, n0: int, k0: int = 0) -> int:
    """Element offset of output column n0 (a multiple of NB), row k0, in a packed [k x n] B."""
    if n0 % NB:
        raise BrgemmError(f"packed_offset: column {n0} is not a multiple of the panel width {NB}")
    if dtype == torch.bfloat16 and k0 % 2:
        raise BrgemmError(f"packed_offset: bf16 row {k0} is not even (rows are packed in pairs)")
    return n0 * padded_k(dtype, k) + k0 * NB


def native_bf16() -> bool:
    """True when bf16 runs on vdpbf16ps (AVX512_BF16) on this CPU and ISA choice."""
    return bool(_lib().lowbit_brgemm_has_native_bf16())


def _amx_threshold(name: str, value: int | None) -> int:
    if value is not None and int(value) < 1:
        raise BrgemmError(f"{name} must be >= 1, got {value}")
    return int(getattr(_lib(), f"lowbit_brgemm_{name}")(0 if value is None else int(value)))


def amx_min_rows(rows: int | None = None) -> int:
    """The fewest rows (m) for which a bf16 BRGEMM runs the AMX-BF16 tiles (with the `amx`
    ISA). With `rows`, sets it for later dispatches and returns the previous value."""
    return _amx_threshold("amx_min_rows", rows)


def amx_min_k(k: int | None = None) -> int:
    """The smallest k for which a bf16 BRGEMM runs the AMX-BF16 tiles (with the `amx` ISA).
    With `k`, sets it for later dispatches and returns the previous value."""
    return _amx_threshold("amx_min_k", k)


def amx_invocations() -> int:
    """BRGEMM invocations that ran the AMX tiles in this process so far (all threads)."""
    return int(_lib().lowbit_brgemm_amx_invocations())


def pack_b(b: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Pack a constant B ([k, n], or [n, k] with `transposed`, e.g. a Linear weight).

    Returns a 1-D tensor of `packed_size` elements of b's dtype in the panel layout.
    """
    if b.dim() != 2:
        raise BrgemmError(f"pack_b: expected a 2-D tensor, got shape {tuple(b.shape)}")
    code = _dtype_code(b.dtype, "pack_b")
    b = b.contiguous()
    n, k = b.shape if transposed else (b.shape[1], b.shape[0])
    if k == 0 or n == 0:
        raise BrgemmError(f"pack_b: empty matrix of shape {tuple(b.shape)}")
    out = torch.empty(packed_size(b.dtype, k, n), dtype=b.dtype)
    rc = _lib().lowbit_brgemm_pack_b(code, b.data_ptr(), k, n, b.shape[1], int(transposed),
                                     out.data_ptr(), out.numel())
    if rc < 0:
        raise BrgemmError(f"pack_b(shape={tuple(b.shape)}, transposed={transposed}): {_error(rc)}")
    return out


@dataclass(frozen=True)
class Brgemm:
    """A dispatched BRGEMM kernel. Leading dimensions default to dense row-major operands;
    for a packed B, `ldb` is the panel stride (default `padded_k * NB`)."""

    dtype: torch.dtype
    m: int
    n: int
    k: int
    lda: int | None = None
    ldb: int | None = None
    ldc: int | None = None
    stride_a: int = 0
    stride_b: int = 0
    beta: int = 1
    b_packed: bool = False
    c_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.beta not in (0, 1):
            raise BrgemmError(f"beta must be 0 (overwrite C) or 1 (accumulate), got {self.beta}")
        if self.c_dtype not in (torch.float32, torch.bfloat16):
            raise BrgemmError(f"c_dtype {self.c_dtype} is not supported (float32 or bfloat16)")
        if self.lda is None:
            object.__setattr__(self, "lda", self.k)
        if self.ldb is None:
            object.__setattr__(self, "ldb", padded_k(self.dtype, self.k) * NB if self.b_packed else self.n)
        if self.ldc is None:
            object.__setattr__(self, "ldc", self.n)
        flags = (FLAG_BETA_0 if self.beta == 0 else 0) | (FLAG_B_PACKED if self.b_packed else 0)
        flags |= FLAG_C_BF16 if self.c_dtype == torch.bfloat16 else 0
        h = _lib().lowbit_brgemm_dispatch(_dtype_code(self.dtype, "Brgemm"), self.m, self.n, self.k,
                                          self.lda, self.ldb, self.ldc, self.stride_a, self.stride_b, flags)
        if h < 0:
            raise BrgemmError(f"cannot dispatch {self}: {_error(h)}")
        object.__setattr__(self, "handle", h)
        object.__setattr__(self, "flags", flags)

    @property
    def isa(self) -> str:
        """The ISA path this kernel runs on (fixed at dispatch)."""
        return isa_name(_lib().lowbit_brgemm_isa(self.handle))

    def extent_a(self, batch: int) -> int:
        return (batch - 1) * self.stride_a + (self.m - 1) * self.lda + self.k

    def extent_b(self, batch: int) -> int:
        last = (batch - 1) * self.stride_b
        if self.b_packed:
            return last + (self.n - 1) // NB * self.ldb + padded_k(self.dtype, self.k) * NB
        return last + (self.k - 1) * self.ldb + self.n

    def extent_c(self) -> int:
        return (self.m - 1) * self.ldc + self.n

    def _check(self, name: str, t: torch.Tensor, dtype: torch.dtype, offset: int, extent: int) -> None:
        if not isinstance(t, torch.Tensor):
            raise BrgemmError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise BrgemmError(f"{name} has dtype {t.dtype}, the kernel expects {dtype}")
        if t.device.type != "cpu":
            raise BrgemmError(f"{name} is on {t.device}, the kernel runs on the CPU")
        if not t.is_contiguous():
            raise BrgemmError(f"{name} must be contiguous (express strides with leading dims/offsets)")
        if offset < 0 or offset + extent > t.numel():
            raise BrgemmError(f"{name} has {t.numel()} elements but the kernel touches elements "
                              f"[{offset}, {offset + extent}) (shape/leading dim/offset mismatch)")

    def __call__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, batch: int = 1,
                 a_offset: int = 0, b_offset: int = 0, c_offset: int = 0) -> torch.Tensor:
        """C[c_offset:] (+)= sum_i A_i @ B_i over `batch` pairs; returns c."""
        if batch < 1:
            raise BrgemmError(f"batch must be >= 1, got {batch}")
        self._check("A", a, self.dtype, a_offset, self.extent_a(batch))
        self._check("B", b, self.dtype, b_offset, self.extent_b(batch))
        self._check("C", c, self.c_dtype, c_offset, self.extent_c())
        if self.b_packed and self.dtype == torch.bfloat16 and b_offset % 2:
            raise BrgemmError(f"packed bf16 B offset {b_offset} is not even (rows are packed in pairs)")
        rc = _lib().lowbit_brgemm_invoke(self.handle, a.data_ptr(), a_offset, b.data_ptr(), b_offset,
                                         c.data_ptr(), c_offset, batch)
        if rc < 0:
            raise BrgemmError(f"invoke of {self}: {_error(rc)}")
        return c


def matmul(a: torch.Tensor, b: torch.Tensor, b_packed: bool = False, n: int | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a[m, k] @ b through one BRGEMM call (b is [k, n], or packed with `n` given)."""
    if a.dim() != 2:
        raise BrgemmError(f"matmul: A must be 2-D, got shape {tuple(a.shape)}")
    m, k = a.shape
    if b_packed:
        if n is None:
            raise BrgemmError("matmul: a packed B needs the logical column count n")
    else:
        if b.dim() != 2 or b.shape[0] != k:
            raise BrgemmError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
        n = b.shape[1]
    out_dtype = out_dtype or a.dtype
    kern = Brgemm(a.dtype, m, n, k, beta=0, b_packed=b_packed, c_dtype=out_dtype)
    c = torch.empty(m, n, dtype=out_dtype)
    return kern(a.contiguous(), b.contiguous(), c)


__all__ = ["NB", "Brgemm", "BrgemmError", "amx_invocations", "amx_min_k", "amx_min_rows", "matmul",
           "native_bf16", "pack_b", "packed_offset", "packed_size", "padded_k"]
