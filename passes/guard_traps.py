"""lowbit-guard-traps: run-time faults of compiled code become flags, not process deaths.

Matches, on bufferized IR before `convert-linalg-to-loops`:

* integer division and remainder (`arith.divsi/divui/remsi/remui/floordivsi/ceildivsi/
  ceildivui`, scalar or vector) whose divisor is not a constant other than 0 and -1. x86's
  `idiv` traps (SIGFPE) on a zero divisor and on INT_MIN / -1. Produces the same op on a
  divisor replaced by 1 where it is 0 or (signed) where the dividend is INT_MIN and the
  divisor -1 -- INT_MIN / -1 then gives INT_MIN and the remainder 0, eager's wrapped
  results -- and raises trap bit 0 when a divisor is 0 (eager raises ZeroDivisionError);
* `memref.load` inside a `linalg.generic` body (data-dependent reads: embedding, gather,
  index_select, `w[i]`): each index is checked against its dimension; out of range, the
  load is skipped (the value is 0) and trap bit 1 is raised (eager raises an IndexError);
* `vector.gather` / `vector.scatter` (what lowbit-vectorize makes of such reads) on a memref
  with the identity layout: each enabled lane's linear position is checked against the
  memref's element count; lanes outside are disabled (a gather gives its pass-through
  value, a scatter writes nothing) and trap bit 1 is raised;
* `cf.assert` inside a `linalg.generic` body (torch-mlir's per-element checks, e.g.
  "index must be smaller than dim size"), and `cf.assert` tagged `lowbit.trap` anywhere
  (lowbit's own checks whose failing path skips the unsafe work, e.g. the row loop of
  `lowbit-convert-index-put`): instead of aborting the process, a failed check raises its
  own trap bit (2 + the message's index, at most 30 messages).

The bits are or-ed atomically into the public global `@_mlir_lowbit_traps : memref<i32>`; the
module attribute `lowbit.traps` lists each bit's message. The caller (lowbit.compiler.compile)
clears the flag before a call and raises eager's exception after it when a bit is set.
Asserts outside generic bodies (shape checks) are left alone: continuing past those could
write out of bounds. Modules with nothing to guard are unchanged.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir
from torch_mlir.dialects import arith, memref, scf, vector

from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import walk

# The ExecutionEngine's Python lookup (`raw_lookup(name)`) finds the symbol `_mlir_<name>`
# (the packed-entry convention), so the global carries that prefix to be found by address.
FLAG_SYMBOL = "_mlir_lowbit_traps"
FLAG_LOOKUP = "lowbit_traps"
TRAPS_ATTR = "lowbit.traps"
TRAP_ATTR = "lowbit.trap"  # on a cf.assert anywhere: a check lowbit emitted that continues safely when it fails
DIVISION_BY_ZERO = "integer division by zero"
INDEX_OUT_OF_RANGE = "index out of range"
MAX_BITS = 32

SIGNED = {"arith.divsi", "arith.remsi", "arith.floordivsi", "arith.ceildivsi"}
UNSIGNED = {"arith.divui", "arith.remui", "arith.ceildivui"}


@register_pass
@dataclasses.dataclass
class GuardTraps(ModulePass):
    """Guard integer division, data-dependent loads and per-element asserts: flags, not traps."""

    NAME = "lowbit-guard-traps"

    def run(self, module: ir.Operation) -> None:
        ops = walk(module)
        divisions = [op for op in ops if op.name in SIGNED | UNSIGNED and _needs_guard(op)]
        loads = [op for op in ops if op.name == "memref.load" and _in_generic_body(op)]
        asserts = [op for op in ops if op.name == "cf.assert" and (TRAP_ATTR in op.attributes or _in_generic_body(op))]
        gathers = [op for op in ops if op.name in ("vector.gather", "vector.scatter") and _identity_layout(op)]
        if not (divisions or loads or asserts or gathers):
            return
        messages = [DIVISION_BY_ZERO, INDEX_OUT_OF_RANGE]
        flag_type = ir.MemRefType.get([], ir.IntegerType.get_signless(32))
        body = module.regions[0].blocks[0]
        with ir.InsertionPoint.at_block_begin(body), ir.Location.unknown():
            memref.GlobalOp(FLAG_SYMBOL, ir.TypeAttr.get(flag_type), sym_visibility="public",
                            initial_value=ir.DenseElementsAttr.get_splat(
                                ir.RankedTensorType.get([], ir.IntegerType.get_signless(32)),
                                ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 0)),
                            alignment=4)
        for op in divisions:
            _guard_division(op, flag_type)
        for op in loads:
            _guard_load(op, flag_type)
        for op in gathers:
            _guard_gather(op, flag_type)
        for op in asserts:
            message = ir.StringAttr(op.attributes["msg"]).value
            if message not in messages:
                if len(messages) >= MAX_BITS - 1:
                    continue  # beyond 31 distinct messages: keep the abort
                messages.append(message)
            _guard_assert(op, flag_type, 1 << messages.index(message))
        module.attributes[TRAPS_ATTR] = ir.ArrayAttr.get([ir.StringAttr.get(m) for m in messages])


def _in_generic_body(op: ir.Operation) -> bool:
    parent = op.parent
    while parent is not None:
        if parent.name == "linalg.generic":
            return True
        if parent.name in ("func.func", "builtin.module"):
            return False
        parent = parent.parent
    return False


def _constant_ints(value: ir.Value) -> list[int] | None:
    owner = value.owner
    if not isinstance(owner, ir.OpView) or owner.operation.name != "arith.constant":
        return None
    attr = owner.attributes["value"]
    if isinstance(attr, ir.IntegerAttr):
        return [attr.value]
    if isinstance(attr, ir.DenseIntElementsAttr) and attr.is_splat:
        return [ir.IntegerAttr(attr.get_splat_value()).value]
    return None


def _needs_guard(op: ir.Operation) -> bool:
    known = _constant_ints(op.operands[1])
    if known is None:
        return True
    return any(v == 0 or (op.name in SIGNED and v == -1) for v in known)


def _const(t: ir.Type, v: int) -> ir.Value:
    if isinstance(t, ir.VectorType):
        elem = t.element_type
        return arith.ConstantOp(t, ir.DenseElementsAttr.get_splat(t, ir.IntegerAttr.get(elem, v))).result
    return arith.ConstantOp(t, ir.IntegerAttr.get(t, v)).result


def _min_value(t: ir.Type) -> int:
    elem = t.element_type if isinstance(t, ir.VectorType) else t
    width = 64 if isinstance(elem, ir.IndexType) else ir.IntegerType(elem).width
    return -(1 << (width - 1))


def _eq(a: ir.Value, b: ir.Value) -> ir.Value:
    return arith.CmpIOp(arith.CmpIPredicate.eq, a, b).result


def _raise_if(cond: ir.Value, flag_type: ir.Type, bits: int) -> None:
    """`if cond { atomic or @_mlir_lowbit_traps, bits }` (cond an i1 or a vector of i1)."""
    if isinstance(cond.type, ir.VectorType):
        cond = vector.ReductionOp(ir.IntegerType.get_signless(1), vector.CombiningKind.OR, cond).result
    branch = scf.IfOp(cond)
    with ir.InsertionPoint(branch.then_block):
        flag = memref.GetGlobalOp(flag_type, FLAG_SYMBOL).result
        memref.AtomicRMWOp(arith.AtomicRMWKind.ori, _const(ir.IntegerType.get_signless(32), bits), flag, [])
        scf.YieldOp([])


def _guard_division(op: ir.Operation, flag_type: ir.Type) -> None:
    a, b = op.operands[0], op.operands[1]
    t = b.type
    with ir.InsertionPoint(op), op.location:
        zero = _eq(b, _const(t, 0))
        bad = zero
        if op.name in SIGNED:
            overflow = arith.AndIOp(_eq(a, _const(t, _min_value(t))), _eq(b, _const(t, -1))).result
            bad = arith.OrIOp(zero, overflow).result
        op.operands[1] = arith.SelectOp(bad, _const(t, 1), b).result
        _raise_if(zero, flag_type, 1 << 0)


def _zero_of(t: ir.Type) -> ir.Value | None:
    if isinstance(t, (ir.F32Type, ir.F64Type, ir.F16Type, ir.BF16Type)):
        return arith.ConstantOp(t, ir.FloatAttr.get(t, 0.0)).result
    if isinstance(t, (ir.IntegerType, ir.IndexType)):
        return arith.ConstantOp(t, ir.IntegerAttr.get(t, 0)).result
    return None


def _guard_load(op: ir.Operation, flag_type: ir.Type) -> None:
    source = op.operands[0]
    indices = list(op.operands[1:])
    shape = ir.MemRefType(source.type).shape
    if not indices:
        return
    result_type = op.results[0].type
    with ir.InsertionPoint(op), op.location:
        probe = _zero_of(result_type)
        if probe is None:
            return
        ok = None
        for d, index in enumerate(indices):
            if shape[d] == ir.ShapedType.get_dynamic_size():
                size = memref.DimOp(source, arith.ConstantOp(ir.IndexType.get(), d).result).result
            else:
                size = arith.ConstantOp(ir.IndexType.get(), shape[d]).result
            # unsigned compare: a negative index is a huge unsigned one
            inside = arith.CmpIOp(arith.CmpIPredicate.ult, index, size).result
            ok = inside if ok is None else arith.AndIOp(ok, inside).result
        branch = scf.IfOp(ok, [result_type], has_else=True)
        with ir.InsertionPoint(branch.then_block):
            loaded = memref.LoadOp(source, indices).result
            scf.YieldOp([loaded])
        with ir.InsertionPoint(branch.else_block):
            flag = memref.GetGlobalOp(flag_type, FLAG_SYMBOL).result
            memref.AtomicRMWOp(arith.AtomicRMWKind.ori, _const(ir.IntegerType.get_signless(32), 1 << 1), flag, [])
            scf.YieldOp([probe])
    op.results[0].replace_all_uses_with(branch.results[0])
    op.erase()


def _identity_layout(op: ir.Operation) -> bool:
    t = op.operands[0].type
    if not isinstance(t, ir.MemRefType):
        return False
    t = ir.MemRefType(t)
    layout = t.layout
    return isinstance(layout, ir.AffineMapAttr) and layout.value == ir.AffineMap.get_identity(t.rank)


def _guard_gather(op: ir.Operation, flag_type: ir.Type) -> None:
    """Disable the lanes of a gather/scatter whose element lies outside its memref."""
    base = op.operands[0]
    shape = ir.MemRefType(base.type).shape
    rank = len(shape)
    offsets = list(op.operands[1:1 + rank])
    lanes, mask = op.operands[1 + rank], op.operands[2 + rank]
    vtype = ir.VectorType(lanes.type)
    index = ir.IndexType.get()
    with ir.InsertionPoint(op), op.location:
        def size(d):
            if shape[d] == ir.ShapedType.get_dynamic_size():
                return memref.DimOp(base, arith.ConstantOp(index, d).result).result
            return arith.ConstantOp(index, shape[d]).result

        numel, start = arith.ConstantOp(index, 1).result, arith.ConstantOp(index, 0).result
        for d in range(rank):
            extent = size(d)
            start = arith.AddIOp(arith.MulIOp(start, extent).result, offsets[d]).result
            numel = arith.MulIOp(numel, extent).result
        positions = lanes
        if not isinstance(vtype.element_type, ir.IndexType):
            positions = arith.IndexCastOp(ir.VectorType.get(vtype.shape, index), lanes).result
        itype = ir.VectorType.get(vtype.shape, index)
        positions = arith.AddIOp(positions, vector.BroadcastOp(itype, start).result).result
        inside = arith.CmpIOp(arith.CmpIPredicate.ult, positions, vector.BroadcastOp(itype, numel).result).result
        enabled = arith.AndIOp(mask, inside).result
        outside = arith.AndIOp(mask, arith.XOrIOp(inside, _const(inside.type, 1)).result).result
        _raise_if(outside, flag_type, 1 << 1)
    op.operands[2 + rank] = enabled


def _guard_assert(op: ir.Operation, flag_type: ir.Type, bits: int) -> None:
    with ir.InsertionPoint(op), op.location:
        failed = arith.XOrIOp(op.operands[0], _const(ir.IntegerType.get_signless(1), 1)).result
        _raise_if(failed, flag_type, bits)
    op.erase()
