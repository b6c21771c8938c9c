"""Storage packing: int8 values q[N, K] <-> uint8 bytes [N, ceil(K * bits / 8)].

Codes are packed along K, little-endian within a byte: code j of a byte (j = k mod
codes_per_byte) occupies bits ``[bits*j, bits*j + bits)``. A row's last byte is padded with
zero bits. Unpacking validates the data (byte tensor shape/dtype, codes outside the value
set, non-zero padding bits) so corrupt tensors raise instead of decoding to garbage.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .formats import WeightFormat, get_weight_format, packed_row_bytes


class CorruptPackedWeightError(ValueError):
    """Packed weight bytes that no valid q tensor packs to."""


def _as_format(fmt: WeightFormat | str) -> WeightFormat:
    return fmt if isinstance(fmt, WeightFormat) else get_weight_format(fmt)


def _step(fmt: WeightFormat) -> int:
    """Spacing of the value set when it is an arithmetic progression (1 for every format
    but int1, whose values -1, +1 have step 2), else 0."""
    vals = fmt.values
    step = vals[1] - vals[0] if len(vals) > 1 else 1
    return step if all(b - a == step for a, b in zip(vals, vals[1:])) else 0


def values_to_codes(q: torch.Tensor, fmt: WeightFormat | str) -> torch.Tensor:
    """Unsigned storage codes (uint8) of integer values ``q``; ValueError for values outside the set."""
    fmt = _as_format(fmt)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor (int8 values of format {fmt.name}), got {q.dtype}")
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=torch.uint8)
    lo, hi = (int(v) for v in torch.aminmax(q))
    if lo < fmt.qmin or hi > fmt.qmax:
        raise ValueError(
            f"values out of range for format {fmt.name} (allowed [{fmt.qmin}, {fmt.qmax}]): "
            f"found min {lo}, max {hi}")
    # Every value now lies in [qmin, qmax] (inside int8), so the int8 bytes of q are exact.
    q8 = q.to(torch.int8).contiguous()
    step = _step(fmt)
    if step == 1:
        # code = q - qmin, computed modulo 256 on the raw bytes (uint8 arithmetic wraps)
        return q8.view(torch.uint8) + ((-fmt.qmin) & 0xFF)
    offset = q8.to(torch.int16) - fmt.qmin
    holes = offset % step != 0 if step else fmt.value_to_code_table()[offset.long()] < 0
    if bool(holes.any()):
        bad = int(q8[holes][0])
        raise ValueError(f"value {bad} is not in the value set {list(fmt.values)} of format {fmt.name}")
    if step:
        return torch.div(offset, step, rounding_mode="floor").to(torch.uint8)
    return fmt.value_to_code_table()[offset.long()].to(torch.uint8)


def codes_to_values(codes: torch.Tensor, fmt: WeightFormat | str) -> torch.Tensor:
    """int8 values of storage ``codes``; CorruptPackedWeightError for codes outside the format."""
    fmt = _as_format(fmt)
    codes = codes.to(torch.uint8)
    if codes.numel() and int(codes.max()) >= fmt.num_codes:
        raise CorruptPackedWeightError(
            f"corrupt packed weight: code {int(codes.max())} is not valid for format {fmt.name} "
            f"(valid codes 0..{fmt.num_codes - 1})")
    if _step(fmt) == 1:
        return (codes + (fmt.qmin & 0xFF)).view(torch.int8)  # q = code + qmin, modulo 256
    return fmt.code_to_value_table()[codes.long()]


#: Integer dtype holding exactly one packed byte's worth of codes (one code per byte of it).
_WORD = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _pack_block(codes: torch.Tensor, fmt: WeightFormat, out: torch.Tensor) -> None:
    """Pack uint8 ``codes[r, K]`` (valid codes) into ``out[r, nbytes]``."""
    r, k = codes.shape
    per_byte, nbytes = fmt.codes_per_byte, out.shape[1]
    if k != nbytes * per_byte:
        padded = torch.zeros((r, nbytes * per_byte), dtype=torch.uint8)
        padded[:, :k] = codes
        codes = padded
    # View the per_byte code bytes of each output byte as one little-endian integer: code j
    # sits at bit 8*j. Shifting right by (8 - bits)*j moves it to bit bits*j, and no other
    # code lands in the low 8 bits (codes are < 2**bits), so OR-ing the shifts and keeping
    # the low byte packs per_byte codes at once. Values stay < 2**(8*per_byte - 7): no sign.
    words = codes.contiguous().view(_WORD[per_byte])
    packed = words | (words >> (8 - fmt.bits))
    for j in range(2, per_byte):
        packed |= words >> ((8 - fmt.bits) * j)
    out.copy_(packed)  # int -> uint8 keeps the low byte (conversion modulo 256)


def pack_codes(q: torch.Tensor, fmt: WeightFormat | str) -> torch.Tensor:
    """Pack int values ``q[N, K]`` of format ``fmt`` into uint8 ``[N, ceil(K * bits / 8)]``."""
    from .quantizers import _run_blocks  # the row-block machinery (quantizers does not import us)

    fmt = _as_format(fmt)
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        raise ValueError(f"q must be a 2-D tensor [N, K], got {_describe(q)}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        values_to_codes(q, fmt)  # raises the TypeError
    n, k = q.shape
    out = torch.empty((n, packed_row_bytes(k, fmt)), dtype=torch.uint8)
    if q.numel() == 0:
        return out

    def block(r0: int, r1: int) -> bool:
        qb = q[r0:r1]
        lo, hi = (int(v) for v in torch.aminmax(qb))
        if lo < fmt.qmin or hi > fmt.qmax:
            return False
        if _step(fmt) != 1:
            try:
                codes = values_to_codes(qb, fmt)
            except ValueError:
                return False
        else:
            codes = qb.to(torch.int8).contiguous().view(torch.uint8) + ((-fmt.qmin) & 0xFF)
        if fmt.bits == 8:
            out[r0:r1] = codes
        else:
            _pack_block(codes, fmt, out[r0:r1])
        return True

    if not all(_run_blocks(block, n, k, stop_if=lambda ok: not ok)):
        values_to_codes(q, fmt)  # raises the error for the whole tensor (first bad value, global range)
        raise AssertionError("pack_codes: a block was rejected but the tensor is valid")
    return out


def unpack_codes(packed: torch.Tensor, fmt: WeightFormat | str, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 values ``q[N, K]`` from uint8 ``packed``.

    Raises CorruptPackedWeightError (a ValueError) if ``packed`` is not a uint8 tensor of
    shape ``[N, ceil(K * bits / 8)]``, holds codes outside the format, or has non-zero
    padding bits.
    """
    from .quantizers import _run_blocks

    fmt = _as_format(fmt)
    check_packed_tensor(packed, fmt, k)
    n, nbytes = packed.shape
    if fmt.bits == 8:
        return codes_to_values(packed, fmt)
    fast = _unpack_by_table(packed, fmt, k)
    if fast is not None:
        return fast
    per_byte = fmt.codes_per_byte
    mask = (1 << fmt.bits) - 1
    out = torch.empty((n, k), dtype=torch.int8)

    def codes_of(pb: torch.Tensor) -> torch.Tensor:
        codes = torch.empty((pb.shape[0], nbytes, per_byte), dtype=torch.uint8)
        for j in range(per_byte):
            torch.bitwise_and(pb >> (fmt.bits * j), mask, out=codes[:, :, j])
        return codes.view(pb.shape[0], nbytes * per_byte)

    def block(r0: int, r1: int) -> bool:
        codes = codes_of(packed[r0:r1])
        if codes.shape[1] > k and bool(codes[:, k:].any()):
            return False
        codes = codes[:, :k]
        if fmt.num_codes < (1 << fmt.bits) and int(codes.max()) >= fmt.num_codes:
            return False
        out[r0:r1] = codes_to_values(codes, fmt)
        return True

    if all(_run_blocks(block, n, nbytes * per_byte, stop_if=lambda ok: not ok)):
        return out
    codes = codes_of(packed)  # corrupt: find the first problem over the whole tensor
    if codes.shape[1] > k and bool(codes[:, k:].any()):
        row = int(codes[:, k:].any(dim=1).nonzero()[0])
        raise CorruptPackedWeightError(
            f"corrupt packed weight: padding bits after K={k} in row {row} are not zero")
    codes_to_values(codes[:, :k], fmt)  # raises for the invalid code
    raise AssertionError("unpack_codes: a block was rejected but the tensor is valid")


