"""ctypes side of the low-bit microkernels (runtime/native/src/q*.cpp, lowbit/qgemm.h).

* `pack_weight` turns integer codes q[N, K] (+ scales, zero points) into the kernels' blocked
  layout (`PackedWeight`); `unpack_weight` inverts it.
* `quantize_activations` is the dynamic int8 activation quantizer (per token or per K-block)
  fused with the per-K-block row sums the kernels use for the code-offset correction.
* `QGemmKernel` is a dispatched BRGEMM tile (the compiler's dispatch/invoke pair); calling it
  checks every array against the tile description before running native code.
* `qlinear` runs a whole layer single-threaded (tests, benchmarks).

Arrays may be torch tensors or numpy arrays (bf16 only as torch); results are torch tensors.
Bad input raises ValueError / TypeError; a native error code raises `QGemmError`.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np
import torch

from .library import current_isa, error_string, load_runtime

NB = 64  # output rows per packed n-block (LOWBIT_QGEMM_NB)

# Canonical names of lowbit.quant (docs/formats.md) -> LOWBIT_QW_*.
FORMATS = {"ternary": 1, "int2_sym": 2, "int2_asym": 3, "int1": 4, "int4_sym": 5,
           "int4_asym": 6, "int8": 7}


@dataclass(frozen=True)
class FormatInfo:
    bits: int
    k_granule: int
    qmin: int
    qmax: int
    zero_point: bool


FORMAT_INFO = {
    "ternary": FormatInfo(2, 4, -1, 1, False),
    "int2_sym": FormatInfo(2, 4, -2, 1, False),
    "int2_asym": FormatInfo(2, 4, 0, 3, True),
    "int1": FormatInfo(1, 8, -1, 1, False),
    "int4_sym": FormatInfo(4, 4, -8, 7, False),
    "int4_asym": FormatInfo(4, 4, 0, 15, True),
    "int8": FormatInfo(8, 4, -128, 127, False),
}

# LOWBIT_QT_*
T_INT8, T_F32, T_BF16 = 1, 2, 3
_DTYPE_TO_T = {torch.int8: T_INT8, torch.float32: T_F32, torch.bfloat16: T_BF16}
_T_TO_DTYPE = {v: k for k, v in _DTYPE_TO_T.items()}

# LOWBIT_QF_*
F_BETA1, F_BIAS, F_ASCALE_PER_BLOCK = 1, 2, 4
F_ACT_RELU, F_ACT_SILU, F_ACT_RELU2 = 8, 16, 32
# Epilogue activations (applied after scales, zero points and bias, before the beta add).
ACTIVATIONS = {"relu": F_ACT_RELU, "silu": F_ACT_SILU, "relu2": F_ACT_RELU2}


def activation_flag(activation: str | None) -> int:
    """LOWBIT_QF_ACT_* for an epilogue activation name (None: no activation)."""
    if activation is None:
        return 0
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown epilogue activation {activation!r}; expected one of "
                         f"{sorted(ACTIVATIONS)} or None")
    return ACTIVATIONS[activation]

E_QRANGE = 32  # LOWBIT_E_QRANGE: only lowbit_qpack returns it
MAX_INT8_KBLOCK = 65536  # largest K-block int8-activation tiles accept (exact int32 sums)


class QGemmError(RuntimeError):
    """A native low-bit kernel entry point returned an error code."""

    def __init__(self, what: str, code: int):
        self.code = int(code)
        msg = ("weight code or zero point outside the format's range" if -code == E_QRANGE
               else error_string(code))
        super().__init__(f"{what} failed: {msg} (code {code})")


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    lib = load_runtime()
    sigs = {
        "lowbit_qpack_layout": (_I64, [_I32, _I64, _I64, _I64, _P, _P, _P]),
        "lowbit_qpack": (_I32, [_I32, _P, _I64, _I64, _I64, _P, _I64, _P, _I64, _P]),
        "lowbit_qunpack": (_I32, [_I32, _P, _I64, _I64, _I64, _P, _I64]),
        "lowbit_qquant_act": (_I32, [_I32, _P, _I64, _I64, _I64, _I64, _I32, _P, _I64, _P, _P,
                                     _I64]),
        "lowbit_qgemm_act_stride": (_I64, [_I64]),
        "lowbit_qgemm_dispatch": (_I64, [_I32, _I32, _I32] + [_I64] * 9 + [_I32]),
        "lowbit_qgemm_invoke": (_I32, [_I64, _P, _I64, _P, _I64, _P, _I64, _P, _I64, _P, _I64,
                                       _P, _I64, _I64]),
        "lowbit_qgemm_handle_isa": (ctypes.c_char_p, [_I64]),
        "lowbit_qgemm_amx_min_rows": (_I64, [_I64]),
        "lowbit_qgemm_amx_invocations": (_I64, []),
        "lowbit_qgemm_amx_min_kblock": (_I64, [_I64]),
        "lowbit_qgemm_panel_min_rows": (_I64, [_I64]),
        "lowbit_qgemm_panel_min_kblock": (_I64, [_I64]),
        "lowbit_qgemm_panel_invocations": (_I64, []),
        "lowbit_qgemm_panel_rule": (_I32, [_I32]),
        "lowbit_qgemm_panel_speedup": (ctypes.c_double, [_I32]),
        "lowbit_qlinear": (_I32, [_I32, _P, _I64, _I64, _I64, _I32, _I32, _P, _I64, _I64, _P,
                                  _I32, _P, _I64]),
        "lowbit_qbench_dispatch": (_I64, [_I32, _P, _I64, _I64, _P]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


# ----------------------------------------------------------------------------- helpers

def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")
    return t


def _check(t: torch.Tensor, name: str, dtypes, ndim: int | None = None,
           contiguous: bool = True) -> torch.Tensor:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    return t


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _format(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def _raise(what: str, code: int) -> None:
    if code < 0:
        raise QGemmError(what, code)


# ----------------------------------------------------------------------------- packing

@dataclass(frozen=True)
class PackedWeight:
    """Packed weight in the kernels' layout (see docs/kernels.md).

    `data` is a flat uint8 tensor; n-block b (output rows [64 b, 64 b + 64)) starts at byte
    b * nblock_bytes, and K-block i inside it at i * kblock_bytes.
    """
    data: torch.Tensor
    fmt: str
    n: int
    k: int
    kblock: int
    kblock_bytes: int
    nblock_bytes: int
    num_kblocks: int

    @property
    def k_padded(self) -> int:
        return self.kblock * self.num_kblocks


def packed_layout(fmt: str, n: int, k: int, kblock: int) -> tuple[int, int, int, int]:
    """(total_bytes, kblock_bytes, nblock_bytes, num_kblocks) of an [n, k] weight."""
    kbb, nbb, nkb = _I64(), _I64(), _I64()
    total = _lib().lowbit_qpack_layout(_format(fmt), n, k, kblock, ctypes.byref(kbb),
                                       ctypes.byref(nbb), ctypes.byref(nkb))
    if total < 0:
        raise QGemmError(f"packed layout of {fmt} [{n}, {k}] with kblock={kblock}", total)
    return total, kbb.value, nbb.value, nkb.value


def default_kblock(fmt: str, k: int, group: int) -> int:
    """The K-block a weight is packed with by default: the group, or all of K rounded up."""
    _format(fmt)
    kg = FORMAT_INFO[fmt].k_granule
    if group < k:
        return group
    # One K-block per row, up to the int8 kernels' exactness limit on a K-block.
    return min(-(-k // kg) * kg, MAX_INT8_KBLOCK)


def pack_weight(q, scale, fmt: str, *, group: int | None = None, zero=None,
                kblock: int | None = None) -> PackedWeight:
    """Pack integer codes q (int8 [N, K]) for the kernels.

    scale: fp32 scalar (per tensor), [N] (per channel) or [N, ceil(K / group)] (per group;
    the last group may be short). zero: integer zero points shaped like scale, for the
    "int2_asym" / "int4_asym" formats.
    kblock: K-block of the layout; must equal `group` for per-group scales; for per-channel
    scales any multiple of the format's K granule (default: all of K in one block).
    """
    wfmt = _format(fmt)
    info = FORMAT_INFO[fmt]
    q = _check(_as_tensor(q, "q"), "q", (torch.int8,), ndim=2)
    n, k = q.shape
    if n == 0 or k == 0:
        raise ValueError(f"q must be non-empty, got shape {tuple(q.shape)}")
    scale = _as_tensor(scale, "scale")
    if scale.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"scale must be a floating tensor, got {scale.dtype}")
    scale = scale.to(torch.float32)
    if scale.numel() == 1:  # per tensor
        scale = scale.reshape(1, 1).expand(n, 1)
    elif scale.dim() == 1:
        if scale.shape[0] != n:
            raise ValueError(f"per-channel scale must have shape [{n}], got {tuple(scale.shape)}")
        scale = scale.reshape(n, 1)
    elif scale.dim() != 2 or scale.shape[0] != n:
        raise ValueError(f"scale must be a scalar, [{n}] or [{n}, K/group], got {tuple(scale.shape)}")
    ngroups = scale.shape[1]
    if group is None:
        if ngroups > 1 and k % ngroups:
            raise ValueError(f"scale has {ngroups} groups, which does not divide K={k}; "
                             "pass group= for a short last group")
        group = k // ngroups
    if group <= 0 or -(-k // min(group, k)) != ngroups:
        raise ValueError(f"group={group} does not match K={k} and scale shape {tuple(scale.shape)} "
                         f"(expected [{n}, ceil(K / group)])")
    if group < k and (group % info.k_granule):
        raise ValueError(f"group={group} must be a multiple of {info.k_granule} for {fmt}")
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("scale contains NaN or infinity")
    if kblock is None:
        kblock = default_kblock(fmt, k, group)
    if group < k and kblock != group:
        raise ValueError(f"kblock={kblock} must equal group={group} for per-group scales")

    zero_t = None
    if info.zero_point:
        if zero is None:
            raise ValueError(f"format {fmt} needs integer zero points (zero=)")
        zero_t = _as_tensor(zero, "zero")
        if zero_t.is_floating_point():
            if not bool((zero_t == zero_t.round()).all()):
                raise ValueError("zero points must be integers")
        zero_t = zero_t.reshape(n, -1) if zero_t.numel() == n * ngroups else None
        if zero_t is None or zero_t.shape[1] != ngroups:
            raise ValueError(f"zero must have shape [{n}, {ngroups}] (like scale)")
        if bool(((zero_t < 0) | (zero_t > info.qmax)).any()):
            raise ValueError(f"zero points must lie in [0, {info.qmax}] for {fmt}")
        zero_t = zero_t.to(torch.int8).contiguous()
    elif zero is not None:
        raise ValueError(f"format {fmt} is symmetric and takes no zero point")

    total, kbb, nbb, nkb = packed_layout(fmt, n, k, kblock)
    out = torch.empty(total, dtype=torch.uint8)
    scale_c = scale.contiguous()
    # The native packer validates every code before it writes (one vectorized pass); the
    # offending position is only looked for when it reports a code out of range.
    rc = _lib().lowbit_qpack(wfmt, q.data_ptr(), n, k, k, scale_c.data_ptr(), group,
                             _ptr(zero_t), kblock, out.data_ptr())
    if rc == -E_QRANGE:
        bad = (q < info.qmin) | (q > info.qmax)
        if fmt == "int1":
            bad |= q == 0
        if bool(bad.any()):
            r, c = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"q[{r}, {c}] = {int(q[r, c])} is outside the {fmt} code range "
                             f"[{info.qmin}, {info.qmax}]"
                             + (" (0 is not a code)" if fmt == "int1" else "")
                             + f"; q spans [{int(q.min())}, {int(q.max())}]")
    _raise(f"packing {fmt} [{n}, {k}]", rc)
    return PackedWeight(out, fmt, n, k, kblock, kbb, nbb, nkb)


def _check_packed(pw: PackedWeight) -> None:
    if not isinstance(pw, PackedWeight):
        raise TypeError(f"expected a PackedWeight (from pack_weight), got {type(pw).__name__}")
    total = packed_layout(pw.fmt, pw.n, pw.k, pw.kblock)[0]
    _check(pw.data, "packed data", (torch.uint8, torch.int8))
    if pw.data.numel() != total:
        raise ValueError(f"packed data has {pw.data.numel()} bytes, the {pw.fmt} [{pw.n}, {pw.k}] "
                         f"layout with kblock={pw.kblock} needs {total}")


def unpack_weight(pw: PackedWeight) -> torch.Tensor:
    """The int8 codes q [N, K] stored in a packed weight."""
    _check_packed(pw)
    q = torch.empty(pw.n, pw.k, dtype=torch.int8)
    rc = _lib().lowbit_qunpack(FORMATS[pw.fmt], pw.data.data_ptr(), pw.n, pw.k, pw.kblock,
                               q.data_ptr(), pw.k)
    _raise("unpacking", rc)
    return q


# ----------------------------------------------------------------------------- activations

def act_stride(kp: int) -> int:
    """Row stride (bytes) for int8 activations of kp values that the tiles read fastest: kp
    rounded up to an odd number of 64-byte lines (lowbit_qgemm_act_stride). Compiled layers
    quantize into rows this far apart."""
    if kp <= 0:
        raise ValueError(f"kp must be positive, got {kp}")
    return int(_lib().lowbit_qgemm_act_stride(kp))


def quantize_activations(x, kblock: int, *, per_block: bool = False, stride: int | None = None):
    """Dynamic int8 quantization of x (fp32/bf16 [M, K]) with per-K-block row sums.

    Returns (xq int8 [M, Kp], scale fp32 [M] or [M, nkb], rowsum int32 [M, nkb]) with
    Kp = nkb * kblock and xq zero in columns [K, Kp). scale is s = 127 / max(amax, 1e-5).
    With `stride` (>= Kp), xq is [M, stride] instead, zero past Kp: act_stride(Kp) gives the
    rows compiled layers quantize into; dispatch the tile with lda=xq.shape[1].
    """
    x = _check(_as_tensor(x, "x"), "x", (torch.float32, torch.bfloat16), ndim=2)
    m, k = x.shape
    if k == 0:
        raise ValueError(f"x must have a non-empty K dimension, got shape {tuple(x.shape)}")
    if kblock <= 0 or kblock % 4:
        raise ValueError(f"kblock must be a positive multiple of 4, got {kblock}")
    nkb = -(-k // kblock)
    kp = nkb * kblock
    stride = kp if stride is None else stride
    if stride < kp:
        raise ValueError(f"stride must be at least Kp = {kp}, got {stride}")
    xq = torch.empty(m, kp, dtype=torch.int8) if stride == kp else torch.zeros(m, stride, dtype=torch.int8)
    scale = torch.empty((m, nkb) if per_block else (m,), dtype=torch.float32)
    rowsum = torch.empty(m, nkb, dtype=torch.int32)
    rc = _lib().lowbit_qquant_act(_DTYPE_TO_T[x.dtype], x.data_ptr(), m, k, k, kblock,
                                  F_ASCALE_PER_BLOCK if per_block else 0, xq.data_ptr(),
                                  stride, scale.data_ptr(), rowsum.data_ptr(), nkb)
    _raise("activation quantization", rc)
    return xq, scale, rowsum


# ----------------------------------------------------------------------------- tiles

class QGemmKernel:
    """A dispatched BRGEMM tile (see lowbit/qgemm.h):

        C[m, n] = [C_in +] act(sum over `count` K-blocks * scales + bias), rounded once

    Strides lda/ldc/stride_a are in elements, ldb/stride_b in bytes, ld_aux is the row stride
    of the per-block activation scale and row-sum arrays. `beta=True` adds C's previous
    contents (fp32 or bf16 C: a residual, or a K-split partial sum for fp32);
    `activation` is None, "relu", "silu" or "relu2" and is only correct when one call
    covers all K-blocks of the layer.
    """

    def __init__(self, fmt: str, a_dtype: torch.dtype, c_dtype: torch.dtype, m: int, n: int,
                 kblock: int, *, lda: int, ldb: int, ldc: int, stride_a: int, stride_b: int,
                 ld_aux: int = 1, beta: bool = False, bias: bool = False,
                 per_block_act_scale: bool = False, activation: str | None = None):
        if a_dtype not in _DTYPE_TO_T:
            raise TypeError(f"activation dtype must be int8, float32 or bfloat16, got {a_dtype}")
        if c_dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"output dtype must be float32 or bfloat16, got {c_dtype}")
        self.fmt, self.a_dtype, self.c_dtype = fmt, a_dtype, c_dtype
        self.m, self.n, self.kblock = m, n, kblock
        self.lda, self.ldb, self.ldc = lda, ldb, ldc
        self.stride_a, self.stride_b, self.ld_aux = stride_a, stride_b, ld_aux
        self.beta, self.bias, self.per_block = beta, bias, per_block_act_scale
        self.activation = activation
        self.flags = ((F_BETA1 if beta else 0) | (F_BIAS if bias else 0)
                      | (F_ASCALE_PER_BLOCK if per_block_act_scale else 0)
                      | activation_flag(activation))
        h = _lib().lowbit_qgemm_dispatch(_format(fmt), _DTYPE_TO_T[a_dtype], _DTYPE_TO_T[c_dtype],
                                         m, n, kblock, lda, ldb, ldc, stride_a, stride_b, ld_aux,
                                         self.flags)
        _raise(f"dispatch of {fmt} tile m={m} n={n} kblock={kblock}", h)
        self.handle = int(h)

    @property
    def isa(self) -> str:
        return _lib().lowbit_qgemm_handle_isa(self.handle).decode()

    def _need(self, t: torch.Tensor, off: int, extent: int, name: str) -> None:
        if off < 0:
            raise ValueError(f"{name} offset must be >= 0, got {off}")
        if t.numel() < off + extent:
            raise ValueError(f"{name} is too small for this tile: needs {off + extent} elements "
                             f"from its start, has {t.numel()}")

    def __call__(self, a, b, c, *, count: int, a_scale=None, a_sum=None, bias=None,
                 a_off: int = 0, b_off: int = 0, c_off: int = 0, as_off: int = 0,
                 sum_off: int = 0, bias_off: int = 0) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        a = _check(_as_tensor(a, "a"), "a", (self.a_dtype,))
        b = _check(_as_tensor(b, "b"), "b", (torch.uint8, torch.int8))
        c = _check(_as_tensor(c, "c"), "c", (self.c_dtype,))
        m, n = self.m, self.n
        if (count - 1) * self.stride_a + self.kblock > self.lda:
            raise ValueError(f"count={count} K-blocks of stride {self.stride_a} overrun lda={self.lda}")
        self._need(a, a_off, (m - 1) * self.lda + (count - 1) * self.stride_a + self.kblock, "a")
        nnb = -(-n // NB)
        self._need(b, b_off, (nnb - 1) * self.ldb + count * self.stride_b, "b")
        self._need(c, c_off, (m - 1) * self.ldc + n, "c")
        int8_a = self.a_dtype == torch.int8
        if int8_a:
            if a_scale is None or a_sum is None:
                raise ValueError("int8 activations need a_scale and a_sum")
            if count > self.ld_aux:
                raise ValueError(f"count={count} exceeds ld_aux={self.ld_aux}")
            a_scale = _check(_as_tensor(a_scale, "a_scale"), "a_scale", (torch.float32,))
            a_sum = _check(_as_tensor(a_sum, "a_sum"), "a_sum", (torch.int32,))
            self._need(a_scale, as_off, (m - 1) * self.ld_aux + count if self.per_block else m,
                       "a_scale")
            self._need(a_sum, sum_off, (m - 1) * self.ld_aux + count, "a_sum")
        if self.bias:
            if bias is None:
                raise ValueError("this tile was dispatched with bias=True; pass bias")
            bias = _check(_as_tensor(bias, "bias"), "bias", (torch.float32,))
            self._need(bias, bias_off, n, "bias")
        rc = _lib().lowbit_qgemm_invoke(
            self.handle, a.data_ptr(), a_off, b.data_ptr(), b_off, c.data_ptr(), c_off,
            _ptr(a_scale) if int8_a else None, as_off, _ptr(a_sum) if int8_a else None, sum_off,
            _ptr(bias) if self.bias else None, bias_off, count)
        _raise("invoke", rc)


def _threshold(name: str, value: int | None) -> int:
    """Reads (value None) or sets the dispatch rule's threshold `name` (amx_min_rows,
    panel_min_kblock, ...); returns the previous value."""
    if value is not None and int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(getattr(_lib(), f"lowbit_qgemm_{name}")(0 if value is None else int(value)))


def amx_min_rows(rows: int | None = None) -> int:
    """The fewest activation rows for which an int8 tile runs on AMX (with the `amx` ISA).
    With `rows`, sets it for later dispatches and returns the previous value."""
    return _threshold("amx_min_rows", rows)


def amx_min_kblock(kblock: int | None = None) -> int:
    """The shortest K-block (scale group) for which an int8 tile runs on AMX (with the `amx`
    ISA). With `kblock`, sets it for later dispatches and returns the previous value."""
    return _threshold("amx_min_kblock", kblock)


def panel_min_rows(rows: int | None = None) -> int:
    """The fewest activation rows for which an AVX-512 tile of int8 activations x 1-/2-/4-bit
    codes decodes the codes once per pass into an L1 panel (the same results, bit for bit, as
    the register tiles, which decode them again for every 6 rows). With `rows`, sets it for
    later dispatches and returns the previous value."""
    return _threshold("panel_min_rows", rows)


def panel_min_kblock(kblock: int | None = None) -> int:
    """The shortest K-block (scale group) for which such a tile takes the panel (shorter ones
    flush too often for it to pay). With `kblock`, sets it for later dispatches and returns
    the previous value."""
    return _threshold("panel_min_kblock", kblock)


PANEL_RULES = ("measured", "always", "never")  # LOWBIT_PANEL_MEASURED, _ALWAYS, _NEVER


def panel_rule(rule: str | None = None) -> str:
    """Whether a tile past panel_min_rows() and panel_min_kblock() takes the panel:
    "measured" (the default: the first such dispatch per code width times the panel against
    the register tiles on this CPU, ~2 ms once per process, and takes it when faster; see
    panel_speedup), "always" or "never". With `rule`, sets it for later dispatches
    and returns the previous one."""
    if rule is None:
        return PANEL_RULES[_lib().lowbit_qgemm_panel_rule(-1)]
    if rule not in PANEL_RULES:
        raise ValueError(f"unknown panel rule {rule!r}; expected one of {PANEL_RULES}")
    return PANEL_RULES[_lib().lowbit_qgemm_panel_rule(PANEL_RULES.index(rule))]


def panel_speedup(bits: int) -> float:
    """The panel tiles' speed over the register tiles for `bits`-bit codes (1, 2 or 4) as the
    "measured" rule saw it on this CPU (measured now if this process has not yet): the median
    of back-to-back pairs on one synthetic 128 x 192 x 1024 call. Needs the AVX-512 ISA."""
    if bits not in (1, 2, 4):
        raise ValueError(f"panel tiles exist for 1-, 2- and 4-bit codes, not {bits}-bit ones")
    s = float(_lib().lowbit_qgemm_panel_speedup(bits))
    if s == 0:
        raise RuntimeError("the panel tiles need the AVX-512 ISA; this process runs "
                           f"{current_isa()}")
    if s < 0:
        raise MemoryError("the panel measurement could not allocate its operands")
    return s


def panel_invocations() -> int:
    """Panel tile invocations in this process so far (did a call take the panel path?)."""
    return int(_lib().lowbit_qgemm_panel_invocations())


def amx_invocations() -> int:
    """AMX tile invocations in this process so far (did compiled code reach the AMX path?)."""
    return int(_lib().lowbit_qgemm_amx_invocations())


def dispatch_for(pw: PackedWeight, m: int, *, a_dtype=torch.int8, c_dtype=torch.float32,
                 bias: bool = False, per_block_act_scale: bool = False, beta: bool = False,
                 activation: str | None = None, lda: int | None = None) -> QGemmKernel:
    """The tile that covers a whole packed weight for m rows of K-padded activations (rows
    `lda` elements apart, default pw.k_padded)."""
    return QGemmKernel(pw.fmt, a_dtype, c_dtype, m, pw.n, pw.kblock, lda=lda or pw.k_padded,
                       ldb=pw.nblock_bytes, ldc=pw.n, stride_a=pw.kblock,
                       stride_b=pw.kblock_bytes, ld_aux=pw.num_kblocks, bias=bias,
                       per_block_act_scale=per_block_act_scale, beta=beta,
                       activation=activation)


# ----------------------------------------------------------------------------- whole layer

def qlinear(x, pw: PackedWeight, bias=None, *, mode: str = "int8",
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a packed weight, single-threaded.

    mode "int8": x is quantized per token to int8 (BitNet a8) and the integer kernels run;
    mode "weight_only": fp32 accumulation of x (fp32 / bf16) against the dequantized weight.
    x: [M, K] (or [..., K]); out_dtype defaults to x's dtype.
    """
    if mode not in ("int8", "weight_only"):
        raise ValueError(f"mode must be 'int8' or 'weight_only', got {mode!r}")
    _check_packed(pw)
    x = _check(_as_tensor(x, "x"), "x", (torch.float32, torch.bfloat16))
    if x.dim() < 1 or x.shape[-1] != pw.k:
        raise ValueError(f"x must have shape [..., {pw.k}], got {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k)
    m = x2.shape[0]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    if bias is not None:
        bias = _check(_as_tensor(bias, "bias"), "bias", (torch.float32, torch.bfloat16), ndim=1,
                      contiguous=False)
        if bias.shape[0] != pw.n:
            raise ValueError(f"bias must have shape [{pw.n}], got {tuple(bias.shape)}")
        bias = bias.to(torch.float32).contiguous()
    y = torch.empty(m, pw.n, dtype=out_dtype)
    rc = _lib().lowbit_qlinear(FORMATS[pw.fmt], pw.data.data_ptr(), pw.n, pw.k, pw.kblock,
                               T_INT8 if mode == "int8" else T_F32, _DTYPE_TO_T[x.dtype],
                               x2.data_ptr(), m, pw.k, _ptr(bias), _DTYPE_TO_T[out_dtype],
                               y.data_ptr(), pw.n)
    _raise(f"qlinear {pw.fmt} [{pw.n}, {pw.k}] x [{m}, {pw.k}]", rc)
    return y.reshape(*lead, pw.n)
