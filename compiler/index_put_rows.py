"""``torch.ops.lowbit.index_put_rows``: the KV-cache form of ``index_put`` as one op.

    lowbit::index_put_rows(Tensor self, int dim, Tensor index, Tensor values) -> Tensor

A copy of ``self`` whose slices ``index[t]`` along ``dim`` are ``values``' slices ``t``
(``values`` has ``self``'s shape with ``index.numel()`` at ``dim``). Negative indices count
from the end, a repeated index takes its last value, an index outside ``[-S, S)`` raises
``IndexError`` -- what ``index_copy_``, ``cache[:, :, pos] = kv`` and ``index_put_`` with one
1-D index do in eager.

Why one op: after functionalization a KV-cache update is "a new cache equal to the old one
but for T rows", which written as ATen ops reads and writes the whole cache every step.
As one op, `lowbit-convert-index-put` lowers it to a loop over the T rows that bufferization
runs in place on the cache's own buffer (docs/codegen.md, "In-place updates"), so a decode
step touches one row per cache instead of all of them.
"""
from __future__ import annotations

import torch


def check_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """`index` as int64 with negative entries wrapped; IndexError (eager's) when one is out of range."""
    idx = index.to(torch.int64)
    if idx.numel() and (bool((idx < -size).any()) or bool((idx >= size).any())):
        bad = idx[(idx < -size) | (idx >= size)][0].item()
        raise IndexError(f"index {bad} is out of bounds for dimension with size {size}")
    return torch.where(idx < 0, idx + size, idx)


@torch.library.custom_op("lowbit::index_put_rows", mutates_args=())
def index_put_rows(self: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``self`` with rows ``index`` along ``dim`` replaced by ``values`` (see the module docstring)."""
    if index.dim() != 1:
        raise ValueError(f"lowbit.index_put_rows: index must be 1-D, got shape {list(index.shape)}")
    idx = check_index(index, self.shape[dim])
    # Last occurrence wins: write the rows in order (index_copy_ leaves duplicates unspecified).
    out = self.clone()
    src = values.to(self.dtype)
    for t in range(idx.numel()):
        out.select(dim, int(idx[t])).copy_(src.select(dim, t))
    return out


@index_put_rows.register_fake
def _(self: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(self)
