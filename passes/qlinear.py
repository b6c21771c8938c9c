"""The canonical form of a recognised low-bit linear layer.

Every recognition pass (our `lowbit.linear` op, dequantize-then-matmul subgraphs, fp
weights that are exactly low-bit) rewrites what it found into the same form: a call

    %y = func.call @lowbit_qlinear_<i>(%x) {no_inline} : (tensor<MxKxT>) -> tensor<MxNxT>

to a private function whose attribute `lowbit.qlinear` is the layer's `LowBitSpec` and whose
body is the reference computation in linalg over constants tagged with `lowbit.role`
(`codes`: int8 q [N, K]; `scales`: fp32 [N, groups] or [1, 1]; `zero_points`: int8;
`bias`: fp32 [N]). The body is honest IR: lowered as it is (to loops) it computes the
layer, which is what the differential tests compare the microkernel path against. Later
passes pack the codes for the kernels, choose tiles, fuse epilogues, and after
bufferization replace the body by runtime calls.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import numpy as np
from torch_mlir import ir

from lowbit.passes.vectorize_support import walk
from lowbit.quant.formats import LowBitSpec

QLINEAR_ATTR = "lowbit.qlinear"
WEIGHTS_ATTR = "lowbit.weights"
ROLE_ATTR = "lowbit.role"
REPORT_ATTR = "lowbit.report"
FUNC_PREFIX = "lowbit_qlinear_"

_ELEM = {"f32": "f32", "bf16": "bf16"}


@dataclasses.dataclass
class QLinearWeights:
    """The integer form of one layer's weight: W = (q - z) * s, plus an optional bias."""

    q: np.ndarray                      # int8 [N, K]
    scales: np.ndarray                 # fp32 [N, groups] or [1, 1]
    zero_points: Optional[np.ndarray]  # int8, like scales, asymmetric formats only
    bias: Optional[np.ndarray]         # fp32 [N]


