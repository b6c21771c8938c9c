"""The quantizers and packing of lowbit.quant as they were before the blocked rewrite
(commit 440f03f), kept verbatim as the reference the fast implementation must reproduce
bit for bit (test_quantize_equivalence.py). Slow (whole-matrix temporaries) but simple.
"""
# flake8: noqa
from __future__ import annotations

import torch

from lowbit.quant.formats import WEIGHT_SCALE_EPS, LowBitSpec, WeightFormat, get_weight_format, packed_row_bytes
from lowbit.quant.packing import CorruptPackedWeightError, check_packed_tensor
from lowbit.quant.quantizers import QuantizedWeight

def check_float_weight(weight: torch.Tensor, spec: LowBitSpec) -> torch.Tensor:
    """Validate a float weight ``[out_features, in_features]``; return it as fp32."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    expected = (spec.out_features, spec.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"weight must have shape {list(expected)} [out_features, in_features], "
                         f"got {list(weight.shape)}")
    if weight.device.type != "cpu":
        raise ValueError(f"lowbit.quant works on CPU tensors, got a weight on {weight.device}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or infinity; cannot quantize it")
    return w


def _grouped(w: torch.Tensor, spec: LowBitSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` viewed as ``[R, G, width]`` (zero-padded) and the real element count per group.

    R is 1 for per-tensor scales (all of W is one group), else N.
    """
    n, k = w.shape
    if spec.granularity == "tensor":
        return w.reshape(1, 1, n * k), torch.tensor([float(n * k)], dtype=torch.float64)
    width, groups = spec.group_width, spec.num_groups
    padded = torch.zeros((n, groups * width), dtype=w.dtype)
    padded[:, :k] = w
    counts = torch.full((groups,), float(width), dtype=torch.float64)
    counts[-1] = k - (groups - 1) * width
    return padded.view(n, groups, width), counts


def expand_groups(t: torch.Tensor, spec: LowBitSpec) -> torch.Tensor:
    """Broadcast a per-group tensor (``spec.scale_shape``) to one entry per weight ``[R, K]``."""
    if spec.granularity == "tensor":
        return t.reshape(1, 1)
    return t.repeat_interleave(spec.group_width, dim=1)[:, : spec.in_features]


def _floor_scale(s64: torch.Tensor) -> torch.Tensor:
    return s64.to(torch.float32).clamp(min=WEIGHT_SCALE_EPS)


def _scales_for(w: torch.Tensor, spec: LowBitSpec, rule: str = "standard") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) by ``rule``.

    "standard" is the format's quantization rule; "absmax" (``s = max|W|``), "hi"
    (``s = max(W) / qmax``) and "lo" (``s = min(W) / qmin``) are the extra candidates that
    :func:`exact_representation` tries.
    """
    fmt = spec.format
    groups, counts = _grouped(w, spec)
    g64 = groups.to(torch.float64)
    hi = g64.amax(dim=-1).clamp(min=0.0)
    lo = g64.amin(dim=-1).clamp(max=0.0)
    if rule == "absmax":
        return _floor_scale(torch.maximum(hi, -lo)), None
    if rule == "hi":
        return _floor_scale(hi / float(fmt.qmax)), None
    if rule == "lo":
        return _floor_scale(lo / float(fmt.qmin)), None
    if fmt.name in ("ternary", "int1"):
        return _floor_scale(g64.abs().sum(dim=-1) / counts), None
    if fmt.asymmetric:
        s = _floor_scale((hi - lo) / float(fmt.qmax))
        return s, _zero_points_for(lo.to(torch.float32), s, fmt.qmax)
    return _floor_scale(torch.maximum(hi / float(fmt.qmax), lo / float(fmt.qmin))), None


def _zero_points_for(lo: torch.Tensor, s: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.round(-lo / s).clamp(0, qmax).to(torch.int8)


def _values_for(w: torch.Tensor, spec: LowBitSpec, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    fmt = spec.format
    if fmt.name == "int1":
        return torch.where(w >= 0, 1, -1).to(torch.int8)
    r = torch.round(w / expand_groups(s, spec))
    if z is not None:
        r = r + expand_groups(z, spec).to(torch.float32)
    return r.clamp(fmt.qmin, fmt.qmax).to(torch.int8)


def quantize_weight(weight: torch.Tensor, spec: LowBitSpec) -> QuantizedWeight:
    """Quantize a float weight by the format's rule (see docs/formats.md, "Quantization rules")."""
    w = check_float_weight(weight, spec)
    s, z = _scales_for(w, spec, "standard")
    return QuantizedWeight(_values_for(w, spec, s, z), s, z)


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                      spec: LowBitSpec) -> torch.Tensor:
    """fp32 ``W = q * s`` or ``W = (q - z) * s`` (one fp32 multiply per element)."""
    qi = q.to(torch.int32)
    if zero_points is not None:
        qi = qi - expand_groups(zero_points.to(torch.int32), spec)
    return qi.to(torch.float32) * expand_groups(scales.to(torch.float32), spec)


