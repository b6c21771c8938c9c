"""lowbit-parallel-copy: large buffer copies outside parallel loops run on all threads.

Matches, after bufferization, each `memref.copy %src, %dst` that is not nested in an
`scf.forall` / `scf.parallel` (whose threads are busy already), whose operands do not view
the same root buffer, that has a dimension to split (the outermost one whose static size is
not 1), and that can reach `min-bytes` (statically, or with a dynamic size). Bufferization
leaves such copies between the parallel loops of a compiled graph -- a concatenation's
operands copied into their halves (RoPE's `rotate_half`), a result copied into its
out-param -- and they ran on the calling thread while the others waited: 3-4 MiB per
decoder layer of a 128-token prefill, ~6% of its time. Produces a call of a private
function, one per (source type, target type):

    func.func private @lowbit_parallel_copy_N(%src, %dst) {
      scf.if (bytes >= min-bytes && n >= 2) {       // n: the split dimension's size
        scf.forall (%t) in (ceil(n / ceil(n / tasks))) {
          memref.copy (subview of %src rows of task t), (the same rows of %dst)
        }
      } else {
        memref.copy %src, %dst
      }
    }

(the condition folds away for static shapes). Copies run as before when their size is
below `min-bytes` at run time; an `scf.forall` becomes an OpenMP loop later in the pipeline.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir

from lowbit.passes.registry import ModulePass, PassError, register_pass
from lowbit.passes.vectorize_support import walk

PARALLEL_LOOPS = ("scf.forall", "scf.parallel", "omp.parallel", "omp.wsloop")
VIEW_OPS = ("memref.subview", "memref.expand_shape", "memref.collapse_shape", "memref.cast",
            "memref.reinterpret_cast", "memref.transpose")


def _in_parallel_loop(op: ir.Operation) -> bool:
    parent = op.parent
    while parent is not None and parent.name != "func.func":
        if parent.name in PARALLEL_LOOPS:
            return True
        parent = parent.parent
    return False


def _root(value: ir.Value) -> ir.Value:
    """The buffer a view is taken of (through subviews, reshapes and casts)."""
    while not isinstance(value, ir.BlockArgument):
        owner = value.owner.operation
        if owner.name not in VIEW_OPS:
            break
        value = owner.operands[0]
    return value


def _layout(t: ir.MemRefType, shape: list[int]) -> str:
    """`t` with `shape`, its strides and a dynamic offset: the type of a subview of it."""
    strides, _ = t.get_strides_and_offset()
    dims = ["?" if ir.ShapedType.is_dynamic_size(d) else str(d) for d in shape]
    dynamic = ir.ShapedType.get_dynamic_stride_or_offset()
    text = ", ".join("?" if s == dynamic else str(s) for s in strides)
    return f"memref<{'x'.join(dims + [str(t.element_type)])}, strided<[{text}], offset: ?>>"


def _elem_bytes(t: ir.MemRefType) -> int:
    elem = t.element_type
    width = 64 if isinstance(elem, ir.IndexType) else getattr(elem, "width", 64)
    return max(1, width // 8)


def _split_dim(shape: list[int]) -> int | None:
    for i, d in enumerate(shape):
        if ir.ShapedType.is_dynamic_size(d) or d > 1:
            return i
    return None


def _helper_text(name: str, src_t: ir.MemRefType, dst_t: ir.MemRefType, dim: int, tasks: int,
                 min_bytes: int) -> str:
    shape = list(src_t.shape)
    elem_bytes = _elem_bytes(src_t)
    rank = len(shape)
    lines = [f"func.func private @{name}(%src: {src_t}, %dst: {dst_t}) {{"]
    emit = lines.append
    for i in range(rank):
        emit(f"  %c{i} = arith.constant {i} : index")
    sizes = []
    for i, d in enumerate(shape):
        if ir.ShapedType.is_dynamic_size(d):
            emit(f"  %d{i} = memref.dim %src, %c{i} : {src_t}")
            sizes.append(f"%d{i}")
        else:
            emit(f"  %d{i} = arith.constant {d} : index")
            sizes.append(str(d))
    emit(f"  %bytes0 = arith.constant {elem_bytes} : index")
    for i in range(rank):
        emit(f"  %bytes{i + 1} = arith.muli %bytes{i}, %d{i} : index")
    emit(f"  %min = arith.constant {min_bytes} : index")
    emit("  %two = arith.constant 2 : index")
    emit(f"  %big = arith.cmpi uge, %bytes{rank}, %min : index")
    emit(f"  %split = arith.cmpi uge, %d{dim}, %two : index")
    emit("  %go = arith.andi %big, %split : i1")
    emit("  scf.if %go {")
    emit(f"    %tasks = arith.constant {tasks} : index")
    emit(f"    %chunk = arith.ceildivui %d{dim}, %tasks : index")
    emit(f"    %count = arith.ceildivui %d{dim}, %chunk : index")
    emit("    scf.forall (%t) in (%count) {")
    emit("      %o = arith.muli %t, %chunk : index")
    emit(f"      %left = arith.subi %d{dim}, %o : index")
    emit("      %len = arith.minui %left, %chunk : index")
    offsets = ", ".join("%o" if i == dim else "0" for i in range(rank))
    sub_sizes = ", ".join("%len" if i == dim else sizes[i] for i in range(rank))
    ones = ", ".join("1" for _ in range(rank))
    sub_shape = [ir.ShapedType.get_dynamic_size() if i == dim else d for i, d in enumerate(shape)]
    sub_src, sub_dst = _layout(src_t, sub_shape), _layout(dst_t, sub_shape)
    emit(f"      %s = memref.subview %src[{offsets}] [{sub_sizes}] [{ones}] : {src_t} to {sub_src}")
    emit(f"      %d = memref.subview %dst[{offsets}] [{sub_sizes}] [{ones}] : {dst_t} to {sub_dst}")
    emit(f"      memref.copy %s, %d : {sub_src} to {sub_dst}")
    emit("    }")
    emit("  } else {")
    emit(f"    memref.copy %src, %dst : {src_t} to {dst_t}")
    emit("  }")
    emit("  return")
    emit("}")
    return "\n".join(lines)


@register_pass
@dataclasses.dataclass
class ParallelCopy(ModulePass):
    """Split large memref.copy ops outside parallel loops into an scf.forall of row-block copies.

    Options: `min-bytes` (copies smaller than this stay serial; checked at run time for
    dynamic shapes) and `tasks` (row blocks per copy, spread over the threads).
    """

    NAME = "lowbit-parallel-copy"
    min_bytes: int = 256 << 10
    tasks: int = 16

    def run(self, module: ir.Operation) -> None:
        if self.min_bytes < 1 or self.tasks < 2:
            raise PassError(f"{self.NAME}: min-bytes must be >= 1 and tasks >= 2, "
                            f"got {self.min_bytes} and {self.tasks}")
        body = module.regions[0].blocks[0]
        taken = {ir.StringAttr(op.operation.attributes["sym_name"]).value
                 for op in body.operations if "sym_name" in op.operation.attributes}
        helpers: dict[tuple[str, str], str] = {}
        for op in [op for op in walk(module) if op.name == "memref.copy"]:
            src, dst = op.operands
            src_t, dst_t = ir.MemRefType(src.type), ir.MemRefType(dst.type)
            dim = _split_dim(list(src_t.shape))
            if dim is None or _in_parallel_loop(op) or _root(src) == _root(dst):
                continue
            if not src_t.has_static_shape or self._bytes(src_t) >= self.min_bytes:
                key = (str(src_t), str(dst_t))
                if key not in helpers:
                    name = self._fresh_name(taken)
                    helper = ir.Module.parse(_helper_text(name, src_t, dst_t, dim, self.tasks, self.min_bytes))
                    fn = helper.body.operations[0].operation
                    fn.detach_from_parent()
                    body.append(fn)
                    helpers[key] = name
                with ir.InsertionPoint(op), op.location:
                    ir.Operation.create("func.call", operands=[src, dst],
                                        attributes={"callee": ir.FlatSymbolRefAttr.get(helpers[key])})
                op.erase()

    @staticmethod
    def _bytes(t: ir.MemRefType) -> int:
        n = _elem_bytes(t)
        for d in t.shape:
            n *= d
        return n

    @staticmethod
    def _fresh_name(taken: set[str]) -> str:
        i = 0
        while f"lowbit_parallel_copy_{i}" in taken:
            i += 1
        taken.add(f"lowbit_parallel_copy_{i}")
        return f"lowbit_parallel_copy_{i}"
