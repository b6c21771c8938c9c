"""`lowbit-dense-brgemm-calls`: after bufferization, turn BRGEMM tiles into runtime calls.

Matches the ops `lowbit-dense-tile` tagged `lowbit.brgemm` once they work on memrefs:

  * "packed":   the blocked `linalg.contract` over a packed constant B
                (f32: A[m, k], P[np, k, 32], C[m, np, 32];
                 bf16: A[m, k/2, 2], P[np, k/2, 32, 2], C[m, np, 32]);
  * "rowmajor": `linalg.matmul` A[m, k] x B[k, n] -> C[m, n], or `linalg.batch_matmul`
                with a unit batch dim (one tile of a bmm).

Produces, in tpp-mlir's xsmm style, one `func.call @lowbit_brgemm_dispatch(...)` per
distinct kernel description at the top of the function (hoisted out of every loop; the
handle is pure, so it is also validated here at compile time with the same runtime), and
in place of each tile a `func.call @lowbit_brgemm_invoke(handle, A, a_off, B, b_off, C,
c_off, 1)` on the tile's base pointers (`memref.extract_aligned_pointer_as_index`) and
element offsets (`memref.extract_strided_metadata`). Leading dimensions and panel strides
come from the memref layouts, which must have unit innermost strides; an op that does not
satisfy that is reported as an error (it was tagged for this pass).

Dynamic tiles (a shape-generic compile: a token-count tail, a KV length, a dynamic K or
leading dimension) cannot be described at compile time. Their sizes and strides are read
at the tile (`memref.extract_strided_metadata`), dispatched there (the runtime's dispatch
is a table lookup, ~0.1 us, small next to a tile's work), and the invoke runs under
`scf.if handle > 0`; otherwise (a description the runtime rejects, e.g. K = 0, or a full
kernel table) the tile op itself runs in the else branch, lowered to loops later -- after
a zero fill of C when it was a beta-0 tile -- so a rejected description is never a wrong
answer. Static tiles keep the hoisted, compile-time validated dispatch.
Tiles accumulate into C (beta = 1), which is linalg's semantics for the `outs` operand,
except packed tiles that lowbit-dense-tile marked `lowbit.brgemm_beta0` (their init was a
zero fill, dropped): those overwrite C (BETA_0), and store it as bf16 (C_BF16) when C is
bf16 (the f32 -> bf16 rounding was folded into the tile).
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir

from lowbit.passes import dense_support as ds
from lowbit.passes.registry import ModulePass, PassError, register_pass

NB = 32
DTYPE = {"f32": 1, "bf16": 2}
FLAG_BETA_0 = 1 << 0
FLAG_B_PACKED = 1 << 1
FLAG_C_BF16 = 1 << 2
BETA0_ATTR = "lowbit.brgemm_beta0"  # set by lowbit-dense-tile when the init was a zero fill

DISPATCH = "lowbit_brgemm_dispatch"
INVOKE = "lowbit_brgemm_invoke"


@dataclasses.dataclass(frozen=True)
class _Desc:
    dtype: int
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int
    stride_a: int
    stride_b: int
    flags: int

    def args(self) -> list:
        return [self.m, self.n, self.k, self.lda, self.ldb, self.ldc, self.stride_a, self.stride_b, self.flags]

    @property
    def dynamic(self) -> bool:
        return any(isinstance(v, _Field) for v in self.args())


@dataclasses.dataclass(frozen=True)
class _Field:
    """A descriptor field only known at run time: `kind` ("size" | "stride") `dim` of
    tile operand `operand` (0 = A, 1 = B, 2 = C), times `scale`."""

    operand: int
    kind: str
    dim: int
    scale: int = 1


def _layout(value: ir.Value, what: str, op: ir.Operation, idx: int) -> tuple[list, list]:
    """Sizes and strides of a tile operand: ints when static, `_Field`s when dynamic."""
    t = ir.MemRefType(value.type)
    strides, _ = t.get_strides_and_offset()
    dyn_stride = ir.ShapedType.get_dynamic_stride_or_offset()
    sizes = [_Field(idx, "size", d) if ir.ShapedType.is_dynamic_size(s) else s for d, s in enumerate(t.shape)]
    strides = [_Field(idx, "stride", d) if s == dyn_stride else s for d, s in enumerate(strides)]
    return sizes, strides


def _describe(op: ir.Operation) -> _Desc:
    kind = ir.StringAttr(op.attributes[ds.BRGEMM_ATTR]).value
    a, b, c = op.operands[0], op.operands[1], op.operands[2]
    dtype = ds.element_name(a.type)
    c_bf16 = ds.element_name(c.type) == "bf16" and dtype == "bf16" and BETA0_ATTR in op.attributes
    if dtype not in DTYPE or ds.element_name(b.type) != dtype or (ds.element_name(c.type) != "f32" and not c_bf16):
        raise PassError(f"{op.location}: BRGEMM tile with element types {a.type}, {b.type}, {c.type}")
    flags = (FLAG_BETA_0 if BETA0_ATTR in op.attributes else 0) | (FLAG_C_BF16 if c_bf16 else 0)
    (sa, ta), (sb, tb), (sc, tc) = (_layout(v, w, op, i) for i, (v, w) in enumerate(((a, "A"), (b, "B"), (c, "C"))))

    def require(cond: bool, why: str):
        if not cond:
            raise PassError(f"{op.location}: BRGEMM tile layout not supported: {why} "
                            f"(A {a.type}, B {b.type}, C {c.type})")

    if kind == "packed":
        require(sc[2] == NB and tc[1:] == [NB, 1], "C must be [m, np, 32] with unit column stride")
        require(not isinstance(sc[1], _Field), "the number of packed panels must be static")
        m, n = sc[0], sc[1] * NB
        if dtype == "f32":
            require(ta[1] == 1 and tb[1:] == [NB, 1], "A rows and packed panels must be contiguous")
            k = sa[1]
        else:
            require(ta[1:] == [2, 1] and tb[1:] == [2 * NB, 2, 1], "A pairs and VNNI panels must be contiguous")
            k = dataclasses.replace(sa[1], scale=2) if isinstance(sa[1], _Field) else 2 * sa[1]
        return _Desc(DTYPE[dtype], m, n, k, ta[0], tb[0], tc[0], 0, 0, FLAG_B_PACKED | flags)
    if kind == "rowmajor":
        if op.name == "linalg.batch_matmul":
            require(sa[0] == 1 and sb[0] == 1 and sc[0] == 1, "a bmm tile must have a unit batch dim")
            sa, ta, sb, tb, sc, tc = sa[1:], ta[1:], sb[1:], tb[1:], sc[1:], tc[1:]
        require(ta[1] == 1 and tb[1] == 1 and tc[1] == 1, "operands need unit column strides")
        return _Desc(DTYPE[dtype], sa[0], sc[1], sa[1], ta[0], tb[0], tc[0], 0, 0, flags)
    raise PassError(f"{op.location}: unknown {ds.BRGEMM_ATTR} kind '{kind}'")


def _validate(desc: _Desc, op: ir.Operation) -> None:
    """Dispatch once now: the runtime's checks are ISA independent, so a description that
    passes here cannot fail at run time."""
    from lowbit.runtime import brgemm as bg

    h = bg._lib().lowbit_brgemm_dispatch(desc.dtype, *desc.args())
    if h < 0:
        raise PassError(f"{op.location}: the runtime rejects BRGEMM {desc}: {bg._error(h)}")


def _i64(v: int) -> ir.Value:
    i64 = ir.IntegerType.get_signless(64)
    return ir.Operation.create("arith.constant", results=[i64],
                               attributes={"value": ir.IntegerAttr.get(i64, v)}).result


def _i32(v: int) -> ir.Value:
    i32 = ir.IntegerType.get_signless(32)
    return ir.Operation.create("arith.constant", results=[i32],
                               attributes={"value": ir.IntegerAttr.get(i32, v)}).result


def _pointer_and_offset(value: ir.Value) -> tuple[ir.Value, ir.Value]:
    i64 = ir.IntegerType.get_signless(64)
    index = ir.IndexType.get()
    t = ir.MemRefType(value.type)
    base_type = ir.MemRefType.get([], t.element_type, memory_space=t.memory_space)
    meta = ir.Operation.create("memref.extract_strided_metadata", results=[base_type] + [index] * (1 + 2 * t.rank),
                               operands=[value])
    ptr_index = ir.Operation.create("memref.extract_aligned_pointer_as_index", results=[index],
                                    operands=[value]).result
    ptr_int = ir.Operation.create("arith.index_cast", results=[i64], operands=[ptr_index]).result
    ptr = ir.Operation.create("llvm.inttoptr", results=[ir.Type.parse("!llvm.ptr")], operands=[ptr_int]).result
    offset = ir.Operation.create("arith.index_cast", results=[i64], operands=[meta.results[1]]).result
    return ptr, offset


def _declare(module: ir.Operation) -> None:
    body = module.regions[0].blocks[0]
    have = {ir.StringAttr(op.operation.attributes["sym_name"]).value
            for op in body.operations if "sym_name" in op.operation.attributes}
    sigs = {
        DISPATCH: "(i32, i64, i64, i64, i64, i64, i64, i64, i64, i64) -> i64",
        INVOKE: "(i64, !llvm.ptr, i64, !llvm.ptr, i64, !llvm.ptr, i64, i64) -> i32",
    }
    for name, sig in sigs.items():
        if name in have:
            continue
        with ir.InsertionPoint.at_block_begin(body), ir.Location.unknown():
            ir.Operation.create("func.func", attributes={
                "sym_name": ir.StringAttr.get(name),
                "function_type": ir.TypeAttr.get(ir.Type.parse(sig)),
                "sym_visibility": ir.StringAttr.get("private")}, regions=1)


def _call(name: str, args: list[ir.Value], result: ir.Type) -> ir.Value:
    return ir.Operation.create("func.call", results=[result], operands=args,
                               attributes={"callee": ir.FlatSymbolRefAttr.get(name)}).result


def _dynamic_tile(op: ir.Operation, desc: _Desc, one: ir.Value) -> None:
    """Dispatch a tile with run-time sizes where it is, invoke it when the runtime accepts
    the description, else run the tile op itself (moved into the else branch)."""
    i1 = ir.IntegerType.get_signless(1)
    i32 = ir.IntegerType.get_signless(32)
    i64 = ir.IntegerType.get_signless(64)
    index = ir.IndexType.get()
    with ir.InsertionPoint(op), op.location:
        metas = {}

        def meta(operand: int) -> ir.Operation:
            if operand not in metas:
                t = ir.MemRefType(op.operands[operand].type)
                base = ir.MemRefType.get([], t.element_type, memory_space=t.memory_space)
                metas[operand] = ir.Operation.create(
                    "memref.extract_strided_metadata", results=[base] + [index] * (1 + 2 * t.rank),
                    operands=[op.operands[operand]])
            return metas[operand]

        def value(v) -> ir.Value:
            if not isinstance(v, _Field):
                return _i64(v)
            rank = ir.MemRefType(op.operands[v.operand].type).rank
            pos = 2 + v.dim + (rank if v.kind == "stride" else 0)
            x = ir.Operation.create("arith.index_cast", results=[i64], operands=[meta(v.operand).results[pos]]).result
            if v.scale != 1:
                x = ir.Operation.create("arith.muli", results=[i64], operands=[x, _i64(v.scale)]).result
            return x

        args = [_i32(desc.dtype)] + [value(v) for v in desc.args()]
        handle = _call(DISPATCH, args, i64)
        zero = _i64(0)
        ok = ir.Operation.create("arith.cmpi", results=[i1], operands=[handle, zero],
                                 attributes={"predicate": ir.IntegerAttr.get(i64, 4)}).result  # sgt
        branch = ir.Operation.create("scf.if", results=[], operands=[ok], regions=2)
        then_block = branch.regions[0].blocks.append()
        else_block = branch.regions[1].blocks.append()
    with ir.InsertionPoint(then_block), op.location:
        (pa, oa), (pb, ob), (pc, oc) = (_pointer_and_offset(v) for v in op.operands[:3])
        _call(INVOKE, [handle, pa, oa, pb, ob, pc, oc, one], i32)
        ir.Operation.create("scf.yield")
    with ir.InsertionPoint(else_block), op.location:
        end = ir.Operation.create("scf.yield")
    op.move_before(end)
    if BETA0_ATTR in op.attributes:
        # The tile's init was a zero fill that lowbit-dense-tile dropped: as loops, the
        # op accumulates into C, so zero C first.
        from torch_mlir.dialects import linalg
        c = op.operands[2]
        with ir.InsertionPoint(op), op.location:
            elem = ir.MemRefType(c.type).element_type
            z = ir.Operation.create("arith.constant", results=[elem],
                                    attributes={"value": ir.FloatAttr.get(elem, 0.0)}).result
            linalg.fill(z, outs=[c])
    for name in (ds.BRGEMM_ATTR, BETA0_ATTR, "lowbit.brgemm_tile"):
        if name in op.attributes:
            del op.attributes[name]


@register_pass
@dataclasses.dataclass
class DenseBrgemmCalls(ModulePass):
    """Replace bufferized `lowbit.brgemm` tiles by hoisted dispatch + invoke runtime calls."""

    NAME = "lowbit-dense-brgemm-calls"

    def run(self, module: ir.Operation) -> None:
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        any_tile = False
        for f in ds.func_ops(module):
            tiles = [op for op in ds.walk(f) if ds.BRGEMM_ATTR in op.attributes]
            if not tiles:
                continue
            for op in tiles:
                if any(isinstance(v.type, ir.RankedTensorType) for v in op.operands):
                    raise PassError(f"{op.location}: {self.NAME} runs after bufferization; "
                                    f"this BRGEMM tile still works on tensors")
            any_tile = True
            descs = [_describe(op) for op in tiles]
            # Phase 1: constants and one dispatch per description at the top of the
            # function, in order before its original first op (still alive here).
            entry = f.regions[0].blocks[0]
            top = ir.InsertionPoint.at_block_begin(entry)
            consts: dict[tuple[int, int], ir.Value] = {}

            def const(v: int, width: int = 64) -> ir.Value:
                if (v, width) not in consts:
                    with top, ir.Location.unknown():
                        consts[(v, width)] = _i64(v) if width == 64 else _i32(v)
                return consts[(v, width)]

            handles: dict[_Desc, ir.Value] = {}
            for op, desc in zip(tiles, descs):
                if not desc.dynamic and desc not in handles:
                    _validate(desc, op)
                    args = [const(desc.dtype, 32)] + [const(v) for v in desc.args()]
                    with top, op.location:
                        handles[desc] = _call(DISPATCH, args, i64)
            one = const(1)
            # Phase 2: each tile becomes an invoke on its pointers and offsets.
            for op, desc in zip(tiles, descs):
                if desc.dynamic:
                    _dynamic_tile(op, desc, one)
                    continue
                with ir.InsertionPoint(op), op.location:
                    (pa, oa), (pb, ob), (pc, oc) = (_pointer_and_offset(v) for v in op.operands[:3])
                    _call(INVOKE, [handles[desc], pa, oa, pb, ob, pc, oc, one], i32)
                op.erase()
        if any_tile:
            _declare(module)
