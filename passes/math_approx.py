"""`lowbit-math-approx`: replace `math.exp`, `math.log`, `math.tanh` and `math.erf` with
polynomial evaluations in `arith`/`math.fma`, so that vectorized code never calls scalar libm
(LLVM scalarizes a vector `llvm.exp` into one `expf` call per lane).

Works on scalars (inside `linalg.generic` bodies, before vectorization) and on vectors.
f32 is computed directly; bf16 and f16 are extended to f32, evaluated and truncated once,
as PyTorch computes these functions. Accuracy (checked against fp64 in the tests):

  exp   Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2; degree-7 Taylor polynomial
        (truncation < 1e-8 relative); 2^k applied in two halves so that results down to
        the subnormal range and up to FLT_MAX are exact powers of two. Overflow -> +inf,
        x < -103.98 -> 0, NaN -> NaN.
  log   x = 2^e m, m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m-1)/(m+1),
        odd series to s^13 (|s| <= 0.172). Subnormals are rescaled; log 0 = -inf,
        log x<0 = NaN, log inf = inf.
  tanh  odd Taylor polynomial to x^15 for |x| < 0.55 (relative error < 5e-8), otherwise
        (1 - t)/(1 + t) with t = exp(-2|x|), sign restored.
  erf   Taylor series to x^19 for |x| < 0.8 (< 2e-10), otherwise 1 - erfc(|x|) with the
        Chebyshev-fitted erfc of Numerical Recipes (relative error < 1.2e-7), sign restored.
"""
from __future__ import annotations

import dataclasses
import math

from torch_mlir import ir
from torch_mlir.dialects import arith
from torch_mlir.dialects import math as math_d

from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import walk

_LN2_HI = 0.693145751953125        # ln 2 with the low 12 mantissa bits zero (exact k * ln2_hi)
_LN2_LO = 1.428606765330187e-06    # ln 2 - _LN2_HI
_TANH_TAYLOR = [1.0, -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075,
                -929569 / 638512875]
_ERF_TAYLOR = [(-1) ** n * 2 / math.sqrt(math.pi) / (math.factorial(n) * (2 * n + 1)) for n in range(10)]
# Numerical Recipes `erfcc`: erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2).
_ERFC_NR = [-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
            -1.13520398, 1.48851587, -0.82215223, 0.17087277]


