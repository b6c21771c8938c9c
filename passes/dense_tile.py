"""`lowbit-dense-tile`: send dense fp32/bf16 matmuls on tensors to BRGEMM tiles.

Matches (see `dense_support.match_matmul`) `linalg.matmul`, `linalg.batch_matmul` and
matmul-like `linalg.generic` (C[m, n] += A[m, k] * B[k, n] or * B^T[n, k]) with static
shapes, A and B both f32 or both bf16, and an f32 accumulator (torch-mlir's form of
aten.mm / addmm / bmm / linear; bf16 results are truncated by a separate op). An f32
matmul of two elementwise `extf`s of bf16 tensors (torch-mlir's bf16 addmm) is treated
as the bf16 matmul of the sources, which is the same computation.

Produces, for a matmul whose B is a compile-time constant (directly, or through the
`linalg.transpose` torch-mlir puts on a Linear weight, or as B^T of a generic) with
N a multiple of the panel width (32) and, for bf16, K even:

  * B packed now by the runtime's `lowbit_brgemm_pack_b` into a constant
    `tensor<N/32 x K x 32 x f32>` (bf16: `tensor<N/32 x K/2 x 32 x 2 x bf16>`, VNNI pairs),
  * the matmul rewritten as the equivalent blocked `linalg.contract` over that constant
    (C viewed as [M, N/32, 32]; bf16 A viewed as [M, K/2, 2]) tagged `lowbit.brgemm = "packed"`
    (a named op, so unit-dim folding and generalization of codegen ops leave it alone),

and for any other matmul with a row-major B the op itself tagged `lowbit.brgemm = "rowmajor"`.
Each tagged op is then tiled with `scf.forall` over (batch,) M and N blocks; the tiles are
ordinary linalg on tensor slices, so the IR stays exact and the untouched remainder of the
pipeline can lower it as is. After bufferization `lowbit-dense-brgemm-calls` turns each
tile into a runtime BRGEMM invoke.

Tile sizes (options are upper bounds; 0 = derive from the cache sizes): the N tile keeps
the B block (K x tile-n) in half of L2; the M tile keeps the A block (tile-m x K) in a
thread's half share of L3, so a weight panel is streamed from memory once; both are
divisors of M / N (N tiles are multiples of 32 when packed) and are shrunk until there
are at least `min-tasks-per-thread` x threads tiles (but not below `min-task-flops` of
work per tile). The chosen sizes are in the IR as
the forall bounds and as `lowbit.brgemm_tile = array<i64: tile-m, tile-n>`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import linalg

from lowbit.passes import dense_support as ds
from lowbit.passes.lib_recognize import is_zero_init
from lowbit.passes.registry import ModulePass, PassError, register_pass

NB = 32  # LOWBIT_BRGEMM_NB


@dataclasses.dataclass
class _Plan:
    mm: ds.Matmul
    packed: np.ndarray | None  # packed B (f32, or uint16 bf16 bits), blocked shape
    tile_m: int
    tile_n: int


@register_pass
@dataclasses.dataclass
class DenseTile(ModulePass):
    """Pack constant B operands of fp32/bf16 matmuls and tile them into BRGEMM tiles (scf.forall).

    Options: `tile-m`, `tile-n` (upper bounds, 0 = from cache sizes), `threads` (0 = CPUs
    available), `min-tasks-per-thread` (tiles per thread to aim for), `min-task-flops`
    (tiles are not split below this much work), `pack` (pre-pack constant B operands;
    off = row-major tiles only).
    """

    NAME = "lowbit-dense-tile"
    tile_m: int = 0
    tile_n: int = 0
    threads: int = 0
    min_tasks_per_thread: int = 2
    min_task_flops: int = 1 << 21
    pack: bool = True

    def run(self, module: ir.Operation) -> None:
        if min(self.tile_m, self.tile_n, self.threads, self.min_task_flops) < 0 or self.min_tasks_per_thread < 1:
            raise PassError(f"{self.NAME}: options must be non-negative ({self.option_text()})")
        plans = []
        for f in ds.func_ops(module):
            for op in ds.walk(f):
                if ds.BRGEMM_ATTR in op.attributes or ds.inside(op, {"scf.forall", "scf.for", "scf.parallel"}):
                    continue
                mm = ds.match_matmul(op)
                if mm is not None:
                    plan = self._plan(mm)
                    if plan is not None:
                        plans.append(plan)
        if not plans:
            return
        script = []
        for i, plan in enumerate(plans):
            tiled = self._rewrite(plan)
            tiled.attributes[ds.TILE_TAG] = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), i)
            sizes = self._tile_sizes(plan)
            script.append(
                f"    %t{i} = {ds.match_tag(i)}\n"
                f"    %tiled{i}, %forall{i} = transform.structured.tile_using_forall %t{i} "
                f"tile_sizes [{', '.join(map(str, sizes))}] "
                f": (!transform.any_op) -> (!transform.any_op, !transform.any_op)")
        ds.run_transform(module, "\n".join(script), self.NAME)
        for f in ds.func_ops(module):
            for op in ds.walk(f):
                if ds.TILE_TAG in op.attributes:
                    del op.attributes[ds.TILE_TAG]

    # -- planning -------------------------------------------------------------------------

    def _plan(self, mm: ds.Matmul) -> _Plan | None:
        packed = None
        if self.pack and mm.batch is None and mm.n % NB == 0 and (mm.dtype == "f32" or mm.k % 2 == 0):
            const = ds.constant_of(mm.b)
            if const is not None:
                array, through_transpose = const
                # B^T either from a transpose op or from a generic's (n, k) map.
                packed = _pack(array, mm.dtype, transposed=through_transpose != mm.b_transposed,
                               k=mm.k, n=mm.n)
        if packed is None and mm.b_transposed:
            return None  # a non-constant B^T: left for other passes
        if packed is None and mm.op.name == "linalg.generic":
            return None  # only named row-major ops are tiled without packing
        elt = 4 if mm.dtype == "f32" else 2
        threads = self.threads or ds.cpu_threads()
        l2 = ds.cache_bytes(2, 1 << 20)
        l3 = ds.cache_bytes(3, 8 << 20)
        n_unit = NB if packed is not None else 1
        tn_limit = self.tile_n or max(NB, min(1024, (l2 // 2) // (mm.k * elt)))
        tm_limit = self.tile_m or max(1, min(512, (l3 // (2 * threads)) // (mm.k * elt)))
        tn_opts = [d for d in ds.divisors(mm.n) if d % n_unit == 0 and d <= max(tn_limit, n_unit)]
        if not tn_opts:
            tn_opts = [n_unit if packed is not None else mm.n]
        tm_opts = [d for d in ds.divisors(mm.m) if d <= tm_limit] or [1]
        # Row-major N tiles are whole vectors (16 lanes) or all of N.
        if packed is None:
            tn_opts = sorted({d for d in tn_opts if d % 16 == 0} | {mm.n})
        tm, tn = tm_opts[-1], tn_opts[-1]
        want = threads * self.min_tasks_per_thread
        batch = mm.batch or 1

        def big_enough(m_: int, n_: int) -> bool:
            return 2 * m_ * n_ * mm.k >= self.min_task_flops

        while batch * (mm.m // tm) * (mm.n // tn) < want:
            smaller_n = [d for d in tn_opts if d < tn and big_enough(tm, d)]
            smaller_m = [d for d in tm_opts if d < tm and big_enough(d, tn)]
            if smaller_n and (tn >= 2 * NB or not smaller_m):
                tn = smaller_n[-1]
            elif smaller_m:
                tm = smaller_m[-1]
            else:
                break
        return _Plan(mm, packed, tm, tn)

    @staticmethod
    def _tile_sizes(plan: _Plan) -> list[int]:
        mm = plan.mm
        if plan.packed is not None:
            return [plan.tile_m, plan.tile_n // NB, 0, 0] + ([0] if mm.dtype == "bf16" else [])
        if mm.batch is not None:
            return [1, plan.tile_m, plan.tile_n, 0]
        return [plan.tile_m, plan.tile_n, 0]

    # -- rewriting ------------------------------------------------------------------------

    def _rewrite(self, plan: _Plan) -> ir.Operation:
        mm = plan.mm
        tile_attr = ir.DenseI64ArrayAttr.get([plan.tile_m, plan.tile_n])
        if plan.packed is None:
            op = mm.op
            if mm.a != op.operands[0] or mm.b != op.operands[1]:
                # Operands were looked through (bf16 -> f32 extf): rebuild the named op
                # on the bf16 sources; its region extends them to f32.
                build = linalg.batch_matmul if op.name == "linalg.batch_matmul" else linalg.matmul
                with ir.InsertionPoint(op), op.location:
                    new = build(mm.a, mm.b, outs=[mm.c]).owner
                op.results[0].replace_all_uses_with(new.results[0])
                op.erase()
                op = new
            op.attributes[ds.BRGEMM_ATTR] = ir.StringAttr.get("rowmajor")
            op.attributes["lowbit.brgemm_tile"] = tile_attr
            return op
        with ir.InsertionPoint(mm.op), mm.op.location:
            op = _packed_contract(mm, plan.packed)
            op.attributes["lowbit.brgemm_tile"] = tile_attr
        return op


BETA0_ATTR = "lowbit.brgemm_beta0"  # the tile writes C; its init is not read


def _pack(array: np.ndarray, dtype: str, transposed: bool, k: int, n: int) -> np.ndarray:
    """Pack B with the runtime (one source of truth for the layout) into its blocked shape."""
    import torch

    from lowbit.runtime import brgemm as bg

    if dtype == "f32":
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    else:
        t = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    packed = bg.pack_b(t, transposed=transposed)
    if dtype == "f32":
        return packed.numpy().reshape(n // NB, k, NB)
    return packed.view(torch.int16).numpy().view(np.uint16).reshape(n // NB, k // 2, NB, 2)


def _packed_contract(mm: ds.Matmul, packed: np.ndarray) -> ir.Operation:
    """Replace `mm.op` by the blocked contraction over the packed constant; returns it."""
    f32 = ir.F32Type.get()
    in_elem = f32 if mm.dtype == "f32" else ir.BF16Type.get()
    m, k, np_ = mm.m, mm.k, mm.n // NB
    if mm.dtype == "f32":
        attr = ir.DenseElementsAttr.get(packed, type=f32, shape=list(packed.shape))
    else:
        attr = ir.DenseElementsAttr.get(packed.view(np.int16), type=in_elem, shape=list(packed.shape))
    p_type = ir.RankedTensorType.get(list(packed.shape), in_elem)
    p = ir.Operation.create("arith.constant", results=[p_type], attributes={"value": attr}).result

    def expand(value, shape, reassoc):
        return ir.Operation.create(
            "tensor.expand_shape", results=[ir.RankedTensorType.get(shape, ir.ShapedType(value.type).element_type)],
            operands=[value], attributes={
                "reassociation": ir.Attribute.parse(reassoc),
                "static_output_shape": ir.DenseI64ArrayAttr.get(shape)}).result

    # tpp-mlir's beta = 0 folding, on tensors: a zero-filled init is not read (the kernel
    # writes C), and a bf16 rounding that only rounds this product is done by the kernel
    # as it stores (C in bf16, accumulated in f32). Both save a pass over C.
    c_init = mm.c
    zero_init = _zero_fill_init(mm.c)
    round_op = None
    if zero_init is not None:
        c_init = zero_init
        if mm.dtype == "bf16":
            round_op = _only_bf16_rounding(mm.op.results[0])
            if round_op is not None:
                c_init = ir.Operation.create(
                    "tensor.empty", results=[round_op.results[0].type], operands=[]).result
    c3 = expand(c_init, [m, np_, NB], "[[0], [1, 2]]")
    if mm.dtype == "f32":
        a_in = mm.a
        maps = ["(d0, d1, d2, d3) -> (d0, d3)", "(d0, d1, d2, d3) -> (d1, d3, d2)",
                "(d0, d1, d2, d3) -> (d0, d1, d2)"]
    else:
        a_in = expand(mm.a, [m, k // 2, 2], "[[0], [1, 2]]")
        maps = ["(d0, d1, d2, d3, d4) -> (d0, d3, d4)", "(d0, d1, d2, d3, d4) -> (d1, d3, d2, d4)",
                "(d0, d1, d2, d3, d4) -> (d0, d1, d2)"]
    # A named op (not a generic): upstream unit-dim folding and generalization leave it
    # and its tags alone; bf16 operands are extended to f32 by contract's cast semantics.
    contract = linalg.contract(a_in, p, outs=[c3],
                               indexing_maps=[ds._map(x) for x in maps])
    op = contract.owner
    op.attributes[ds.BRGEMM_ATTR] = ir.StringAttr.get("packed")
    if zero_init is not None:
        op.attributes[BETA0_ATTR] = ir.UnitAttr.get()
    result = ir.Operation.create(
        "tensor.collapse_shape", results=[c_init.type], operands=[op.result],
        attributes={"reassociation": ir.Attribute.parse("[[0], [1, 2]]")}).result
    if round_op is not None:
        round_op.results[0].replace_all_uses_with(result)
        round_op.erase()
    else:
        mm.op.results[0].replace_all_uses_with(result)
    mm.op.erase()
    return op


def _zero_fill_init(c: ir.Value) -> ir.Value | None:
    """The tensor a `linalg.fill` of +0.0 writes into, when `c` is that fill's result."""
    owner = c.owner
    if isinstance(owner, ir.Block) or owner.name != "linalg.fill" or not is_zero_init(owner.operands[0]):
        return None
    return owner.operands[1]


def _only_bf16_rounding(product: ir.Value) -> ir.Operation | None:
    """The elementwise generic that only rounds `product` (f32) to bf16, if it is the
    product's one use."""
    uses = list(product.uses)
    if len(uses) != 1:
        return None
    user = uses[0].owner
    if not ds.is_elementwise_cast(user, "arith.truncf") or ds.element_name(user.results[0].type) != "bf16":
        return None
    return user
