"""Quantization and dequantization rules of every format (the definitions of docs/formats.md).

Weights (``W`` fp32/bf16 ``[N, K]``) are quantized group by group; statistics are taken over the
real elements of a group only (a short last group is not padded for the statistics). Scale
statistics are computed in float64 and rounded once to fp32; the division ``W / s`` and the
rounding (half to even) are done in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import ACT_ABSMAX_EPS, WEIGHT_SCALE_EPS, LowBitSpec, WeightFormat


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer values ``q`` (int8 ``[N, K]``), fp32 ``scales`` and int8 ``zero_points`` (asymmetric only)."""

    q: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None


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


def quantize_activations_int8(x: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet a8: ``s_x = 127 / max(|x|).clamp(min=1e-5)``, ``xq = clamp(round(x * s_x), -128, 127)``.

    ``x`` is fp32 ``[M, K]``; the max is per row (``block == 0``) or per K-block of ``block``
    columns. Returns ``xq`` as fp32 holding integers (exact) and fp32 ``s_x`` ``[M, B]``.
    """
    m, k = x.shape
    width = k if block == 0 else block
    blocks = -(-k // width)
    padded = torch.zeros((m, blocks * width), dtype=torch.float32)
    padded[:, :k] = x
    absmax = padded.view(m, blocks, width).abs().amax(dim=-1)
    # A true fp32 division: PyTorch evaluates `127.0 / tensor` as `127.0 * reciprocal(tensor)`,
    # which can differ in the last ulp from the documented 127 / max.
    s_x = torch.full_like(absmax, 127.0) / absmax.clamp(min=ACT_ABSMAX_EPS)
    s_full = s_x.repeat_interleave(width, dim=1)[:, :k]
    xq = torch.round(x * s_full).clamp(-128, 127)
    return xq, s_x


def check_weight_tensors(scales: torch.Tensor, zero_points: torch.Tensor | None, spec: LowBitSpec,
                         check_values: bool = True) -> None:
    """Validate scale / zero-point tensors against ``spec`` (shape, dtype, and if asked, values)."""
    fmt: WeightFormat = spec.format
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(scales).__name__}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if tuple(scales.shape) != spec.scale_shape:
        raise ValueError(f"scales for {spec.describe()} with K={spec.in_features}, N={spec.out_features} "
                         f"must have shape {list(spec.scale_shape)}, got {list(scales.shape)}")
    if fmt.asymmetric:
        if zero_points is None:
            raise ValueError(f"format {fmt.name} is asymmetric and needs zero_points")
        if zero_points.dtype != torch.int8:
            raise TypeError(f"zero_points must be int8, got {zero_points.dtype}")
        if tuple(zero_points.shape) != spec.scale_shape:
            raise ValueError(f"zero_points must have the scales' shape {list(spec.scale_shape)}, "
                             f"got {list(zero_points.shape)}")
    elif zero_points is not None:
        raise ValueError(f"format {fmt.name} is symmetric and takes no zero_points")
    if check_values:
        if not bool((torch.isfinite(scales) & (scales > 0)).all()):
            raise ValueError("scales must be finite and > 0")
        if zero_points is not None and zero_points.numel():
            lo, hi = int(zero_points.min()), int(zero_points.max())
            if lo < 0 or hi > fmt.qmax:
                raise ValueError(f"zero_points of {fmt.name} must lie in [0, {fmt.qmax}], found [{lo}, {hi}]")
