"""lowbit's additions to torch-mlir's ATen decomposition table.

torch-mlir lowers `aten.index_put` (what `index_copy_`, `cache[:, :, pos] = kv` and
`index_put_` become after functionalization) to `tm_tensor.scatter`, which neither
bufferizes in our pipeline nor checks its indices. The common KV-cache form, one 1-D
integer index tensor on one dimension with no accumulation, is rewritten here into ops
that lower to plain linalg and can never write out of bounds:

    j[s]  = the last t with idx[t] == s (or -1)        # [S] from an [S, T] comparison
    out   = where(j >= 0, index_select(values, d, max(j, 0)), self)

Out-of-range indices (which eager rejects with an IndexError) select nothing. Every
other `index_put` form keeps torch-mlir's lowering (and falls back to eager if that
fails).

`gelu(approximate="tanh")` is spelled out with the exact sqrt(2/pi): torch-mlir's
lowering uses 0.797724 and is off by up to 5e-5. bf16/fp16 inputs are computed in fp32
and rounded once, as eager does.

Sums and means of bf16/fp16 tensors accumulate in fp32 and round once, as eager PyTorch
does; torch-mlir's lowering would accumulate in the narrow type (a 4096-wide bf16 mean
then loses two orders of magnitude of accuracy).
"""
from __future__ import annotations

import math

import torch

aten = torch.ops.aten


def _index_put_as_select(self: torch.Tensor, indices, values: torch.Tensor, accumulate: bool = False):
    tensor_positions = [i for i, t in enumerate(indices) if t is not None]
    if accumulate or len(tensor_positions) != 1:
        return NotImplemented
    d = tensor_positions[0]
    idx = indices[d]
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32) or idx.shape[0] == 0:
        return NotImplemented
    size = self.shape[d]
    count = idx.shape[0]
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + size, idx)
    positions = torch.arange(size, dtype=torch.int64)
    steps = torch.arange(count, dtype=torch.int64)
    hits = positions.unsqueeze(1) == idx.unsqueeze(0)                       # [S, T]
    last = torch.where(hits, steps.unsqueeze(0), -1).amax(1)
    indexed_shape = list(self.shape)
    indexed_shape[d] = count
    values = values.to(self.dtype).expand(indexed_shape)
    gathered = aten.index_select(values, d, last.clamp(min=0))
    mask_shape = [1] * self.dim()
    mask_shape[d] = size
    return torch.where((last >= 0).view(mask_shape), gathered, self)


_NARROW_FLOATS = (torch.bfloat16, torch.float16)


def _sum_in_fp32(x: torch.Tensor, dims=None, keepdim: bool = False, *, dtype=None):
    if x.dtype not in _NARROW_FLOATS or dtype is not None:
        return NotImplemented
    return aten.sum.dim_IntList(x.to(torch.float32), dims, keepdim).to(x.dtype)


def _mean_in_fp32(x: torch.Tensor, dims=None, keepdim: bool = False, *, dtype=None):
    if x.dtype not in _NARROW_FLOATS or dtype is not None:
        return NotImplemented
    return aten.mean.dim(x.to(torch.float32), dims, keepdim).to(x.dtype)


def _full_sum_in_fp32(x: torch.Tensor, *, dtype=None):
    if x.dtype not in _NARROW_FLOATS or dtype is not None:
        return NotImplemented
    return aten.sum.default(x.to(torch.float32)).to(x.dtype)


def _gelu_tanh(x: torch.Tensor, approximate: str = "none"):
    if approximate != "tanh":
        return NotImplemented
    xf = x.to(torch.float32) if x.dtype in _NARROW_FLOATS else x
    inner = math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)
    return (0.5 * xf * (1.0 + torch.tanh(inner))).to(x.dtype)


def _chain(first, fallback):
    """`first`, or `fallback` (the base table's entry) when `first` does not apply."""
    if fallback is None:
        return first

    def decomposition(*args, **kwargs):
        out = first(*args, **kwargs)
        return fallback(*args, **kwargs) if out is NotImplemented else out

    return decomposition


def lowbit_decompositions(base: dict | None = None) -> dict:
    """`base` (torch-mlir's table) with lowbit's decompositions taking precedence.

    Each of ours returns `NotImplemented` when it does not apply; then `base`'s entry for
    the op (if any) runs instead.
    """
    table = dict(base or {})
    ours = {
        aten.index_put.default: _index_put_as_select,
        aten.sum.dim_IntList: _sum_in_fp32,
        aten.sum.default: _full_sum_in_fp32,
        aten.mean.dim: _mean_in_fp32,
        aten.gelu.default: _gelu_tanh,
    }
    for op, fn in ours.items():
        table[op] = _chain(fn, table.get(op))
    return table
