"""`lowbit-fuse-parallel`: fuse producer/consumer chains of elementwise ops and reductions
into one `scf.forall` over their outer parallel dims, so they run on threads and each
thread's rows stay in cache from the first op of the chain to the last.

For softmax over rows (max -> sub/exp -> sum -> div) the result is one loop over row
blocks whose body computes the row max, the exponentials, their sum and the quotient for
just those rows; RMSNorm (mean of squares -> scale) and SiLU * up likewise.

A fusion group is grown from a root (the last op of a chain, visited in reverse program
order) by adding a producer P when
  * P is a codegen op (not a contraction: matmuls belong to the matmul passes),
  * every use of every result of P is already in the group (no recomputation, no op
    left outside needing P's full result), and
  * each tiled dim of the root reaches P through pure-dim indexing maps, identically
    from every user: the block of rows a task computes needs exactly that block of P
    (a producer a task would need in full, such as a vector broadcast along the tiled
    rows, is not fused).
The root is tiled with `transform.structured.tile_using_forall` over all its parallel
loops except the innermost, and the group is pulled in with `fuse_into_containing_op`.
Tile sizes give about `max-tasks` iterations of at least `min-task-elements` iterations
of work each; a root with less work than two tasks stays sequential. The `scf.forall`
becomes OpenMP in the lower-to-llvm stage (scf-forall-to-parallel, convert-scf-to-openmp).

Dynamic dims (a token count `?` of a shape-generic compile) are planned as if their extent
were `dynamic-extent` (default 128, a prefill-sized chunk): the tile size found for that
extent is kept as a fixed block of rows, so the forall has `ceil(T / block)` iterations at
run time (the last one a partial tile; `tile_using_forall` bounds it with `affine.min`).
A fixed block rather than `num_threads`-style sizes computed at run time: every task keeps
at least `min-task-elements` of work at any T, and a long prompt simply gets more tasks,
which the OpenMP static schedule hands out without per-task cost. A group whose static
part is too small to split even at `dynamic-extent` stays sequential.
"""
from __future__ import annotations

import dataclasses
import math

from torch_mlir import ir

from lowbit.passes.registry import ModulePass, PassError, register_pass
from lowbit.passes.vectorize_support import (
    clear_tags, func_ops, generalize_named_ops, index_list, is_codegen_op,
    loop_info, match, operand_dims, run_transform, tag, walk,
)

_VISITED = "lowbit.cg_visited"


