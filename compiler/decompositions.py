"""lowbit's additions to torch-mlir's ATen decomposition table.

torch-mlir lowers `aten.index_put` (what `index_copy_`, `cache[:, :, pos] = kv` and
`index_put_` become after functionalization) to `tm_tensor.scatter`, which neither
bufferizes in our pipeline nor checks its indices. The common KV-cache form, one 1-D
integer index tensor on one dimension with no accumulation, becomes
`lowbit::index_put_rows` (lowbit.compiler.index_put_rows), which `lowbit-convert-index-put`
lowers to a loop over the index that writes the T new rows in place and raises eager's
IndexError for an index out of range. Every other `index_put` form keeps torch-mlir's
lowering (and falls back to eager if that fails).

`scaled_dot_product_attention` with 4-D float32/bfloat16 inputs, no dropout and a boolean
mask (or none) becomes `lowbit::attention` (lowbit.compiler.attention_op), which
`lowbit-convert-attention` turns into a call of the runtime's fused attention kernel
(no materialized [B, H, T, S] scores; masked key blocks are not read). Other forms keep
torch-mlir's decomposition.

`gelu(approximate="tanh")` is spelled out with the exact sqrt(2/pi): torch-mlir's
lowering uses 0.797724 and is off by up to 5e-5. bf16/fp16 inputs are computed in fp32
and rounded once, as eager does.

Sums and means with a bf16/fp16 result (the input's dtype or an explicit `dtype=`) accumulate
in fp32 and round once, as eager PyTorch does; torch-mlir's lowering would accumulate in the
narrow type (a 4096-wide bf16 mean then loses two orders of magnitude of accuracy; masked.var
in bf16, which sums with dtype=bfloat16, was 0.5 off a variance of 24).

Integer floor division (`div(..., rounding_mode="floor")`, what `//` and `floor_divide`
become) is computed by torch-mlir through float64, which is inexact beyond 2**53:
`(2**63 - 1) // 2**30` gave 8589934592 instead of 8589934591. It is rewritten into exact
integer ops: the truncating quotient (which lowers to `arith.divsi`), corrected by one
when the remainder is non-zero and its sign differs from the divisor's.

Matrix products of 8-bit integers (`mm`, `bmm`, `mv`, `dot`, `addmm`, `baddbmm` on int8 or
uint8) crash torch-mlir's torch-to-linalg conversion with SIGSEGV (zero-K included),
killing the process. Eager wraps them modulo 256 (the result keeps the operand dtype), and
a product accumulated in int32 and truncated to 8 bits is the same value modulo 256 (int32
arithmetic wraps, which is again exact modulo 256), so they are computed as int32 products
converted back, exactly as eager returns them. Products whose contraction length is a
static 0 (which crash there for every dtype, fp32 included) become zeros of the result's
shape and dtype, as in eager.

`var`, `std` and `var_mean` of bf16/fp16 tensors are computed in fp32 and rounded once, as
eager does: torch-mlir's lowering went through f64, and the f64 -> bf16 truncation needs the
compiler-rt builtin `__truncdfbf2`, which the JIT cannot resolve (SIGSEGV).

`reciprocal` is `1 / x` (integers promoted to the default float dtype, as eager does):
torch-mlir's lowering asserts `x != 0` at run time ("unimplemented: tensor with zero
element"), which aborted the process where eager returns inf.
"""
from __future__ import annotations

import math

import torch

import lowbit.compiler.attention_op as _attention_op  # registers torch.ops.lowbit.attention
import lowbit.compiler.index_put_rows  # noqa: F401  (registers torch.ops.lowbit.index_put_rows)

aten = torch.ops.aten


def _index_put_as_rows(self: torch.Tensor, indices, values: torch.Tensor, accumulate: bool = False):
    tensor_positions = [i for i, t in enumerate(indices) if t is not None]
    if accumulate or len(tensor_positions) != 1:
        return NotImplemented
    d = tensor_positions[0]
    idx = indices[d]
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32) or idx.shape[0] == 0:
        return NotImplemented
    indexed_shape = list(self.shape)
    indexed_shape[d] = idx.shape[0]
    values = values.to(self.dtype).expand(indexed_shape)
    return torch.ops.lowbit.index_put_rows(self, d, idx.to(torch.int64), values)


