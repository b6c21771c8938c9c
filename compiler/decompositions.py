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
"""
from __future__ import annotations

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


def lowbit_decompositions() -> dict:
    """Decompositions applied on top of torch-mlir's table (op overload -> function)."""
    return {aten.index_put.default: _index_put_as_select}
