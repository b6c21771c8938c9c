"""A small numpy interpreter for linalg-on-tensors IR: evaluates SSA values bit-exactly.

Recognition passes use it to fold the constant subgraph that computes a matmul's weight
(unpacking by shifts and masks, zero-point subtraction, casts, scale multiplies, reshapes,
transposes) and to check what a subgraph computes by running it on probe inputs.

Coverage (anything else raises `Unsupported` naming the op, so callers leave the IR alone):

* `arith`: constants, integer and float arithmetic, bitwise ops and shifts, comparisons,
  `select`, every cast; `math`: `absf`, `absi`, `sqrt`, rounding (`round`, `roundeven`,
  `floor`, `ceil`, `trunc`), `copysign`. Transcendental functions are left out on purpose:
  numpy's libm may round differently from the compiled code's, and a folded weight must
  equal what the program computes at run time.
* `linalg.generic` (any affine indexing maps, `linalg.index`, `tensor.extract` in the
  body, parallel and reduction loops; reductions run in loop order, so float sums round
  as the compiled loops do), `linalg.fill`, `linalg.copy`, `linalg.transpose`,
  `linalg.broadcast`, `linalg.map`.
* `tensor`: `empty`, `expand_shape`, `collapse_shape`, `reshape`, `cast`, `concat`,
  `extract_slice`, `insert_slice`, `extract`, `pad` (constant padding), `splat`;
  `cf.assert` inside bodies (a failing assertion is reported, not folded).

Values are numpy arrays. Integers of width 8/16/32/64 are stored two's complement in the
signed numpy type of that width (unsigned ops reinterpret), `i1` as bool, `index` as int64;
bf16 is stored in float32 and rounded to bf16 (nearest even) after every bf16 result.
Reading an uninitialised `tensor.empty` is an error, poison-producing cases (shift by
>= width, division by zero, out-of-range float-to-int) are `Unsupported`.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import numpy as np
from torch_mlir import ir


class InterpError(Exception):
    """The value cannot be evaluated; `reason` says why and `op` names the culprit."""

    def __init__(self, reason: str, op: Optional[ir.Operation] = None):
        self.reason = reason
        self.op_name = op.name if op is not None else ""
        super().__init__(f"{self.op_name}: {reason}" if self.op_name else reason)


class NotConstant(InterpError):
    """The value depends on a value that is neither constant nor given in the environment."""


class Unsupported(InterpError):
    """An op (or a case of an op) the interpreter does not evaluate."""


DEFAULT_MAX_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------- types

def element_type(t: ir.Type) -> ir.Type:
    return ir.ShapedType(t).element_type if isinstance(t, ir.ShapedType) else t


def is_float_type(t: ir.Type) -> bool:
    t = element_type(t)
    return isinstance(t, (ir.F32Type, ir.F64Type, ir.F16Type, ir.BF16Type))


def is_bf16(t: ir.Type) -> bool:
    return isinstance(element_type(t), ir.BF16Type)


def int_width(t: ir.Type) -> int:
    t = element_type(t)
    if isinstance(t, ir.IndexType):
        return 64
    if isinstance(t, ir.IntegerType):
        return ir.IntegerType(t).width
    raise Unsupported(f"not an integer type: {t}")


_SIGNED = {1: np.bool_, 8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64}
_UNSIGNED = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def np_dtype(t: ir.Type) -> np.dtype:
    """The numpy storage type of an MLIR element type."""
    t = element_type(t)
    if isinstance(t, ir.F32Type) or isinstance(t, ir.BF16Type):
        return np.dtype(np.float32)
    if isinstance(t, ir.F64Type):
        return np.dtype(np.float64)
    if isinstance(t, ir.F16Type):
        return np.dtype(np.float16)
    if isinstance(t, ir.IndexType) or isinstance(t, ir.IntegerType):
        w = int_width(t)
        if w not in _SIGNED:
            raise Unsupported(f"integer width {w} is not supported")
        return np.dtype(_SIGNED[w])
    raise Unsupported(f"element type {t} is not supported")


def static_shape(t: ir.Type) -> tuple[int, ...]:
    if not isinstance(t, ir.ShapedType):
        return ()
    st = ir.ShapedType(t)
    if not st.has_static_shape:
        raise Unsupported(f"dynamic shape {t}")
    return tuple(st.shape)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bfloat16, kept in float32 (NaN stays NaN)."""
    a = np.asarray(a, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = rounded.view(np.float32)
    return np.where(np.isnan(a), a, out).astype(np.float32)


def _unsigned(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    return a.view(_UNSIGNED[a.dtype.itemsize * 8])


def _to_type(a, t: ir.Type) -> np.ndarray:
    """Store a computed array in `t`'s representation (wrapping integers, rounding bf16)."""
    dt = np_dtype(t)
    a = np.asarray(a)
    if a.dtype != dt:
        a = a.astype(dt)
    if is_bf16(t):
        a = round_bf16(a)
    return a


# ----------------------------------------------------------------------------- attributes

def dense_to_numpy(attr: ir.Attribute, t: ir.Type) -> np.ndarray:
    """A `DenseElementsAttr` as a numpy array in the interpreter's representation."""
    if not isinstance(attr, ir.DenseElementsAttr):
        raise Unsupported(f"constant attribute kind {str(attr)[:40]}... (e.g. dense_resource) is not readable")
    shape = static_shape(t)
    if is_bf16(t):
        return _bf16_dense(str(attr), shape)
    arr = np.array(ir.DenseElementsAttr(attr))
    if arr.dtype.kind == "u":
        arr = arr.view(_SIGNED[arr.dtype.itemsize * 8])
    return _to_type(arr.reshape(shape), t)


def _bf16_dense(text: str, shape: tuple[int, ...]) -> np.ndarray:
    m = re.match(r'dense<"0x([0-9A-Fa-f]*)">', text)
    if m:
        raw = np.frombuffer(bytes.fromhex(m.group(1)), dtype="<u2").astype(np.uint32) << 16
        vals = raw.view(np.float32)
        if vals.size == 1:
            return np.full(shape, vals[0], dtype=np.float32)
        return vals.reshape(shape).copy()
    body = text[len("dense<"): text.rindex(">")].rsplit(">", 0)[0]
    body = body[: body.rindex(":")].strip().rstrip(">") if ":" in body else body
    nums = [float(x) for x in re.findall(r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf|nan|0x[0-9A-Fa-f]+)", body)]
    vals = np.array(nums, dtype=np.float32)
    if vals.size == 1:
        return np.full(shape, vals[0], dtype=np.float32)
    return round_bf16(vals.reshape(shape))


def _scalar_attr(attr: ir.Attribute, t: ir.Type) -> np.ndarray:
    if isinstance(attr, ir.FloatAttr):
        return _to_type(np.array(ir.FloatAttr(attr).value, dtype=np.float64), t)
    if isinstance(attr, ir.IntegerAttr):
        v = ir.IntegerAttr(attr).value
        w = int_width(t)
        if w == 1:
            return np.array(bool(v & 1))
        v &= (1 << w) - 1
        if v >= 1 << (w - 1):
            v -= 1 << w
        return np.array(v, dtype=np_dtype(t))
    if isinstance(attr, ir.BoolAttr):
        return np.array(ir.BoolAttr(attr).value)
    raise Unsupported(f"constant attribute {attr}")


def _int_array_attr(op: ir.Operation, name: str) -> list[int]:
    attr = op.attributes[name]
    if isinstance(attr, ir.DenseI64ArrayAttr):
        return list(ir.DenseI64ArrayAttr(attr))
    return [ir.IntegerAttr(a).value for a in ir.ArrayAttr(attr)]


def affine_maps(op: ir.Operation) -> list[ir.AffineMap]:
    return [ir.AffineMapAttr(a).value for a in ir.ArrayAttr(op.attributes["indexing_maps"])]


def iterator_kinds(op: ir.Operation) -> list[str]:
    out = []
    for a in ir.ArrayAttr(op.attributes["iterator_types"]):
        s = str(a)
        out.append("reduction" if "reduction" in s else "parallel")
    return out


def eval_affine(expr: ir.AffineExpr, dims: list) -> object:
    """Evaluate an affine expression over index arrays (or ints) for each dim."""
    e = expr.maybe_downcast() if hasattr(expr, "maybe_downcast") else expr
    if isinstance(e, ir.AffineDimExpr):
        return dims[e.position]
    if isinstance(e, ir.AffineConstantExpr):
        return e.value
    if isinstance(e, ir.AffineSymbolExpr):
        raise Unsupported("affine symbols in indexing maps")
    lhs, rhs = eval_affine(e.lhs, dims), eval_affine(e.rhs, dims)
    if isinstance(e, ir.AffineAddExpr):
        return lhs + rhs
    if isinstance(e, ir.AffineMulExpr):
        return lhs * rhs
    if isinstance(e, ir.AffineModExpr):
        return np.mod(lhs, rhs)
    if isinstance(e, ir.AffineFloorDivExpr):
        return np.floor_divide(lhs, rhs)
    if isinstance(e, ir.AffineCeilDivExpr):
        return -np.floor_divide(-np.asarray(lhs), rhs)
    raise Unsupported(f"affine expression {e}")


def dim_position(expr: ir.AffineExpr) -> Optional[int]:
    e = expr.maybe_downcast() if hasattr(expr, "maybe_downcast") else expr
    return e.position if isinstance(e, ir.AffineDimExpr) else None


# ----------------------------------------------------------------------------- scalar ops

def _check_shift(b: np.ndarray, width: int, op: ir.Operation) -> np.ndarray:
    b = np.asarray(b)
    ub = _unsigned(b)
    if ub.size and int(ub.max()) >= width:
        raise Unsupported(f"shift amount >= bit width {width} (poison)", op)
    return ub


def _trunc_div(a: np.ndarray, b: np.ndarray, op: ir.Operation) -> np.ndarray:
    if np.any(np.asarray(b) == 0):
        raise Unsupported("integer division by zero", op)
    a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
    info = np.iinfo(a.dtype)
    if np.any((a == info.min) & (b == -1)):
        raise Unsupported("signed division overflow", op)
    q = np.floor_divide(a, b)
    fix = (np.mod(a, b) != 0) & ((a < 0) != (b < 0))
    return (q + fix.astype(q.dtype)).astype(a.dtype)


def _float_to_int(a: np.ndarray, rt: ir.Type, signed: bool, op: ir.Operation) -> np.ndarray:
    w = int_width(rt)
    a = np.asarray(a, dtype=np.float64)
    t = np.trunc(a)
    lo, hi = (-(2 ** (w - 1)), 2 ** (w - 1) - 1) if signed else (0, 2 ** w - 1)
    if np.any(~np.isfinite(a)) or np.any(t < lo) or np.any(t > hi):
        raise Unsupported("float-to-int conversion out of range (poison)", op)
    if signed:
        return t.astype(_SIGNED[w])
    return t.astype(np.uint64).astype(_UNSIGNED.get(w, np.uint64)).view(_SIGNED[w]) if w > 1 else t.astype(bool)


def _cmpf(pred: int, a, b) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    unordered = np.isnan(a) | np.isnan(b)
    rel = [None, a == b, a > b, a >= b, a < b, a <= b, a != b]
    if pred == 0:
        return np.zeros(np.broadcast(a, b).shape, bool)
    if 1 <= pred <= 6:
        return rel[pred] & ~unordered
    if pred == 7:
        return ~unordered
    if 8 <= pred <= 13:
        return rel[pred - 7] | unordered
    if pred == 14:
        return unordered
    return np.ones(np.broadcast(a, b).shape, bool)


def _cmpi(pred: int, a, b) -> np.ndarray:
    if pred >= 6:
        a, b = _unsigned(a), _unsigned(b)
    a, b = np.asarray(a), np.asarray(b)
    return [a == b, a != b, a < b, a <= b, a > b, a >= b, a < b, a <= b, a > b, a >= b][pred]


def _predicate(op: ir.Operation) -> int:
    return ir.IntegerAttr(op.attributes["predicate"]).value


def _round_half_away(a: np.ndarray) -> np.ndarray:
    a64 = np.asarray(a, dtype=np.float64)
    return np.copysign(np.floor(np.abs(a64) + 0.5), a64)


def _ext_int(a: np.ndarray, rt: ir.Type, signed: bool) -> np.ndarray:
    a = np.asarray(a)
    w = int_width(rt)
    if a.dtype == np.bool_:
        v = a.astype(np.int64)
        return (-v if signed else v).astype(_SIGNED[w])
    return (a if signed else _unsigned(a)).astype(_SIGNED[w])


_FLOAT_BINARY: dict[str, Callable] = {
    "arith.addf": np.add, "arith.subf": np.subtract, "arith.mulf": np.multiply,
    "arith.divf": np.divide, "arith.remf": np.fmod,
    "arith.maximumf": np.maximum, "arith.minimumf": np.minimum,
    "arith.maxnumf": np.fmax, "arith.minnumf": np.fmin, "math.copysign": np.copysign,
}
_INT_BINARY: dict[str, Callable] = {
    "arith.addi": np.add, "arith.subi": np.subtract, "arith.muli": np.multiply,
    "arith.andi": np.bitwise_and, "arith.ori": np.bitwise_or, "arith.xori": np.bitwise_xor,
    "arith.maxsi": np.maximum, "arith.minsi": np.minimum,
}
_FLOAT_UNARY: dict[str, Callable] = {
    "arith.negf": np.negative, "math.absf": np.abs, "math.sqrt": np.sqrt,
    "math.roundeven": np.rint, "math.floor": np.floor, "math.ceil": np.ceil,
    "math.trunc": np.trunc, "math.round": _round_half_away,
}


def eval_elementwise(op: ir.Operation, args: list[np.ndarray]) -> list[np.ndarray]:
    """Evaluate one arith/math op on (broadcastable) arrays; returns its results."""
    name = op.name
    rt = op.results[0].type if len(op.results) else None
    with np.errstate(all="ignore"):
        if name in _FLOAT_BINARY:
            return [_to_type(_FLOAT_BINARY[name](args[0], args[1]), rt)]
        if name in _FLOAT_UNARY:
            return [_to_type(_FLOAT_UNARY[name](args[0]), rt)]
        if name in _INT_BINARY:
            a, b = args
            if a.dtype == np.bool_ and name in ("arith.addi", "arith.subi"):
                return [np.logical_xor(a, b)]
            if a.dtype == np.bool_ and name == "arith.muli":
                return [np.logical_and(a, b)]
            return [_to_type(_INT_BINARY[name](a, b), rt)]
        if name in ("arith.maxui", "arith.minui"):
            f = np.maximum if name == "arith.maxui" else np.minimum
            return [_to_type(f(_unsigned(args[0]), _unsigned(args[1])).view(args[0].dtype), rt)]
        if name == "math.absi":
            return [_to_type(np.abs(args[0]), rt)]
        if name in ("arith.shli", "arith.shrui", "arith.shrsi"):
            a, b = args
            w = int_width(rt)
            ub = _check_shift(b, w, op)
            if name == "arith.shrsi":
                return [_to_type(np.right_shift(a, ub.astype(a.dtype)), rt)]
            ua = _unsigned(a)
            f = np.left_shift if name == "arith.shli" else np.right_shift
            return [_to_type(f(ua, ub.astype(ua.dtype)).view(a.dtype), rt)]
        if name in ("arith.divsi", "arith.remsi", "arith.floordivsi", "arith.ceildivsi"):
            a, b = np.asarray(args[0]), np.asarray(args[1])
            if name == "arith.divsi":
                return [_to_type(_trunc_div(a, b, op), rt)]
            if name == "arith.remsi":
                q = _trunc_div(a, b, op)
                return [_to_type(a - b * q, rt)]
            if np.any(b == 0):
                raise Unsupported("integer division by zero", op)
            if name == "arith.floordivsi":
                return [_to_type(np.floor_divide(a, b), rt)]
            q = np.floor_divide(a, b)
            return [_to_type(q + (np.mod(a, b) != 0).astype(q.dtype), rt)]
        if name in ("arith.divui", "arith.remui"):
            ua, ub = _unsigned(args[0]), _unsigned(args[1])
            if np.any(ub == 0):
                raise Unsupported("integer division by zero", op)
            r = np.floor_divide(ua, ub) if name == "arith.divui" else np.mod(ua, ub)
            return [_to_type(np.asarray(r).astype(ua.dtype).view(args[0].dtype), rt)]
        if name == "arith.cmpf":
            return [_cmpf(_predicate(op), args[0], args[1])]
        if name == "arith.cmpi":
            return [_cmpi(_predicate(op), args[0], args[1])]
        if name == "arith.select":
            return [_to_type(np.where(args[0], args[1], args[2]), rt)]
        if name == "arith.extsi":
            return [_ext_int(args[0], rt, True)]
        if name == "arith.extui":
            return [_ext_int(args[0], rt, False)]
        if name == "arith.trunci":
            a = np.asarray(args[0])
            if int_width(rt) == 1:
                return [(a & 1) != 0]
            return [a.astype(np_dtype(rt))]
        if name == "arith.sitofp":
            a = np.asarray(args[0])
            return [_to_type(-a.astype(np.int64) if a.dtype == np.bool_ else a, rt)]
        if name == "arith.uitofp":
            return [_to_type(_unsigned(args[0]), rt)]
        if name == "arith.fptosi":
            return [_float_to_int(args[0], rt, True, op)]
        if name == "arith.fptoui":
            return [_float_to_int(args[0], rt, False, op)]
        if name in ("arith.extf", "arith.truncf"):
            if "roundingmode" in op.attributes:
                raise Unsupported("truncf with an explicit rounding mode", op)
            return [_to_type(np.asarray(args[0]).astype(np.float64), rt) if name == "arith.truncf"
                    else _to_type(args[0], rt)]
        if name in ("arith.index_cast", "arith.index_castui"):
            # Sign- (or zero-) extend to 64 bits, then wrap to the result width.
            a = np.asarray(args[0])
            wide = a.astype(np.int64) if name == "arith.index_cast" else _unsigned(a).astype(np.int64)
            return [_to_type(wide, rt)]
        if name == "arith.bitcast":
            a = np.asarray(args[0])
            if is_bf16(rt) or is_bf16(op.operands[0].type):
                raise Unsupported("bitcast involving bf16", op)
            return [a.view(np_dtype(rt))]
    raise Unsupported("operation is not supported by the interpreter", op)


# ----------------------------------------------------------------------------- interpreter

def _is_uninitialized(value: ir.Value) -> bool:
    """True if `value` is a tensor.empty (possibly reshaped): its contents are undefined."""
    op = defining_op(value)
    while op is not None and op.name in ("tensor.expand_shape", "tensor.collapse_shape", "tensor.cast"):
        op = defining_op(op.operands[0])
    return op is not None and op.name == "tensor.empty"


def defining_op(value: ir.Value) -> Optional[ir.Operation]:
    """The op that defines `value`, or None for a block argument."""
    owner = value.owner
    if isinstance(owner, ir.Block):
        return None
    return owner.operation if hasattr(owner, "operation") else owner


class Interpreter:
    """Evaluates SSA values of tensor IR; `env` binds non-constant values to arrays.

    One instance memoizes every value it evaluated; create a new one per environment.
    """

    def __init__(self, env: Optional[dict] = None, max_elements: int = DEFAULT_MAX_ELEMENTS):
        self.env = dict(env or {})
        self.cache: dict = {}
        self.max_elements = max_elements
        self.visited_ops: list[ir.Operation] = []

    def value(self, v: ir.Value) -> np.ndarray:
        if v in self.env:
            return self.env[v]
        if v in self.cache:
            return self.cache[v]
        op = defining_op(v)
        if op is None:
            raise NotConstant("depends on a block argument (not a constant)")
        results = self._eval_op(op)
        for r, a in zip(op.results, results):
            self.cache[r] = a
        self.visited_ops.append(op)
        return self.cache[v]

    def _check_size(self, shape: Iterable[int], op: ir.Operation) -> None:
        n = int(np.prod(list(shape), dtype=np.int64)) if shape else 1
        if n > self.max_elements:
            raise Unsupported(f"{n} elements exceed the interpreter limit of {self.max_elements}", op)

    def _eval_op(self, op: ir.Operation) -> list[np.ndarray]:
        name = op.name
        for r in op.results:
            self._check_size(static_shape(r.type), op)
        if name == "arith.constant":
            attr, t = op.attributes["value"], op.results[0].type
            if isinstance(t, ir.ShapedType):
                return [dense_to_numpy(attr, t)]
            return [_scalar_attr(attr, t)]
        handler = _STRUCTURED.get(name)
        if handler is not None:
            return handler(self, op)
        if name.startswith("arith.") or name.startswith("math."):
            args = [self.value(o) for o in op.operands]
            return eval_elementwise(op, args)
        raise Unsupported("operation is not supported by the interpreter", op)

    # --- structured ops -------------------------------------------------------

    def _generic(self, op: ir.Operation) -> list[np.ndarray]:
        maps = affine_maps(op)
        kinds = iterator_kinds(op)
        operands = list(op.operands)
        n_out = len(op.results)
        n_in = len(operands) - n_out
        arrays = [self.value(o) for o in operands]
        ranges = [None] * len(kinds)
        for arr, m in zip(arrays, maps):
            for i, e in enumerate(m.results):
                p = dim_position(e)
                if p is not None:
                    ranges[p] = arr.shape[i]
        if any(r is None for r in ranges):
            raise Unsupported("a loop dimension is not bound by any operand shape", op)
        block = op.regions[0].blocks[0]
        for i in range(n_in, len(operands)):
            if _has_uses(block.arguments[i]) and _is_uninitialized(operands[i]):
                raise Unsupported("the body reads an uninitialized tensor.empty output", op)
        red = [d for d, k in enumerate(kinds) if k == "reduction"]
        out_maps = maps[n_in:]
        for m in out_maps:
            pos = [dim_position(e) for e in m.results]
            if None in pos or sorted(pos) != sorted(d for d, k in enumerate(kinds) if k == "parallel"):
                raise Unsupported("an output indexing map is not a permutation of the parallel loops", op)
        grid_shape = [1 if d in red else r for d, r in enumerate(ranges)]
        par_axes = [d for d in range(len(kinds)) if d not in red]

        def grids(fixed: dict[int, int]) -> list:
            g = []
            for d, r in enumerate(ranges):
                if d in fixed:
                    g.append(np.int64(fixed[d]))
                else:
                    shape = [1] * len(ranges)
                    shape[d] = r
                    g.append(np.arange(r, dtype=np.int64).reshape(shape))
            return g

        def gather(arr, m, dims):
            if not m.results:
                return arr
            idx = tuple(np.asarray(eval_affine(e, dims)) for e in m.results)
            return arr[idx]

        def to_output(res, m):
            # res has the full grid shape; drop reduction axes and order as the map says.
            res = np.broadcast_to(res, grid_shape).reshape([ranges[d] for d in par_axes])
            order = [par_axes.index(dim_position(e)) for e in m.results]
            return np.ascontiguousarray(np.transpose(res, order))

        outs = [np.array(a, copy=True) for a in arrays[n_in:]]
        if not red:
            dims = grids({})
            vals = [gather(a, m, dims) for a, m in zip(arrays, maps)]
            results = self._body(op, block, vals, dims)
            return [_to_type(to_output(r, m), res.type)
                    for r, m, res in zip(results, out_maps, op.results)]
        total = int(np.prod([ranges[d] for d in red]))
        self._check_size([total] + [ranges[d] for d in par_axes], op)
        for flat in range(total):
            fixed, rem = {}, flat
            for d in reversed(red):
                fixed[d] = rem % ranges[d]
                rem //= ranges[d]
            dims = grids(fixed)
            ins = [gather(a, m, dims) for a, m in zip(arrays[:n_in], maps[:n_in])]
            accs = [gather(o, m, dims) for o, m in zip(outs, out_maps)]
            results = self._body(op, block, ins + accs, dims)
            outs = [_to_type(to_output(r, m), res.type)
                    for r, m, res in zip(results, out_maps, op.results)]
        return outs

    def _body(self, op: ir.Operation, block: ir.Block, args: list[np.ndarray], dims: list) -> list[np.ndarray]:
        local = {}
        for a, v in zip(block.arguments, args):
            local[a] = v

        def get(v):
            if v in local:
                return local[v]
            return self.value(v)

        for inner in block.operations:
            inner = inner.operation
            name = inner.name
            if name == "linalg.yield":
                return [np.asarray(get(v)) for v in inner.operands]
            if name == "linalg.index":
                d = ir.IntegerAttr(inner.attributes["dim"]).value
                local[inner.results[0]] = dims[d]
            elif name == "tensor.extract":
                t = get(inner.operands[0])
                idx = tuple(np.asarray(get(i)) for i in list(inner.operands)[1:])
                for i, n in zip(idx, t.shape):
                    if np.any(i < 0) or np.any(i >= n):
                        raise Unsupported("tensor.extract index out of bounds", inner)
                local[inner.results[0]] = t[idx] if idx else t[()]
            elif name == "cf.assert":
                if not np.all(get(inner.operands[0])):
                    msg = ir.StringAttr(inner.attributes["msg"]).value if "msg" in inner.attributes else ""
                    raise Unsupported(f"assertion fails: {msg}", inner)
            elif name == "arith.constant":
                local[inner.results[0]] = self._eval_op(inner)[0]
            elif name.startswith("arith.") or name.startswith("math."):
                vals = eval_elementwise(inner, [get(o) for o in inner.operands])
                for r, v in zip(inner.results, vals):
                    local[r] = v
            else:
                raise Unsupported(f"op {name} in a linalg body is not supported", op)
        raise Unsupported("body has no terminator", op)

    def _fill(self, op):
        v = self.value(op.operands[0])
        t = op.results[0].type
        return [_to_type(np.full(static_shape(t), v), t)]

    def _copy(self, op):
        return [_to_type(self.value(op.operands[0]), op.results[0].type)]

    def _transpose(self, op):
        perm = _int_array_attr(op, "permutation")
        return [np.ascontiguousarray(np.transpose(self.value(op.operands[0]), perm))]

    def _broadcast(self, op):
        x = self.value(op.operands[0])
        added = _int_array_attr(op, "dimensions")
        shape = static_shape(op.results[0].type)
        for d in sorted(added):
            x = np.expand_dims(x, d)
        return [np.ascontiguousarray(np.broadcast_to(x, shape))]

    def _map(self, op):
        n_in = len(op.operands) - 1
        ins = [self.value(o) for o in list(op.operands)[:n_in]]
        block = op.regions[0].blocks[0]
        shape = static_shape(op.results[0].type)
        res = self._body(op, block, ins, [None] * len(shape))
        return [_to_type(np.broadcast_to(res[0], shape), op.results[0].type)]

    def _empty(self, op):
        t = op.results[0].type
        return [np.zeros(static_shape(t), dtype=np_dtype(t))]

    def _reshape(self, op):
        return [self.value(op.operands[0]).reshape(static_shape(op.results[0].type))]

    def _concat(self, op):
        dim = ir.IntegerAttr(op.attributes["dim"]).value
        return [np.concatenate([self.value(o) for o in op.operands], axis=dim)]

    def _slices(self, op, rank: int) -> tuple:
        offs = _int_array_attr(op, "static_offsets")
        sizes = _int_array_attr(op, "static_sizes")
        strides = _int_array_attr(op, "static_strides")
        dyn = ir.ShapedType.get_dynamic_size()
        if any(v == dyn or v < -(1 << 62) for v in offs + sizes + strides):
            raise Unsupported("dynamic offsets, sizes or strides", op)
        return tuple(slice(o, o + (s - 1) * st + 1, st) for o, s, st in zip(offs, sizes, strides)), sizes

    def _extract_slice(self, op):
        src = self.value(op.operands[0])
        sl, sizes = self._slices(op, src.ndim)
        part = src[sl]
        if list(part.shape) != list(sizes):
            raise Unsupported("slice out of bounds", op)
        return [np.ascontiguousarray(part).reshape(static_shape(op.results[0].type))]

    def _insert_slice(self, op):
        src, dest = self.value(op.operands[0]), np.array(self.value(op.operands[1]), copy=True)
        sl, sizes = self._slices(op, dest.ndim)
        if list(dest[sl].shape) != list(sizes):
            raise Unsupported("slice out of bounds", op)
        dest[sl] = src.reshape(sizes)
        return [dest]

    def _extract(self, op):
        t = self.value(op.operands[0])
        idx = tuple(int(self.value(i)) for i in list(op.operands)[1:])
        if any(i < 0 or i >= n for i, n in zip(idx, t.shape)):
            raise Unsupported("index out of bounds", op)
        return [np.asarray(t[idx])]

    def _pad(self, op):
        src = self.value(op.operands[0])
        low, high = _int_array_attr(op, "static_low"), _int_array_attr(op, "static_high")
        if len(op.operands) != 1:
            raise Unsupported("dynamic padding", op)
        block = op.regions[0].blocks[0]
        term = list(block.operations)[-1].operation
        pad_value = term.operands[0]
        if any(pad_value == a for a in block.arguments) or len(list(block.operations)) != 1:
            raise Unsupported("padding value computed in the region", op)
        v = self.value(pad_value)
        return [_to_type(np.pad(src, list(zip(low, high)), constant_values=v), op.results[0].type)]

    def _splat(self, op):
        t = op.results[0].type
        return [_to_type(np.full(static_shape(t), self.value(op.operands[0])), t)]


def _has_uses(value: ir.Value) -> bool:
    for _ in value.uses:
        return True
    return False


_STRUCTURED: dict[str, Callable] = {
    "linalg.generic": Interpreter._generic,
    "linalg.fill": Interpreter._fill,
    "linalg.copy": Interpreter._copy,
    "linalg.transpose": Interpreter._transpose,
    "linalg.broadcast": Interpreter._broadcast,
    "linalg.map": Interpreter._map,
    "tensor.empty": Interpreter._empty,
    "tensor.expand_shape": Interpreter._reshape,
    "tensor.collapse_shape": Interpreter._reshape,
    "tensor.reshape": Interpreter._reshape,
    "tensor.cast": Interpreter._reshape,
    "tensor.concat": Interpreter._concat,
    "tensor.extract_slice": Interpreter._extract_slice,
    "tensor.insert_slice": Interpreter._insert_slice,
    "tensor.extract": Interpreter._extract,
    "tensor.pad": Interpreter._pad,
    "tensor.splat": Interpreter._splat,
}


def evaluate(value: ir.Value, env: Optional[dict] = None,
             max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """Evaluate `value`; raises `NotConstant` / `Unsupported` (an `InterpError`)."""
    return Interpreter(env, max_elements).value(value)