#: Marks codes outside a format's value set in `_byte_table`; no format has the value -128
#: below 8 bits.
_INVALID = -128


@functools.lru_cache(maxsize=None)
def _byte_table(fmt: WeightFormat) -> np.ndarray:
    """int8 [256, codes_per_byte]: the values of the codes each possible byte holds."""
    values = np.full(1 << fmt.bits, _INVALID, dtype=np.int8)
    values[: fmt.num_codes] = fmt.values
    byte = np.arange(256)[:, None]
    shifts = fmt.bits * np.arange(fmt.codes_per_byte)[None, :]
    return values[(byte >> shifts) & ((1 << fmt.bits) - 1)]


def _unpack_by_table(packed: torch.Tensor, fmt: WeightFormat, k: int) -> torch.Tensor | None:
    """`unpack_codes` as one table lookup per byte (numpy, single-threaded: torch's
    element-wise ops on the same data waited on OpenMP barriers for seconds per layer on a
    busy machine). None when the data is corrupt: the caller's checks then name the problem."""
    n, nbytes = packed.shape
    per_byte = fmt.codes_per_byte
    pn = packed.contiguous().numpy()
    tail = k % per_byte
    if tail and np.any(pn[:, -1] >> (fmt.bits * tail)):
        return None  # non-zero padding bits
    values = _byte_table(fmt)[pn].reshape(n, nbytes * per_byte)
    if tail:
        values = values[:, :k]
    if fmt.num_codes < (1 << fmt.bits) and np.any(values == _INVALID):
        return None
    return torch.from_numpy(np.ascontiguousarray(values))


def check_packed_tensor(packed: torch.Tensor, fmt: WeightFormat | str, k: int, n: int | None = None) -> None:
    """Check dtype, rank and shape of a packed weight (cheap; does not read the data)."""
    fmt = _as_format(fmt)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed weight must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise CorruptPackedWeightError(f"packed weight must be uint8, got {packed.dtype}")
    expected_cols = packed_row_bytes(k, fmt)
    if packed.dim() != 2 or packed.shape[1] != expected_cols or (n is not None and packed.shape[0] != n):
        rows = "N" if n is None else str(n)
        raise CorruptPackedWeightError(
            f"packed {fmt.name} weight for K={k} must have shape [{rows}, {expected_cols}] "
            f"(ceil(K*{fmt.bits}/8) bytes per row), got {list(packed.shape)}")


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {list(t.shape)} and dtype {t.dtype}"
    return type(t).__name__
