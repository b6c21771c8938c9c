"""lowbit-legalize-vector-memory: vector loads/stores of bool and 16-bit float data, in the
LLVM dialect, rewritten to the integer vectors that match their memory layout.

Matches `llvm.load` / `llvm.store` and `llvm.intr.masked.{load,store,gather,scatter}` whose
data is a vector of

* `i1`: produces the same access on `i8` lanes (`llvm.zext` before a store, `llvm.trunc`
  after a load). A memref of i1 holds one byte per element (as torch's bool tensors do),
  but LLVM packs `<N x i1>` in memory to N bits, so a plain vector load of a mask would
  read 8 elements' bytes as 64 bits of wrong data;
* `bf16` / `f16`: produces the same access on `i16` lanes between `llvm.bitcast`s.
  LLVM's x86 backend splits a masked store of `<64 x bfloat>` into scalar stores and then
  fails instruction selection ("Cannot select: store ... poison"), aborting the process;
  on `<64 x i16>` it is an AVX-512BW masked move.

Data is only moved, never computed on, so the rewrite is exact. Runs after
`convert-vector-to-llvm`.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir

from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import attribute_dict, walk

# Op -> (index of the data operand, or None when only the result is data; whether the
# result is data). Pass-through operands of masked loads/gathers are data too (index 2).
_ACCESSES = {
    "llvm.load": (None, True),                # (ptr) -> data
    "llvm.store": (0, False),                 # (data, ptr)
    "llvm.intr.masked.load": (2, True),       # (ptr, mask, pass_thru) -> data
    "llvm.intr.masked.gather": (2, True),     # (ptrs, mask, pass_thru) -> data
    "llvm.intr.masked.store": (0, False),     # (data, ptr, mask)
    "llvm.intr.masked.scatter": (0, False),   # (data, ptrs, mask)
}


def _memory_type(t: ir.Type) -> ir.Type | None:
    """The integer vector type `t` (a data vector) is moved as, or None to leave it."""
    if not isinstance(t, ir.VectorType):
        return None
    vt = ir.VectorType(t)
    element = vt.element_type
    if isinstance(element, (ir.BF16Type, ir.F16Type)):
        return ir.VectorType.get(vt.shape, ir.IntegerType.get_signless(16))
    if isinstance(element, ir.IntegerType) and ir.IntegerType(element).width == 1:
        return ir.VectorType.get(vt.shape, ir.IntegerType.get_signless(8))
    return None


def _convert(op_name: str, value: ir.Value, to: ir.Type) -> ir.Value:
    return ir.Operation.create(op_name, results=[to], operands=[value]).result


@register_pass
@dataclasses.dataclass
class LegalizeVectorMemory(ModulePass):
    """Move i1 vectors through memory as i8 and bf16/f16 vectors as i16."""

    NAME = "lowbit-legalize-vector-memory"

    def run(self, module: ir.Operation) -> None:
        for op in [op for op in walk(module) if op.name in _ACCESSES]:
            self._rewrite(op)

    @staticmethod
    def _rewrite(op: ir.Operation) -> None:
        data_index, returns_data = _ACCESSES[op.name]
        operands = list(op.operands)
        data_type = op.results[0].type if returns_data else operands[data_index].type
        memory_type = _memory_type(data_type)
        if memory_type is None:
            return
        is_bool = isinstance(ir.VectorType(data_type).element_type, ir.IntegerType)
        to_memory, from_memory = ("llvm.zext", "llvm.trunc") if is_bool else ("llvm.bitcast", "llvm.bitcast")
        with ir.InsertionPoint(op), op.location:
            if data_index is not None and data_index < len(operands):
                operands[data_index] = _convert(to_memory, operands[data_index], memory_type)
            new = ir.Operation.create(op.name, results=[memory_type] if returns_data else [],
                                      operands=operands, attributes=attribute_dict(op))
            if returns_data:
                op.results[0].replace_all_uses_with(_convert(from_memory, new.results[0], data_type))
        op.erase()