def exact_representation(weight: torch.Tensor, spec: LowBitSpec) -> QuantizedWeight | None:
    """The format's representation of ``weight`` if it reproduces every value exactly, else None.

    For weights that are already low-bit (e.g. a QAT checkpoint exported as ternary-valued
    floats ``q * s``). Each group takes the first candidate scale that reproduces it bit for
    bit. Candidates: the format's standard rule, then for symmetric formats ``max|W|``,
    ``max(W)/qmax`` and ``min(W)/qmin``; each also one fp32 ulp up and down. The result is
    verified: dequantizing it gives ``weight`` (as fp32) exactly. Detection succeeds for
    every symmetric-format weight whose groups contain an end value of the value set (or,
    for ternary/int1, any non-zero); for asymmetric formats it is best effort.
    """
    w = check_float_weight(weight, spec)
    if spec.out_features > 1:
        # Cheap early reject: if W is exact, so is its first row under the same candidates.
        row = LowBitSpec(spec.weight_format, spec.granularity, spec.group_size, spec.in_features, 1)
        if exact_representation(w[:1], row) is None:
            return None
    fmt = spec.format
    rules = ["standard"] if fmt.asymmetric else ["standard", "absmax", "hi"]
    if not fmt.asymmetric and fmt.qmin < 0 and fmt.name != "int1":
        rules.append("lo")
    lo = _grouped(w, spec)[0].amin(dim=-1).clamp(max=0.0)
    chosen_s = chosen_z = done = None
    for rule in rules:
        base, _ = _scales_for(w, spec, rule)
        for s in (base, torch.nextafter(base, torch.tensor(float("inf"))),
                  torch.nextafter(base, torch.tensor(0.0)).clamp(min=WEIGHT_SCALE_EPS)):
            z = _zero_points_for(lo, s, fmt.qmax) if fmt.asymmetric else None
            q = _values_for(w, spec, s, z)
            exact = _exact_groups(dequantize_weight(q, s, z, spec) == w, spec)
            if chosen_s is None:
                chosen_s, chosen_z, done = s.clone(), z, exact
                continue
            take = exact & ~done
            chosen_s = torch.where(take, s, chosen_s)
            if z is not None:
                chosen_z = torch.where(take, z, chosen_z)
            done = done | exact
            if bool(done.all()):
                break
        if bool(done.all()):
            break
    if not bool(done.all()):
        return None
    q = _values_for(w, spec, chosen_s, chosen_z)
    if not torch.equal(dequantize_weight(q, chosen_s, chosen_z, spec), w):
        return None
    return QuantizedWeight(q, chosen_s, chosen_z)


def _exact_groups(equal: torch.Tensor, spec: LowBitSpec) -> torch.Tensor:
    """Per-group all() of an elementwise ``[N, K]`` boolean tensor, shaped like the scales."""
    if spec.granularity == "tensor":
        return equal.all().reshape(1, 1)
    grouped, _ = _grouped(equal.to(torch.float32), spec)
    padded_true, _ = _grouped(torch.ones_like(equal, dtype=torch.float32), spec)
    return (grouped == padded_true).all(dim=-1)


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


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {list(t.shape)} and dtype {t.dtype}"
    return type(t).__name__
