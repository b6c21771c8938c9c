"""lowbit-empty-memref-args: entry arguments with no elements keep the bare-pointer convention.

Static graphs are called with one data pointer per tensor
(`convert-func-to-llvm{use-bare-ptr-memref-call-conv=1}`, see compiler/jit.py). MLIR can give a
memref that convention only if it has static strides, and it finds none for an identity-layout
memref with a zero dim inside (`memref<5x0xf32>`): the whole function then silently keeps
MLIR's descriptor convention (pointer, offset, sizes, strides per memref), while the caller
still passes one pointer per tensor -- the compiled code read its arguments from past the end
of the argument array and crashed the process (`x.sum(-1)` of a `[5, 0]` tensor, issue 13).

Such an argument holds no element, so nothing is ever read from or written to it: its type
becomes the same shape with an explicit static strided layout (which converts to a bare
pointer, and keeps the rank, so the descriptor convention of dynamic graphs is unchanged),
and its uses read an empty `memref.alloca` of the original type instead. Runs on bufferized
IR, before anything lowers memrefs to LLVM.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir
from torch_mlir.dialects import memref

from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import func_ops


def _needs_layout(t: ir.Type) -> bool:
    if not isinstance(t, ir.MemRefType) or not t.has_static_shape or 0 not in t.shape or t.rank < 2:
        return False
    layout = t.layout
    return isinstance(layout, ir.AffineMapAttr) and layout.value == ir.AffineMap.get_identity(t.rank)


def _strided(t: ir.MemRefType) -> ir.MemRefType:
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= max(size, 1)
    layout = ir.StridedLayoutAttr.get(0, list(reversed(strides)))
    return ir.MemRefType.get(t.shape, t.element_type, layout=layout, memory_space=t.memory_space)


@register_pass
@dataclasses.dataclass
class EmptyMemrefArgs(ModulePass):
    """Give zero-element memref arguments of public functions a static strided layout."""

    NAME = "lowbit-empty-memref-args"

    def run(self, module: ir.Operation) -> None:
        for f in func_ops(module):
            if "sym_visibility" in f.attributes and ir.StringAttr(f.attributes["sym_visibility"]).value != "public":
                continue  # called from inside the module: its call sites would need casts
            block = f.regions[0].blocks[0]
            ftype = ir.FunctionType(ir.TypeAttr(f.attributes["function_type"]).value)
            inputs = list(ftype.inputs)
            changed = False
            for i in range(len(block.arguments)):
                arg = block.arguments[i]
                if not _needs_layout(arg.type):
                    continue
                old = ir.MemRefType(arg.type)
                with ir.InsertionPoint.at_block_begin(block), f.location:
                    empty = memref.AllocaOp(old, [], []).result
                arg.replace_all_uses_with(empty)
                arg.set_type(_strided(old))
                inputs[i] = arg.type
                changed = True
            if changed:
                f.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(inputs, list(ftype.results)))
