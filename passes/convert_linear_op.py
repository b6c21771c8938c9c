"""lowbit-convert-linear-op: `torch.ops.lowbit.linear` / `packed_linear` -> the canonical qlinear form.

Matches, on torch-dialect IR straight from the importer,

    %y = torch.operator "torch.lowbit.linear"(%x, %packed, %scales, %zp_or_none, %bias_or_none,
                                               <7 constant attributes>)

whose weight tensors are frozen literals, and produces a call to a private
`@lowbit_qlinear_<i>` function (see `lowbit.passes.qlinear`) between
`torch_c.to_builtin_tensor` / `torch_c.from_builtin_tensor`. The packed codes are
unpacked at compile time with `lowbit.quant`'s documented layout; codes outside the
format's value set are rejected with an error naming the layer.

An op it cannot convert (non-constant weights, activation blocks) is left alone with a
report entry; the torch backend then rejects it and the partitioner runs it in eager.

And `torch.lowbit.packed_matmul(%x, %packed)` (a dense fp32/bf16 weight pre-packed at bind
time in the BRGEMM panel layout) becomes the blocked `linalg.contract` over the packed
argument, tagged `lowbit.brgemm = "packed"`, that `lowbit-dense-tile` tiles into BRGEMM calls.

Also matches `torch.operator "torch.lowbit.packed_linear"(%x, %packed, %bias_or_none, <7
constants>)`, the form binding gives a recognised layer whose weight is a runtime buffer
(`lowbit.compiler.bind`), and produces a call to a *bound* qlinear function that takes the
packed bytes (and bias) as arguments, in destination-passing style so the token count may
be dynamic (`lowbit.passes.qlinear`, "bound weights"). No weight byte enters the IR.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch_mlir import ir

from lowbit.passes.qlinear import (
    QLinearWeights,
    add_report_entry,
    build_bound_qlinear_function,
    build_qlinear_function,
    dense_array,
    emit_bound_qlinear_call,
    emit_qlinear_call,
)
from lowbit.passes.registry import ModulePass, PassError, register_pass
from lowbit.passes.vectorize_support import walk
from lowbit.quant.formats import LowBitSpec
from lowbit.quant.packing import unpack_codes

OP_NAME = "torch.lowbit.linear"
PACKED_OP_NAME = "torch.lowbit.packed_linear"
DENSE_OP_NAME = "torch.lowbit.packed_matmul"


def _literal(value: ir.Value) -> np.ndarray | None:
    op = value.owner
    if not isinstance(op, ir.OpView) and not isinstance(op, ir.Operation):
        return None
    op = op.operation
    if op.name != "torch.vtensor.literal":
        return None
    return dense_array(op.attributes["value"])


def _is_none(value: ir.Value) -> bool:
    owner = value.owner
    return hasattr(owner, "operation") and owner.operation.name == "torch.constant.none"


def _constant(value: ir.Value):
    op = value.owner.operation
    if op.name == "torch.constant.str":
        return ir.StringAttr(op.attributes["value"]).value
    if op.name == "torch.constant.int":
        return ir.IntegerAttr(op.attributes["value"]).value
    raise PassError(f"lowbit.linear attribute is not a constant ({op.name})")


def _vtensor_shape_dtype(t: ir.Type) -> tuple[list[int], str]:
    # !torch.vtensor<[2,3,16],f32>; a dynamic dim prints as `?`
    text = str(t)
    inner = text[text.index("<") + 1:text.rindex(">")]
    dims, _, elem = inner.rpartition(",")
    dyn = ir.ShapedType.get_dynamic_size()
    return [dyn if d.strip() == "?" else int(d) for d in dims.strip("[]").split(",") if d], elem.strip()


def _flat_rows(lead: list[int]) -> int:
    if any(ir.ShapedType.is_dynamic_size(d) for d in lead):
        return ir.ShapedType.get_dynamic_size()
    return int(np.prod(lead)) if lead else 1


def _to_builtin(value: ir.Value, shape: list[int], elem: ir.Type) -> ir.Value:
    builtin = ir.RankedTensorType.get(shape, elem)
    return ir.Operation.create("torch_c.to_builtin_tensor", results=[builtin], operands=[value]).result


@register_pass
@dataclasses.dataclass
class ConvertLinearOp(ModulePass):
    """Rewrite `torch.lowbit.linear` ops with frozen weights into calls to qlinear functions."""

    NAME = "lowbit-convert-linear-op"

    def run(self, module: ir.Operation) -> None:
        ops = [op for op in walk(module) if op.name == "torch.operator"
               and ir.StringAttr(op.attributes["name"]).value in (OP_NAME, PACKED_OP_NAME, DENSE_OP_NAME)]
        for op in ops:
            name = ir.StringAttr(op.attributes["name"]).value
            if name == OP_NAME:
                self._convert(module, op)
            elif name == PACKED_OP_NAME:
                self._convert_packed(module, op)
            else:
                _convert_packed_matmul(op)

    def _convert_packed(self, module: ir.Operation, op: ir.Operation) -> None:
        from lowbit.runtime.qgemm import packed_layout

        location = str(op.location)
        x, packed, bias, *attrs = op.operands
        fmt, gran, group, k, n, kblock, act = [_constant(a) for a in attrs]
        spec = LowBitSpec(fmt, gran, group, k, n, act)
        total, kbb, nbb, nkb = packed_layout(spec.weight_format, n, k, kblock)
        p_shape, p_elem = _vtensor_shape_dtype(packed.type)
        if p_shape != [total] or p_elem not in ("si8", "ui8"):
            raise PassError(f"lowbit.packed_linear at {location}: packed weight is {packed.type}, "
                            f"the {spec.describe()} layout with kblock {kblock} needs {total} int8 bytes")
        has_bias = not _is_none(bias)
        bound = dict(bytes=total, kblock=kblock, kblock_bytes=kbb, nblock_bytes=nbb, num_kblocks=nkb,
                     bias=int(has_bias))
        x_shape, x_elem = _vtensor_shape_dtype(x.type)
        y_shape, y_elem = _vtensor_shape_dtype(op.results[0].type)
        m = _flat_rows(x_shape[:-1])
        func = build_bound_qlinear_function(module, spec, bound, m, x_elem, y_elem, origin="bound")
        with ir.InsertionPoint(op), op.location:
            xb = _to_builtin(x, x_shape, _elem_type(x_elem))
            weights = [_to_builtin(packed, [total], ir.IntegerType.get_signless(8))]
            if has_bias:
                weights.append(_to_builtin(bias, [n], ir.F32Type.get()))
            yb = emit_bound_qlinear_call(xb, func, n, _elem_type(y_elem), weights)
            y = ir.Operation.create("torch_c.from_builtin_tensor", results=[op.results[0].type],
                                    operands=[yb]).result
        op.results[0].replace_all_uses_with(y)
        op.erase()
        add_report_entry(module, kind="matmul", location=location, origin="bound", result="recognized",
                         format=spec.describe(), function=ir.StringAttr(func.attributes["sym_name"]).value)

    def _convert(self, module: ir.Operation, op: ir.Operation) -> None:
        location = str(op.location)
        x, packed, scales, zp, bias, *attrs = op.operands
        spec = LowBitSpec(*[_constant(a) for a in attrs])
        if spec.act_group_size:
            add_report_entry(module, kind="matmul", location=location, origin="lowbit.linear",
                             result="not recognized",
                             reason="per-K-block activation scales are not compiled (runs in eager)")
            return
        packed_np, scales_np = _literal(packed), _literal(scales)
        zp_np = None if _is_none(zp) else _literal(zp)
        bias_np = None if _is_none(bias) else _literal(bias)
        if packed_np is None or scales_np is None or (zp_np is None and not _is_none(zp)) \
                or (bias_np is None and not _is_none(bias)):
            add_report_entry(module, kind="matmul", location=location, origin="lowbit.linear",
                             result="not recognized", reason="weights are not compile-time constants")
            return
        try:
            q = unpack_codes(torch.from_numpy(packed_np.astype(np.uint8)), spec.format, spec.in_features)
        except ValueError as e:
            raise PassError(f"lowbit.linear at {location}: {e}") from None
        x_shape, x_elem = _vtensor_shape_dtype(x.type)
        y_shape, y_elem = _vtensor_shape_dtype(op.results[0].type)
        m = int(np.prod(x_shape[:-1])) if len(x_shape) > 1 else 1
        weights = QLinearWeights(
            q.numpy().astype(np.int8),
            scales_np.astype(np.float32).reshape(spec.scale_shape),
            None if zp_np is None else zp_np.astype(np.int8).reshape(spec.scale_shape),
            None if bias_np is None else bias_np.astype(np.float32).reshape(-1))
        func = build_qlinear_function(module, spec, weights, m, x_elem, y_elem, origin="lowbit.linear")
        with ir.InsertionPoint(op), op.location:
            builtin_x = ir.RankedTensorType.get(x_shape, _elem_type(x_elem))
            xb = ir.Operation.create("torch_c.to_builtin_tensor", results=[builtin_x], operands=[x]).result
            yb = emit_qlinear_call(xb, func, spec.out_features, _elem_type(y_elem))
            y = ir.Operation.create("torch_c.from_builtin_tensor", results=[op.results[0].type],
                                    operands=[yb]).result
        op.results[0].replace_all_uses_with(y)
        op.erase()
        add_report_entry(module, kind="matmul", location=location, origin="lowbit.linear",
                         result="recognized", format=spec.describe(),
                         function=ir.StringAttr(func.attributes["sym_name"]).value)


def _elem_type(name: str) -> ir.Type:
    if name == "f32":
        return ir.F32Type.get()
    if name == "bf16":
        return ir.BF16Type.get()
    raise PassError(f"lowbit.linear activations must be f32 or bf16, got {name}")


def _convert_packed_matmul(op: ir.Operation) -> None:
    """x [..., K] @ packed B -> linalg.contract over [M, N/32, 32], f32 accumulation."""
    from torch_mlir.dialects import linalg

    from lowbit.passes.dense_support import BRGEMM_ATTR, _map
    from lowbit.passes.dense_tile import BETA0_ATTR

    x, packed = op.operands
    x_shape, x_elem = _vtensor_shape_dtype(x.type)
    p_shape, _ = _vtensor_shape_dtype(packed.type)
    y_shape, _ = _vtensor_shape_dtype(op.results[0].type)
    bf16 = x_elem == "bf16"
    k, n = x_shape[-1], p_shape[0] * 32
    f32 = ir.F32Type.get()
    elem = _elem_type(x_elem)
    index = ir.IndexType.get()
    dyn = ir.ShapedType.get_dynamic_size()
    with ir.InsertionPoint(op), op.location:
        xb = _to_builtin(x, x_shape, elem)
        pb = _to_builtin(packed, p_shape, elem)
        lead = x_shape[:-1]
        m = _flat_rows(lead)
        x2 = xb
        if len(x_shape) != 2:
            t2 = ir.RankedTensorType.get([m, k], elem)
            if len(x_shape) == 1:
                x2 = ir.Operation.create("tensor.expand_shape", results=[t2], operands=[xb], attributes={
                    "reassociation": ir.Attribute.parse("[[0, 1]]"),
                    "static_output_shape": ir.DenseI64ArrayAttr.get([1, k])}).result
            else:
                groups = ", ".join(str(i) for i in range(len(x_shape) - 1))
                x2 = ir.Operation.create("tensor.collapse_shape", results=[t2], operands=[xb], attributes={
                    "reassociation": ir.Attribute.parse(f"[[{groups}], [{len(x_shape) - 1}]]")}).result
        rows = []
        if ir.ShapedType.is_dynamic_size(m):
            zero = ir.Operation.create("arith.constant", results=[index],
                                       attributes={"value": ir.IntegerAttr.get(index, 0)}).result
            rows = [ir.Operation.create("tensor.dim", results=[index], operands=[x2, zero]).result]
        c3_type = ir.RankedTensorType.get([m, n // 32, 32], f32)
        empty = ir.Operation.create("tensor.empty", results=[c3_type], operands=rows).result
        fzero = ir.Operation.create("arith.constant", results=[f32], attributes={"value": ir.FloatAttr.get(f32, 0.0)}).result
        c3 = linalg.fill(fzero, outs=[empty])
        if bf16:
            a_in = ir.Operation.create("tensor.expand_shape", results=[ir.RankedTensorType.get([m, k // 2, 2], elem)],
                                       operands=[x2] + rows, attributes={
                                           "reassociation": ir.Attribute.parse("[[0], [1, 2]]"),
                                           "static_output_shape": ir.DenseI64ArrayAttr.get([m, k // 2, 2])}).result
            maps = ["(d0, d1, d2, d3, d4) -> (d0, d3, d4)", "(d0, d1, d2, d3, d4) -> (d1, d3, d2, d4)",
                    "(d0, d1, d2, d3, d4) -> (d0, d1, d2)"]
        else:
            a_in = x2
            maps = ["(d0, d1, d2, d3) -> (d0, d3)", "(d0, d1, d2, d3) -> (d1, d3, d2)",
                    "(d0, d1, d2, d3) -> (d0, d1, d2)"]
        contract = linalg.contract(a_in, pb, outs=[c3], indexing_maps=[_map(t) for t in maps])
        cop = contract.owner
        cop.attributes[BRGEMM_ATTR] = ir.StringAttr.get("packed")
        cop.attributes[BETA0_ATTR] = ir.UnitAttr.get()
        y2 = ir.Operation.create("tensor.collapse_shape", results=[ir.RankedTensorType.get([m, n], f32)],
                                 operands=[contract], attributes={
                                     "reassociation": ir.Attribute.parse("[[0], [1, 2]]")}).result
        if bf16:
            e2 = ir.Operation.create("tensor.empty", results=[ir.RankedTensorType.get([m, n], elem)],
                                     operands=rows).result
            y2 = _truncf(y2, e2, elem)
        y = y2
        if len(x_shape) != 2:
            yt = ir.RankedTensorType.get(lead + [n], elem)
            if len(x_shape) == 1:
                y = ir.Operation.create("tensor.collapse_shape", results=[yt], operands=[y2], attributes={
                    "reassociation": ir.Attribute.parse("[[0, 1]]")}).result
            else:
                sizes = []
                for i, d in enumerate(lead):
                    if ir.ShapedType.is_dynamic_size(d):
                        c = ir.Operation.create("arith.constant", results=[index],
                                                attributes={"value": ir.IntegerAttr.get(index, i)}).result
                        sizes.append(ir.Operation.create("tensor.dim", results=[index], operands=[xb, c]).result)
                groups = ", ".join(str(i) for i in range(len(x_shape) - 1))
                y = ir.Operation.create("tensor.expand_shape", results=[yt], operands=[y2] + sizes, attributes={
                    "reassociation": ir.Attribute.parse(f"[[{groups}], [{len(x_shape) - 1}]]"),
                    "static_output_shape": ir.DenseI64ArrayAttr.get(lead + [n])}).result
        out = ir.Operation.create("torch_c.from_builtin_tensor", results=[op.results[0].type], operands=[y]).result
    op.results[0].replace_all_uses_with(out)
    op.erase()


def _truncf(src: ir.Value, init: ir.Value, elem: ir.Type) -> ir.Value:
    """An elementwise f32 -> bf16 rounding of a 2-D tensor (linalg.generic)."""
    text_maps = ir.ArrayAttr.get([ir.AffineMapAttr.get(ir.AffineMap.get_identity(2))] * 2)
    iters = ir.ArrayAttr.get([ir.Attribute.parse("#linalg.iterator_type<parallel>")] * 2)
    op = ir.Operation.create("linalg.generic", results=[init.type], operands=[src, init], attributes={
        "indexing_maps": text_maps, "iterator_types": iters,
        "operandSegmentSizes": ir.DenseI32ArrayAttr.get([1, 1])}, regions=1)
    block = op.regions[0].blocks.append(ir.F32Type.get(), elem)
    with ir.InsertionPoint(block):
        t = ir.Operation.create("arith.truncf", results=[elem], operands=[block.arguments[0]]).result
        ir.Operation.create("linalg.yield", operands=[t])
    return op.results[0]
