"""lowbit-convert-attention: `torch.ops.lowbit.attention` -> a call of the fused attention kernel.

Matches, on torch-dialect IR straight from the importer,

    %o = torch.operator "torch.lowbit.attention"(%q, %k, %v, %mask, %scale, %causal)

(`lowbit.compiler.attention_op`: what `lowbit.compiler.decompositions` makes of a supported
`F.scaled_dot_product_attention`) with q `[B, H, T, D]`, k/v `[B, Hkv, S, D]` of f32 or
bf16, static H, Hkv (H a multiple of Hkv) and D, any B, T, S; a boolean mask of rank <= 4
or `torch.constant.none`; constant `%scale` and `%causal`. It produces

    %out = tensor.empty(dynamic dims of q)
    %o   = func.call @lowbit_attention_<i>(q, k, v, [mask,] %out)

between `torch_c.to_builtin_tensor` / `torch_c.from_builtin_tensor`, where the private
function carries `lowbit.attention = {scale, causal}` and a placeholder body: it reads one
element of every input (bufferization decides from the callee's body which arguments a call
reads; an input the body ignored could have its buffer reused while the kernel still reads
it) and fills `%out` with NaN. After bufferization `lowbit-lower-attention`
(passes/lower_attention.py) replaces that body by the runtime kernel's invocations; the
placeholder never runs. One function serves every B, T and S (shape-generic).

Keys and values repeated for grouped-query attention, the way Llama code (and transformers'
`repeat_kv`) writes it,

    %u = torch.aten.unsqueeze %kv, 2        [B, Hkv, 1, S, D]
    %e = torch.aten.expand %u, [B, Hkv, r, S, D]
    %c = torch.aten.clone %e                (optional; or aten.contiguous)
    %k = torch.aten.view %c, [B, Hkv*r, S, D]   (or reshape / _unsafe_view)

are passed as `%kv` itself, Hkv heads: the kernel maps query head h to kv head h / r, the
order the expand gives, and reads every cached row once instead of the graph copying the
whole cache r times per call first. Both k and v must have that form with the same Hkv, and
B and S static and unchanged through the chain (a growing, dynamic-length cache is left as
it is).

Anything else (another dtype, a dynamic head count or head dim, non-constant scale) is left
alone: the torch backend rejects the op and the partitioner runs its eager implementation.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir

from lowbit.passes.convert_index_put import _constant_int, _shape_elem, _tensor
from lowbit.passes.qlinear import unique_symbol
from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import walk

OP_NAME = "torch.lowbit.attention"
FUNC_PREFIX = "lowbit_attention_"
FUNC_ATTR = "lowbit.attention"
_ELEMENTS = {"f32": "f32", "bf16": "bf16"}


def _defining_op(value: ir.Value) -> ir.Operation | None:
    owner = value.owner
    return owner.operation if hasattr(owner, "operation") else None


def _constant(value: ir.Value, kind: str):
    """The Python value of a `torch.constant.<kind>` (float / bool), else None."""
    op = _defining_op(value)
    if op is None or op.name != f"torch.constant.{kind}":
        return None
    attr = op.attributes["value"]
    return ir.FloatAttr(attr).value if kind == "float" else ir.BoolAttr(attr).value


def _is_none(value: ir.Value) -> bool:
    op = _defining_op(value)
    return op is not None and op.name == "torch.constant.none"


_VIEWS = ("torch.aten.view", "torch.aten.reshape", "torch.aten._unsafe_view")
_COPIES = ("torch.aten.clone", "torch.aten.contiguous")


def gqa_source(value: ir.Value) -> ir.Value | None:
    """`%kv` when `value` is `%kv` [B, Hkv, S, D] repeated per query head (the module
    docstring's form), else None."""
    view = _defining_op(value)
    if view is None or view.name not in _VIEWS:
        return None
    inner = _defining_op(view.operands[0])
    if inner is not None and inner.name in _COPIES:
        inner = _defining_op(inner.operands[0])
    if inner is None or inner.name != "torch.aten.expand":
        return None
    unsq = _defining_op(inner.operands[0])
    if unsq is None or unsq.name != "torch.aten.unsqueeze" or _constant_int(unsq.operands[1]) not in (2, -3):
        return None
    src = unsq.operands[0]
    typed = [_shape_elem(x.type) for x in (src, unsq.results[0], inner.results[0], view.results[0])]
    if any(t is None for t in typed) or len({t[1] for t in typed}) != 1:
        return None
    (ss, _), (us, _), (es, _), (vs, _) = typed
    if not (len(ss) == 4 and len(us) == 5 and len(es) == 5 and len(vs) == 4):
        return None
    hkv, rep, d = es[1], es[2], es[4]
    if None in (hkv, rep, d) or ss[1] != hkv or us[1:3] != [hkv, 1] or ss[3] != d or us[4] != d:
        return None
    if vs[1] != hkv * rep or vs[3] != d:
        return None
    # B and S static and the same along the chain (an expand may also broadcast a size-1
    # batch; a dynamic one could be either).
    if not (ss[0] == us[0] == es[0] == vs[0] and ss[2] == us[3] == es[3] == vs[2]) or None in (ss[0], ss[2]):
        return None
    return src


def placeholder_text(name: str, q_shape, kv_shape, mask_shape, elem: str) -> str:
    """The private function with its placeholder body (see the module docstring)."""
    qt, kt = _tensor(q_shape, elem), _tensor(kv_shape, elem)
    args = [f"%q: {qt}", f"%k: {kt}", f"%v: {kt}"]
    mt = None
    if mask_shape is not None:
        mt = _tensor(mask_shape, "i1")
        args.append(f"%mask: {mt}")
    args.append(f"%out: {qt}")
    lines = ["  %c0 = arith.constant 0 : index", "  %nan = arith.constant 0x7FC00000 : f32",
             "  %zero = arith.constant 0.0 : f32"]
    reads = []
    for var, ty in (("q", qt), ("k", kt), ("v", kt)):
        lines.append(f"  %{var}e = tensor.extract %{var}[%c0, %c0, %c0, %c0] : {ty}")
        if elem != "f32":
            lines.append(f"  %{var}f = arith.extf %{var}e : {elem} to f32")
            reads.append(f"%{var}f")
        else:
            reads.append(f"%{var}e")
    if mt is not None:
        idx = ", ".join("%c0" for _ in mask_shape)
        lines.append(f"  %me = tensor.extract %mask[{idx}] : {mt}")
        lines.append("  %mf = arith.uitofp %me : i1 to f32")
        reads.append("%mf")
    acc = "%nan"
    for i, r in enumerate(reads):
        lines += [f"  %z{i} = arith.mulf {r}, %zero : f32", f"  %p{i} = arith.addf {acc}, %z{i} : f32"]
        acc = f"%p{i}"
    if elem != "f32":
        lines.append(f"  %poison = arith.truncf {acc} : f32 to {elem}")
        acc = "%poison"
    return (f"func.func private @{name}({', '.join(args)}) -> {qt} {{\n" + "\n".join(lines) + "\n"
            f"  %y = linalg.fill ins({acc} : {elem}) outs(%out : {qt}) -> {qt}\n"
            f"  return %y : {qt}\n}}\n")


def supported_form(op: ir.Operation) -> tuple | None:
    """(q shape, kv shape, mask shape or None, element, scale, causal) when the pass can
    convert `op`, else None."""
    if len(op.operands) != 6 or len(op.results) != 1:
        return None
    q_v, k_v, v_v, mask_v, scale_v, causal_v = op.operands
    scale, causal = _constant(scale_v, "float"), _constant(causal_v, "bool")
    typed = [_shape_elem(x.type) for x in (q_v, k_v, v_v, op.results[0])]
    if scale is None or causal is None or any(t is None for t in typed):
        return None
    (qs, qe), (ks, ke), (vs, ve), (rs, re) = typed
    if qe not in _ELEMENTS or not (qe == ke == ve == re) or not (len(qs) == len(ks) == 4) or vs != ks or rs != qs:
        return None
    h, hkv, d = qs[1], ks[1], qs[3]
    if None in (h, hkv, d) or ks[3] != d or hkv < 1 or h % hkv or d < 1:
        return None
    if _is_none(mask_v):
        mask_shape = None
    else:
        mt = _shape_elem(mask_v.type)
        if mt is None or mt[1] != "i1" or len(mt[0]) > 4:
            return None
        mask_shape = mt[0]
    return qs, ks, mask_shape, _ELEMENTS[qe], scale, causal


@register_pass
@dataclasses.dataclass
class ConvertAttention(ModulePass):
    """Rewrite `torch.lowbit.attention` into calls of fused-attention functions."""

    NAME = "lowbit-convert-attention"

    def run(self, module: ir.Operation) -> None:
        ops = [op for op in walk(module) if op.name == "torch.operator"
               and ir.StringAttr(op.attributes["name"]).value == OP_NAME]
        for op in ops:
            k_src, v_src = gqa_source(op.operands[1]), gqa_source(op.operands[2])
            if k_src is not None and v_src is not None and _shape_elem(k_src.type) == _shape_elem(v_src.type):
                op.operands[1] = k_src
                op.operands[2] = v_src
            form = supported_form(op)
            if form is not None:
                self._convert(module, op, *form)

    def _convert(self, module, op, q_shape, kv_shape, mask_shape, elem, scale, causal) -> None:
        name = unique_symbol(module, FUNC_PREFIX)
        with module.context:
            parsed = ir.Module.parse(placeholder_text(name, q_shape, kv_shape, mask_shape, elem))
            func = parsed.body.operations[0].operation
            func.attributes[FUNC_ATTR] = ir.DictAttr.get({
                "scale": ir.FloatAttr.get(ir.F64Type.get(), float(scale)),
                "causal": ir.BoolAttr.get(bool(causal))})
            func.attributes["no_inline"] = ir.UnitAttr.get()
            func.detach_from_parent()
            module.regions[0].blocks[0].append(func)
            index = ir.IndexType.get()
            with ir.InsertionPoint(op), op.location:
                operands = list(op.operands[:3])
                shapes = [q_shape, kv_shape, kv_shape]
                elems = [elem] * 3
                if mask_shape is not None:
                    operands.append(op.operands[3])
                    shapes.append(mask_shape)
                    elems.append("i1")
                args = []
                for value, shp, el in zip(operands, shapes, elems):
                    builtin = ir.Type.parse(_tensor(shp, el))
                    args.append(ir.Operation.create("torch_c.to_builtin_tensor", results=[builtin],
                                                    operands=[value]).result)
                sizes = []
                for dim, extent in enumerate(q_shape):
                    if extent is None:
                        c = ir.Operation.create("arith.constant", results=[index],
                                                attributes={"value": ir.IntegerAttr.get(index, dim)})
                        sizes.append(ir.Operation.create("tensor.dim", results=[index],
                                                         operands=[args[0], c.result]).result)
                out_type = ir.Type.parse(_tensor(q_shape, elem))
                empty = ir.Operation.create("tensor.empty", results=[out_type], operands=sizes).result
                call = ir.Operation.create("func.call", results=[out_type], operands=args + [empty],
                                           attributes={"callee": ir.FlatSymbolRefAttr.get(name)})
                new = ir.Operation.create("torch_c.from_builtin_tensor", results=[op.results[0].type],
                                          operands=[call.result]).result
        op.results[0].replace_all_uses_with(new)
        op.erase()
