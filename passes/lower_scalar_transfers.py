"""lowbit-lower-scalar-transfers: 0-d vector transfers on memrefs -> scalar load/store.

Matches `vector.transfer_read %m[...] : memref<...>, vector<T>` and the matching
`vector.transfer_write` with a 0-d vector (what `convert-vector-to-scf` leaves for
broadcast reads) and produces `memref.load` + `vector.broadcast` /
`vector.extract` + `memref.store`. `convert-vector-to-llvm` only lowers transfers on
unit-stride memrefs, so a 0-d transfer from a strided view (a slice of a wider
buffer) would otherwise survive as an unrealized cast and fail LLVM translation.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir
from torch_mlir.dialects import memref, vector

from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import walk


def _is_0d_vector(t: ir.Type) -> bool:
    return isinstance(t, ir.VectorType) and t.rank == 0


@register_pass
@dataclasses.dataclass
class LowerScalarTransfers(ModulePass):
    """Rewrite 0-d vector.transfer_read/write on memrefs into memref.load/store."""

    NAME = "lowbit-lower-scalar-transfers"

    def run(self, module: ir.Operation) -> None:
        found = [op for op in walk(module) if op.name in ("vector.transfer_read", "vector.transfer_write")]
        for op in found:
            if op.name == "vector.transfer_read":
                self._read(op)
            else:
                self._write(op)

    @staticmethod
    def _read(op: ir.Operation) -> None:
        result = op.results[0]
        source = op.operands[0]
        if not _is_0d_vector(result.type) or not isinstance(source.type, ir.MemRefType):
            return
        rank = ir.MemRefType(source.type).rank
        indices = list(op.operands)[1:1 + rank]
        with ir.InsertionPoint(op), op.location:
            scalar = memref.LoadOp(source, indices).result
            value = vector.BroadcastOp(result.type, scalar).result
        result.replace_all_uses_with(value)
        op.erase()

    @staticmethod
    def _write(op: ir.Operation) -> None:
        value, dest = op.operands[0], op.operands[1]
        if not _is_0d_vector(value.type) or not isinstance(dest.type, ir.MemRefType):
            return
        rank = ir.MemRefType(dest.type).rank
        indices = list(op.operands)[2:2 + rank]
        with ir.InsertionPoint(op), op.location:
            scalar = vector.ExtractOp(value, [], []).result
            memref.StoreOp(scalar, dest, indices)
        op.erase()
