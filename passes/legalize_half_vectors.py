"""lowbit-legalize-half-vectors: masked memory intrinsics on bf16/f16 vectors -> on i16.

Matches, in the LLVM dialect, `llvm.intr.masked.load`, `masked.store`, `masked.gather` and
`masked.scatter` whose data type is a vector of 16-bit floats, and produces the same
intrinsic on the same-width `i16` vector between `llvm.bitcast`s. The data is only moved,
never computed on, so this is exact.

Why: LLVM's x86 backend splits a masked store of `<64 x bfloat>` into scalar stores when
legalizing and then fails instruction selection ("Cannot select: store ... poison"),
which aborts the process; the same intrinsic on `<64 x i16>` becomes AVX-512BW masked
moves. Runs after `convert-vector-to-llvm`.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir

from lowbit.passes.registry import ModulePass, register_pass

# Intrinsic -> (index of the data operand or None, whether the result is data).
_MASKED = {
    "llvm.intr.masked.load": (2, True),      # (ptr, mask, pass_thru) -> data
    "llvm.intr.masked.gather": (2, True),    # (ptrs, mask, pass_thru) -> data
    "llvm.intr.masked.store": (0, False),    # (data, ptr, mask)
    "llvm.intr.masked.scatter": (0, False),  # (data, ptrs, mask)
}


def _half_vector(t: ir.Type) -> bool:
    return isinstance(t, ir.VectorType) and isinstance(t.element_type, (ir.BF16Type, ir.F16Type))


def _as_i16(t: ir.Type) -> ir.Type:
    return ir.VectorType.get(ir.VectorType(t).shape, ir.IntegerType.get_signless(16))


def _bitcast(value: ir.Value, to: ir.Type) -> ir.Value:
    return ir.Operation.create("llvm.bitcast", results=[to], operands=[value]).result


@register_pass
@dataclasses.dataclass
class LegalizeHalfVectors(ModulePass):
    """Move bf16/f16 vectors through masked load/store/gather/scatter as i16 vectors."""

    NAME = "lowbit-legalize-half-vectors"

    def run(self, module: ir.Operation) -> None:
        found = []

        def visit(op):
            if op.name in _MASKED:
                found.append(op.operation)
            return ir.WalkResult.ADVANCE

        module.walk(visit)
        for op in found:
            self._rewrite(op)

    @staticmethod
    def _rewrite(op: ir.Operation) -> None:
        data_index, returns_data = _MASKED[op.name]
        operands = list(op.operands)
        data_type = op.results[0].type if returns_data else operands[data_index].type
        if not _half_vector(data_type):
            return
        i16 = _as_i16(data_type)
        names = [a if isinstance(a, str) else a.name for a in op.attributes]
        attrs = {name: op.attributes[name] for name in names}
        with ir.InsertionPoint(op), op.location:
            if data_index < len(operands):
                operands[data_index] = _bitcast(operands[data_index], i16)
            new = ir.Operation.create(op.name, results=[i16] if returns_data else [],
                                      operands=operands, attributes=attrs)
            if returns_data:
                op.results[0].replace_all_uses_with(_bitcast(new.results[0], data_type))
        op.erase()
