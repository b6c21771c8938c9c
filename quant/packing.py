"""Storage packing: int8 values q[N, K] <-> uint8 bytes [N, ceil(K * bits / 8)].

Codes are packed along K, little-endian within a byte: code j of a byte (j = k mod
codes_per_byte) occupies bits ``[bits*j, bits*j + bits)``. A row's last byte is padded with
zero bits. Unpacking validates the data (byte tensor shape/dtype, codes outside the value
set, non-zero padding bits) so corrupt tensors raise instead of decoding to garbage.
"""
from __future__ import annotations

import torch

from .formats import WeightFormat, get_weight_format, packed_row_bytes


class CorruptPackedWeightError(ValueError):
    """Packed weight bytes that no valid q tensor packs to."""


def _as_format(fmt: WeightFormat | str) -> WeightFormat:
    return fmt if isinstance(fmt, WeightFormat) else get_weight_format(fmt)


def values_to_codes(q: torch.Tensor, fmt: WeightFormat | str) -> torch.Tensor:
    """Unsigned storage codes (uint8) of integer values ``q``; ValueError for values outside the set."""
    fmt = _as_format(fmt)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor (int8 values of format {fmt.name}), got {q.dtype}")
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=torch.uint8)
    q = q.to(torch.int32)
    lo, hi = int(q.min()), int(q.max())
    if lo < fmt.qmin or hi > fmt.qmax:
        raise ValueError(
            f"values out of range for format {fmt.name} (allowed [{fmt.qmin}, {fmt.qmax}]): "
            f"found min {lo}, max {hi}")
    codes = fmt.value_to_code_table()[(q - fmt.qmin).long()]
    if bool((codes < 0).any()):
        bad = int(q[codes < 0][0])
        raise ValueError(f"value {bad} is not in the value set {list(fmt.values)} of format {fmt.name}")
    return codes.to(torch.uint8)


def codes_to_values(codes: torch.Tensor, fmt: WeightFormat | str) -> torch.Tensor:
    """int8 values of storage ``codes``; CorruptPackedWeightError for codes outside the format."""
    fmt = _as_format(fmt)
    codes = codes.to(torch.uint8)
    if codes.numel() and int(codes.max()) >= fmt.num_codes:
        raise CorruptPackedWeightError(
            f"corrupt packed weight: code {int(codes.max())} is not valid for format {fmt.name} "
            f"(valid codes 0..{fmt.num_codes - 1})")
    return fmt.code_to_value_table()[codes.long()]


def pack_codes(q: torch.Tensor, fmt: WeightFormat | str) -> torch.Tensor:
    """Pack int values ``q[N, K]`` of format ``fmt`` into uint8 ``[N, ceil(K * bits / 8)]``."""
    fmt = _as_format(fmt)
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        raise ValueError(f"q must be a 2-D tensor [N, K], got {_describe(q)}")
    n, k = q.shape
    codes = values_to_codes(q, fmt)
    if fmt.bits == 8:
        return codes.contiguous()
    per_byte = fmt.codes_per_byte
    nbytes = packed_row_bytes(k, fmt)
    padded = torch.zeros((n, nbytes * per_byte), dtype=torch.int32)
    padded[:, :k] = codes.to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * fmt.bits
    packed = (padded.view(n, nbytes, per_byte) << shifts).sum(dim=-1)
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, fmt: WeightFormat | str, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 values ``q[N, K]`` from uint8 ``packed``.

    Raises CorruptPackedWeightError (a ValueError) if ``packed`` is not a uint8 tensor of
    shape ``[N, ceil(K * bits / 8)]``, holds codes outside the format, or has non-zero
    padding bits.
    """
    fmt = _as_format(fmt)
    check_packed_tensor(packed, fmt, k)
    n, nbytes = packed.shape
    if fmt.bits == 8:
        return codes_to_values(packed, fmt)
    per_byte = fmt.codes_per_byte
    shifts = torch.arange(per_byte, dtype=torch.int32) * fmt.bits
    mask = (1 << fmt.bits) - 1
    codes = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & mask).reshape(n, nbytes * per_byte)
    if codes.shape[1] > k and bool(codes[:, k:].any()):
        row = int(codes[:, k:].any(dim=1).nonzero()[0])
        raise CorruptPackedWeightError(
            f"corrupt packed weight: padding bits after K={k} in row {row} are not zero")
    return codes_to_values(codes[:, :k], fmt)


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
