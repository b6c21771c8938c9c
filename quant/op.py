"""``torch.ops.lowbit.linear``: the one custom op every quantized linear lowers to.

Schema (attributes after the tensors, in :meth:`LowBitSpec.op_attributes` order)::

    lowbit::linear(Tensor x, Tensor packed, Tensor scales, Tensor? zero_points, Tensor? bias,
                   str weight_format, str granularity, int group_size, int in_features,
                   int out_features, str act_format, int act_group_size) -> Tensor

The CPU implementation here is the *reference semantics* (docs/formats.md, "The op"): the
native kernels and the compiler are checked against it. It unpacks and validates the weight
on every call, which is slow on purpose: it is a specification, not a kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from .formats import LowBitSpec
from .packing import check_packed_tensor, unpack_codes
from .quantizers import check_weight_tensors, dequantize_weight, expand_groups, quantize_activations_int8

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


def check_linear_args(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                      zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      spec: LowBitSpec) -> None:
    """Metadata checks shared by the real and the fake kernel (no data is read)."""
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"lowbit.linear: x must be float32 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != spec.in_features:
        raise ValueError(f"lowbit.linear: x must have shape [..., {spec.in_features}] "
                         f"(in_features), got {list(x.shape)}")
    check_packed_tensor(packed, spec.format, spec.in_features, spec.out_features)
    check_weight_tensors(scales, zero_points, spec, check_values=False)
    if bias is not None:
        if bias.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"lowbit.linear: bias must be float32 or {x.dtype}, got {bias.dtype}")
        if tuple(bias.shape) != (spec.out_features,):
            raise ValueError(f"lowbit.linear: bias must have shape [{spec.out_features}], "
                             f"got {list(bias.shape)}")


def reference_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                     zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     spec: LowBitSpec) -> torch.Tensor:
    """The documented semantics of ``lowbit.linear`` in plain PyTorch."""
    check_linear_args(x, packed, scales, zero_points, bias, spec)
    check_weight_tensors(scales, zero_points, spec, check_values=True)
    q = unpack_codes(packed, spec.format, spec.in_features)
    x2 = x.reshape(-1, spec.in_features).to(torch.float32)
    if spec.act_format == "none":
        y = x2 @ dequantize_weight(q, scales, zero_points, spec).T
    else:
        y = _int8_activation_linear(x2, q, scales, zero_points, spec)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], spec.out_features)


def _unit_activations(x: torch.Tensor) -> torch.Tensor:
    """act_format ``int8_unit``: x must already hold int8 values (integers in [-128, 127])."""
    xf = x.to(torch.float32)
    bad = (xf != xf.round()) | (xf < -128) | (xf > 127)
    if bool(bad.any()):
        v = xf[bad][0].item()
        raise ValueError(f"lowbit.linear: act_format 'int8_unit' needs integer activations in [-128, 127], "
                         f"got {v!r}")
    return xf


def _int8_activation_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                            zero_points: Optional[torch.Tensor], spec: LowBitSpec) -> torch.Tensor:
    """``y = sum_b (sum_{g in b} fp32(isum[b,g]) * s[n,g]) / s_x[m,b]`` with exact integer sums.

    A segment is the intersection of a weight scale group and an activation block; its
    integer dot products are exact (computed in float64, |sum| < 2**53 for any K < 2**37).
    """
    k = spec.in_features
    if spec.act_format == "int8_unit":
        xq, s_x = _unit_activations(x), torch.ones((x.shape[0], 1), dtype=torch.float32)
    else:
        xq, s_x = quantize_activations_int8(x, spec.act_group_size)
    w = q.to(torch.int32)
    if zero_points is not None:
        w = w - expand_groups(zero_points.to(torch.int32), spec)
    xq64, w64 = xq.to(torch.float64), w.to(torch.float64)
    s_rows = scales if spec.granularity != "tensor" else scales.expand(spec.out_features, 1)
    group, block = spec.group_width, spec.act_group_size or k
    y = torch.zeros((x.shape[0], spec.out_features), dtype=torch.float32)
    for b, b0 in enumerate(range(0, k, block)):
        b1 = min(b0 + block, k)
        acc = torch.zeros_like(y)
        c0 = b0
        while c0 < b1:
            g = c0 // group
            c1 = min(b1, (g + 1) * group)
            isum = xq64[:, c0:c1] @ w64[:, c0:c1].T
            acc += isum.to(torch.float32) * s_rows[:, g]
            c0 = c1
        y += acc / s_x[:, b : b + 1]
    return y


# Written out (not inferred) so the attributes are plain `int`s, not `SymInt`s: they are
# static properties of a layer, and docs/formats.md pins this exact string.
SCHEMA = ("(Tensor x, Tensor packed, Tensor scales, Tensor? zero_points, Tensor? bias, "
          "str weight_format, str granularity, int group_size, int in_features, int out_features, "
          "str act_format, int act_group_size) -> Tensor")


@torch.library.custom_op("lowbit::linear", mutates_args=(), schema=SCHEMA)
def linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
           zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           weight_format: str, granularity: str, group_size: int, in_features: int,
           out_features: int, act_format: str, act_group_size: int) -> torch.Tensor:
    """Low-bit linear ``y = x @ W^T + bias`` with W given by packed codes, scales and zero points."""
    spec = LowBitSpec(weight_format, granularity, group_size, in_features, out_features,
                      act_format, act_group_size)
    if x.device.type != "cpu":
        raise ValueError(f"lowbit.linear has a CPU implementation only, got x on {x.device}")
    return reference_linear(x, packed, scales, zero_points, bias, spec)


@linear.register_fake
def _linear_fake(x, packed, scales, zero_points, bias, weight_format, granularity, group_size,
                 in_features, out_features, act_format, act_group_size):
    spec = LowBitSpec(weight_format, granularity, group_size, in_features, out_features,
                      act_format, act_group_size)
    check_linear_args(x, packed, scales, zero_points, bias, spec)
    return x.new_empty((*x.shape[:-1], out_features))