@register_pass
@dataclasses.dataclass
class FuseParallel(ModulePass):
    """Tile elementwise/reduction chains with scf.forall over outer parallel dims and fuse.

    Options: `min-task-elements` (iteration-space points per task), `max-tasks` (forall
    iterations per group), `align` (1-D tiles are a multiple of this many elements),
    `dynamic-extent` (the extent a dynamic dim is planned for; its tile stays fixed).
    """

    NAME = "lowbit-fuse-parallel"
    min_task_elements: int = 16384
    max_tasks: int = 32
    align: int = 64
    dynamic_extent: int = 128

    def run(self, module: ir.Operation) -> None:
        if min(self.min_task_elements, self.max_tasks, self.align, self.dynamic_extent) < 1:
            raise PassError(f"{self.NAME}: options must be positive ({self.option_text()})")
        generalize_named_ops(module, self.NAME)
        counter = 0
        for func in func_ops(module):
            block = func.regions[0].blocks[0]
            while True:
                # Fresh handles every round: a transform erases the ops it fuses.
                ops = [op.operation for op in block.operations]
                cands = [op for op in ops if _VISITED not in op.attributes
                         and op.name in ("linalg.generic", "linalg.fill") and is_codegen_op(op)]
                if not cands:
                    break
                root = cands[-1]
                root.attributes[_VISITED] = ir.UnitAttr.get()
                plan = self.plan_root(root)
                if plan is None:
                    continue
                tiles, root_dims = plan
                group = self.grow(root, root_dims, block)
                order = {op: i for i, op in enumerate(ops)}
                producers = sorted(group, key=lambda o: -order[o])
                self._version_small_extents(root, producers)
                counter = self._apply(module, root, tiles, producers, counter)
        for op in walk(module):
            if _VISITED in op.attributes:
                del op.attributes[_VISITED]
        clear_tags(module)

    # -- planning -------------------------------------------------------------------------

    def plan_root(self, root: ir.Operation) -> tuple[list[int], list[int]] | None:
        """Tile sizes for the root's forall and the root loop dims it tiles (outer first)."""
        info = loop_info(root)
        if info is None or info.rank == 0:
            return None
        # A dynamic extent is planned at `dynamic-extent`; its tile size is then a fixed block.
        ranges = [self.dynamic_extent if r is None else r for r in info.ranges]
        if info.rank == 1:
            dims = [0] if info.iterators[0] == "parallel" else []
        else:
            dims = [d for d in range(info.rank - 1) if info.iterators[d] == "parallel"]
        if not dims:
            return None
        work = math.prod(ranges)
        tasks = min(self.max_tasks, work // self.min_task_elements, math.prod(ranges[d] for d in dims))
        if tasks < 2:
            return None
        tiles = [0] * info.rank
        remaining = tasks
        for d in dims:
            extent = ranges[d]
            if remaining <= 1:
                break
            if extent >= remaining:
                size = math.ceil(extent / remaining)
                if info.rank == 1:
                    size = math.ceil(size / self.align) * self.align
                tiles[d] = min(size, extent) if info.ranges[d] is not None else size
                remaining = 1
            else:
                tiles[d] = 1
                remaining = math.ceil(remaining / extent)
        tiled = [d for d in dims if tiles[d]]
        return tiles, tiled

    def grow(self, root: ir.Operation, root_dims: list[int], block: ir.Block) -> list[ir.Operation]:
        """Producers fused with `root`; `root_dims[k]` is the root loop of tiled dim k."""
        dims_of: dict[ir.Operation, list[int]] = {root: root_dims}
        worklist = [root]
        while worklist:
            consumer = worklist.pop()
            for operand in consumer.operands:
                producer = operand.owner
                if isinstance(producer, ir.Block):
                    continue
                producer = producer.operation
                if (producer in dims_of or _VISITED in producer.attributes or producer.parent != block.owner
                        or producer.name not in ("linalg.generic", "linalg.fill") or not is_codegen_op(producer)):
                    continue
                pdims = self._producer_dims(producer, dims_of)
                if pdims is not None:
                    dims_of[producer] = pdims
                    worklist.append(producer)
        return [op for op in dims_of if op != root]

    @staticmethod
    def _producer_dims(producer: ir.Operation, dims_of: dict[ir.Operation, list[int]]) -> list[int] | None:
        pinfo = loop_info(producer)
        if pinfo is None:
            return None
        found: list[int] | None = None
        for r_idx, result in enumerate(producer.results):
            out_dims = operand_dims(pinfo.output_map(r_idx))
            for use in result.uses:
                user = use.owner.operation
                if user not in dims_of:
                    return None  # a use outside the group would need the full result
                uinfo = loop_info(user)
                if uinfo is None:
                    return None
                in_dims = operand_dims(uinfo.maps[use.operand_number])
                mapped = []
                for u in dims_of[user]:
                    if u not in in_dims:
                        return None  # every task would need all of the producer
                    p = out_dims[in_dims.index(u)]
                    if p is None or pinfo.iterators[p] != "parallel":
                        return None
                    mapped.append(p)
                if found is None:
                    found = mapped
                elif found != mapped:
                    return None
        return found

    # -- rewriting ------------------------------------------------------------------------

    def _version_small_extents(self, root: ir.Operation, producers: list[ir.Operation]) -> None:
        """For a root with dynamic dims: run the group sequentially when the run-time work is
        under two tasks' worth (decode: T = 1), as a static compile of that size would.

        The group moves into the then-branch of `scf.if (prod(dynamic extents) >= threshold)`
        (tiled into the forall afterwards) and a copy of it into the else-branch (no forall,
        vectorized in place): an OpenMP region for a one-row softmax costs more than the row.
        """
        info = loop_info(root)
        dyn = [d for d, r in enumerate(info.ranges) if r is None]
        if not dyn or len(root.results) == 0:
            return
        static_work = math.prod(r for r in info.ranges if r is not None)
        threshold = -(-2 * self.min_task_elements // static_work)
        if threshold <= 1:
            return  # any extent >= 1 has two tasks' worth of work
        index = ir.IndexType.get()
        i1 = ir.IntegerType.get_signless(1)
        group = sorted(producers, key=lambda o: _position(o)) + [root]
        with ir.InsertionPoint(root), root.location:
            extents = [_extent_value(root, info, d, group) for d in dyn]
            if any(e is None for e in extents):
                return
            work = extents[0]
            for e in extents[1:]:
                work = ir.Operation.create("arith.muli", results=[index], operands=[work, e]).result
            thr = ir.Operation.create("arith.constant", results=[index],
                                      attributes={"value": ir.IntegerAttr.get(index, threshold)}).result
            cond = ir.Operation.create("arith.cmpi", results=[i1], operands=[work, thr],
                                       attributes={"predicate": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), 5)}).result
            branch = ir.Operation.create("scf.if", results=[r.type for r in root.results], operands=[cond], regions=2)
            then_block = branch.regions[0].blocks.append()
            else_block = branch.regions[1].blocks.append()
        for i, r in enumerate(root.results):
            r.replace_all_uses_with(branch.results[i])
        with ir.InsertionPoint(then_block), root.location:
            then_yield = ir.Operation.create("scf.yield", operands=list(root.results))
        for op in group:
            op.move_before(then_yield)
        mapping: dict = {}
        with ir.InsertionPoint(else_block):
            for op in group:
                clone = op.clone()
                for i, v in enumerate(clone.operands):
                    if v in mapping:
                        clone.operands[i] = mapping[v]
                for old, new in zip(op.results, clone.results):
                    mapping[old] = new
            with root.location:
                ir.Operation.create("scf.yield", operands=[mapping[r] for r in root.results])

    def _apply(self, module: ir.Operation, root: ir.Operation, tiles: list[int],
               producers: list[ir.Operation], counter: int) -> int:
        root_id = counter
        tag(root, root_id)
        lines = [f"    %root_op = {match(root_id)}",
                 f"    %tiled, %forall0 = transform.structured.tile_using_forall %root_op "
                 f"tile_sizes {index_list(tiles)} : (!transform.any_op) -> (!transform.any_op, !transform.any_op)"]
        for i, producer in enumerate(producers, start=1):
            tag(producer, root_id + i)
            lines.append(f"    %p{i} = {match(root_id + i)}")
            lines.append(f"    %f{i}, %forall{i} = transform.structured.fuse_into_containing_op %p{i} into "
                         f"%forall{i - 1} : (!transform.any_op, !transform.any_op) -> (!transform.any_op, !transform.any_op)")
        run_transform(module, "\n".join(lines), f"{self.NAME} on {root.name}")
        return root_id + len(producers) + 1