def _sdpa_as_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False):
    """`F.scaled_dot_product_attention` -> `lowbit::attention` (the fused kernel) when the form
    is supported (lowbit.compiler.attention_op.supported); else torch-mlir's decomposition.
    `LOWBIT_DISABLE_PASSES=lowbit-convert-attention` keeps the decomposition (what compiled
    attention was before the kernel), rather than an op nothing would lower."""
    from lowbit.compiler.pipeline import disabled_passes
    if not _attention_op.supported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
        return NotImplemented
    if "lowbit-convert-attention" in disabled_passes():
        return NotImplemented
    d = query.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return torch.ops.lowbit.attention(query, key, value, attn_mask, scale, bool(is_causal))


_NARROW_FLOATS = (torch.bfloat16, torch.float16)


def _narrow_result(x: torch.Tensor, dtype) -> torch.dtype | None:
    """The bf16/fp16 result dtype of a sum/mean (an explicit `dtype=` included: masked.var
    sums with dtype=bfloat16), or None when the result is not a narrow float."""
    out = dtype if dtype is not None else x.dtype
    return out if out in _NARROW_FLOATS and not x.dtype.is_complex else None


def _sum_in_fp32(x: torch.Tensor, dims=None, keepdim: bool = False, *, dtype=None):
    out = _narrow_result(x, dtype)
    if out is None:
        return NotImplemented
    return aten.sum.dim_IntList(x.to(out).to(torch.float32), dims, keepdim).to(out)


def _mean_in_fp32(x: torch.Tensor, dims=None, keepdim: bool = False, *, dtype=None):
    out = _narrow_result(x, dtype)
    if out is None:
        return NotImplemented
    return aten.mean.dim(x.to(out).to(torch.float32), dims, keepdim).to(out)


def _full_sum_in_fp32(x: torch.Tensor, *, dtype=None):
    out = _narrow_result(x, dtype)
    if out is None:
        return NotImplemented
    return aten.sum.default(x.to(out).to(torch.float32)).to(out)


def _narrow_in_fp32(op):
    """`op` (var / std / var_mean) of a bf16/fp16 tensor computed in fp32, rounded once, as
    eager does (its reduced-precision variance accumulates in fp32). torch-mlir's lowering
    goes through f64, whose f64 -> bf16 truncation needs `__truncdfbf2`, a compiler-rt builtin
    the JIT cannot resolve: the process died with SIGSEGV."""
    def decomposition(x, *args, **kwargs):
        if not isinstance(x, torch.Tensor) or x.dtype not in _NARROW_FLOATS:
            return NotImplemented
        out = op(x.to(torch.float32), *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.to(x.dtype) for o in out)
        return out.to(x.dtype)
    return decomposition


def _gelu_tanh(x: torch.Tensor, approximate: str = "none"):
    if approximate != "tanh":
        return NotImplemented
    xf = x.to(torch.float32) if x.dtype in _NARROW_FLOATS else x
    inner = math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)
    return (0.5 * xf * (1.0 + torch.tanh(inner))).to(x.dtype)


def _is_int_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.dtype.is_floating_point and not t.dtype.is_complex \
        and t.dtype != torch.bool


def _is_int_operand(v) -> bool:
    return _is_int_tensor(v) or (isinstance(v, int) and not isinstance(v, bool))


def _int_floor_divide(a, b, rounding_mode=None):
    """Exact `floor(a / b)` for integer tensors / scalars (a must be a tensor)."""
    if rounding_mode != "floor" or not _is_int_tensor(a) or not _is_int_operand(b):
        return NotImplemented
    if isinstance(b, int) and b == 0:
        b = torch.zeros_like(a)  # a tensor division, so that the guard below raises as eager does
    if isinstance(b, torch.Tensor):
        # A zero divisor reaches `arith.divsi`, which lowbit-guard-traps turns into eager's
        # RuntimeError("ZeroDivisionError") instead of a SIGFPE.
        q = aten.div.Tensor_mode(a, b, rounding_mode="trunc")
    else:
        q = aten.div.Scalar_mode(a, b, rounding_mode="trunc")
    r = a - q * b                                    # exact: |q * b| <= |a|
    adjust = (r != 0) & ((r < 0) != (b < 0))
    return q - adjust.to(q.dtype)