# Epilogue activations the kernels fuse (lowbit/qgemm.h LOWBIT_QF_ACT_*).
EPILOGUE_ACTIVATIONS = ("relu", "silu", "relu2")


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What a qlinear function computes after scales, zero points and bias:

        y = [r +] act(x W^T + bias)      in fp32, rounded once to y's type

    `activation` is None or one of EPILOGUE_ACTIVATIONS; `residual` adds the function's
    second argument r (same shape and type as y). Recorded in the spec attribute as
    `epilogue = "silu+residual"` (absent: no epilogue)."""

    activation: Optional[str] = None
    residual: bool = False

    def __post_init__(self):
        if self.activation is not None and self.activation not in EPILOGUE_ACTIVATIONS:
            raise ValueError(f"unknown epilogue activation {self.activation!r}")

    def __bool__(self) -> bool:
        return self.activation is not None or self.residual

    def describe(self) -> str:
        parts = ([self.activation] if self.activation else []) + (["residual"] if self.residual else [])
        return "+".join(parts) if parts else "none"

    @staticmethod
    def parse(text: str) -> "Epilogue":
        parts = [p for p in text.split("+") if p and p != "none"]
        residual = "residual" in parts
        acts = [p for p in parts if p != "residual"]
        if len(acts) > 1:
            raise ValueError(f"epilogue {text!r} has more than one activation")
        return Epilogue(acts[0] if acts else None, residual)


def spec_to_attr(spec: LowBitSpec, origin: str, epilogue: Optional[Epilogue] = None) -> ir.Attribute:
    fields = {k: (ir.StringAttr.get(v) if isinstance(v, str) else
                  ir.IntegerAttr.get(ir.IntegerType.get_signless(64), v))
              for k, v in spec.to_dict().items()}
    fields["origin"] = ir.StringAttr.get(origin)
    if epilogue:
        fields["epilogue"] = ir.StringAttr.get(epilogue.describe())
    return ir.DictAttr.get(fields)


def epilogue_from_attr(attr: ir.Attribute) -> Epilogue:
    """The epilogue recorded in a `lowbit.qlinear` attribute (none if absent)."""
    d = ir.DictAttr(attr)
    return Epilogue.parse(ir.StringAttr(d["epilogue"]).value) if "epilogue" in d else Epilogue()


def spec_from_attr(attr: ir.Attribute) -> tuple[LowBitSpec, str]:
    d = ir.DictAttr(attr)
    values = {}
    for name in LowBitSpec.__dataclass_fields__:
        a = d[name]
        values[name] = ir.StringAttr(a).value if isinstance(a, ir.StringAttr) else ir.IntegerAttr(a).value
    origin = ir.StringAttr(d["origin"]).value if "origin" in d else ""
    return LowBitSpec(**values), origin


def qlinear_functions(module: ir.Operation) -> list[ir.Operation]:
    body = _module_body(module)
    return [op.operation for op in body.operations
            if op.operation.name == "func.func" and QLINEAR_ATTR in op.operation.attributes]


def qlinear_calls(module: ir.Operation, functions: dict[str, ir.Operation]) -> list[tuple[ir.Operation, str]]:
    """(call, callee name) for every `func.call` of one of `functions`, in program order."""
    calls = []
    for op in walk(module):
        if op.name == "func.call":
            callee = ir.FlatSymbolRefAttr(op.attributes["callee"]).value
            if callee in functions:
                calls.append((op, callee))
    return calls


def _module_body(module: ir.Operation) -> ir.Block:
    op = module.operation if hasattr(module, "operation") else module
    return op.regions[0].blocks[0]


def declare_functions(module: ir.Operation, declarations: dict[str, str]) -> None:
    """Append `func.func private @name signature` for each declaration the module lacks
    (runtime entry points the lowered code calls)."""
    body = _module_body(module)
    existing = {ir.StringAttr(op.operation.attributes["sym_name"]).value
                for op in body.operations if "sym_name" in op.operation.attributes}
    for name, signature in declarations.items():
        if name in existing:
            continue
        parsed = ir.Module.parse(f"func.func private @{name}{signature}")  # keep alive until detached
        decl = parsed.body.operations[0].operation
        decl.detach_from_parent()
        body.append(decl)


def unique_symbol(module: ir.Operation, prefix: str) -> str:
    names = set()
    for op in _module_body(module).operations:
        if "sym_name" in op.operation.attributes:
            names.add(ir.StringAttr(op.operation.attributes["sym_name"]).value)
    for i in itertools.count():
        if f"{prefix}{i}" not in names:
            return f"{prefix}{i}"


def role_constants(func: ir.Operation) -> dict[str, ir.Operation]:
    """The tagged constants of a qlinear function, by role (before bufferization)."""
    found = {}
    for op in func.regions[0].blocks[0].operations:
        if ROLE_ATTR in op.operation.attributes:
            found[ir.StringAttr(op.operation.attributes[ROLE_ATTR]).value] = op.operation
    return found


def read_weights(func: ir.Operation) -> QLinearWeights:
    """Read the codes, scales, zero points and bias of a qlinear function as numpy arrays.

    They come from the function's `lowbit.weights` attribute, not from the body, whose
    constants canonicalization may fold (the attribute and the body constants share
    storage: MLIR uniques attributes).
    """
    weights = ir.DictAttr(func.attributes[WEIGHTS_ATTR])

    def arr(role, dtype):
        if role not in weights:
            return None
        return dense_array(weights[role]).astype(dtype, copy=False)

    return QLinearWeights(arr("codes", np.int8), arr("scales", np.float32),
                          arr("zero_points", np.int8), arr("bias", np.float32))


def dense_array(attr: ir.Attribute) -> np.ndarray:
    """A DenseElementsAttr (splat or not) as a numpy array of its full shape."""
    dense = ir.DenseElementsAttr(attr)
    shape = list(ir.ShapedType(dense.type).shape)
    if dense.is_splat:
        splat = dense.get_splat_value()
        scalar = ir.FloatAttr(splat).value if isinstance(splat, ir.FloatAttr) else ir.IntegerAttr(splat).value
        return np.full(shape, scalar)
    return np.array(dense)


def _dense(array: np.ndarray, element: ir.Type) -> ir.DenseElementsAttr:
    array = np.ascontiguousarray(array)
    return ir.DenseElementsAttr.get(array, type=element, shape=list(array.shape))


def _reference_body(spec: LowBitSpec, m: int, xt: str, yt: str, has_zp: bool, has_bias: bool,
                    scale_shape: tuple[int, int], epilogue: Optional[Epilogue] = None) -> str:
    """MLIR text of the reference computation (constants are placeholders, filled later)."""
    n, k = spec.out_features, spec.in_features
    g = spec.group_width
    sn, sg = scale_shape
    lines = [
        f'  %q = arith.constant {{{ROLE_ATTR} = "codes"}} dense<0> : tensor<{n}x{k}xi8>',
        f'  %s = arith.constant {{{ROLE_ATTR} = "scales"}} dense<0.0> : tensor<{sn}x{sg}xf32>',
    ]
    if has_zp:
        lines.append(f'  %z = arith.constant {{{ROLE_ATTR} = "zero_points"}} dense<0> : tensor<{sn}x{sg}xi8>')
    if has_bias:
        lines.append(f'  %b = arith.constant {{{ROLE_ATTR} = "bias"}} dense<0.0> : tensor<{n}xf32>')
    lines += [
        "  %zero = arith.constant 0.0 : f32",
        f"  %cg = arith.constant {g} : index",
        "  %c0 = arith.constant 0 : index",
        f"  %e = tensor.empty() : tensor<{m}x{n}xf32>",
        f"  %acc0 = linalg.fill ins(%zero : f32) outs(%e : tensor<{m}x{n}xf32>) -> tensor<{m}x{n}xf32>",
    ]
    xf = "%xv" if xt == "f32" else "%xe"
    x_ext = "" if xt == "f32" else "      %xe = arith.extf %xv : bf16 to f32\n"
    s_idx = "%n, %g" if spec.granularity != "tensor" else "%c0, %c0"
    weight = (
        "      %n = linalg.index 1 : index\n"
        "      %kk = linalg.index 2 : index\n"
        "      %g = arith.divui %kk, %cg : index\n"
        f"      %sv = tensor.extract %s[{s_idx}] : tensor<{sn}x{sg}xf32>\n")
    if has_zp:
        weight += (
            f"      %zv = tensor.extract %z[%n, %g] : tensor<{sn}x{sg}xi8>\n"
            "      %qi = arith.extsi %qv : i8 to i32\n"
            "      %zi = arith.extsi %zv : i8 to i32\n"
            "      %qz = arith.subi %qi, %zi : i32\n"
            "      %qf = arith.sitofp %qz : i32 to f32\n")
    else:
        weight += "      %qf = arith.sitofp %qv : i8 to f32\n"
    weight += "      %w = arith.mulf %qf, %sv : f32\n"
    contraction_maps = ("indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>,"
                        " affine_map<(m, n, k) -> (m, n)>], iterator_types = [\"parallel\", \"parallel\", \"reduction\"]")
    if spec.act_format in ("none", "int8_unit"):  # int8_unit: x holds integers, scale 1
        lines.append(
            f"  %acc = linalg.generic {{{contraction_maps}}}\n"
            f"      ins(%x, %q : tensor<{m}x{k}x{xt}>, tensor<{n}x{k}xi8>) outs(%acc0 : tensor<{m}x{n}xf32>) {{\n"
            f"    ^bb0(%xv: {xt}, %qv: i8, %o: f32):\n{x_ext}{weight}"
            f"      %p = arith.mulf {xf}, %w : f32\n"
            "      %r = arith.addf %o, %p : f32\n"
            "      linalg.yield %r : f32\n"
            f"  }} -> tensor<{m}x{n}xf32>")
        result = "%acc"
        sx = None
    else:
        lines += [
            f"  %ae = tensor.empty() : tensor<{m}xf32>",
            f"  %a0 = linalg.fill ins(%zero : f32) outs(%ae : tensor<{m}xf32>) -> tensor<{m}xf32>",
            "  %amax = linalg.generic {indexing_maps = [affine_map<(m, k) -> (m, k)>, affine_map<(m, k) -> (m)>],"
            " iterator_types = [\"parallel\", \"reduction\"]}",
            f"      ins(%x : tensor<{m}x{k}x{xt}>) outs(%a0 : tensor<{m}xf32>) {{",
            f"    ^bb0(%xv: {xt}, %o: f32):",
            x_ext.rstrip("\n") if x_ext else "",
            f"      %ab = math.absf {xf} : f32",
            "      %mx = arith.maximumf %o, %ab : f32",
            "      linalg.yield %mx : f32",
            f"  }} -> tensor<{m}xf32>",
            "  %sx = linalg.generic {indexing_maps = [affine_map<(m) -> (m)>, affine_map<(m) -> (m)>],"
            " iterator_types = [\"parallel\"]}",
            f"      ins(%amax : tensor<{m}xf32>) outs(%ae : tensor<{m}xf32>) {{",
            "    ^bb0(%av: f32, %o: f32):",
            "      %eps = arith.constant 1.0e-05 : f32",
            "      %c127 = arith.constant 127.0 : f32",
            "      %cl = arith.maximumf %av, %eps : f32",
            "      %sv2 = arith.divf %c127, %cl : f32",
            "      linalg.yield %sv2 : f32",
            f"  }} -> tensor<{m}xf32>",
        ]
        quant = (
            "      %xs = arith.mulf {xf}, %sxv : f32\n"
            "      %xr = math.roundeven %xs : f32\n"
            "      %lo = arith.constant -128.0 : f32\n"
            "      %hi = arith.constant 127.0 : f32\n"
            "      %xl = arith.maximumf %xr, %lo : f32\n"
            "      %xq = arith.minimumf %xl, %hi : f32\n").format(xf=xf)
        lines.append(
            "  %acc = linalg.generic {indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>,"
            " affine_map<(m, n, k) -> (m)>, affine_map<(m, n, k) -> (m, n)>],"
            " iterator_types = [\"parallel\", \"parallel\", \"reduction\"]}\n"
            f"      ins(%x, %q, %sx : tensor<{m}x{k}x{xt}>, tensor<{n}x{k}xi8>, tensor<{m}xf32>)"
            f" outs(%acc0 : tensor<{m}x{n}xf32>) {{\n"
            f"    ^bb0(%xv: {xt}, %qv: i8, %sxv: f32, %o: f32):\n{x_ext}{quant}{weight}"
            "      %p = arith.mulf %xq, %w : f32\n"
            "      %r = arith.addf %o, %p : f32\n"
            "      linalg.yield %r : f32\n"
            f"  }} -> tensor<{m}x{n}xf32>")
        result = "%acc"
        sx = "%sx"
    # Epilogue: divide by the activation scale, add the bias, cast to the output type.
    ins, types, args, body = [result], [f"tensor<{m}x{n}xf32>"], ["%av: f32"], []
    maps = ["affine_map<(m, n) -> (m, n)>"]
    val = "%av"
    if sx:
        ins.append(sx)
        types.append(f"tensor<{m}xf32>")
        args.append("%sxv: f32")
        maps.append("affine_map<(m, n) -> (m)>")
        body.append(f"      %d = arith.divf {val}, %sxv : f32")
        val = "%d"
    if has_bias:
        ins.append("%b")
        types.append(f"tensor<{n}xf32>")
        args.append("%bv: f32")
        maps.append("affine_map<(m, n) -> (n)>")
        body.append(f"      %bb = arith.addf {val}, %bv : f32")
        val = "%bb"
    epilogue = epilogue or Epilogue()
    if epilogue.activation in ("relu", "relu2"):
        body.append(f"      %relu = arith.maximumf {val}, %zero : f32")
        val = "%relu"
        if epilogue.activation == "relu2":
            body.append(f"      %relu2 = arith.mulf {val}, {val} : f32")
            val = "%relu2"
    elif epilogue.activation == "silu":
        body += [f"      %sneg = arith.negf {val} : f32",
                 "      %sexp = math.exp %sneg : f32",
                 "      %sone = arith.constant 1.0 : f32",
                 "      %sden = arith.addf %sexp, %sone : f32",
                 f"      %silu = arith.divf {val}, %sden : f32"]
        val = "%silu"
    if epilogue.residual:
        ins.append("%resid")
        types.append(f"tensor<{m}x{n}x{yt}>")
        args.append(f"%rv: {yt}")
        maps.append("affine_map<(m, n) -> (m, n)>")
        rv = "%rv"
        if yt != "f32":
            body.append(f"      %rf = arith.extf %rv : {yt} to f32")
            rv = "%rf"
        body.append(f"      %res = arith.addf {rv}, {val} : f32")
        val = "%res"
    if yt != "f32":
        body.append(f"      %tr = arith.truncf {val} : f32 to {yt}")
        val = "%tr"
    if len(ins) == 1 and yt == "f32" and not epilogue:
        lines.append(f"  return {result} : tensor<{m}x{n}xf32>")
        return "\n".join(line for line in lines if line)
    maps.append("affine_map<(m, n) -> (m, n)>")
    lines += [
        f"  %ye = tensor.empty() : tensor<{m}x{n}x{yt}>",
        f"  %y = linalg.generic {{indexing_maps = [{', '.join(maps)}], iterator_types = [\"parallel\", \"parallel\"]}}",
        f"      ins({', '.join(ins)} : {', '.join(types)}) outs(%ye : tensor<{m}x{n}x{yt}>) {{",
        f"    ^bb0({', '.join(args)}, %o: {yt}):",
        *body,
        f"      linalg.yield {val} : {yt}",
        f"  }} -> tensor<{m}x{n}x{yt}>",
        f"  return %y : tensor<{m}x{n}x{yt}>",
    ]
    return "\n".join(line for line in lines if line)


def element_name(t: ir.Type) -> str:
    s = str(t)
    if s not in _ELEM:
        raise ValueError(f"low-bit linear activations must be f32 or bf16, got {s}")
    return s


def build_qlinear_function(module: ir.Operation, spec: LowBitSpec, weights: QLinearWeights,
                           m: int, x_elem: str, y_elem: str, origin: str,
                           epilogue: Optional[Epilogue] = None) -> ir.Operation:
    """Create `func.func private @lowbit_qlinear_<i>` for `spec` with these weights.

    `m` is the static number of rows of the (2-D) activation; `x_elem`/`y_elem` are
    "f32" or "bf16". With an epilogue that has a residual the function takes it as a second
    argument `%resid: tensor<MxNx(y_elem)>`. The function is appended to the module body and
    returned.
    """
    n, k = spec.out_features, spec.in_features
    if weights.q.shape != (n, k):
        raise ValueError(f"codes have shape {weights.q.shape}, expected {(n, k)}")
    scale_shape = tuple(weights.scales.shape)
    name = unique_symbol(module, FUNC_PREFIX)
    residual_arg = f", %resid: tensor<{m}x{n}x{y_elem}>" if epilogue and epilogue.residual else ""
    text = (f"func.func private @{name}(%x: tensor<{m}x{k}x{x_elem}>{residual_arg}) -> tensor<{m}x{n}x{y_elem}> {{\n"
            + _reference_body(spec, m, x_elem, y_elem, weights.zero_points is not None,
                              weights.bias is not None, scale_shape, epilogue)
            + "\n}\n")
    parsed = ir.Module.parse(text)
    func = parsed.body.operations[0].operation
    func.attributes[QLINEAR_ATTR] = spec_to_attr(spec, origin, epilogue)
    func.attributes["no_inline"] = ir.UnitAttr.get()
    consts = role_constants(func)
    i8 = ir.IntegerType.get_signless(8)
    attrs = {"codes": _dense(weights.q.astype(np.int8, copy=False), i8),
             "scales": _dense(weights.scales.astype(np.float32, copy=False), ir.F32Type.get())}
    if weights.zero_points is not None:
        attrs["zero_points"] = _dense(weights.zero_points.astype(np.int8, copy=False), i8)
    if weights.bias is not None:
        attrs["bias"] = _dense(weights.bias.astype(np.float32, copy=False), ir.F32Type.get())
    for role, attr in attrs.items():
        consts[role].attributes["value"] = attr
    func.attributes[WEIGHTS_ATTR] = ir.DictAttr.get(attrs)
    func.detach_from_parent()
    _module_body(module).append(func)
    return func


def add_report_entry(module: ir.Operation, **fields) -> None:
    """Append one entry (a dictionary of strings/ints) to the module's `lowbit.report`."""
    op = module.operation if hasattr(module, "operation") else module
    entries = list(ir.ArrayAttr(op.attributes[REPORT_ATTR])) if REPORT_ATTR in op.attributes else []
    d = {}
    for key, value in fields.items():
        if isinstance(value, bool):
            d[key] = ir.BoolAttr.get(value)
        elif isinstance(value, int):
            d[key] = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), value)
        else:
            d[key] = ir.StringAttr.get(str(value))
    entries.append(ir.DictAttr.get(d))
    op.attributes[REPORT_ATTR] = ir.ArrayAttr.get(entries)


