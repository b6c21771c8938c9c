"""``torch.ops.lowbit.packed_linear``: a low-bit linear whose weight is a runtime buffer.

Binding (`lowbit.compiler.bind`) replaces every recognised low-bit matmul of a captured
graph by this op, with the weight already packed in the microkernels' layout (codes,
scales and offsets inside the blocks, docs/kernels.md) and passed as a graph *input*:

    lowbit::packed_linear(Tensor x, Tensor packed, Tensor? bias, str weight_format,
                          str granularity, int group_size, int in_features,
                          int out_features, int kblock, str act_format) -> Tensor

so the compiled code carries the layer's format, shape and tiling but never its bytes
(weights are data, not code). ``act_format``: "none" (fp activations), "int8" (the kernel
quantizes x per token) or "int8_unit" (x already holds int8 values, quantized by the model
itself; the kernel takes them with scale 1 and the model's own ops rescale the result; made by
`lowbit.compiler.act_quant` for per-tensor ternary weights only). The eager implementation runs the runtime's whole-layer
kernel (`lowbit.runtime.qgemm.qlinear`), so a graph after binding still runs in eager
(the fallback for parts the pipeline rejects) with the same numerics as compiled code.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowbit.quant.formats import LowBitSpec

SCHEMA = ("(Tensor x, Tensor packed, Tensor? bias, str weight_format, str granularity, int group_size, "
          "int in_features, int out_features, int kblock, str act_format) -> Tensor")


def spec_of(weight_format: str, granularity: str, group_size: int, in_features: int, out_features: int,
            act_format: str) -> LowBitSpec:
    return LowBitSpec(weight_format, granularity, group_size, in_features, out_features, act_format)


def _check(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], spec: LowBitSpec) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"lowbit.packed_linear: x must be float32 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != spec.in_features:
        raise ValueError(f"lowbit.packed_linear: x must have shape [..., {spec.in_features}], "
                         f"got {list(x.shape)}")
    if packed.dtype not in (torch.int8, torch.uint8) or packed.dim() != 1:
        raise TypeError(f"lowbit.packed_linear: packed must be a 1-D int8/uint8 tensor, got "
                        f"{packed.dtype}{list(packed.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (spec.out_features,)):
        raise ValueError(f"lowbit.packed_linear: bias must be float32 [{spec.out_features}], got "
                         f"{bias.dtype}{list(bias.shape)}")


@torch.library.custom_op("lowbit::packed_linear", mutates_args=(), schema=SCHEMA)
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], weight_format: str,
                  granularity: str, group_size: int, in_features: int, out_features: int, kblock: int,
                  act_format: str) -> torch.Tensor:
    """``y = x @ W^T + bias`` with W pre-packed for the kernels (see the module docstring)."""
    from lowbit.runtime.qgemm import PackedWeight, packed_layout, qlinear

    spec = spec_of(weight_format, granularity, group_size, in_features, out_features, act_format)
    _check(x, packed, bias, spec)
    total, kbb, nbb, nkb = packed_layout(spec.weight_format, out_features, in_features, kblock)
    if packed.numel() != total:
        raise ValueError(f"lowbit.packed_linear: packed has {packed.numel()} bytes, the layout needs {total}")
    pw = PackedWeight(packed.view(torch.uint8), spec.weight_format, out_features, in_features, kblock,
                      kbb, nbb, nkb)
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], out_features))
    if act_format == "int8_unit":
        from lowbit.quant.op import _unit_activations
        _unit_activations(x)  # integers in [-128, 127], else a ValueError naming a value
        if spec.weight_format != "ternary" or spec.granularity != "tensor" or spec.in_features >= 2 ** 17:
            raise ValueError("lowbit.packed_linear: act_format 'int8_unit' is defined for per-tensor ternary "
                             f"weights with K < 2**17, got {spec.describe()}")
        # Integer x times ternary codes: every partial sum is an integer below 2**24, so the
        # weight-only kernel's fp32 sums equal the int8 kernels' exact ones (the scale is a
        # power of two for the layers act_quant rewrites).
        return qlinear(x.contiguous(), pw, bias, mode="weight_only")
    mode = "int8" if act_format == "int8" else "weight_only"
    return qlinear(x.contiguous(), pw, bias, mode=mode)


@packed_linear.register_fake
def _packed_linear_fake(x, packed, bias, weight_format, granularity, group_size, in_features, out_features,
                        kblock, act_format):
    spec = spec_of(weight_format, granularity, group_size, in_features, out_features, act_format)
    _check(x, packed, bias, spec)
    return x.new_empty((*x.shape[:-1], out_features))


# ----------------------------------------------------------------------------- dense weights
#
#   lowbit::packed_matmul(Tensor x, Tensor packed) -> Tensor
#
# `y = x @ B` for an fp32/bf16 B ([K, N], a Linear weight's transpose) pre-packed at bind
# time in the BRGEMM panel layout (`lowbit.runtime.brgemm.pack_b`): `packed` is
# [N/32, K, 32] (fp32) or [N/32, K/2, 32, 2] (bf16 VNNI pairs), x is [..., K] of the same
# dtype. Compiled, it becomes the blocked `linalg.contract` that `lowbit-dense-tile` tiles
# into BRGEMM calls; in eager, one BRGEMM call.

@torch.library.custom_op("lowbit::packed_matmul", mutates_args=())
def packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``y = x @ B`` with B pre-packed in the BRGEMM panel layout (see above)."""
    from lowbit.runtime.brgemm import matmul

    n, k = _dense_dims(x, packed)
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    return matmul(x2.contiguous(), packed.reshape(-1), b_packed=True, n=n).reshape(*x.shape[:-1], n)


@packed_matmul.register_fake
def _packed_matmul_fake(x, packed):
    n, _ = _dense_dims(x, packed)
    return x.new_empty((*x.shape[:-1], n))


def _dense_dims(x: torch.Tensor, packed: torch.Tensor) -> tuple[int, int]:
    if x.dtype not in (torch.float32, torch.bfloat16) or packed.dtype != x.dtype:
        raise TypeError(f"lowbit.packed_matmul: x and packed must be both float32 or both bfloat16, got "
                        f"{x.dtype} and {packed.dtype}")
    rank = 3 if x.dtype == torch.float32 else 4
    if packed.dim() != rank or packed.shape[2] != 32 or (rank == 4 and packed.shape[3] != 2):
        raise ValueError(f"lowbit.packed_matmul: packed must be [N/32, K, 32] (bf16: [N/32, K/2, 32, 2]), "
                         f"got {list(packed.shape)}")
    k = packed.shape[1] * (1 if rank == 3 else 2)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"lowbit.packed_matmul: x must have shape [..., {k}], got {list(x.shape)}")
    return packed.shape[0] * 32, k
