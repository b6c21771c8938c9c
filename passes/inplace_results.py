"""lowbit-inplace-results: an updated input's copy to its out-param only when they differ.

Matches, after `buffer-results-to-out-params`, public functions carrying
`lowbit.num_inputs = N` (their first N arguments are inputs, the rest out-params) whose entry
block ends with copies

    memref.copy %arg_i, %arg_j      // i < N <= j: result j - N is input i's final value
    ...
    return

Such a copy exists when bufferization wrote a result in place into a writable input (a KV
cache updated by `lowbit-convert-index-put`'s row loop) and the function returns it. Produces

    %pi = memref.extract_aligned_pointer_as_index %arg_i
    %pj = memref.extract_aligned_pointer_as_index %arg_j
    scf.if (%pi != %pj) { memref.copy %arg_i, %arg_j }

and the module attribute `lowbit.inplace_results = [[i, j - N], ...]`. A caller that passes
the input's own buffer as that out-param (the JIT does: `lowbit.compiler.jit`) skips a copy
of the whole cache per call; any other caller still gets the value copied, so the code is
correct under both conventions.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir
from torch_mlir.dialects import arith, memref, scf

from lowbit.passes.registry import ModulePass, register_pass

NUM_INPUTS_ATTR = "lowbit.num_inputs"
RESULTS_ATTR = "lowbit.inplace_results"


def _arg_index(value: ir.Value, block: ir.Block) -> int | None:
    if isinstance(value, ir.BlockArgument) and value.owner == block:
        return value.arg_number
    return None


def _trailing_copies(block: ir.Block) -> list[ir.Operation]:
    ops = [op.operation for op in block.operations]
    copies = []
    for op in reversed(ops[:-1]):
        if op.name != "memref.copy":
            break
        copies.append(op)
    return copies[::-1]


@register_pass
@dataclasses.dataclass
class InplaceResults(ModulePass):
    """Guard the copies of updated inputs to their out-params by a pointer comparison."""

    NAME = "lowbit-inplace-results"

    def run(self, module: ir.Operation) -> None:
        pairs = []
        for op in module.regions[0].blocks[0].operations:
            func = op.operation
            if func.name != "func.func" or NUM_INPUTS_ATTR not in func.attributes:
                continue
            if "sym_visibility" in func.attributes and ir.StringAttr(func.attributes["sym_visibility"]).value != "public":
                continue
            n_inputs = ir.IntegerAttr(func.attributes[NUM_INPUTS_ATTR]).value
            block = func.regions[0].blocks[0]
            for copy in _trailing_copies(block):
                src, dst = (_arg_index(v, block) for v in copy.operands)
                if src is None or dst is None or not (src < n_inputs <= dst):
                    continue
                with ir.InsertionPoint(copy), copy.location:
                    p_src = memref.ExtractAlignedPointerAsIndexOp(copy.operands[0]).result
                    p_dst = memref.ExtractAlignedPointerAsIndexOp(copy.operands[1]).result
                    differ = arith.CmpIOp(arith.CmpIPredicate.ne, p_src, p_dst).result
                    guard = scf.IfOp(differ)
                    with ir.InsertionPoint(guard.then_block):
                        memref.CopyOp(copy.operands[0], copy.operands[1])
                        scf.YieldOp([])
                copy.erase()
                pairs.append((src, dst - n_inputs))
        if pairs:
            i64 = ir.IntegerType.get_signless(64)
            module.attributes[RESULTS_ATTR] = ir.ArrayAttr.get(
                [ir.ArrayAttr.get([ir.IntegerAttr.get(i64, a), ir.IntegerAttr.get(i64, b)]) for a, b in pairs])
