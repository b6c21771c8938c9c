"""lowbit-fuse-qlinear-epilogue: fold a residual add and/or an activation into the qlinear call.

Matches a call to a qlinear function (`@lowbit_qlinear_*`, one operand, no epilogue yet,
called only there) whose result -- directly, or through the `tensor.expand_shape` that
restores an activation's leading dims -- has exactly one use: an elementwise
`linalg.generic` (all loops parallel, identity indexing maps, result of the same shape and
element type, `outs` unused in the body) whose body computes, from the qlinear result `a`
and at most one other input `r` of the same shape and type, exactly one of

    act(a)            a + r    r + a    act(a) + r    r + act(a)

with act one of (recognised from what the body's arithmetic means, not from one spelling;
commutative operands in either order, `extf`/`truncf` roundings looked through, ops on
bf16 read as the same real operation)

    relu   maximumf / maxnumf (a, 0);  select(a >(=) 0, a, 0);  select(a <(=) 0, 0, a)
    silu   a * sigmoid(a);  a / (1 + exp(-a));  sigmoid(a) = 1 / (1 + exp(-a)),
           -a as negf, 0 - a or a * -1
    relu2  relu(a) * relu(a);  fpowi(relu(a), 2);  powf(relu(a), 2.0)

Produces a qlinear function with the same name whose spec attribute records the epilogue
(`epilogue = "silu"`, `"residual"`, `"relu2+residual"`, ...), whose signature gains the
residual `(x, r) -> y` when there is one, and whose reference body computes

    y = [r +] act(x W^T * scales + bias)      in fp32, rounded once to y's type

(the microkernels' epilogue order, lowbit/qgemm.h), so the module stays correct on the
generic path. The call takes the generic's place (collapsing a 3-D residual to the call's
2-D shape and expanding the result back) and the generic is erased.

Left alone: the qlinear result has other uses (e.g. merged siblings' slices, or both an
activation and something else); the other input is broadcast (non-identity map) or of
another type; anything else in the body -- notably an activation applied after a sum,
relu(a + b), which is what a K range split over two partial products looks like: the
kernels apply activations on an invoke that covers the whole K, never on a partial sum.

Runs after lowbit-merge-sibling-qlinear (q/k/v and gate/up merge first: SwiGLU's
silu(gate) * up is not an epilogue of either) and after elementwise fusion, so that the
epilogue of a layer is one generic.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch_mlir import ir
from torch_mlir.dialects import func as func_d
from torch_mlir.dialects import tensor as tensor_d

from lowbit.passes.qlinear import (
    QLINEAR_ATTR,
    Epilogue,
    build_qlinear_function,
    epilogue_from_attr,
    qlinear_calls,
    qlinear_functions,
    read_weights,
    spec_from_attr,
)
from lowbit.passes.registry import ModulePass, register_pass

A = ("a",)  # the qlinear result inside an expression


class _NoMatch(Exception):
    pass


# ----------------------------------------------------------------------------- body -> expression

_BINARY = {"arith.addf": "add", "arith.mulf": "mul", "arith.subf": "sub", "arith.divf": "div",
           "arith.maximumf": "max", "arith.maxnumf": "max", "math.powf": "pow", "math.fpowi": "pow"}
_UNARY = {"arith.negf": "neg", "math.exp": "exp"}


def _expression(value: ir.Value, args: dict, depth: int = 0):
    """The expression tree computing `value`: ("a",), ("r",), ("c", number), (op, *children)."""
    if depth > 64:
        raise _NoMatch("expression too deep")
    if isinstance(value, ir.BlockArgument):
        if value in args:
            return args[value]
        raise _NoMatch("reads the output operand")
    op = value.owner
    name = op.name
    if name == "arith.constant":
        attr = op.attributes["value"]
        if isinstance(attr, ir.FloatAttr):
            return ("c", ir.FloatAttr(attr).value)
        if isinstance(attr, ir.IntegerAttr):
            return ("c", float(ir.IntegerAttr(attr).value))
        raise _NoMatch(f"constant {attr}")
    sub = [(lambda v: _expression(v, args, depth + 1))(v) for v in op.operands]
    if name in ("arith.extf", "arith.truncf"):
        return sub[0]
    if name in _UNARY:
        return (_UNARY[name], sub[0])
    if name in _BINARY:
        return (_BINARY[name], sub[0], sub[1])
    if name == "arith.cmpf":
        pred = str(op.attributes["predicate"])
        return ("cmp", _predicate(pred), sub[0], sub[1])
    if name == "arith.select":
        return ("select", *sub)
    raise _NoMatch(f"op {name}")


# arith.cmpf predicate enum values (CmpFPredicate) -> the comparison they make on numbers.
_PRED = {1: "eq", 2: "gt", 3: "ge", 4: "lt", 5: "le", 8: "eq", 9: "gt", 10: "ge", 11: "lt", 12: "le"}


def _predicate(text: str) -> str:
    # The attribute prints as `2 : i64` (an IntegerAttr) in these bindings.
    try:
        return _PRED.get(int(text.split(":")[0].strip()), "other")
    except ValueError:
        return "other"


def _is_const(e, value: float) -> bool:
    return e[0] == "c" and e[1] == value


def _neg_of(e):
    if e[0] == "neg":
        return e[1]
    if e[0] == "sub" and _is_const(e[1], 0.0):
        return e[2]
    if e[0] == "mul":
        if _is_const(e[2], -1.0):
            return e[1]
        if _is_const(e[1], -1.0):
            return e[2]
    return None


def _one_plus_exp_neg(e):
    """x if e = 1 + exp(-x) (either order), else None."""
    if e[0] != "add":
        return None
    for p, q in ((e[1], e[2]), (e[2], e[1])):
        if _is_const(q, 1.0) and p[0] == "exp":
            return _neg_of(p[1])
    return None


def _sigmoid_of(e):
    if e[0] == "div" and _is_const(e[1], 1.0):
        return _one_plus_exp_neg(e[2])
    return None


def _relu_of(e):
    if e[0] == "max":
        for p, q in ((e[1], e[2]), (e[2], e[1])):
            if _is_const(q, 0.0):
                return p
    if e[0] == "select" and e[1][0] == "cmp":
        _, pred, lhs, rhs = e[1]
        if _is_const(lhs, 0.0):  # 0 < x  ==  x > 0
            pred, lhs, rhs = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}.get(pred, "other"), rhs, lhs
        if not _is_const(rhs, 0.0):
            return None
        t, f = e[2], e[3]
        if pred in ("gt", "ge") and t == lhs and _is_const(f, 0.0):
            return lhs
        if pred in ("lt", "le") and _is_const(t, 0.0) and f == lhs:
            return lhs
    return None


def _silu_of(e):
    if e[0] == "mul":
        for p, q in ((e[1], e[2]), (e[2], e[1])):
            if _sigmoid_of(q) is not None and _sigmoid_of(q) == p:
                return p
    if e[0] == "div":
        x = _one_plus_exp_neg(e[2])
        if x is not None and x == e[1]:
            return x
    return None


def _relu2_of(e):
    if e[0] == "mul":
        x = _relu_of(e[1])
        return x if x is not None and _relu_of(e[2]) == x else None
    if e[0] == "pow" and _is_const(e[2], 2.0):
        return _relu_of(e[1])
    return None


_ACTIVATIONS = (("relu", _relu_of), ("silu", _silu_of), ("relu2", _relu2_of))


def _activation_of(e) -> Optional[str]:
    for name, match in _ACTIVATIONS:
        if match(e) == A:
            return name
    return None


def classify(e) -> Epilogue:
    """The epilogue an expression of ("a",) and ("r",) computes, or _NoMatch."""
    act = _activation_of(e)
    if act:
        return Epilogue(act, False)
    if e[0] == "add":
        for p, q in ((e[1], e[2]), (e[2], e[1])):
            if q == ("r",):
                if p == A:
                    return Epilogue(None, True)
                act = _activation_of(p)
                if act:
                    return Epilogue(act, True)
    raise _NoMatch("the body is not [r +] act(a)")


# ----------------------------------------------------------------------------- the pass

def _identity(attr: ir.Attribute, rank: int) -> bool:
    amap = ir.AffineMapAttr(attr).value
    return amap.n_dims == rank and amap.n_symbols == 0 and str(amap) == str(ir.AffineMap.get_identity(rank))


def _single_use(value: ir.Value) -> Optional[ir.Operation]:
    uses = list(value.uses)
    return uses[0].owner if len(uses) == 1 else None


@dataclasses.dataclass
class _Match:
    call: ir.Operation
    expand: Optional[ir.Operation]
    generic: ir.Operation
    epilogue: Epilogue
    residual: Optional[ir.Value]


def _match_consumer(call: ir.Operation) -> _Match:
    value = call.results[0]
    user = _single_use(value)
    expand = None
    if user is not None and user.name == "tensor.expand_shape":
        expand = user
        value = user.results[0]
        user = _single_use(value)
    if user is None:
        raise _NoMatch("the qlinear result has several uses")
    if user.name != "linalg.generic":
        raise _NoMatch(f"the qlinear result is used by {user.name}")
    generic = user
    ty = ir.RankedTensorType(value.type)
    rank = ty.rank
    if len(generic.results) != 1 or ir.RankedTensorType(generic.results[0].type) != ty:
        raise _NoMatch("the generic's result differs in shape or type from the qlinear result")
    iterators = [str(a) for a in ir.ArrayAttr(generic.attributes["iterator_types"])]
    if any("parallel" not in it for it in iterators):
        raise _NoMatch("not an elementwise generic")
    maps = list(ir.ArrayAttr(generic.attributes["indexing_maps"]))
    n_ins = len(generic.operands) - 1
    block = generic.regions[0].blocks[0]
    args, residual = {}, None
    for i in range(n_ins):
        operand = generic.operands[i]
        barg = block.arguments[i]
        if not _identity(maps[i], rank):
            raise _NoMatch("an input is broadcast or transposed")
        if operand == value:
            args[barg] = A
        elif ir.RankedTensorType(operand.type) == ty and (residual is None or residual == operand):
            residual = operand
            args[barg] = ("r",)
        else:
            raise _NoMatch("more than one other input, or one of another shape or type")
    if not _identity(maps[n_ins], rank):
        raise _NoMatch("the output map is not the identity")
    if list(block.arguments[n_ins].uses):
        raise _NoMatch("the body reads the output operand")
    yield_op = list(block.operations)[-1]
    epilogue = classify(_expression(yield_op.operands[0], args))
    return _Match(call, expand, generic, epilogue, residual if epilogue.residual else None)


@register_pass
@dataclasses.dataclass
class FuseQLinearEpilogue(ModulePass):
    """Fold `[r +] act(qlinear(x))` (act: relu, silu, squared relu) into the qlinear call."""

    NAME = "lowbit-fuse-qlinear-epilogue"

    def run(self, module: ir.Operation) -> None:
        functions = {ir.StringAttr(f.attributes["sym_name"]).value: f for f in qlinear_functions(module)}
        if not functions:
            return
        calls = {}
        for op, callee in qlinear_calls(module, functions):
            calls.setdefault(callee, []).append(op)
        for name, sites in calls.items():
            func = functions[name]
            if len(sites) != 1 or len(sites[0].operands) != 1:
                continue
            if epilogue_from_attr(func.attributes[QLINEAR_ATTR]):
                continue
            try:
                match = _match_consumer(sites[0])
            except _NoMatch:
                continue
            self._fuse(module, func, name, match)

    def _fuse(self, module, func, name, match: _Match) -> None:
        spec, origin = spec_from_attr(func.attributes[QLINEAR_ATTR])
        weights = read_weights(func)
        call = match.call
        x = call.operands[0]
        x_type = ir.RankedTensorType(x.type)
        y_type = ir.RankedTensorType(call.results[0].type)
        m = x_type.shape[0]
        # The fused function replaces the old one under the same name (report entries and
        # the call's callee stay valid): build it, erase the old one, take its name.
        fused = build_qlinear_function(module, spec, weights, m, str(x_type.element_type),
                                       str(y_type.element_type), origin, match.epilogue)
        for attr in ("no_inline",):
            if attr in func.attributes:
                fused.attributes[attr] = func.attributes[attr]
        generic = match.generic
        with ir.InsertionPoint(generic), generic.location:
            operands = [x]
            if match.residual is not None:
                r = match.residual
                if match.expand is not None:
                    reassoc = match.expand.attributes["reassociation"]
                    r = tensor_d.CollapseShapeOp(y_type, r, reassoc).result
                operands.append(r)
            new_call = func_d.CallOp([y_type], ir.FlatSymbolRefAttr.get(name), operands)
            new_call.operation.attributes["no_inline"] = ir.UnitAttr.get()
            result = new_call.result
            if match.expand is not None:
                exp = match.expand
                result = tensor_d.ExpandShapeOp(exp.results[0].type, result, exp.attributes["reassociation"],
                                                [], exp.attributes["static_output_shape"]).result
        init = generic.operands[len(generic.operands) - 1]
        init = init.owner.operation if isinstance(init, ir.OpResult) else None
        generic.results[0].replace_all_uses_with(result)
        generic.erase()
        if init is not None and init.name == "tensor.empty" and not list(init.results[0].uses):
            init.erase()
        if match.expand is not None:
            match.expand.erase()
        call.erase()
        func.erase()
        fused.attributes["sym_name"] = ir.StringAttr.get(name)
