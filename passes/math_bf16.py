"""`lowbit-math-promote-bf16`: compute bf16/f16 arithmetic inside `linalg.generic` bodies
in f32, rounding once where a value leaves the chain, as PyTorch computes bf16 ops.

torch-mlir lowers a bf16 GELU or `silu(a) * b` to generic bodies that do `arith`/`math` on
bf16 directly. Besides rounding after every step, vectors of bf16 arithmetic are not
something LLVM's x86 backend can legalize for every width (`vector<17xbf16>` mulf aborts
instruction selection). This pass rewrites each floating-point `arith`/`math` op of a
16-bit float type into the same op on f32: operands are extended (`arith.extf`), or taken
from the f32 value a preceding `arith.truncf` rounded, and the result is truncated back
for the users that still need the 16-bit type (the yield, stores). Extension of constants
folds away under canonicalization.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir
from torch_mlir.dialects import arith

from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import attribute_dict, walk

_PROMOTED = {
    "arith.addf", "arith.subf", "arith.mulf", "arith.divf", "arith.remf", "arith.negf",
    "arith.maximumf", "arith.minimumf", "arith.maxnumf", "arith.minnumf", "arith.cmpf",
    "arith.select",
    "math.exp", "math.exp2", "math.expm1", "math.log", "math.log1p", "math.log2", "math.log10",
    "math.tanh", "math.erf", "math.sqrt", "math.rsqrt", "math.absf", "math.powf", "math.fpowi",
    "math.sin", "math.cos", "math.atan", "math.atan2", "math.floor", "math.ceil", "math.round",
    "math.roundeven", "math.trunc", "math.fma", "math.copysign",
}


def _is_narrow_float(t: ir.Type) -> bool:
    return isinstance(t, (ir.BF16Type, ir.F16Type))


@register_pass
@dataclasses.dataclass
class PromoteBF16(ModulePass):
    """Rewrite bf16/f16 arith and math ops in linalg.generic bodies to f32 (one rounding)."""

    NAME = "lowbit-math-promote-bf16"

    def run(self, module: ir.Operation) -> None:
        for generic in [op for op in walk(module) if op.name == "linalg.generic"]:
            body = generic.regions[0].blocks[0]
            for op in [o.operation for o in body.operations]:
                if op.name in _PROMOTED and self._narrow(op):
                    self._promote(op)

    @staticmethod
    def _narrow(op: ir.Operation) -> bool:
        types = [v.type for v in op.operands] + [r.type for r in op.results]
        return any(_is_narrow_float(t) for t in types)

    @staticmethod
    def _promote(op: ir.Operation) -> None:
        f32 = ir.F32Type.get()
        with ir.InsertionPoint(op), op.location:
            operands = []
            for v in op.operands:
                if not _is_narrow_float(v.type):
                    operands.append(v)
                    continue
                owner = v.owner
                if (not isinstance(owner, ir.Block) and owner.operation.name == "arith.truncf"
                        and isinstance(owner.operation.operands[0].type, ir.F32Type)):
                    operands.append(owner.operation.operands[0])
                else:
                    operands.append(arith.ExtFOp(f32, v).result)
            result_types = [f32 if _is_narrow_float(r.type) else r.type for r in op.results]
            new = ir.Operation.create(op.name, results=result_types, operands=operands,
                                      attributes=attribute_dict(op))
            for old, res, t in zip(op.results, new.results, [r.type for r in op.results]):
                value = arith.TruncFOp(t, res).result if _is_narrow_float(t) else res
                old.replace_all_uses_with(value)
        op.erase()
