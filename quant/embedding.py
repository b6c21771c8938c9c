"""`LowBitEmbedding`: an ``nn.Embedding`` whose table is int8 or int4 codes with fp32 scales.

The table ``[V, D]`` is quantized like a linear weight with V output rows (docs/formats.md):
``int8`` one scale per row (granularity "channel") or per group of ``group_size`` columns,
``int4_sym`` per row or per group. A lookup dequantizes only the rows it reads:

    row(i) = codes[i] * scales[i]            (per row; per group: scales[i] repeated per group)

int4 codes are stored two per byte (column 2j in the low nibble, 2j+1 in the high one, each a
signed 4-bit value), so the table takes D/2 bytes per row. The forward is plain torch ops
(gather, shifts, one multiply), which the lowbit backend compiles like any other graph, and
the compiled lookup equals eager's bit for bit. llama.cpp ships its TQ1_0/TQ2_0 models with a
Q4_K embedding for the same reason: at 1-3B the fp32 table is the largest tensor of the model
(128256 x 2560 x 4 B = 1.3 GB for BitNet-2B4T's size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .quantizers import quantize_weight

FORMATS = ("int8", "int4_sym")


class LowBitEmbedding(nn.Module):
    """An embedding table held as int8 / packed int4 codes and fp32 scales (weight-only)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, weight_format: str = "int8",
                 group_size: int = 0, dtype: torch.dtype = torch.float32, padding_idx: int | None = None):
        super().__init__()
        if weight_format not in FORMATS:
            raise ValueError(f"LowBitEmbedding: weights must be one of {FORMATS}, got {weight_format!r}")
        if weight_format == "int4_sym" and embedding_dim % 2:
            raise ValueError(f"LowBitEmbedding: int4 codes pack two per byte; embedding_dim {embedding_dim} is odd")
        if group_size and (group_size <= 0 or embedding_dim % group_size):
            raise ValueError(f"LowBitEmbedding: group_size {group_size} must divide embedding_dim {embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight_format, self.group_size, self.dtype, self.padding_idx = weight_format, group_size, dtype, padding_idx
        width = embedding_dim // 2 if weight_format == "int4_sym" else embedding_dim
        groups = embedding_dim // group_size if group_size else 1
        self.register_buffer("codes", torch.zeros(num_embeddings, width, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(num_embeddings, groups, dtype=torch.float32))

    @classmethod
    def from_float(cls, embedding: nn.Embedding, config: QuantConfig) -> "LowBitEmbedding":
        if type(embedding) is not nn.Embedding:
            raise TypeError(f"LowBitEmbedding.from_float expects nn.Embedding, got {type(embedding).__name__}")
        if config.weights not in FORMATS:
            raise ValueError(f"embeddings take weights {' or '.join(FORMATS)}, got {config.weights!r}")
        if config.activations != "none":
            raise ValueError("an embedding has no activations to quantize: use activations='none'")
        if config.granularity not in ("channel", "group"):
            raise ValueError(f"embedding granularity must be 'channel' or 'group', got {config.granularity!r}")
        if embedding.max_norm is not None or embedding.sparse or embedding.scale_grad_by_freq:
            raise ValueError("LowBitEmbedding does not support max_norm, sparse or scale_grad_by_freq")
        weight = embedding.weight.detach()
        v, d = weight.shape
        group = config.group_size or 0
        module = cls(v, d, config.weights, group, weight.dtype, embedding.padding_idx)
        spec = config.spec_for(d, v)
        quantized = quantize_weight(weight.float(), spec)
        q = quantized.q
        scales = quantized.scales.reshape(v, -1).to(torch.float32)
        if config.weights == "int4_sym":
            low, high = q[:, 0::2], q[:, 1::2]
            q = (low & 0x0F) | (high << 4)  # int8 arithmetic wraps: the high nibble keeps its sign
        module.codes.copy_(q.to(torch.int8))
        module.scales.copy_(scales)
        return module

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        codes = F.embedding(ids, self.codes)
        if self.weight_format != "int4_sym":
            return codes.to(torch.float32)
        # byte = 16 * high + (low mod 16): the low nibble's unsigned value, sign-corrected, and
        # the high one by an exact fp32 division (no shifts: torch-mlir lowers neither shift).
        unsigned = torch.bitwise_and(codes, 15).to(torch.float32)
        low = unsigned - 16.0 * (unsigned >= 8).to(torch.float32)
        high = (codes.to(torch.float32) - unsigned) * 0.0625
        return torch.stack((low, high), dim=-1).flatten(-2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._rows(ids)
        scales = F.embedding(ids, self.scales)
        if self.group_size:
            rows = rows.unflatten(-1, (-1, self.group_size)) * scales.unsqueeze(-1)
            rows = rows.flatten(-2)
        else:
            rows = rows * scales
        return rows.to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        """The table as the model sees it, ``[V, D]`` in the original dtype."""
        return self.forward(torch.arange(self.num_embeddings))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, weights={self.weight_format}{group}, dtype={self.dtype}"
