"""`lowbit-dense-tile`: send dense fp32/bf16 matmuls on tensors to BRGEMM tiles.

Matches (see `dense_support.match_matmul`) `linalg.matmul`, `linalg.batch_matmul` and
matmul-like `linalg.generic` (C[m, n] += A[m, k] * B[k, n] or * B^T[n, k]) with static
or dynamic sizes, A and B both f32 or both bf16, and an f32 accumulator (torch-mlir's form of
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

and for any other matmul the named op tagged `lowbit.brgemm = "rowmajor"` (a non-constant
B^T -- a weight argument read through torch-mlir's transpose, or a generic's (n, k) map --
is first materialised row-major by a `linalg.transpose`). A `linalg.contract` that
already has this blocked packed form with P a function argument (weights packed at bind
time), M possibly dynamic, is tiled the same way.
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
the forall bounds and as `lowbit.brgemm_tile = array<i64: tile-m, tile-n>`. A dynamic size
is planned as `dynamic-extent` and its tile kept fixed (run-time tails via `affine.min`).
Empty products (a static zero M, N or K) are left to loops.
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
    mm: ds.Matmul | None
    packed: np.ndarray | None  # packed B (f32, or uint16 bf16 bits), blocked shape
    tile_m: int
    tile_n: int
    op: ir.Operation | None = None  # a packed contraction that arrived already blocked
    dtype: str = ""


@register_pass
@dataclasses.dataclass
class DenseTile(ModulePass):
    """Pack constant B operands of fp32/bf16 matmuls and tile them into BRGEMM tiles (scf.forall).

    Options: `tile-m`, `tile-n` (upper bounds, 0 = from cache sizes), `threads` (0 = CPUs
    available), `min-tasks-per-thread` (tiles per thread to aim for), `min-task-flops`
    (tiles are not split below this much work), `pack` (pre-pack constant B operands;
    off = row-major tiles only), `dynamic-extent` (the size a dynamic dim is planned for).
    """

    NAME = "lowbit-dense-tile"
    tile_m: int = 0
    tile_n: int = 0
    threads: int = 0
    min_tasks_per_thread: int = 2
    min_task_flops: int = 1 << 21
    pack: bool = True
    dynamic_extent: int = 128

    def run(self, module: ir.Operation) -> None:
        if (min(self.tile_m, self.tile_n, self.threads, self.min_task_flops) < 0 or self.min_tasks_per_thread < 1
                or self.dynamic_extent < 1):
            raise PassError(f"{self.NAME}: options must be non-negative ({self.option_text()})")
        plans = []
        for f in ds.func_ops(module):
            for op in ds.walk(f):
                if ds.inside(op, {"scf.forall", "scf.for", "scf.parallel"}):
                    continue
                if ds.BRGEMM_ATTR in op.attributes:
                    # A blocked contraction over a B packed at bind time (a function
                    # argument), emitted by the low-bit passes in this pass's own form.
                    plan = self._plan_packed_argument(op)
                    if plan is not None:
                        plans.append(plan)
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
            tiled = plan.op if plan.op is not None else self._rewrite(plan)
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
        if 0 in (mm.m, mm.n, mm.k) or (mm.bmm and mm.batch == 0):
            return None  # an empty product (e.g. zero K): nothing for a kernel, loops do it
        packed = None
        if (self.pack and not mm.bmm and mm.n is not None and mm.k is not None and mm.n % NB == 0
                and (mm.dtype == "f32" or mm.k % 2 == 0)):
            const = ds.constant_of(mm.b)
            if const is not None:
                array, through_transpose = const
                # B^T either from a transpose op or from a generic's (n, k) map.
                packed = _pack(array, mm.dtype, transposed=through_transpose != mm.b_transposed,
                               k=mm.k, n=mm.n)
        m, n, k = self._tile_sizes_for(mm.m, mm.n, mm.k, mm.dtype, mm.batch if mm.bmm else None,
                                       packed is not None)
        return _Plan(mm, packed, m, n)

    def _tile_sizes_for(self, m: int | None, n: int | None, k: int | None, dtype: str,
                        batch: int | None, packed: bool) -> tuple[int, int, int]:
        """(tile-m, tile-n, k) for an (m x k) @ (k x n) product. A dynamic size is planned
        at `dynamic-extent` and its tile is kept as a fixed block (runtime tails)."""
        hint = self.dynamic_extent
        m_, n_, k_ = (hint if v is None else v for v in (m, n, k))
        elt = 4 if dtype == "f32" else 2
        threads = self.threads or ds.cpu_threads()
        l2 = ds.cache_bytes(2, 1 << 20)
        l3 = ds.cache_bytes(3, 8 << 20)
        n_unit = NB if packed else 1
        tn_limit = self.tile_n or max(NB, min(1024, (l2 // 2) // (k_ * elt)))
        tm_limit = self.tile_m or max(1, min(512, (l3 // (2 * threads)) // (k_ * elt)))
        tn_opts = [d for d in ds.divisors(n_) if d % n_unit == 0 and d <= max(tn_limit, n_unit)]
        if not tn_opts:
            tn_opts = [n_unit if packed else n_]
        tm_opts = [d for d in ds.divisors(m_) if d <= tm_limit] or [1]
        # Row-major N tiles are whole vectors (16 lanes) or all of N.
        if not packed:
            tn_opts = sorted({d for d in tn_opts if d % 16 == 0} | {n_})
        tm, tn = tm_opts[-1], tn_opts[-1]
        want = threads * self.min_tasks_per_thread
        batch = 1 if batch is None else batch

        def big_enough(m2: int, n2: int) -> bool:
            return 2 * m2 * n2 * k_ >= self.min_task_flops

        while batch * (m_ // tm) * (n_ // tn) < want:
            smaller_n = [d for d in tn_opts if d < tn and big_enough(tm, d)]
            smaller_m = [d for d in tm_opts if d < tm and big_enough(d, tn)]
            if smaller_n and (tn >= 2 * NB or not smaller_m):
                tn = smaller_n[-1]
            elif smaller_m:
                tm = smaller_m[-1]
            else:
                break
        return tm, tn, k_

    def _plan_packed_argument(self, op: ir.Operation) -> _Plan | None:
        """An untiled blocked `linalg.contract` tagged `lowbit.brgemm = "packed"` whose packed
        B is not a constant (bound at run time): A [M, K] (bf16: [M, K/2, 2]), P [N/32, K, 32]
        (bf16: [N/32, K/2, 32, 2]), C [M, N/32, 32]; M may be dynamic."""
        if op.name != "linalg.contract" or ir.StringAttr(op.attributes[ds.BRGEMM_ATTR]).value != "packed":
            return None
        if not op.results or not isinstance(op.results[0].type, ir.RankedTensorType):
            return None
        a, p, c = (ds.ranked_shape(v) for v in op.operands[:3])
        dtype = ds.element_name(op.operands[0].type)
        rank_ok = (len(a), len(p), len(c)) == ((2, 3, 3) if dtype == "f32" else (3, 4, 3))
        if dtype not in ("f32", "bf16") or not rank_ok or None in p or c[1:] != [p[0], NB]:
            raise PassError(f"{op.location}: {self.NAME}: a lowbit.brgemm = \"packed\" contraction must be "
                            f"A [M, K] / P [N/32, K, 32] (bf16: [M, K/2, 2] / [N/32, K/2, 32, 2]) -> "
                            f"C [M, N/32, 32] with static P; got {op.operands[0].type}, "
                            f"{op.operands[1].type}, {op.operands[2].type}")
        k = p[1] if dtype == "f32" else 2 * p[1]
        tm, tn, _ = self._tile_sizes_for(a[0], p[0] * NB, k, dtype, None, True)
        if a[0] == 0:
            return None
        if BETA0_ATTR in op.attributes:
            # A beta-0 tile overwrites C: a zero fill of its init is never read.
            init = _zero_fill_init(op.operands[2])
            if init is not None:
                op.operands[2] = init
            if dtype == "bf16" and ds.element_name(op.results[0].type) == "f32":
                op = _fold_bf16_store(op)
        return _Plan(None, None, tm, tn, op=op, dtype=dtype)

    @staticmethod
    def _tile_sizes(plan: _Plan) -> list[int]:
        if plan.op is not None:  # packed contraction given as input
            return [plan.tile_m, plan.tile_n // NB, 0, 0] + ([0] if plan.dtype == "bf16" else [])
        mm = plan.mm
        if plan.packed is not None:
            return [plan.tile_m, plan.tile_n // NB, 0, 0] + ([0] if mm.dtype == "bf16" else [])
        if mm.bmm:
            return [1, plan.tile_m, plan.tile_n, 0]
        return [plan.tile_m, plan.tile_n, 0]

    # -- rewriting ------------------------------------------------------------------------

    def _rewrite(self, plan: _Plan) -> ir.Operation:
        mm = plan.mm
        tile_attr = ir.DenseI64ArrayAttr.get([plan.tile_m, plan.tile_n])
        if plan.packed is None:
            op = mm.op
            b = mm.b
            if mm.b_transposed:
                # B^T that is not a constant (a weight bound at run time, or an activation):
                # materialise B [k, n] once so the tiles read it row-major.
                with ir.InsertionPoint(op), op.location:
                    b = _transpose_2d(mm.b)
            if mm.a != op.operands[0] or b != op.operands[1] or op.name == "linalg.generic":
                # Operands were looked through (bf16 -> f32 extf) or transposed, or the op is
                # a matmul-like generic: rebuild it as the named op on those operands (the
                # named op's region extends bf16 to f32).
                build = linalg.batch_matmul if mm.bmm else linalg.matmul
                with ir.InsertionPoint(op), op.location:
                    new = build(mm.a, b, outs=[mm.c]).owner
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


def _transpose_2d(value: ir.Value) -> ir.Value:
    """`linalg.transpose` of a 2-D tensor into a new (possibly dynamic) tensor."""
    t = ir.RankedTensorType(value.type)
    rows, cols = t.shape
    dyn = []
    index = ir.IndexType.get()
    for dim, size in ((1, cols), (0, rows)):
        if ir.ShapedType.is_dynamic_size(size):
            pos = ir.Operation.create("arith.constant", results=[index],
                                      attributes={"value": ir.IntegerAttr.get(index, dim)}).result
            dyn.append(ir.Operation.create("tensor.dim", results=[index], operands=[value, pos]).result)
    out_type = ir.RankedTensorType.get([cols, rows], t.element_type)
    empty = ir.Operation.create("tensor.empty", results=[out_type], operands=dyn).result
    return linalg.transpose(value, outs=[empty], permutation=[1, 0])


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

    dyn = ir.ShapedType.get_dynamic_size()

    def expand(value, shape, reassoc):
        # Only the row dim (0) can be dynamic: a shape-generic token count.
        sizes = []
        if shape[0] is None:
            index = ir.IndexType.get()
            zero = ir.Operation.create("arith.constant", results=[index],
                                       attributes={"value": ir.IntegerAttr.get(index, 0)}).result
            sizes.append(ir.Operation.create("tensor.dim", results=[index], operands=[value, zero]).result)
        static = [dyn if d is None else d for d in shape]
        return ir.Operation.create(
            "tensor.expand_shape", results=[ir.RankedTensorType.get(static, ir.ShapedType(value.type).element_type)],
            operands=[value] + sizes, attributes={
                "reassociation": ir.Attribute.parse(reassoc),
                "static_output_shape": ir.DenseI64ArrayAttr.get(static)}).result

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
                c_init = _empty_like(round_op.results[0].type, mm.c)
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


def _empty_like(t: ir.Type, shape_of: ir.Value) -> ir.Value:
    """`tensor.empty` of type `t`, its dynamic sizes read from `shape_of` (same shape)."""
    rt = ir.RankedTensorType(t)
    index = ir.IndexType.get()
    sizes = []
    for d, size in enumerate(rt.shape):
        if ir.ShapedType.is_dynamic_size(size):
            pos = ir.Operation.create("arith.constant", results=[index],
                                      attributes={"value": ir.IntegerAttr.get(index, d)}).result
            sizes.append(ir.Operation.create("tensor.dim", results=[index], operands=[shape_of, pos]).result)
    return ir.Operation.create("tensor.empty", results=[t], operands=sizes).result


def _fold_bf16_store(op: ir.Operation) -> ir.Operation:
    """A beta-0 packed contraction whose f32 C is only collapsed to [M, N] and rounded to
    bf16 (the form lowbit-convert-linear-op emits for a bf16 Linear): rebuilt to store
    bf16 C itself (the kernel rounds once as it stores), as for a constant B. Returns the
    op to tile (`op` unchanged when the pattern does not match)."""
    uses = list(op.results[0].uses)
    if len(uses) != 1 or uses[0].owner.name != "tensor.collapse_shape":
        return op
    collapse = uses[0].owner
    if str(collapse.attributes["reassociation"]) != "[[0], [1, 2]]":
        return op
    round_op = _only_bf16_rounding(collapse.results[0])
    if round_op is None:
        return op
    from torch_mlir.dialects import linalg

    bf16 = ir.BF16Type.get()
    c_type = ir.RankedTensorType(op.results[0].type)
    with ir.InsertionPoint(op), op.location:
        init = _empty_like(ir.RankedTensorType.get(list(c_type.shape), bf16), op.operands[2])
        maps = [ir.AffineMapAttr(a).value for a in op.attributes["indexing_maps"]]
        new = linalg.contract(op.operands[0], op.operands[1], outs=[init], indexing_maps=maps).owner
        for name in (ds.BRGEMM_ATTR, BETA0_ATTR):
            new.attributes[name] = op.attributes[name]
        out = ir.Operation.create("tensor.collapse_shape", results=[round_op.results[0].type],
                                  operands=[new.result], attributes={
                                      "reassociation": ir.Attribute.parse("[[0], [1, 2]]")}).result
    round_op.results[0].replace_all_uses_with(out)
    round_op.erase()
    collapse.erase()
    op.erase()
    return new


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
