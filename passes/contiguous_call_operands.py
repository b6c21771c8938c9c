"""lowbit-contiguous-call-operands: kernel calls get buffers whose layout is what they assume.

Matches, right after one-shot bufferization, calls of lowbit's kernel functions (callees
tagged `lowbit.attention` or `lowbit.qlinear`: inputs first, the output buffer last) with an
operand that is

    %c = memref.cast %view : memref<..., strided<[...]>> to memref<...>     // identity layout

Bufferization passes a slice of a larger buffer that way (a static KV cache read up to the
current length: `cache[:, :, :n]` is rows 0..n of a 32-slot buffer, row stride 32 x D, not
n x D). The cast is only valid if the strides really are the identity ones, and the kernels
compute addresses from the identity layout: the attention kernel read the wrong rows of a
Hugging Face static cache (logits 40% off after prefill). Produces a fresh identity buffer
and a `memref.copy` of the view into it before the call (for the output operand: a copy
back after the call instead), unless the view's static strides are the identity ones. Calls
whose operands are identity buffers already (the common case) are unchanged.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir
from torch_mlir.dialects import memref

from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import walk

KERNEL_ATTRS = ("lowbit.attention", "lowbit.qlinear")


def _kernel_functions(module: ir.Operation) -> set[str]:
    names = set()
    for op in module.regions[0].blocks[0].operations:
        op = op.operation
        if op.name == "func.func" and any(a in op.attributes for a in KERNEL_ATTRS):
            names.add(ir.StringAttr(op.attributes["sym_name"]).value)
    return names


def _identity_strides(shape: list[int]) -> list[int] | None:
    if any(ir.ShapedType.is_dynamic_size(d) for d in shape):
        return None
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return strides[::-1]


def _is_contiguous(t: ir.MemRefType) -> bool:
    layout = t.layout
    if str(layout).startswith("affine_map") and ir.AffineMapAttr(layout).value.is_identity:
        return True
    strides, offset = t.get_strides_and_offset()
    identity = _identity_strides(list(t.shape))
    return identity is not None and list(strides) == identity and offset == 0


def _dynamic_sizes(value: ir.Value, t: ir.MemRefType) -> list[ir.Value]:
    sizes = []
    for i, d in enumerate(t.shape):
        if ir.ShapedType.is_dynamic_size(d):
            index = ir.IntegerAttr.get(ir.IndexType.get(), i)
            c = ir.Operation.create("arith.constant", results=[ir.IndexType.get()], attributes={"value": index}).result
            sizes.append(memref.DimOp(value, c).result)
    return sizes


@register_pass
@dataclasses.dataclass
class ContiguousCallOperands(ModulePass):
    """Copy strided views cast to the identity layout before/after kernel calls."""

    NAME = "lowbit-contiguous-call-operands"

    def run(self, module: ir.Operation) -> None:
        kernels = _kernel_functions(module)
        if not kernels:
            return
        calls = [op for op in walk(module) if op.name == "func.call"
                 and ir.FlatSymbolRefAttr(op.attributes["callee"]).value in kernels]
        for call in calls:
            last = len(call.operands) - 1
            for i, operand in enumerate(list(call.operands)):
                owner = operand.owner
                cast = owner.operation if hasattr(owner, "operation") else None
                if cast is None or cast.name != "memref.cast":
                    continue
                source = cast.operands[0]
                if _is_contiguous(ir.MemRefType(source.type)):
                    continue
                target_type = ir.MemRefType(operand.type)
                with ir.InsertionPoint(call), call.location:
                    fresh = memref.AllocOp(target_type, _dynamic_sizes(source, target_type), []).result
                    if i != last:
                        memref.CopyOp(source, fresh)
                call.operands[i] = fresh
                if i == last:
                    with ir.InsertionPoint.after(call), call.location:
                        memref.CopyOp(fresh, source)
