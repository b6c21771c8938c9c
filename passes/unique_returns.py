"""lowbit-unique-returns: give every tensor a function returns its own buffer.

Matches `func.return` ops that return one tensor value more than once, or return a
function argument (after CSE, `(x + 1, x + 1)` is one value returned twice), and
produces a `bufferization.alloc_tensor() copy(%v)` for each repeat. Without it,
`buffer-results-to-out-params` sees one buffer for two results, which crashes it (a
segfault, not an error). Runs right before bufferization, after the last canonicalize
that could fold the copies away.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir
from torch_mlir.dialects import bufferization

from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import walk


@register_pass
@dataclasses.dataclass
class UniqueReturns(ModulePass):
    """Copy repeated (or argument) tensor results of public functions before bufferization."""

    NAME = "lowbit-unique-returns"

    def run(self, module: ir.Operation) -> None:
        for ret in [op for op in walk(module) if op.name == "func.return"]:
            args = set()
            block = ret.block
            for i in range(len(block.arguments)):
                args.add(block.arguments[i])
            seen = set()
            for i, value in enumerate(list(ret.operands)):
                if not isinstance(value.type, ir.RankedTensorType):
                    continue
                if value in seen or value in args:
                    with ir.InsertionPoint(ret), ret.location:
                        copy = bufferization.AllocTensorOp(value.type, [], copy=value).result
                    ret.operands[i] = copy
                else:
                    seen.add(value)
