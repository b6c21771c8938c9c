"""lowbit-convert-index-put: `torch.ops.lowbit.index_put_rows` -> a row loop that updates in place.

Matches, on torch-dialect IR straight from the importer,

    %new = torch.operator "torch.lowbit.index_put_rows"(%self, %dim, %index, %values)

(the KV-cache form of `index_put`, see `lowbit.compiler.index_put_rows`) with a constant
`%dim`, and produces a call to a private `@lowbit_index_put_rows_<i>` function between
`torch_c.to_builtin_tensor` / `torch_c.from_builtin_tensor`. The function loops over the
index: each entry is wrapped when negative, checked against the dimension (outside, a
`cf.assert` tagged `lowbit.trap` that `lowbit-guard-traps` turns into eager's IndexError)
and its row of `%values` is copied into the row of the cache:

    scf.for %t iter_args(%acc = %self)
      %row = linalg.generic ins(extract_slice %values[t]) outs(extract_slice %acc[i])
               { select(in range, new, old) }         // out of range: row 0 rewritten as is
      insert_slice %row into %acc[i]

No region yields a tensor but the loop (an `scf.if` choosing between cache buffers made
bufferization copy the cache and deallocation call a runtime alias helper).

Destination-passing all the way, so one-shot bufferization writes the rows into the
cache's own buffer when the cache is a writable function argument (a mutated graph input:
`lowbit.compiler.compile` marks which are) and into a copy otherwise. A decode step then
writes one row per cache instead of copying every cache. Ops with a non-constant
dimension are left alone (the torch backend rejects them; the partitioner runs them in
eager, which computes the same values).
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir

from lowbit.passes.qlinear import unique_symbol
from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import walk

OP_NAME = "torch.lowbit.index_put_rows"
FUNC_PREFIX = "lowbit_index_put_rows_"
FUNC_ATTR = "lowbit.index_put_rows"
TRAP_ATTR = "lowbit.trap"
MESSAGE = "index out of range"  # lowbit.passes.guard_traps.INDEX_OUT_OF_RANGE: raised as IndexError

# torch element type -> builtin element type (torch-mlir's backend conversion is signless).
_ELEMENTS = {"f64": "f64", "f32": "f32", "bf16": "bf16", "f16": "f16", "si64": "i64", "si32": "i32",
             "si16": "i16", "si8": "i8", "ui8": "i8", "i1": "i1"}


def _shape_elem(t: ir.Type) -> tuple[list[int | None], str] | None:
    """`!torch.vtensor<[2,?,8],f32>` -> ([2, None, 8], "f32"); None for other types."""
    text = str(t)
    if not text.startswith("!torch.vtensor<[") or not text.endswith(">"):
        return None
    inner = text[len("!torch.vtensor<"):-1]
    dims, _, elem = inner.rpartition(",")
    dims = dims.strip()[1:-1]
    shape = [None if d.strip() == "?" else int(d) for d in dims.split(",")] if dims else []
    return shape, elem.strip()


def _tensor(shape: list[int | None], elem: str) -> str:
    return "tensor<" + "".join(("?" if d is None else str(d)) + "x" for d in shape) + elem + ">"


def _constant_int(value: ir.Value) -> int | None:
    owner = value.owner
    op = owner.operation if hasattr(owner, "operation") else None
    if op is None or op.name != "torch.constant.int":
        return None
    return ir.IntegerAttr(op.attributes["value"]).value


def function_text(name: str, shape: list[int | None], values_shape: list[int | None], index_len: int | None,
                  dim: int, elem: str) -> str:
    """The row loop as MLIR text (see the module docstring)."""
    st, vt, it = _tensor(shape, elem), _tensor(values_shape, elem), _tensor([index_len], "i64")
    row_shape = [1 if k == dim else d for k, d in enumerate(values_shape)]
    rt = _tensor(row_shape, elem)
    lines = [f"func.func private @{name}(%self: {st}, %idx: {it}, %vals: {vt}) -> {st} "
             f"attributes {{{FUNC_ATTR}}} {{",
             "  %c0 = arith.constant 0 : index",
             "  %c1 = arith.constant 1 : index",
             f"  %cd = arith.constant {dim} : index",
             "  %zero = arith.constant 0 : i64",
             f"  %n = tensor.dim %idx, %c0 : {it}",
             f"  %size = tensor.dim %self, %cd : {st}",
             "  %size64 = arith.index_cast %size : index to i64"]
    sizes = []
    for k, d in enumerate(row_shape):
        if d is None:
            lines.append(f"  %ck{k} = arith.constant {k} : index")
            lines.append(f"  %s{k} = tensor.dim %vals, %ck{k} : {vt}")
            sizes.append(f"%s{k}")
        else:
            sizes.append(str(d))
    size_list = ", ".join(sizes)
    ones = ", ".join("1" for _ in shape)

    dims = ", ".join(f"d{k}" for k in range(len(shape)))
    identity = f"affine_map<({dims}) -> ({dims})>"
    parallel = ", ".join('"parallel"' for _ in shape)

    def offsets(at: str) -> str:
        return ", ".join(at if k == dim else "0" for k in range(len(shape)))

    lines += [
        f"  %r = scf.for %t = %c0 to %n step %c1 iter_args(%acc = %self) -> ({st}) {{",
        f"    %raw = tensor.extract %idx[%t] : {it}",
        "    %neg = arith.cmpi slt, %raw, %zero : i64",
        "    %wrapped = arith.addi %raw, %size64 : i64",
        "    %i64 = arith.select %neg, %wrapped, %raw : i64",
        "    %ge = arith.cmpi sge, %i64, %zero : i64",
        "    %lt = arith.cmpi slt, %i64, %size64 : i64",
        "    %ok = arith.andi %ge, %lt : i1",
        f"    cf.assert %ok, \"{MESSAGE}\" {{{TRAP_ATTR}}}",
        "    %safe = arith.select %ok, %i64, %zero : i64",
        "    %i = arith.index_cast %safe : i64 to index",
        f"    %src = tensor.extract_slice %vals[{offsets('%t')}] [{size_list}] [{ones}] : {vt} to {rt}",
        f"    %dst = tensor.extract_slice %acc[{offsets('%i')}] [{size_list}] [{ones}] : {st} to {rt}",
        f"    %row = linalg.generic {{indexing_maps = [{identity}, {identity}], iterator_types = [{parallel}]}}"
        f" ins(%src : {rt}) outs(%dst : {rt}) {{",
        f"    ^bb0(%new: {elem}, %old: {elem}):",
        f"      %v = arith.select %ok, %new, %old : {elem}",
        f"      linalg.yield %v : {elem}",
        f"    }} -> {rt}",
        f"    %ins = tensor.insert_slice %row into %acc[{offsets('%i')}] [{size_list}] [{ones}] : {rt} into {st}",
        f"    scf.yield %ins : {st}",
        "  }",
        f"  return %r : {st}",
        "}"]
    return "\n".join(lines)


@register_pass
@dataclasses.dataclass
class ConvertIndexPut(ModulePass):
    """Rewrite `torch.lowbit.index_put_rows` into calls of in-place row-update functions."""

    NAME = "lowbit-convert-index-put"

    def run(self, module: ir.Operation) -> None:
        ops = [op for op in walk(module) if op.name == "torch.operator"
               and ir.StringAttr(op.attributes["name"]).value == OP_NAME]
        for op in ops:
            self._convert(module, op)

    def _convert(self, module: ir.Operation, op: ir.Operation) -> None:
        self_v, dim_v, index_v, values_v = op.operands
        dim = _constant_int(dim_v)
        typed = [_shape_elem(v.type) for v in (self_v, index_v, values_v, op.results[0])]
        if dim is None or any(t is None for t in typed):
            return
        (shape, elem), (ishape, ielem), (vshape, velem), (rshape, _) = typed
        if (elem not in _ELEMENTS or velem != elem or ielem != "si64" or len(ishape) != 1
                or len(vshape) != len(shape) or not 0 <= dim < len(shape) or rshape != shape):
            return
        name = unique_symbol(module, FUNC_PREFIX)
        belem = _ELEMENTS[elem]
        with module.context:
            parsed = ir.Module.parse(function_text(name, shape, vshape, ishape[0], dim, belem))
            func = parsed.body.operations[0].operation
            func.detach_from_parent()
            body = module.regions[0].blocks[0]
            body.append(func)
            with ir.InsertionPoint(op), op.location:
                args = []
                for value, shp, el in ((self_v, shape, belem), (index_v, ishape, "i64"), (values_v, vshape, belem)):
                    builtin = ir.Type.parse(_tensor(shp, el))
                    args.append(ir.Operation.create("torch_c.to_builtin_tensor", results=[builtin],
                                                    operands=[value]).result)
                result_type = ir.Type.parse(_tensor(shape, belem))
                call = ir.Operation.create("func.call", results=[result_type], operands=args,
                                           attributes={"callee": ir.FlatSymbolRefAttr.get(name)})
                new = ir.Operation.create("torch_c.from_builtin_tensor", results=[op.results[0].type],
                                          operands=[call.result]).result
        op.results[0].replace_all_uses_with(new)
        op.erase()
