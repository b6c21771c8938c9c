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
               and ir.StringAttr(op.attributes["name"]).value in (OP_NAME, PACKED_OP_NAME)]
        for op in ops:
            if ir.StringAttr(op.attributes["name"]).value == OP_NAME:
                self._convert(module, op)
            else:
                self._convert_packed(module, op)

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