def read_report(module: ir.Operation) -> list[dict]:
    op = module.operation if hasattr(module, "operation") else module
    if REPORT_ATTR not in op.attributes:
        return []
    out = []
    for entry in ir.ArrayAttr(op.attributes[REPORT_ATTR]):
        d = {}
        for named in ir.DictAttr(entry):
            a = named.attr
            if isinstance(a, ir.StringAttr):
                d[named.name] = ir.StringAttr(a).value
            elif isinstance(a, ir.BoolAttr):
                d[named.name] = ir.BoolAttr(a).value
            elif isinstance(a, ir.IntegerAttr):
                d[named.name] = ir.IntegerAttr(a).value
            else:
                d[named.name] = str(a)
        out.append(d)
    return out


def _collapse_reassociation(rank: int) -> ir.ArrayAttr:
    i64 = ir.IntegerType.get_signless(64)
    lead = [ir.IntegerAttr.get(i64, i) for i in range(rank - 1)]
    last = [ir.IntegerAttr.get(i64, rank - 1)]
    return ir.ArrayAttr.get([ir.ArrayAttr.get(lead), ir.ArrayAttr.get(last)])


def emit_qlinear_call(x: ir.Value, func: ir.Operation, n: int, y_elem: ir.Type) -> ir.Value:
    """At the current insertion point: `func(x)` for an x of any rank >= 1 (leading dims
    are collapsed into M for the call and expanded back). Returns a tensor [..., N]."""
    from torch_mlir.dialects import func as func_d
    from torch_mlir.dialects import tensor as tensor_d

    xt = ir.RankedTensorType(x.type)
    shape = list(xt.shape)
    k = shape[-1]
    m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    x2 = x
    if len(shape) != 2:
        flat = ir.RankedTensorType.get([m, k], xt.element_type)
        if len(shape) == 1:
            x2 = tensor_d.ExpandShapeOp(flat, x, _expand_1d(), [], ir.DenseI64ArrayAttr.get([1, k])).result
        else:
            x2 = tensor_d.CollapseShapeOp(flat, x, _collapse_reassociation(len(shape))).result
    sym = ir.StringAttr(func.attributes["sym_name"]).value
    y2_type = ir.RankedTensorType.get([m, n], y_elem)
    call = func_d.CallOp([y2_type], ir.FlatSymbolRefAttr.get(sym), [x2])
    call.operation.attributes["no_inline"] = ir.UnitAttr.get()
    y2 = call.result
    if len(shape) == 2:
        return y2
    y_type = ir.RankedTensorType.get(shape[:-1] + [n], y_elem)
    if len(shape) == 1:
        return tensor_d.CollapseShapeOp(y_type, y2, _expand_1d()).result
    return tensor_d.ExpandShapeOp(y_type, y2, _collapse_reassociation(len(shape)), [],
                                  ir.DenseI64ArrayAttr.get(shape[:-1] + [n])).result