def _position(op: ir.Operation) -> int:
    """Index of `op` in its block (program order of a group's ops)."""
    for i, other in enumerate(op.block.operations):
        if other.operation == op:
            return i
    return -1


def _extent_value(op: ir.Operation, info, dim: int, group: list[ir.Operation]) -> ir.Value | None:
    """A `tensor.dim` giving the extent of loop `dim` of `op` (inserted at the insertion point)
    on a value defined outside `group` (whose ops move into a branch): a group op's result
    has the shape of its init operand (destination style), so results are traced to inits."""
    index = ir.IndexType.get()
    members = set(group)

    def outside(value: ir.Value) -> ir.Value | None:
        while True:
            owner = value.owner
            if isinstance(owner, ir.Block):
                return value
            owner = owner.operation
            if owner not in members:
                return value
            n_in = len(owner.operands) - len(owner.results)
            value = owner.operands[n_in + ir.OpResult(value).result_number]

    # info.maps covers the shaped operands: all of a generic's, only a fill's init.
    for operand, amap in zip(list(op.operands)[-len(info.maps):], info.maps):
        if not isinstance(operand.type, ir.RankedTensorType):
            continue
        dims = operand_dims(amap)
        if dim in dims:
            source = outside(operand)
            if source is None:
                continue
            pos = ir.Operation.create("arith.constant", results=[index],
                                      attributes={"value": ir.IntegerAttr.get(index, dims.index(dim))}).result
            return ir.Operation.create("tensor.dim", results=[index], operands=[source, pos]).result
    return None
