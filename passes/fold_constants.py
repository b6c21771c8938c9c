"""lowbit-fold-constants: evaluate the constant subgraph feeding a matmul's weight operand.

Matches every matmul-like op (see `lib_recognize.match_contraction`) whose weight operand
is not already an `arith.constant` but depends on constants only, through ops that
`lowbit.passes.interp` evaluates bit-exactly (linalg.generic bodies of arith/math ops,
`linalg.index`, transposes, broadcasts, fills, copies, tensor reshapes, concat, slices,
padding). Produces one `arith.constant dense<...> {lowbit.folded}` of the operand's type
in its place and erases the producers nothing else uses.

A subgraph with an op (or a case, e.g. a shift by >= the bit width) the interpreter does
not evaluate is left alone, with a `lowbit.report` entry (`kind = "fold"`) naming it.

The default pipeline does not run this pass: `lowbit-recognize-lowbit-weights` evaluates
the same subgraphs itself and rewrites only weights that fit a low-bit format, so a weight
that does not fit keeps its compact packed storage. Use it to inspect what a dequantization
subgraph computes (`lowbit-opt --pass-pipeline='builtin.module(lowbit-fold-constants)'`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from torch_mlir import ir

from lowbit.passes.interp import InterpError, Interpreter, defining_op, element_type, is_bf16
from lowbit.passes.lib_recognize import erase_dead, match_contraction
from lowbit.passes.qlinear import add_report_entry
from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import walk

FOLDED_ATTR = "lowbit.folded"


@register_pass
@dataclasses.dataclass
class FoldConstants(ModulePass):
    """Fold constant subgraphs that compute matmul weights into dense constants.

    Options: `max-elements` (largest intermediate tensor the interpreter may build).
    """

    NAME = "lowbit-fold-constants"

    max_elements: int = 1 << 26

    def run(self, module: ir.Operation) -> None:
        found = [c for c in map(match_contraction, walk(module)) if c is not None]
        for c in found:
            producer = defining_op(c.b)
            if producer is None or producer.name == "arith.constant":
                continue
            location = str(c.op.location)
            try:
                value = Interpreter(max_elements=self.max_elements).value(c.b)
            except InterpError as e:
                add_report_entry(module, kind="fold", pass_name=self.NAME, location=location,
                                 result="not folded", reason=str(e))
                continue
            t = c.b.type
            if is_bf16(t):
                add_report_entry(module, kind="fold", pass_name=self.NAME, location=location,
                                 result="not folded", reason="bf16 constants are not materialized")
                continue
            attr = ir.DenseElementsAttr.get(np.ascontiguousarray(value), type=element_type(t),
                                            shape=list(value.shape))
            with ir.InsertionPoint(c.op), c.op.location:
                const = ir.Operation.create("arith.constant", results=[t],
                                            attributes={"value": attr, FOLDED_ATTR: ir.UnitAttr.get()})
            c.op.operands[1] = const.results[0]
            erase_dead([producer])
            add_report_entry(module, kind="fold", pass_name=self.NAME, location=location, result="folded",
                             shape="x".join(str(d) for d in value.shape))