def _expand_1d() -> ir.ArrayAttr:
    i64 = ir.IntegerType.get_signless(64)
    return ir.ArrayAttr.get([ir.ArrayAttr.get([ir.IntegerAttr.get(i64, 0), ir.IntegerAttr.get(i64, 1)])])


# ----------------------------------------------------------------------------- bound weights
#
# A *bound* qlinear function takes its weight as runtime buffers instead of constants
# (`lowbit.compiler.bind`: weights are data, not code). In destination-passing style, so that
# the token count M may be dynamic:
#
#   func.func private @lowbit_qlinear_<i>(%x: tensor<MxKxT>, [%r: tensor<MxNxU>,]
#                                         %w: tensor<BYTESxi8>, [%b: tensor<Nxf32>,]
#                                         %out: tensor<MxNxU>) -> tensor<MxNxU>
#       attributes {lowbit.qlinear = <spec>, lowbit.bound = {bytes, kblock, kblock_bytes,
#                   nblock_bytes, num_kblocks, bias}}
#
# `%w` holds the kernels' packed layout (codes, scales and offsets inside the blocks), which
# linalg cannot read, so until `lowbit-lower-qlinear` replaces it the body only poisons the
# output with NaN (computed from a read of every input, see below); that pass fails loudly
# (the op then runs in eager) rather than leave it.

