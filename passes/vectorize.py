"""`lowbit-vectorize`: tile elementwise ops, reductions, copies and fills into vector-sized
tiles and vectorize them, so no scalar loop is left on a hot path.

Every structured op on tensors that is not a contraction or convolution (see
`vectorize_support.is_codegen_op`), at function level or inside an `scf.forall` made by
`lowbit-fuse-parallel`, is handled the same way:

1. named ops (`linalg.transpose`, `linalg.broadcast`, `linalg.reduce`, `linalg.add`, ...)
   are generalized; all-parallel ops whose operands all use identity maps on a static
   shape are flattened to one dimension (a `[128, 3]` add becomes one `[384]` loop);
2. every loop is tiled by 1 except the innermost, which is tiled by
   `unroll * vector-bits / element-bits` (64 x f32 on AVX-512); a trip count that does not
   divide is peeled, so the main loop has full static tiles and one remainder tile;
3. each tile is vectorized with `transform.structured.vectorize` at those vector sizes;
   the remainder tile and dynamic tiles get masked vectors (AVX-512 masked loads/stores),
   reductions become `vector.multi_reduction`;
4. unit vector dims are dropped and masked transfers lowered to masked loads/stores,
   which bufferize cleanly.

Reductions over the innermost dim reduce a whole vector tile per iteration (one
horizontal reduction per 64 elements; the LLVM lowering reassociates it into a tree).
Ops the vectorizer rejects stay as (tiled) scalar loops and are reported through
`logging.getLogger("lowbit.vectorize")` (an internal diagnostic, not a user warning).

Integer division and remainder (`arith.divsi/divui/remsi/remui/ceildiv*/floordivsi`) are
never vectorized: x86 has no SIMD integer division, so LLVM would scalarize them anyway,
and the padding lanes of a masked or peeled vector tile would divide by zero (SIGFPE; a
`torch.fmod` on int32 tensors killed the process this way). Such ops stay scalar loops.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

from torch_mlir import ir

from lowbit.passes.registry import ModulePass, PassError, register_pass
from lowbit.passes.vectorize_support import (
    TAG, clear_tags, fold_empty_iteration_ops, func_ops, generalize_named_ops, index_list, is_codegen_op,
    loop_info, match, run_transform, tag, walk,
)

log = logging.getLogger("lowbit.vectorize")

# Integer division/remainder: no SIMD form on x86, and a zero in a padding lane traps.
_INT_DIVISIONS = {
    "arith.divsi", "arith.divui", "arith.remsi", "arith.remui", "arith.ceildivsi",
    "arith.ceildivui", "arith.floordivsi",
}


def has_integer_division(op: ir.Operation) -> bool:
    """`op`'s body divides integers (kept scalar: see the module docstring)."""
    return any(inner.name in _INT_DIVISIONS for inner in walk(op))