class _Builder:
    """Emits f32 (scalar or vector) arithmetic at the current insertion point."""

    def __init__(self, ftype: ir.Type):
        self.ftype = ftype
        shape = ftype.shape if isinstance(ftype, ir.VectorType) else None
        i32 = ir.IntegerType.get_signless(32)
        self.itype = ir.VectorType.get(shape, i32) if shape is not None else i32
        self.btype = ir.VectorType.get(shape, ir.IntegerType.get_signless(1)) if shape is not None \
            else ir.IntegerType.get_signless(1)

    def _const(self, t: ir.Type, attr: ir.Attribute) -> ir.Value:
        if isinstance(t, ir.VectorType):
            attr = ir.DenseElementsAttr.get_splat(t, attr)
        return arith.ConstantOp(t, attr).result

    def f(self, v: float) -> ir.Value:
        return self._const(self.ftype, ir.FloatAttr.get(ir.F32Type.get(), v))

    def i(self, v: int) -> ir.Value:
        return self._const(self.itype, ir.IntegerAttr.get(ir.IntegerType.get_signless(32), v))

    def add(self, a, b): return arith.AddFOp(a, b).result
    def sub(self, a, b): return arith.SubFOp(a, b).result
    def mul(self, a, b): return arith.MulFOp(a, b).result
    def div(self, a, b): return arith.DivFOp(a, b).result
    def fma(self, a, b, c): return math_d.FmaOp(a, b, c).result
    def abs(self, a): return math_d.AbsFOp(a).result
    def max(self, a, b): return arith.MaxNumFOp(a, b).result
    def min(self, a, b): return arith.MinNumFOp(a, b).result
    def select(self, c, a, b): return arith.SelectOp(c, a, b).result
    def copysign(self, a, b): return math_d.CopySignOp(a, b).result

    def cmp(self, pred: str, a, b) -> ir.Value:
        return arith.CmpFOp(getattr(arith.CmpFPredicate, pred), a, b).result

    def horner(self, x, coeffs: list[float]) -> ir.Value:
        """coeffs[0] + coeffs[1] x + ... evaluated with fused multiply-adds."""
        acc = self.f(coeffs[-1])
        for c in reversed(coeffs[:-1]):
            acc = self.fma(acc, x, self.f(c))
        return acc

    def pow2(self, k_int) -> ir.Value:
        """2^k for integer k in [-126, 127], built in the exponent field."""
        biased = arith.AddIOp(k_int, self.i(127)).result
        return arith.BitcastOp(self.ftype, arith.ShLIOp(biased, self.i(23)).result).result

    # -- functions ------------------------------------------------------------------------

    def exp(self, x) -> ir.Value:
        xc = self.min(self.max(x, self.f(-103.97)), self.f(88.72283935546875))
        k = math_d.RoundEvenOp(self.mul(xc, self.f(1.4426950408889634))).result
        r = self.fma(k, self.f(-_LN2_HI), xc)
        r = self.fma(k, self.f(-_LN2_LO), r)
        p = self.horner(r, [1.0 / math.factorial(n) for n in range(8)])
        ki = arith.FPToSIOp(self.itype, k).result
        k1 = arith.ShRSIOp(ki, self.i(1)).result
        k2 = arith.SubIOp(ki, k1).result
        y = self.mul(self.mul(p, self.pow2(k1)), self.pow2(k2))
        y = self.select(self.cmp("OGT", x, self.f(88.72283935546875)), self.f(math.inf), y)
        y = self.select(self.cmp("OLT", x, self.f(-103.97)), self.f(0.0), y)
        return self.select(self.cmp("UNO", x, x), x, y)

    def log(self, x) -> ir.Value:
        tiny = self.cmp("OLT", x, self.f(1.1754943508222875e-38))
        xs = self.select(tiny, self.mul(x, self.f(8388608.0)), x)  # 2^23: subnormals -> normal
        bits = arith.BitcastOp(self.itype, xs).result
        e = arith.SubIOp(arith.ShRUIOp(bits, self.i(23)).result, self.i(127)).result
        mbits = arith.OrIOp(arith.AndIOp(bits, self.i(0x7FFFFF)).result, self.i(0x3F800000)).result
        m = arith.BitcastOp(self.ftype, mbits).result
        big = self.cmp("OGT", m, self.f(math.sqrt(2.0)))
        m = self.select(big, self.mul(m, self.f(0.5)), m)
        ef = arith.SIToFPOp(self.ftype, e).result
        ef = self.select(big, self.add(ef, self.f(1.0)), ef)
        ef = self.select(tiny, self.sub(ef, self.f(23.0)), ef)
        s = self.div(self.sub(m, self.f(1.0)), self.add(m, self.f(1.0)))
        s2 = self.mul(s, s)
        series = self.horner(s2, [2.0 / (2 * n + 1) for n in range(7)])
        y = self.fma(ef, self.f(_LN2_HI), self.fma(ef, self.f(_LN2_LO), self.mul(s, series)))
        y = self.select(self.cmp("OEQ", x, self.f(math.inf)), x, y)
        y = self.select(self.cmp("OEQ", x, self.f(0.0)), self.f(-math.inf), y)
        return self.select(self.cmp("ULT", x, self.f(0.0)), self.f(math.nan), y)

    def tanh(self, x) -> ir.Value:
        ax = self.abs(x)
        small = self.mul(x, self.horner(self.mul(x, x), _TANH_TAYLOR))
        t = self.exp(self.mul(ax, self.f(-2.0)))
        large = self.copysign(self.div(self.sub(self.f(1.0), t), self.add(self.f(1.0), t)), x)
        return self.select(self.cmp("OLT", ax, self.f(0.55)), small, large)

    def erf(self, x) -> ir.Value:
        ax = self.abs(x)
        small = self.mul(x, self.horner(self.mul(x, x), _ERF_TAYLOR))
        t = self.div(self.f(1.0), self.fma(ax, self.f(0.5), self.f(1.0)))
        arg = self.sub(self.horner(t, _ERFC_NR), self.mul(ax, ax))
        erfc = self.mul(t, self.exp(arg))
        large = self.copysign(self.sub(self.f(1.0), erfc), x)
        return self.select(self.cmp("OLT", ax, self.f(0.8)), small, large)