BOUND_ATTR = "lowbit.bound"


def is_bound(func: ir.Operation) -> bool:
    return BOUND_ATTR in func.attributes


def bound_info(func: ir.Operation) -> dict:
    out = {}
    for named in ir.DictAttr(func.attributes[BOUND_ATTR]):
        out[named.name] = ir.IntegerAttr(named.attr).value
    return out


def _dim(d: int) -> str:
    return "?" if ir.ShapedType.is_dynamic_size(d) else str(d)


def build_bound_qlinear_function(module: ir.Operation, spec: LowBitSpec, bound: dict, m: int,
                                 x_elem: str, y_elem: str, origin: str,
                                 epilogue: Optional[Epilogue] = None) -> ir.Operation:
    """Create the bound form of a qlinear function (see above); `m` may be dynamic."""
    n, k = spec.out_features, spec.in_features
    ms = _dim(m)
    name = unique_symbol(module, FUNC_PREFIX)
    yt = f"tensor<{ms}x{n}x{y_elem}>"
    args = [f"%x: tensor<{ms}x{k}x{x_elem}>"]
    if epilogue and epilogue.residual:
        args.append(f"%resid: {yt}")
    args.append(f"%w: tensor<{bound['bytes']}xi8>")
    if bound["bias"]:
        args.append(f"%b: tensor<{n}xf32>")
    args.append(f"%out: {yt}")
    # The placeholder body must *read* every input: bufferization decides from the callee's
    # body which arguments a call reads, and would otherwise reuse x's buffer (shared by
    # q/k/v) for other values while the kernels still need it.
    nan = "0x7FC00000"
    lines = ["  %c0 = arith.constant 0 : index", f"  %nan = arith.constant {nan} : f32",
             "  %zero = arith.constant 0.0 : f32",
             f"  %xe = tensor.extract %x[%c0, %c0] : tensor<{ms}x{k}x{x_elem}>"]
    reads = ["%xe" if x_elem == "f32" else "%xf"]
    if x_elem != "f32":
        lines.append(f"  %xf = arith.extf %xe : {x_elem} to f32")
    lines += [f"  %we = tensor.extract %w[%c0] : tensor<{bound['bytes']}xi8>", "  %wf = arith.sitofp %we : i8 to f32"]
    reads.append("%wf")
    if bound["bias"]:
        lines.append(f"  %be = tensor.extract %b[%c0] : tensor<{n}xf32>")
        reads.append("%be")
    if epilogue and epilogue.residual:
        lines.append(f"  %re = tensor.extract %resid[%c0, %c0] : {yt}")
        if y_elem != "f32":
            lines.append(f"  %rf = arith.extf %re : {y_elem} to f32")
        reads.append("%re" if y_elem == "f32" else "%rf")
    acc = "%nan"
    for i, r in enumerate(reads):
        lines += [f"  %z{i} = arith.mulf {r}, %zero : f32", f"  %p{i} = arith.addf {acc}, %z{i} : f32"]
        acc = f"%p{i}"
    if y_elem != "f32":
        lines.append(f"  %poison = arith.truncf {acc} : f32 to {y_elem}")
        acc = "%poison"
    text = (f"func.func private @{name}({', '.join(args)}) -> {yt} {{\n" + "\n".join(lines) + "\n"
            f"  %y = linalg.fill ins({acc} : {y_elem}) outs(%out : {yt}) -> {yt}\n"
            f"  return %y : {yt}\n}}\n")
    parsed = ir.Module.parse(text)
    func = parsed.body.operations[0].operation
    func.attributes[QLINEAR_ATTR] = spec_to_attr(spec, origin, epilogue)
    func.attributes["no_inline"] = ir.UnitAttr.get()
    i64 = ir.IntegerType.get_signless(64)
    func.attributes[BOUND_ATTR] = ir.DictAttr.get({key: ir.IntegerAttr.get(i64, int(v)) for key, v in bound.items()})
    func.detach_from_parent()
    _module_body(module).append(func)
    return func