_BYTE_INTS = (torch.int8, torch.uint8)


def _byte_operands(*ts) -> bool:
    return all(isinstance(t, torch.Tensor) for t in ts) and ts[0].dtype in _BYTE_INTS \
        and all(t.dtype == ts[0].dtype for t in ts)


def _static_zero(size) -> bool:
    return isinstance(size, int) and size == 0


def _zero_k_product(a: torch.Tensor, b: torch.Tensor):
    """`mm`/`bmm`/`mv`/`dot` of operands with a (static) zero-length contraction: zeros, as
    eager returns (torch-mlir's lowering segfaults on it). Else NotImplemented."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or not _static_zero(a.shape[-1]):
        return NotImplemented
    if a.dtype != b.dtype:
        return NotImplemented  # eager raises; keep the op so the same error surfaces
    if a.dim() == 1 and b.dim() == 1:
        shape = []                                    # dot
    elif b.dim() == 1:
        shape = list(a.shape[:-1])                    # mv
    else:
        shape = list(a.shape[:-1]) + [b.shape[-1]]    # mm, bmm
    return torch.zeros(shape, dtype=a.dtype)


def _product(op):
    """`op` (mm, bmm, mv, dot): zero-K -> zeros; 8-bit integers -> int32 product converted back."""
    def decomposition(a, b):
        out = _zero_k_product(a, b)
        if out is not NotImplemented:
            return out
        if not _byte_operands(a, b):
            return NotImplemented
        return op(a.to(torch.int32), b.to(torch.int32)).to(a.dtype)
    return decomposition


def _widened_add_product(op):
    """`addmm`/`baddbmm` on 8-bit integers: computed in int32 and converted back (modulo 256)."""
    def decomposition(inp, a, b, *, beta=1, alpha=1):
        if not _byte_operands(inp, a, b):
            return NotImplemented
        wide = (t.to(torch.int32) for t in (inp, a, b))
        return op(*wide, beta=beta, alpha=alpha).to(a.dtype)
    return decomposition


def _reciprocal_by_division(x):
    """`1 / x`, as eager computes `reciprocal` (integers promoted to the default float dtype).

    torch-mlir's lowering guards the division with `cf.assert x != 0, "unimplemented: tensor
    with zero element"`, which aborts the whole process at run time where eager returns inf."""
    if not isinstance(x, torch.Tensor) or x.dtype.is_complex:
        return NotImplemented
    if not x.dtype.is_floating_point:
        x = x.to(torch.get_default_dtype())
    return aten.div.Tensor(aten.ones_like.default(x), x)


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
        aten.index_put.default: _index_put_as_rows,
        aten.scaled_dot_product_attention.default: _sdpa_as_attention,
        aten.sum.dim_IntList: _sum_in_fp32,
        aten.sum.default: _full_sum_in_fp32,
        aten.mean.dim: _mean_in_fp32,
        aten.gelu.default: _gelu_tanh,
        aten.var.correction: _narrow_in_fp32(aten.var.correction),
        aten.var_mean.correction: _narrow_in_fp32(aten.var_mean.correction),
        aten.std.correction: _narrow_in_fp32(aten.std.correction),
        aten.reciprocal.default: _reciprocal_by_division,
        aten.div.Tensor_mode: _int_floor_divide,
        aten.div.Scalar_mode: _int_floor_divide,
        aten.mm.default: _product(aten.mm.default),
        aten.bmm.default: _product(aten.bmm.default),
        aten.mv.default: _product(aten.mv.default),
        aten.dot.default: _product(aten.dot.default),
        aten.addmm.default: _widened_add_product(aten.addmm.default),
        aten.baddbmm.default: _widened_add_product(aten.baddbmm.default),
    }
    for op, fn in ours.items():
        table[op] = _chain(fn, table.get(op))
    return table
