"""A GPTQ-style quantized linear, reproducing the torch dequantization of GPTQModel's
`TorchQuantLinear` (gptqmodel/nn_modules/qlinear/torch.py, `dequantize_weight`, bits 2/4/8):

    zeros  = (qzeros[:, :, None] >> wf[None, None, :]).to(int8) & maxq   -> [groups, N]
    weight = (qweight[:, None, :] >> wf[None, :, None]).to(int8) & maxq  -> [K, N]
    weights = scales[g_idx] * (weight - zeros[g_idx])                      (fp16)

`qweight` int32 [K / (32/bits), N] packs 32/bits codes per word along K, `qzeros` int32
[groups, N / (32/bits)] along N, `scales` fp16 [groups, N], `g_idx` int32 [K] (k // group,
or a permutation of it with act-order). 3-bit uses the same per-word scheme with 10 codes per
word here (GPTQ's own 3-bit layout spans words; lowbit reads values, not the packing).
The weight is cast to the activations' dtype for the matmul (fp16 matmuls are not run on
CPU here). gptqmodel itself is not installed by the tests: importing it pulls CUDA-oriented
dependencies; this module is the fixture the issue asks for in that case.
"""
from __future__ import annotations

import torch


class GPTQStyleLinear(torch.nn.Module):
    def __init__(self, in_features, out_features, bits=4, group_size=128, bias=True, seed=0,
                 act_order=False, scale_dtype=torch.float16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, out_features
        self.pack = 32 // bits
        maxq = 2 ** bits - 1
        groups = -(-in_features // group_size)
        q = torch.randint(0, maxq + 1, (in_features, out_features), generator=g, dtype=torch.int64)
        z = torch.randint(0, maxq + 1, (groups, out_features), generator=g, dtype=torch.int64)
        scales = (torch.rand(groups, out_features, generator=g) * 0.02 + 0.005).to(scale_dtype)
        g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
        if act_order:
            g_idx = g_idx[torch.randperm(in_features, generator=g)]
        self.register_buffer("qweight", self._pack_rows(q))
        self.register_buffer("qzeros", self._pack_rows(z.t()).t().contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("wf", torch.arange(0, self.pack * bits, bits, dtype=torch.int32))
        self.bias = torch.nn.Parameter(torch.randn(out_features, generator=g) * 0.1) if bias else None

    def _pack_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Pack codes [R, C] along R into int32 words [ceil(R / pack), C]."""
        rows, cols = codes.shape
        words = -(-rows // self.pack)
        padded = torch.zeros(words * self.pack, cols, dtype=torch.int64)
        padded[:rows] = codes
        shifts = (torch.arange(self.pack) * self.bits).view(1, self.pack, 1)
        packed = (padded.view(words, self.pack, cols) << shifts).sum(1)
        return (packed - ((packed >> 31) << 32)).to(torch.int32)  # wrap to signed 32-bit

    def dequantize_weight(self) -> torch.Tensor:
        maxq = 2 ** self.bits - 1
        zeros = torch.bitwise_right_shift(self.qzeros.unsqueeze(2).expand(-1, -1, self.pack),
                                          self.wf.unsqueeze(0)).to(torch.int16)
        zeros = torch.bitwise_and(zeros, maxq).reshape(self.qzeros.shape[0], -1)[:, : self.out_features]
        weight = torch.bitwise_and(
            torch.bitwise_right_shift(self.qweight.unsqueeze(1).expand(-1, self.pack, -1),
                                      self.wf.unsqueeze(-1)).to(torch.int16), maxq)
        weight = weight.reshape(-1, weight.shape[2])[: self.in_features]
        gi = self.g_idx.long()
        return self.scales[gi] * (weight - zeros[gi]).to(self.scales.dtype)

    def forward(self, x):
        out = torch.matmul(x, self.dequantize_weight().to(x.dtype))
        return out + self.bias.to(x.dtype) if self.bias is not None else out