def bound_weight_operands(call: ir.Operation, func: ir.Operation) -> list[ir.Value]:
    """The packed weight (and bias) operands of a call of a bound qlinear function."""
    ops = list(call.operands)
    residual = 1 if epilogue_from_attr(func.attributes[QLINEAR_ATTR]).residual else 0
    count = 1 + bound_info(func)["bias"]
    return ops[1 + residual:1 + residual + count]


def _dims_of(x: ir.Value) -> list:
    """Sizes of x: ints for static dims, `tensor.dim` values for dynamic ones."""
    from torch_mlir.dialects import arith as arith_d
    from torch_mlir.dialects import tensor as tensor_d

    xt = ir.RankedTensorType(x.type)
    out = []
    for i, d in enumerate(xt.shape):
        if ir.ShapedType.is_dynamic_size(d):
            idx = arith_d.ConstantOp(ir.IndexType.get(), i).result
            out.append(tensor_d.DimOp(x, idx).result)
        else:
            out.append(d)
    return out


def _flat_rows(dims: list) -> int:
    if any(not isinstance(d, int) for d in dims):
        return ir.ShapedType.get_dynamic_size()
    return int(np.prod(dims)) if dims else 1


def emit_bound_qlinear_call(x: ir.Value, func: ir.Operation, n: int, y_elem: ir.Type,
                            weights: list[ir.Value], residual: Optional[ir.Value] = None) -> ir.Value:
    """At the current insertion point: `func(x, [r], weights..., empty)` for an x of any rank
    >= 1 with static or dynamic leading dims, reshaped to [M, K] and back. Returns [..., N]."""
    from torch_mlir.dialects import arith as arith_d
    from torch_mlir.dialects import func as func_d
    from torch_mlir.dialects import tensor as tensor_d

    xt = ir.RankedTensorType(x.type)
    shape = list(xt.shape)
    k = shape[-1]
    lead = _dims_of(x)[:-1]
    m = _flat_rows(lead)
    flat = ir.RankedTensorType.get([m, k], xt.element_type)
    y2_type = ir.RankedTensorType.get([m, n], y_elem)

    def to_2d(v: ir.Value, last: int, elem: ir.Type) -> ir.Value:
        vt = ir.RankedTensorType(v.type)
        if len(vt.shape) == 2:
            return v
        t2 = ir.RankedTensorType.get([m, last], elem)
        if len(vt.shape) == 1:
            return tensor_d.ExpandShapeOp(t2, v, _expand_1d(), [], ir.DenseI64ArrayAttr.get([1, last])).result
        return tensor_d.CollapseShapeOp(t2, v, _collapse_reassociation(len(vt.shape))).result

    x2 = to_2d(x, k, xt.element_type)
    operands = [x2]
    if residual is not None:
        operands.append(to_2d(residual, n, y_elem))
    operands += list(weights)
    dyn = []
    if ir.ShapedType.is_dynamic_size(m):
        dyn = [tensor_d.DimOp(x2, arith_d.ConstantOp(ir.IndexType.get(), 0).result).result]
    # A fresh buffer per call: `bufferization.alloc_tensor`, not `tensor.empty`, which CSE
    # merges across calls of the same shape -- the callee overwrites its destination without
    # reading it, so bufferization would let two calls (k and v) share one output buffer.
    operands.append(ir.Operation.create(
        "bufferization.alloc_tensor", results=[y2_type], operands=dyn,
        attributes={"operandSegmentSizes": ir.DenseI32ArrayAttr.get([len(dyn), 0, 0])}).result)
    sym = ir.StringAttr(func.attributes["sym_name"]).value
    call = func_d.CallOp([y2_type], ir.FlatSymbolRefAttr.get(sym), operands)
    call.operation.attributes["no_inline"] = ir.UnitAttr.get()
    y2 = call.result
    if len(shape) == 2:
        return y2
    y_type = ir.RankedTensorType.get(shape[:-1] + [n], y_elem)
    if len(shape) == 1:
        return tensor_d.CollapseShapeOp(y_type, y2, _expand_1d()).result
    dynamic = [d for d in lead if not isinstance(d, int)]
    static = [d if isinstance(d, int) else ir.ShapedType.get_dynamic_size() for d in lead] + [n]
    return tensor_d.ExpandShapeOp(y_type, y2, _collapse_reassociation(len(shape)), dynamic,
                                  ir.DenseI64ArrayAttr.get(static)).result
