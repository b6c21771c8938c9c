"""``torch.ops.lowbit.attention``: scaled dot-product attention as one op, and its kernel.

    lowbit::attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> Tensor

``q`` is ``[B, H, T, D]``, ``k`` and ``v`` are ``[B, Hkv, S, D]`` with ``H`` a multiple of
``Hkv`` (grouped-query attention: head ``h`` reads kv head ``h // (H // Hkv)``), ``mask`` is
``None`` or a boolean tensor broadcastable to ``[B, H, T, S]`` (True = may attend),
``causal`` keeps key ``s`` for query ``t`` only when ``s <= t`` (``is_causal=True``'s
top-left alignment; combined with a mask both must allow). The result is
``softmax(scale * q k^T, masked) v`` in ``q``'s dtype, with eager CPU
``F.scaled_dot_product_attention``'s answer for a query whose keys are all masked: zeros.

Why one op: torch-mlir decomposes SDPA into two batched matmuls and a masked softmax over a
materialized ``[B, H, T, S]`` score tensor that reads every cache position even when the
mask hides most of them (decode at position p of an S-slot cache). As one op,
`lowbit-convert-attention` turns it into a call of the runtime's fused kernel
(``runtime/native/src/attention*.cpp``: online softmax over key blocks, blocks nobody may see
skipped without reading K/V; docs/codegen.md, "Fused attention"). The eager implementation
below runs where the compiler falls back.

``fused_attention`` calls the kernel directly (ctypes, one thread) for tests and benchmarks.
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

DTYPE_CODES = {torch.float32: 2, torch.bfloat16: 3}   # LOWBIT_ATTN_F32 / LOWBIT_ATTN_BF16
CAUSAL = 1                                            # LOWBIT_ATTN_CAUSAL


def _broadcast_mask_shape(mask: torch.Tensor, full: list) -> list:
    """`mask`'s sizes padded to rank 4; ValueError unless each is 1 or the full size."""
    if mask.dim() > 4:
        raise ValueError(f"lowbit.attention: mask must have at most 4 dims, got {list(mask.shape)}")
    sizes = [1] * (4 - mask.dim()) + list(mask.shape)
    for got, want in zip(sizes, full):
        if got != 1 and got != want:
            raise ValueError(f"lowbit.attention: mask of shape {list(mask.shape)} does not broadcast to "
                             f"{list(full)}")
    return sizes


def check_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """ValueError (naming what is wrong) unless the op's shape/dtype contract holds."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"lowbit.attention: {name} must be 4-D [B, heads, length, head_dim], "
                             f"got {list(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"lowbit.attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPE_CODES:
        raise ValueError(f"lowbit.attention: dtype {q.dtype} is not supported (float32, bfloat16)")
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"lowbit.attention: k {list(k.shape)} and v {list(v.shape)} must be "
                         f"[{b}, Hkv, S, {d}] for q {list(q.shape)}")
    hkv = k.shape[1]
    if hkv < 1 or h % hkv:
        raise ValueError(f"lowbit.attention: q's {h} heads are not a multiple of k/v's {hkv}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"lowbit.attention: mask must be bool, got {mask.dtype}")
        _broadcast_mask_shape(mask, [b, h, q.shape[2], k.shape[2]])


@torch.library.custom_op("lowbit::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
              causal: bool) -> torch.Tensor:
    """Scaled dot-product attention (see the module docstring), eager implementation."""
    check_arguments(q, k, v, mask)
    if causal:
        t, s = q.shape[2], k.shape[2]
        tri = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        mask = tri if mask is None else mask & tri
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@attention.register_fake
def _(q, k, v, mask, scale, causal):
    check_arguments(q, k, v, mask)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def supported(q, k, v, mask, dropout_p: float, is_causal: bool, enable_gqa: bool) -> bool:
    """Whether `F.scaled_dot_product_attention` with these arguments is `lowbit::attention`'s
    form: 4-D float32/bfloat16 q/k/v of one dtype, static head counts and head dim, no
    dropout, a boolean mask or none, not mask and is_causal together (eager rejects that)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return False
    if any(t.dim() != 4 or t.dtype != q.dtype for t in (q, k, v)) or q.dtype not in DTYPE_CODES:
        return False
    if not (isinstance(dropout_p, (int, float)) and dropout_p == 0.0):
        return False
    static = (q.shape[1], k.shape[1], v.shape[1], q.shape[3], k.shape[3], v.shape[3])
    if not all(isinstance(x, int) for x in static):
        return False
    h, hkv, hv, d, dk, dv = static
    if hkv != hv or d != dk or d != dv or d < 1 or hkv < 1 or h % hkv or (h != hkv and not enable_gqa):
        return False
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or not 2 <= mask.dim() <= 4 or is_causal:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _kernel():
    from lowbit.runtime.library import load_runtime
    lib = load_runtime()
    fn = lib.lowbit_attention_invoke
    fn.restype = ctypes.c_int32
    fn.argtypes = ([ctypes.c_int32] + [ctypes.c_int64] * 5 + [ctypes.c_int64] * 10
                   + [ctypes.c_float, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64])
    lib.lowbit_attention_last_isa.restype = ctypes.c_char_p
    return lib


def last_isa() -> str:
    """The ISA the last `fused_attention` call on this thread ran ("avx512", "avx2", "scalar")."""
    return _kernel().lowbit_attention_last_isa().decode()


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """`lowbit::attention` computed by the runtime's fused kernel (one thread, the ISA
    `lowbit.runtime` selected; LOWBIT_ISA forces one). CPU tensors only."""
    check_arguments(q, k, v, mask)
    if any(t.device.type != "cpu" for t in (q, k, v)):
        raise ValueError("lowbit.attention: the fused kernel runs on CPU tensors only")
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    msizes = [1, 1, 1, 1]
    mptr = 0
    if mask is not None:
        msizes = _broadcast_mask_shape(mask, [b, h, t, s])
        mask = mask.contiguous()
        mptr = mask.data_ptr() if mask.numel() else 0
    rc = _kernel().lowbit_attention_invoke(
        DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), mptr, out.data_ptr(),
        b, h, hkv, t, s, d, *msizes, scale, CAUSAL if causal else 0, 0, b * h)
    if rc != 0:
        from lowbit.runtime.library import error_string
        raise ValueError(f"lowbit.attention: the kernel rejected its arguments: {error_string(rc)}")
    return out