@functools.lru_cache(maxsize=None)
def host_vector_bits() -> int:
    """Widest SIMD register of this CPU: 512 (AVX-512F), 256 (AVX2) or 128."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return 128
    if "avx512f" in flags:
        return 512
    if "avx2" in flags:
        return 256
    return 128


def _is_half_float(t: ir.Type) -> bool:
    return isinstance(t, ir.ShapedType) and isinstance(t.element_type, (ir.BF16Type, ir.F16Type))


def _element_bits(t: ir.Type) -> int:
    if isinstance(t, ir.ShapedType):
        t = t.element_type
    if isinstance(t, (ir.F16Type, ir.BF16Type)):
        return 16
    if isinstance(t, (ir.F64Type, ir.IndexType)):
        return 64
    if isinstance(t, ir.IntegerType):
        return max(8, t.width)
    return 32


@dataclasses.dataclass
class TilePlan:
    tile_sizes: list[int]       # 0: loop not tiled
    vector_sizes: list[int]
    peel: bool                  # peel the innermost tile loop
    flatten: bool
    split_reduction: bool = False  # innermost reduction accumulates in a vector


# Combiners `transform.structured.tile_reduction_using_for` can split (it needs the
# neutral element of the yielded op).
_SPLITTABLE_COMBINERS = {
    "arith.addf", "arith.mulf", "arith.maximumf", "arith.minimumf", "arith.maxnumf",
    "arith.minnumf", "arith.addi", "arith.muli", "arith.maxsi", "arith.minsi", "arith.maxui",
    "arith.minui", "arith.andi", "arith.ori", "arith.xori",
}


def _innermost_reduction_combiner(op: ir.Operation, info) -> bool:
    """A single-output generic whose only reduction loop is the innermost one and whose body
    combines the accumulator with one splittable op (`acc = combine(f(inputs), acc)`)."""
    if op.name != "linalg.generic" or len(op.results) != 1 or info.iterators[-1] != "reduction":
        return False
    if any(it != "parallel" for it in info.iterators[:-1]):
        return False
    block = op.regions[0].blocks[0]
    acc = block.arguments[len(block.arguments) - 1]
    ops = [o.operation for o in block.operations]
    yielded = ops[-1].operands[0]
    combiner = yielded.owner
    if isinstance(combiner, ir.Block) or combiner.name not in _SPLITTABLE_COMBINERS:
        return False
    uses = [u for o in ops for u in o.operands if u == acc]
    return len(uses) == 1 and any(v == acc for v in combiner.operands)


@register_pass
@dataclasses.dataclass
class Vectorize(ModulePass):
    """Tile non-contraction linalg ops to vector tiles (innermost dim) and vectorize them.

    Options: `vector-bits` (0: this CPU's widest SIMD register), `unroll` (vectors per
    innermost tile), `flatten` (collapse identity-map elementwise ops to 1-D first).
    """

    NAME = "lowbit-vectorize"
    vector_bits: int = 0
    unroll: int = 4
    flatten: bool = True

    def run(self, module: ir.Operation) -> None:
        if self.unroll < 1 or self.vector_bits < 0 or self.vector_bits % 64:
            raise PassError(f"{self.NAME}: bad options vector-bits={self.vector_bits} unroll={self.unroll}")
        generalize_named_ops(module, self.NAME)
        empty = fold_empty_iteration_ops(module)  # a 0-lane vector crashed MLIR
        if empty:
            log.debug("%s: %d op(s) with an empty iteration space folded to their inits", self.NAME, empty)
        # Plan and tag every op first: each transform below may erase or clone other ops,
        # so Python handles are not kept across transforms; tags find the ops again.
        plans: dict[int, tuple[str, TilePlan]] = {}
        for op in [op for f in func_ops(module) for op in walk(f) if is_codegen_op(op)]:
            plan = self.plan(op)
            if plan is not None:
                tag(op, len(plans))
                plans[len(plans)] = (op.name, plan)
        failures = []
        for i, (name, plan) in plans.items():
            try:
                for script in self._scripts(i, plan):
                    run_transform(module, script, f"{self.NAME} on {name}")
            except PassError as e:
                reason = " ".join(line.strip() for line in str(e).splitlines()[1:3])
                failures.append(f"{name} {plan.vector_sizes}: {reason}"[:300])
        run_transform(module, _CLEANUP, f"{self.NAME} cleanup")
        clear_tags(module)
        copy_strided_gather_bases(module)
        if failures:
            log.info("%s: %d op(s) left as scalar loops: %s", self.NAME, len(failures), "; ".join(failures))

    # -- planning -------------------------------------------------------------------------

    def lanes(self, op: ir.Operation) -> int:
        bits = self.vector_bits or host_vector_bits()
        widest = max([_element_bits(v.type) for v in list(op.operands) + list(op.results)
                      if isinstance(v.type, ir.ShapedType)] or [32])
        return max(1, bits // widest) * self.unroll

    def plan(self, op: ir.Operation) -> TilePlan | None:
        info = loop_info(op)
        if info is None or info.rank == 0 or has_integer_division(op):
            return None
        half = any(_is_half_float(v.type) for v in list(op.operands) + list(op.results))
        lanes = self.lanes(op)
        flatten = (self.flatten and op.name == "linalg.generic" and info.rank > 1
                   and all(it == "parallel" for it in info.iterators)
                   and all(len(m.results) == 0 or m == ir.AffineMap.get_identity(info.rank) for m in info.maps)
                   # Gathers (tensor.extract in the body) would recover their n-d indices
                   # from the flat one with a vector integer div/rem per dim.
                   and not any(inner.name == "tensor.extract" for inner in walk(op))
                   # A dynamic tile of a forall is a strided view that cannot be proven
                   # contiguous: collapsing it would copy the tile out and back.
                   and not (None in info.ranges and _inside(op, "scf.forall")))
        # A dynamic extent anywhere makes the flattened extent dynamic (peeled below).
        ranges = [None if None in info.ranges else _prod(info.ranges)] if flatten else list(info.ranges)
        tiles, vecs = [], []
        for r in ranges[:-1]:
            tiles.append(0 if r == 1 else 1)
            vecs.append(1)
        last = ranges[-1]
        if last is not None and last <= lanes:
            tiles.append(0)
            # LLVM's x86 backend cannot legalize odd-width 16-bit float vectors (v17bf16
            # aborts in "soft promote"); a masked power-of-two vector covers the same loop.
            vecs.append(_next_pow2(last) if half else last)
        else:
            tiles.append(lanes)
            vecs.append(lanes)
        peel = tiles[-1] != 0 and (last is None or last % lanes != 0)
        # A long innermost reduction keeps a vector of partial results across the loop
        # and reduces it horizontally once per row, not once per vector tile.
        split = not flatten and tiles[-1] != 0 and _innermost_reduction_combiner(op, info)
        return TilePlan(tiles, vecs, peel, flatten, split)

    # -- transform scripts ----------------------------------------------------------------

    @staticmethod
    def _split_reduction_scripts(i: int, plan: TilePlan) -> list[str]:
        """Tile the parallel loops by 1, split the innermost reduction into a loop that
        combines vector-wide partials (then one `vector.multi_reduction`), peel its tail,
        and keep the partials in registers (hoisted out of the tensor round trip).

        Two scripts: canonicalization may fold a one-trip main loop away, which a live
        loop handle would not survive, so the loop is found again by its tag."""
        lines = [f"    %op = {match(i)}"]
        outer = list(plan.tile_sizes[:-1]) + [0]
        n_loops = sum(1 for t in outer if t)
        target = "%op"
        if n_loops:
            loop_types = ", ".join(["!transform.any_op"] * n_loops)
            lines.append(f"    %tiled, %loops:{n_loops} = transform.structured.tile_using_for %op "
                         f"tile_sizes {index_list(outer)} : (!transform.any_op) -> (!transform.any_op, {loop_types})")
            target = "%tiled"
        lanes = plan.vector_sizes[-1]
        split_sizes = [0] * (len(plan.tile_sizes) - 1) + [lanes]
        vec_sizes = [1] * (len(plan.tile_sizes) - 1) + [lanes]
        lines += [
            f"    %fill, %split, %comb, %for = transform.structured.tile_reduction_using_for {target} "
            f"by tile_sizes = {index_list(split_sizes)} : (!transform.any_op) -> "
            "(!transform.any_op, !transform.any_op, !transform.any_op, !transform.any_op)",
            "    transform.structured.vectorize %fill : !transform.any_op",
            "    transform.structured.vectorize %comb : !transform.any_op",
            f"    transform.structured.vectorize %split vector_sizes {index_list(vec_sizes)} : !transform.any_op",
        ]
        loop = "%for"
        if plan.peel:
            lines += [
                '    %forc = transform.cast %for : !transform.any_op to !transform.op<"scf.for">',
                '    %main, %rest = transform.loop.peel %forc : (!transform.op<"scf.for">) '
                "-> (!transform.any_op, !transform.any_op)",
            ]
            loop = "%main"
        loop_tag = -1000 - i
        lines += [
            f"    %lt = transform.param.constant {loop_tag} : i64 -> !transform.param<i64>",
            f'    transform.annotate {loop} "{TAG}" = %lt : !transform.any_op, !transform.param<i64>',
        ]
        funcs = ('    %funcs = transform.structured.match ops{["func.func"]} in %root '
                 ': (!transform.any_op) -> !transform.any_op')
        second = [
            funcs,
            "    transform.apply_patterns to %funcs {",
            "      transform.apply_patterns.vector.lower_masked_transfers",
            "    } : !transform.any_op",
            "    transform.apply_patterns to %funcs {",
            "      transform.apply_patterns.canonicalization",
            "    } : !transform.any_op",
            f"    %loops = {match(loop_tag)}",
            "    transform.foreach %loops : !transform.any_op {",
            "    ^bb0(%l: !transform.any_op):",
            "      transform.loop.hoist_loop_invariant_subsets %l : !transform.any_op",
            "    }",
        ]
        return ["\n".join(lines), "\n".join(second)]

    @classmethod
    def _scripts(cls, i: int, plan: TilePlan) -> list[str]:
        if plan.split_reduction:
            return cls._split_reduction_scripts(i, plan)
        return [cls._script(i, plan)]

    @staticmethod
    def _script(i: int, plan: TilePlan) -> str:
        lines = [f"    %op = {match(i)}"]
        if plan.flatten:
            lines.append("    %flat = transform.structured.flatten_elementwise %op "
                         ": (!transform.any_op) -> !transform.any_op")
            lines.append(f"    %id = transform.param.constant {i} : i64 -> !transform.param<i64>")
            lines.append(f'    transform.annotate %flat "{TAG}" = %id : !transform.any_op, !transform.param<i64>')
            target = "%flat"
        else:
            target = "%op"
        n_loops = sum(1 for t in plan.tile_sizes if t)
        if n_loops:
            loop_types = ", ".join(["!transform.any_op"] * n_loops)
            lines.append(f"    %tiled, %loops:{n_loops} = transform.structured.tile_using_for {target} "
                         f"tile_sizes {index_list(plan.tile_sizes)} "
                         f": (!transform.any_op) -> (!transform.any_op, {loop_types})")
            if plan.peel:
                lines.append(f"    %inner = transform.cast %loops#{n_loops - 1} "
                             ": !transform.any_op to !transform.op<\"scf.for\">")
                lines.append("    %main, %rest = transform.loop.peel %inner "
                             ": (!transform.op<\"scf.for\">) -> (!transform.any_op, !transform.any_op)")
        lines += [
            '    %funcs = transform.structured.match ops{["func.func"]} in %root '
            ': (!transform.any_op) -> !transform.any_op',
            "    transform.apply_patterns to %funcs {",
            "      transform.apply_patterns.canonicalization",
            "    } : !transform.any_op",
            f"    %tiles = {match(i)}",
            "    transform.foreach %tiles : !transform.any_op {",
            "    ^bb0(%t: !transform.any_op):",
            f"      transform.structured.vectorize %t vector_sizes {index_list(plan.vector_sizes)} "
            "{vectorize_nd_extract} : !transform.any_op",
            "    }",
        ]
        return "\n".join(lines)


_CLEANUP = """    %funcs = transform.structured.match ops{["func.func"]} in %root : (!transform.any_op) -> !transform.any_op
    transform.apply_patterns to %funcs {
      transform.apply_patterns.vector.lower_masked_transfers
      transform.apply_patterns.vector.cast_away_vector_leading_one_dim
      transform.apply_patterns.vector.drop_unit_dims_with_shape_cast
      transform.apply_patterns.canonicalization
    } : !transform.any_op
    transform.apply_cse to %funcs : !transform.any_op"""


def copy_strided_gather_bases(module: ir.Operation) -> int:
    """Give every `vector.gather` of rank >= 2 a base that bufferizes contiguously.

    The vectorizer turns `tensor.extract` into a gather whose lane offsets linearize the
    n-d indices over the base's *shape* (row-major), but bufferization lowers the gather on
    the base's buffer, whose rows may be further apart: `z[:, :40][idx]` read row 1 at
    offset 40 instead of 48 (a wrong answer). A base that may be a strided view is copied
    once, right after it is made (`bufferization.alloc_tensor() copy(...)`: contiguous).
    Returns how many copies were made."""
    copies: dict[ir.Value, ir.Value] = {}  # values hash by the IR value, not the wrapper
    for f in func_ops(module):
        for op in [o for o in walk(f) if o.name == "vector.gather"]:
            base = op.operands[0]
            if not isinstance(base.type, ir.RankedTensorType) or base.type.rank < 2 or _contiguous(base):
                continue
            copy = copies.get(base)
            if copy is None:
                with ir.InsertionPoint(_ancestor_in_block_of(op, base)), op.location:
                    copy = ir.Operation.create(
                        "bufferization.alloc_tensor", results=[base.type], operands=[base],
                        attributes={"operandSegmentSizes": ir.DenseI32ArrayAttr.get([0, 1, 0])}).result
                copies[base] = copy
            op.operands[0] = copy
    return len(copies)


def _contiguous(value: ir.Value) -> bool:
    """Whether `value` certainly bufferizes to an identity-layout buffer: function arguments
    (identity layout at function boundaries) and results of ops that allocate; an
    `extract_slice` only if it keeps whole rows (offsets and sizes full in every dim but
    the first, unit strides)."""
    owner = value.owner
    if isinstance(owner, ir.Block):
        return owner.owner.operation.name == "func.func"
    op = owner.operation if hasattr(owner, "operation") else owner
    if op.name == "tensor.extract_slice":
        src = op.operands[0].type
        res = value.type
        sizes = list(ir.DenseI64ArrayAttr(op.attributes["static_sizes"]))
        offsets = list(ir.DenseI64ArrayAttr(op.attributes["static_offsets"]))
        strides = list(ir.DenseI64ArrayAttr(op.attributes["static_strides"]))
        if res.rank != src.rank or any(s != 1 for s in strides) or any(o != 0 for o in offsets[1:]):
            return False
        if any(ir.ShapedType.is_dynamic_size(d) for d in src.shape[1:]):
            return False
        return sizes[1:] == list(src.shape[1:]) and _contiguous(op.operands[0])
    if op.name in ("tensor.expand_shape", "tensor.collapse_shape", "tensor.cast"):
        return _contiguous(op.operands[0])
    return op.name in ("tensor.empty", "bufferization.alloc_tensor", "linalg.generic", "linalg.fill",
                       "arith.constant", "tensor.splat", "tensor.pad", "tensor.concat")


def _ancestor_in_block_of(op: ir.Operation, value: ir.Value) -> ir.Operation:
    """The ancestor of `op` (or `op`) that sits in the block defining `value`: a copy
    placed before it is computed once, outside any loop `op` is in."""
    owner = value.owner
    block = owner if isinstance(owner, ir.Block) else owner.operation.block
    cur = op.operation
    while cur.block != block:
        cur = cur.parent.operation
    return cur


def _inside(op: ir.Operation, name: str) -> bool:
    parent = op.parent
    while parent is not None and parent.operation.name != "func.func":
        if parent.operation.name == name:
            return True
        parent = parent.parent
    return False


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out