_FUNCTIONS = {"math.exp": "exp", "math.log": "log", "math.tanh": "tanh", "math.erf": "erf"}


def _f32_like(t: ir.Type) -> ir.Type | None:
    """The f32 type of the same shape if `t` is a float type we approximate, else None."""
    elem = t.element_type if isinstance(t, ir.VectorType) else t
    if not isinstance(elem, (ir.F32Type, ir.BF16Type, ir.F16Type)):
        return None
    f32 = ir.F32Type.get()
    return ir.VectorType.get(t.shape, f32) if isinstance(t, ir.VectorType) else f32


def _constant_int(value: ir.Value) -> int | None:
    owner = value.owner
    if isinstance(owner, ir.Block) or owner.operation.name != "arith.constant":
        return None
    attr = owner.operation.attributes["value"]
    if isinstance(attr, ir.DenseIntElementsAttr) and attr.is_splat:
        attr = attr.get_splat_value()
    return int(attr.value) if isinstance(attr, ir.IntegerAttr) else None


def _expand_constant_fpowi(op: ir.Operation) -> None:
    """x ** n for a constant integer n (|n| <= 64) by repeated squaring; 1/x^|n| if n < 0.

    `math.fpowi` with an i64 exponent cannot be vectorized into `llvm.intr.powi` (which
    takes a scalar i32), and x**2 / x**3 are what RMSNorm and GELU-tanh use.
    """
    n = _constant_int(op.operands[1])
    if n is None or abs(n) > 64:
        return
    t = op.results[0].type
    with ir.InsertionPoint(op), op.location:
        one = arith.ConstantOp(t, ir.FloatAttr.get(t, 1.0)).result if not isinstance(t, ir.VectorType) \
            else arith.ConstantOp(t, ir.DenseElementsAttr.get_splat(t, ir.FloatAttr.get(t.element_type, 1.0))).result
        result, base, k = None, op.operands[0], abs(n)
        while k:
            if k & 1:
                result = base if result is None else arith.MulFOp(result, base).result
            k >>= 1
            if k:
                base = arith.MulFOp(base, base).result
        result = one if result is None else result
        if n < 0:
            result = arith.DivFOp(one, result).result
    op.results[0].replace_all_uses_with(result)
    op.erase()


@register_pass
@dataclasses.dataclass
class MathApprox(ModulePass):
    """Expand math.exp/log/tanh/erf (f32, bf16, f16; scalar or vector) into polynomials.

    Also expands `math.fpowi` with a constant exponent into multiplications.

    Option `functions`: comma-separated subset of exp,log,tanh,erf to expand.
    """

    NAME = "lowbit-math-approx"
    functions: list[str] = dataclasses.field(default_factory=lambda: ["exp", "log", "tanh", "erf"])

    def run(self, module: ir.Operation) -> None:
        unknown = set(self.functions) - set(_FUNCTIONS.values())
        if unknown:
            from lowbit.passes.registry import PassError
            raise PassError(f"{self.NAME}: unknown functions {sorted(unknown)} (known: exp, log, tanh, erf)")
        targets = [op for op in walk(module)
                   if _FUNCTIONS.get(op.name) in self.functions and _f32_like(op.results[0].type) is not None]
        for op in targets:
            self._expand(op)
        for op in [op for op in walk(module) if op.name == "math.fpowi"]:
            _expand_constant_fpowi(op)

    @staticmethod
    def _expand(op: ir.Operation) -> None:
        result_type = op.results[0].type
        f32 = _f32_like(result_type)
        with ir.InsertionPoint(op), op.location:
            x = op.operands[0]
            if result_type != f32:
                x = arith.ExtFOp(f32, x).result
            y = getattr(_Builder(f32), _FUNCTIONS[op.name])(x)
            if result_type != f32:
                y = arith.TruncFOp(result_type, y).result
        op.results[0].replace_all_uses_with(y)
        op.erase()
