"""Shared pieces of lowbit's codegen passes (fuse-parallel, vectorize, math).

* which linalg ops the codegen passes own (everything structured that is not a
  contraction or convolution: those belong to the matmul passes and microkernels);
* the loop structure of a linalg op (iterator types, indexing maps, static ranges);
* running a transform-dialect script on one module from Python, with payload ops picked
  by a temporary attribute (`lowbit.cg`) so a script can address exactly one op.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from torch_mlir import ir
from torch_mlir.dialects import linalg

from lowbit.passes.transform_script import run_transform

TAG = "lowbit.cg"

# Structured ops that the codegen passes never touch: contractions and convolutions go to
# the matmul passes; the rest are not tileable payload ops (or are lowered elsewhere).
_SKIP_NAMES = {
    "linalg.matmul", "linalg.batch_matmul", "linalg.matvec", "linalg.vecmat",
    "linalg.batch_matvec", "linalg.batch_vecmat", "linalg.dot", "linalg.contract",
    "linalg.batch_reduce_matmul", "linalg.mmt4d", "linalg.batch_mmt4d",
    "linalg.quantized_matmul", "linalg.quantized_batch_matmul",
    "linalg.pack", "linalg.unpack", "linalg.softmax", "linalg.yield", "linalg.index",
    "linalg.winograd_filter_transform", "linalg.winograd_input_transform",
    "linalg.winograd_output_transform",
}

# Ops inside these have already been tiled by some pass; the codegen passes leave them.
_TILED_PARENTS = {"scf.for", "scf.while", "scf.parallel", "affine.for"}


def is_codegen_op(op: ir.Operation) -> bool:
    """A linalg op on tensors that lowbit's elementwise/reduction codegen should handle."""
    name = op.name
    if not name.startswith("linalg.") or name in _SKIP_NAMES:
        return False
    if name.startswith(("linalg.conv", "linalg.depthwise", "linalg.pooling")) or "matmul" in name:
        return False
    if not op.results or not all(isinstance(r.type, ir.RankedTensorType) for r in op.results):
        return False
    if any(isinstance(o.type, ir.MemRefType) for o in op.operands):
        return False
    try:
        if linalg.isa_contraction_op(op) or linalg.isa_convolution_op(op):
            return False
    except (TypeError, ValueError):
        return False
    parent = op.parent
    while parent is not None and parent.operation.name != "func.func":
        if parent.operation.name in _TILED_PARENTS:
            return False
        parent = parent.parent
    return True


def func_ops(module: ir.Operation) -> Iterator[ir.Operation]:
    for op in module.regions[0].blocks[0].operations:
        op = op.operation  # OpView.name may be a symbol name; Operation.name is the op name
        if op.name == "func.func" and len(op.regions[0].blocks) > 0:
            yield op


def walk(op: ir.Operation) -> list[ir.Operation]:
    """Every op nested in `op` (not `op` itself), in pre-order. A snapshot collected by
    MLIR's own walker (a Python recursion was ~10x slower on lowered modules), so callers
    may erase or rewrite ops while iterating over it."""
    found = []

    def visit(inner):
        found.append(inner)
        return ir.WalkResult.ADVANCE

    op.walk(visit, walk_order=ir.WalkOrder.PRE_ORDER)
    return found[1:]


def attribute_dict(op: ir.Operation) -> dict[str, ir.Attribute]:
    """`op`'s attributes by name, to recreate it with other operand or result types."""
    names = [a if isinstance(a, str) else a.name for a in op.attributes]
    return {name: op.attributes[name] for name in names}


@dataclasses.dataclass
class LoopInfo:
    """The iteration space of a generic (or fill) op."""

    iterators: list[str]                 # "parallel" / "reduction" per loop
    maps: list[ir.AffineMap]             # one per operand (inputs then outputs)
    ranges: list[int | None]             # static trip count per loop, None if dynamic
    num_inputs: int

    @property
    def rank(self) -> int:
        return len(self.iterators)

    def output_map(self, i: int = 0) -> ir.AffineMap:
        return self.maps[self.num_inputs + i]


