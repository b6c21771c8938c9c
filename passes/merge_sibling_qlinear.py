"""lowbit-merge-sibling-qlinear: one kernel call for low-bit layers that share an input.

Matches two or more calls to qlinear functions in the same block that take the same
activation value and agree on everything but the output width (weight format, scale
granularity and group, K, activation format, dtypes) -- q/k/v projections, SwiGLU's
gate/up. Produces one qlinear function whose weight is the row-wise concatenation of
theirs (per-tensor scales become per-row scales, missing biases become zeros) and one call
followed by `tensor.extract_slice`s of its result. The activations are then quantized
once and the kernels run as a single parallel loop over all the output rows, which
matters most at decode time, when each layer alone is too small to keep both cores busy.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import func as func_d
from torch_mlir.dialects import tensor as tensor_d

from lowbit.passes.qlinear import (
    QLINEAR_ATTR,
    REPORT_ATTR,
    QLinearWeights,
    build_qlinear_function,
    qlinear_calls,
    qlinear_functions,
    read_weights,
    spec_from_attr,
)
from lowbit.passes.registry import ModulePass, register_pass
from lowbit.quant.formats import LowBitSpec


def _merge_key(spec: LowBitSpec, x: ir.Value, call: ir.Operation):
    granularity = "channel" if spec.granularity == "tensor" else spec.granularity
    return (x, call.block, spec.weight_format, granularity, spec.group_size, spec.in_features,
            spec.act_format, spec.act_group_size, str(call.results[0].type.element_type))


def _merge_weights(parts: list[tuple[LowBitSpec, QLinearWeights]]) -> QLinearWeights:
    q = np.concatenate([w.q for _, w in parts])
    scales = np.concatenate([np.broadcast_to(w.scales, (s.out_features, w.scales.shape[1]))
                             if s.granularity == "tensor" else w.scales for s, w in parts])
    zeros = None
    if parts[0][1].zero_points is not None:
        zeros = np.concatenate([w.zero_points for _, w in parts])
    bias = None
    if any(w.bias is not None for _, w in parts):
        bias = np.concatenate([w.bias if w.bias is not None else np.zeros(s.out_features, np.float32)
                               for s, w in parts])
    return QLinearWeights(q, np.ascontiguousarray(scales, dtype=np.float32), zeros, bias)


@register_pass
@dataclasses.dataclass
class MergeSiblingQLinear(ModulePass):
    """Merge qlinear calls on the same input into one call with concatenated weights."""

    NAME = "lowbit-merge-sibling-qlinear"
    min_group: int = 2

    def run(self, module: ir.Operation) -> None:
        functions = {ir.StringAttr(f.attributes["sym_name"]).value: f for f in qlinear_functions(module)}
        if not functions:
            return
        groups = defaultdict(list)
        for op, callee in qlinear_calls(module, functions):
            if len(op.operands) == 1:
                spec, _ = spec_from_attr(functions[callee].attributes[QLINEAR_ATTR])
                groups[_merge_key(spec, op.operands[0], op)].append((op, callee))
        erased = set()
        for calls in groups.values():
            if len(calls) < max(2, self.min_group):
                continue
            self._merge(module, calls, functions)
            erased.update(callee for _, callee in calls)
        for name in erased:
            if not _has_uses(module, name):
                functions[name].erase()

    def _merge(self, module: ir.Operation, calls, functions) -> None:
        parts = []
        for op, callee in calls:
            spec, origin = spec_from_attr(functions[callee].attributes[QLINEAR_ATTR])
            parts.append((spec, read_weights(functions[callee])))
        first_spec = parts[0][0]
        n_total = sum(s.out_features for s, _ in parts)
        merged_spec = dataclasses.replace(
            first_spec, out_features=n_total,
            granularity="channel" if first_spec.granularity == "tensor" else first_spec.granularity)
        x = calls[0][0].operands[0]
        x_type = ir.RankedTensorType(x.type)
        m = x_type.shape[0]
        y_elem = ir.RankedTensorType(calls[0][0].results[0].type).element_type
        merged = build_qlinear_function(module, merged_spec, _merge_weights(parts), m,
                                        str(x_type.element_type), str(y_elem),
                                        origin="merged " + "+".join(c for _, c in calls))
        first = _earliest([op for op, _ in calls])
        sym = ir.StringAttr(merged.attributes["sym_name"]).value
        with ir.InsertionPoint(first), first.location:
            out_type = ir.RankedTensorType.get([m, n_total], y_elem)
            call = func_d.CallOp([out_type], ir.FlatSymbolRefAttr.get(sym), [x])
            call.operation.attributes["no_inline"] = ir.UnitAttr.get()
            offset = 0
            for (op, _), (spec, _) in zip(calls, parts):
                part_type = ir.RankedTensorType.get([m, spec.out_features], y_elem)
                piece = tensor_d.ExtractSliceOp(part_type, call.result, [], [], [],
                                                ir.DenseI64ArrayAttr.get([0, offset]),
                                                ir.DenseI64ArrayAttr.get([m, spec.out_features]),
                                                ir.DenseI64ArrayAttr.get([1, 1])).result
                op.results[0].replace_all_uses_with(piece)
                offset += spec.out_features
        for op, _ in calls:
            op.erase()
        _retarget_report(module, {callee for _, callee in calls}, sym)


def _retarget_report(module: ir.Operation, old: set[str], new: str) -> None:
    """Report entries of the merged layers now point at the merged function."""
    if REPORT_ATTR not in module.attributes:
        return
    entries = []
    for entry in ir.ArrayAttr(module.attributes[REPORT_ATTR]):
        d = ir.DictAttr(entry)
        if "function" in d and ir.StringAttr(d["function"]).value in old:
            fields = {named.name: named.attr for named in d}
            fields["merged_from"] = fields["function"]
            fields["function"] = ir.StringAttr.get(new)
            entry = ir.DictAttr.get(fields)
        entries.append(entry)
    module.attributes[REPORT_ATTR] = ir.ArrayAttr.get(entries)


def _earliest(ops: list[ir.Operation]) -> ir.Operation:
    """The first of `ops` (all in one block) in block order."""
    for op in ops[0].block.operations:
        if any(op.operation == o for o in ops):
            return op.operation
    raise AssertionError("sibling calls are not in one block")


def _has_uses(module: ir.Operation, name: str) -> bool:
    found = []

    def visit(op):
        if op.name == "func.call" and ir.FlatSymbolRefAttr(op.attributes["callee"]).value == name:
            found.append(op)
            return ir.WalkResult.INTERRUPT
        return ir.WalkResult.ADVANCE

    module.walk(visit)
    return bool(found)
