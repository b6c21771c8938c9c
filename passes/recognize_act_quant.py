"""lowbit-recognize-act-quant: absorb a model's own int8 activation quantization into qlinear.

Matches a qlinear call (from `lowbit-recognize-lowbit-weights`, fp activations, no bias)

    %xq = <subgraph of %x>                      e.g. BitNet a8:  s = 127 / max|x|.clamp(1e-5)
    %r  = call @lowbit_qlinear_<i>(%xq)                          xq = round(x * s).clamp(-128, 127)
    %y  = <op of %r and %x>                                      y = F.linear(xq, W) / s

and produces `%y = call @lowbit_qlinear_<j>(%x)` whose spec has `act_format = "int8"`: the
microkernel quantizes x itself and divides by the scale in its epilogue. A bias added
right after the rescale is absorbed too.

The subgraphs are not trusted by their op names. The pass evaluates them with
`lowbit.passes.interp` on probe inputs (zero rows, rows of exact .5 ties, huge and
denormal values, values under the 1e-5 floor, negative maxima, scales where
`127 / a` and `127 * (1 / a)` round differently, random rows) and requires, for every
probe, `xq` to equal the documented quantization (`lowbit.quant.quantize_activations_int8`)
and `y` to equal `r / s` bit for bit. A subgraph that computes anything else is left
alone with a report entry saying which check failed, so the compiled result is always
the model's own arithmetic.

Option `scale-ulps` (default 0) relaxes one thing only: the model's per-token scale may
differ from `127 / max` by that many ulps (PyTorch evaluates `127 / t` as
`127 * (1 / t)`); xq and the rescale must still be exactly consistent with the model's
own scale. The kernel then uses the documented scale, which can move a value that lies
within an ulp of a rounding tie by one int8 step; the report entry says so.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Optional

import numpy as np
from torch_mlir import ir

from lowbit.passes.interp import InterpError, Interpreter, defining_op, is_float_type, static_shape
from lowbit.passes.lib_recognize import bias_after, erase_dead
from lowbit.passes.qlinear import (
    QLINEAR_ATTR, QLinearWeights, add_report_entry, bound_info, bound_weight_operands,
    build_bound_qlinear_function, build_qlinear_function, emit_bound_qlinear_call, emit_qlinear_call,
    is_bound, qlinear_calls, qlinear_functions, read_weights, spec_from_attr,
)
from lowbit.passes.registry import ModulePass, register_pass
from lowbit.quant.formats import ACT_ABSMAX_EPS

_RESHAPES = ("tensor.expand_shape", "tensor.collapse_shape")


def documented_quantization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 (xq, s) of `quantize_activations_int8` for x [M, K] (per-token scale, true division)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(all="ignore"):
        amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
        s = np.float32(127.0) / np.maximum(amax, np.float32(ACT_ABSMAX_EPS))
        xq = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.float32)
    return xq, s.astype(np.float32)


def _scale_disagreements(count: int) -> np.ndarray:
    """fp32 maxima a (deterministic) for which 127/a and 127*(1/a) round differently."""
    rng = np.random.default_rng(1234)
    found = []
    while len(found) < count:
        a = (rng.random(4096) * 10.0 ** rng.integers(-3, 4, 4096)).astype(np.float32)
        a = a[a > ACT_ABSMAX_EPS]
        with np.errstate(all="ignore"):
            div = np.float32(127.0) / a
            rec = (np.float32(1.0) / a) * np.float32(127.0)
        found += list(a[div != rec][: count - len(found)])
    return np.array(found, dtype=np.float32)


def probe_rows(k: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` probe rows of width k covering the corner cases of per-token quantization."""
    hard = _scale_disagreements(8)
    kinds = []
    j = np.arange(k)
    ties = ((j % 255) - 127 + 0.5).astype(np.float32)        # x * 1 = j + 0.5 exactly
    ties[0] = 127.0
    kinds.append(ties)
    odd = (2 * ((j % 255) - 127) + 1).astype(np.float32)      # amax 254 -> x * 0.5 = .5 ties
    odd[0] = -254.0
    kinds.append(odd)
    kinds.append(np.zeros(k, np.float32))
    kinds.append((rng.standard_normal(k) * 3e37).astype(np.float32).clip(-3.4e38, 3.4e38))
    kinds.append((rng.standard_normal(k) * 1e-7).astype(np.float32))            # under the floor
    tiny = np.zeros(k, np.float32)
    tiny[k // 2] = 1e-40                                                        # denormal
    kinds.append(tiny)
    neg = rng.standard_normal(k).astype(np.float32)
    neg[k - 1] = -float(np.abs(neg).max()) * 2 - 1                              # negative maximum
    kinds.append(neg)
    for a in hard:
        row = (rng.uniform(-1, 1, k) * a).astype(np.float32)
        row[rng.integers(0, k)] = a
        kinds.append(row)
    while len(kinds) < count:
        kinds.append((rng.standard_normal(k) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32))
    return np.stack(kinds[:count]) if count <= len(kinds) else np.stack(kinds)


@dataclasses.dataclass
class _Match:
    x: ir.Value
    numerics: str


@register_pass
@dataclasses.dataclass
class RecognizeActQuant(ModulePass):
    """Absorb a verified per-token int8 activation quantization and its rescale into qlinear.

    Options: `scale-ulps` (allowed ulp distance of the model's scale from 127/max; 0 =
    exact), `search-depth` (ops walked back from the call's input looking for x),
    `seed` (probe inputs; deterministic).
    """

    NAME = "lowbit-recognize-act-quant"

    scale_ulps: int = 0
    search_depth: int = 12
    seed: int = 0

    def run(self, module: ir.Operation) -> None:
        funcs = {ir.StringAttr(f.attributes["sym_name"]).value: f for f in qlinear_functions(module)}
        for call, callee in qlinear_calls(module, funcs):
            self._absorb(module, call, funcs[callee])
        self._drop_unused(module, funcs)

    def _absorb(self, module: ir.Operation, call: ir.Operation, func: ir.Operation) -> None:
        spec, origin = spec_from_attr(func.attributes[QLINEAR_ATTR])
        if spec.act_format != "none":
            return
        a2, r = call.operands[0], call.results[0]
        if not ir.RankedTensorType(a2.type).has_static_shape:
            return  # the probes evaluate the subgraph at static shapes only
        rescale = _single_user_through_reshapes(r)
        candidates = self._candidates(a2)
        if not candidates or rescale is None:
            return
        where = dict(kind="act-quant", pass_name=self.NAME, location=str(call.location),
                     function=ir.StringAttr(func.attributes["sym_name"]).value)
        bound = is_bound(func)
        weights = None if bound else read_weights(func)
        if (bound_info(func)["bias"] if bound else weights.bias is not None):
            add_report_entry(module, **where, result="not absorbed",
                             reason="the layer adds a bias before the rescale; the kernel adds it after")
            return
        t = rescale.results[0]
        reasons: list[tuple[bool, str]] = []
        match = None
        for x in candidates:
            found = self._verify(x, a2, r, t, spec.out_features, reasons)
            if found is not None:
                match = found
                break
        if match is None:
            # The nearest candidate whose subgraph evaluated explains best why it failed.
            evaluated = [why for ok, why in reasons if ok] or [why for _, why in reasons]
            add_report_entry(module, **where, result="not absorbed", reason=evaluated[0])
            return
        x = match.x
        n = spec.out_features
        bias, bias_op = (None, None)
        y_elem = ir.ShapedType(t.type).element_type
        if str(y_elem) == "f32" and not bound:
            bias, bias_op = bias_after(t, n)
        new_spec = dataclasses.replace(spec, act_format="int8")
        x_elem = str(ir.ShapedType(x.type).element_type)
        if bound:
            # The packed bytes do not depend on the activation format: the same buffers serve.
            new_func = build_bound_qlinear_function(module, new_spec, bound_info(func), ir.RankedTensorType(
                call.operands[0].type).shape[0], x_elem, str(y_elem), origin=origin)
        else:
            x_shape = static_shape(x.type)
            m = int(np.prod(x_shape[:-1])) if len(x_shape) > 1 else 1
            new_func = build_qlinear_function(
                module, new_spec, QLinearWeights(weights.q, weights.scales, weights.zero_points, bias), m,
                x_elem, str(y_elem), origin=origin)
        replaced = bias_op if bias_op is not None else rescale
        with ir.InsertionPoint(replaced), replaced.location:
            if bound:
                y = emit_bound_qlinear_call(x, new_func, n, y_elem, bound_weight_operands(call, func))
            else:
                y = emit_qlinear_call(x, new_func, n, y_elem)
        replaced.results[0].replace_all_uses_with(y)
        erase_dead([replaced, rescale])
        if not any(True for _ in call.results[0].uses):
            producer = defining_op(call.operands[0])
            call.erase()
            erase_dead([producer] if producer is not None else [])
        add_report_entry(module, **where, result="absorbed", format=new_spec.describe(),
                         new_function=ir.StringAttr(new_func.attributes["sym_name"]).value,
                         numerics=match.numerics, bias="absorbed" if bias is not None else "none")

    def _candidates(self, a2: ir.Value) -> list[ir.Value]:
        """Float values with a2's element count and K, walking back from a2 (nearest first)."""
        want = int(np.prod(static_shape(a2.type)))
        k = static_shape(a2.type)[-1]
        out, seen = [], []
        queue = deque([(a2, 0)])
        while queue:
            v, depth = queue.popleft()
            if any(v == s for s in seen):
                continue
            seen.append(v)
            if (v != a2 and is_float_type(v.type) and isinstance(v.type, ir.RankedTensorType)
                    and ir.RankedTensorType(v.type).has_static_shape):
                shape = static_shape(v.type)
                if shape and shape[-1] == k and int(np.prod(shape)) == want:
                    out.append(v)
            op = defining_op(v)
            if op is None or depth >= self.search_depth:
                continue
            for o in op.operands:
                queue.append((o, depth + 1))
        return out

    def _verify(self, x: ir.Value, a2: ir.Value, r: ir.Value, t: ir.Value, n: int,
                reasons: list[str]) -> Optional[_Match]:
        x_shape, t_shape = static_shape(x.type), static_shape(t.type)
        if tuple(x_shape[:-1]) + (n,) != tuple(t_shape):
            reasons.append((False, f"rescaled result shape {list(t_shape)} does not match input {list(x_shape)}"))
            return None
        k = x_shape[-1]
        rows = int(np.prod(x_shape[:-1])) if len(x_shape) > 1 else 1
        rng = np.random.default_rng(self.seed)
        all_rows = probe_rows(k, max(24, rows), rng)
        n_probes = -(-len(all_rows) // rows)
        worst_ulps = 0
        for p in range(n_probes):
            idx = (np.arange(rows) + p * rows) % len(all_rows)
            xp = all_rows[idx]
            yp = (rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-2, 2)).astype(np.float32)
            yp[rng.random((rows, n)) < 0.1] = 0.0
            env = {x: xp.reshape(x_shape), r: yp.reshape(static_shape(r.type))}
            interp = Interpreter(env)
            try:
                xq = interp.value(a2).reshape(rows, k)
                got = interp.value(t).reshape(rows, n)
            except InterpError as e:
                reasons.append((False, f"cannot evaluate the activation subgraph: {e}"))
                return None
            xq_doc, s_doc = documented_quantization(xp)
            with np.errstate(all="ignore"):
                want = yp / s_doc[:, None]
            if np.array_equal(xq, xq_doc) and np.array_equal(got, want, equal_nan=True):
                continue
            if self.scale_ulps <= 0:
                reasons.append((True, self._explain(interp, xp, xq, xq_doc, got, want, s_doc, rows)))
                return None
            s_model = _model_scale(interp, xp, xq, got, yp, rows)
            if s_model is None:
                reasons.append((True, "the input is not round(x * s).clamp(-128, 127) or the result not r / s "
                                      "for any per-token scale s computed in the subgraph"))
                return None
            ulps = _ulps(s_model, s_doc)
            if ulps > self.scale_ulps:
                reasons.append((True, f"the model's activation scale is {ulps} ulp from 127 / max(|x|, 1e-5) "
                                      f"(allowed: {self.scale_ulps})"))
                return None
            worst_ulps = max(worst_ulps, ulps)
        if worst_ulps:
            return _Match(x, f"activation scale within {worst_ulps} ulp of the model's "
                             f"(kernel: 127 / max(|x|, 1e-5))")
        return _Match(x, "exact")

    def _explain(self, interp, xp, xq, xq_doc, got, want, s_doc, rows) -> str:
        s_model = _model_scale(interp, xp, xq, got, None, rows)
        if s_model is not None and not np.array_equal(s_model, s_doc):
            ulps = _ulps(s_model, s_doc)
            return (f"the model's per-token scale differs from 127 / max(|x|, 1e-5) by up to {ulps} ulp "
                    f"(e.g. 127 * (1 / max) instead of a division); set scale-ulps={ulps} to absorb it anyway")
        if not np.array_equal(xq, xq_doc):
            bad = np.argwhere(xq != xq_doc)[0]
            return (f"the quantized input is not round_half_even(x * 127 / max(|x|, 1e-5)).clamp(-128, 127) "
                    f"(probe value {xp[tuple(bad)]!r}: model {xq[tuple(bad)]!r}, documented {xq_doc[tuple(bad)]!r})")
        return "the matmul result is not rescaled by exactly r / s (per-token division)"

    def _drop_unused(self, module: ir.Operation, funcs: dict) -> None:
        used = {callee for _, callee in qlinear_calls(module, funcs)}
        for name, f in funcs.items():
            if name not in used:
                f.erase()


def _single_user_through_reshapes(v: ir.Value) -> Optional[ir.Operation]:
    """The one op using v, looking through expand/collapse_shape ops with one user."""
    while True:
        uses = list(v.uses)
        if len(uses) != 1:
            return None
        op = uses[0].owner
        op = op.operation if hasattr(op, "operation") else op
        if op.name in _RESHAPES:
            v = op.results[0]
            continue
        return op if len(op.results) == 1 else None


def _model_scale(interp: Interpreter, xp, xq, got, yp, rows) -> Optional[np.ndarray]:
    """The per-token scale the model computed: a float value of `rows` elements in the
    evaluated subgraph that explains xq = clamp(round(x * s)) (and, given yp, got = yp / s)."""
    for v, arr in interp.cache.items():
        if arr.size != rows or arr.dtype != np.float32:
            continue
        s = arr.reshape(rows)
        with np.errstate(all="ignore"):
            xq_s = np.clip(np.rint(xp * s[:, None]), -128, 127)
            if not np.array_equal(xq_s, xq):
                continue
            if yp is not None and not np.array_equal(yp / s[:, None], got, equal_nan=True):
                continue
        return s
    return None


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    ia = a.astype(np.float32).view(np.int32).astype(np.int64)
    ib = b.astype(np.float32).view(np.int32).astype(np.int64)
    return int(np.abs(ia - ib).max()) if ia.size else 0