def _dim_position(expr: ir.AffineExpr) -> int | None:
    if isinstance(expr, ir.AffineDimExpr):
        return expr.position
    return None


def loop_info(op: ir.Operation) -> LoopInfo | None:
    """Loop structure of a `linalg.generic` or `linalg.fill`; None for other ops."""
    if op.name == "linalg.fill":
        out_type = ir.RankedTensorType(op.results[0].type)
        rank = out_type.rank
        ranges = [None if ir.ShapedType.is_dynamic_size(s) else s for s in out_type.shape]
        return LoopInfo(["parallel"] * rank, [ir.AffineMap.get_identity(rank)], ranges, 0)
    if op.name != "linalg.generic":
        return None
    view = op.opview
    maps = [ir.AffineMapAttr(a).value for a in op.attributes["indexing_maps"]]
    iterators = ["reduction" if "reduction" in str(a) else "parallel"
                 for a in op.attributes["iterator_types"]]
    ranges: list[int | None] = [None] * len(iterators)
    for operand, amap in zip(list(view.inputs) + list(view.outputs), maps):
        if not isinstance(operand.type, ir.RankedTensorType):
            continue
        shape = ir.RankedTensorType(operand.type).shape
        for pos, expr in enumerate(amap.results):
            d = _dim_position(expr)
            if d is not None and ranges[d] is None and not ir.ShapedType.is_dynamic_size(shape[pos]):
                ranges[d] = shape[pos]
    return LoopInfo(iterators, maps, ranges, len(view.inputs))


def operand_dims(amap: ir.AffineMap) -> list[int | None]:
    """Per result of `amap`: the loop dim it reads, or None for a constant/compound expr."""
    return [_dim_position(e) for e in amap.results]


def tag(op: ir.Operation, value: int) -> None:
    op.attributes[TAG] = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), value)


def clear_tags(module: ir.Operation) -> None:
    for op in walk(module):
        if TAG in op.attributes:
            del op.attributes[TAG]


def match(value: int, name: str = "%root") -> str:
    """Transform IR matching the payload ops tagged `value` (may be several after cloning)."""
    return (f'transform.structured.match attributes{{{TAG} = {value} : i64}} in {name} '
            f': (!transform.any_op) -> !transform.any_op')


def index_list(values: list[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def generalize_named_ops(module: ir.Operation, what: str) -> None:
    """Rewrite named codegen ops (transpose, broadcast, reduce, add, ...) as linalg.generic."""
    named = [op for f in func_ops(module) for op in walk(f)
             if is_codegen_op(op) and op.name not in ("linalg.generic", "linalg.fill")]
    if not named:
        return
    for op in named:
        tag(op, -1)
    run_transform(module, f"    %n = {match(-1)}\n"
                          f"    %g = transform.structured.generalize %n : (!transform.any_op) -> !transform.any_op",
                  f"{what}: generalize")
    clear_tags(module)


def fold_empty_iteration_ops(module: ir.Operation) -> int:
    """Replace codegen ops with a static zero-trip loop by their `outs` operands.

    An op whose iteration space is empty (`x.sum(-1)` of a `[5, 0]` tensor: the reduction
    loop runs 0 times) writes nothing, so each result is its init tensor unchanged (the
    fill before a reduction: zeros for a sum, eager's result). Tiling and vectorizing such
    an op would ask for a 0-lane vector, which crashed MLIR (SIGSEGV). Returns how many ops
    were folded."""
    empty = []
    for f in func_ops(module):
        for op in walk(f):  # collected first: erasing an op frees the ops of its body
            if not is_codegen_op(op):
                continue
            info = loop_info(op)
            if info is None or 0 not in info.ranges:
                continue
            outs = list(op.opview.outputs)
            if len(outs) == len(op.results) and all(o.type == r.type for o, r in zip(outs, op.results)):
                empty.append(op)
    for op in empty:
        # read now: an init may be the result of an op folded just before (a fill)
        for result, init in zip(op.results, list(op.opview.outputs)):
            result.replace_all_uses_with(init)
        op.erase()
    return len(empty)
