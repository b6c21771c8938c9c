"""lowbit-recognize-lowbit-weights: matmuls whose constant weight is exactly low-bit -> qlinear.

Matches, on linalg on tensors, every matmul-like op (`linalg.matmul`, `linalg.batch_matmul`,
their `_transpose_b` forms, and `linalg.generic` contractions `out[.., n] += a[.., k] * b`,
with B read as [K, N], [N, K] or broadcast over a batch dim) whose

* accumulator starts at +0.0 (a zero `linalg.fill`),
* activation is f32 or bf16 with a static shape,
* weight operand is a compile-time constant: either a float constant (possibly
  transposed, e.g. an `nn.Linear` checkpoint saved by quantization-aware training) or a
  constant subgraph, e.g. the dequantization of packed integer codes (`>>`, `&`, zero-point
  subtraction, casts, scale multiplies, reshapes, concatenation, transposes), which
  `lowbit.passes.interp` evaluates bit-exactly at compile time,

and whose evaluated weight W [N, K] equals `q * s` (or `(q - z) * s`) exactly, bit for bit,
for one of the enabled formats: the search takes the fewest bits first (int1, ternary,
int2_sym, int2_asym; int4/int8 only when `formats` lists them) and then the coarsest
scales (per tensor for ternary, per channel, then groups of `group-sizes`).

Produces the canonical form of `lowbit.passes.qlinear`: a call to a private
`@lowbit_qlinear_<i>` function holding the integer codes, scales and zero points; a bias
`+ b[n]` applied right after the matmul (f32 output) is absorbed into the function. The
weight's producers are erased when nothing else uses them.

Every matmul it looks at gets a `lowbit.report` entry (`kind = "matmul"`, `result`,
`format`, `origin` = "fp-weights" | "dequant-subgraph", `reason` when not recognized). A
matmul that does not qualify is left exactly as it was. Activations stay fp unless the
option `activations=int8` opts in to dynamic int8 activation quantization.
"""
from __future__ import annotations

import dataclasses
import numpy as np
from torch_mlir import ir

from lowbit.passes.interp import InterpError, Interpreter, static_shape
from lowbit.passes.lib_recognize import (
    DEFAULT_FORMATS, DEFAULT_GROUP_SIZES, Contraction, bias_after, erase_dead, find_exact_format,
    is_zero_init, match_contraction, parse_formats, weight_matrix, weight_origin,
)
from lowbit.passes.qlinear import QLinearWeights, add_report_entry, build_qlinear_function, emit_qlinear_call
from lowbit.passes.registry import ModulePass, register_pass
from lowbit.passes.vectorize_support import walk


@register_pass
@dataclasses.dataclass
class RecognizeLowbitWeights(ModulePass):
    """Rewrite matmuls with constant, exactly low-bit weights into qlinear calls.

    Options: `formats` (weight formats to look for, fewest bits win), `group-sizes`
    (group widths to try after per-tensor/per-channel scales, coarsest first),
    `activations` ("none" keeps fp activations; "int8" opts in to int8 activations),
    `absorb-bias`, `max-elements` (largest weight subgraph the interpreter evaluates).
    """

    NAME = "lowbit-recognize-lowbit-weights"

    formats: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_FORMATS))
    group_sizes: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_GROUP_SIZES))
    activations: str = "none"
    absorb_bias: bool = True
    max_elements: int = 1 << 26

    def __post_init__(self) -> None:
        self.formats = parse_formats(self.formats)
        if self.activations not in ("none", "int8"):
            raise ValueError(f"pass '{self.NAME}': activations must be 'none' or 'int8', got {self.activations!r}")
        for g in self.group_sizes:
            if g < 8 or g % 8:
                raise ValueError(f"pass '{self.NAME}': group sizes must be positive multiples of 8, got {g}")

    def run(self, module: ir.Operation) -> None:
        found: list[Contraction] = [c for c in map(match_contraction, walk(module)) if c is not None]
        for c in found:
            self._rewrite(module, c)

    def _rewrite(self, module: ir.Operation, c: Contraction) -> None:
        a_shape = static_shape(c.a.type)
        where = dict(kind="matmul", pass_name=self.NAME, location=str(c.op.location), op=c.op.name,
                     shape=f"{'x'.join(map(str, a_shape))} @ {c.n}x{c.k}^T")

        def reject(reason: str, **extra) -> None:
            add_report_entry(module, **where, result="not recognized", reason=reason, **extra)

        x_elem, y_elem = str(ir.ShapedType(c.a.type).element_type), str(ir.ShapedType(c.init.type).element_type)
        if x_elem not in ("f32", "bf16") or y_elem not in ("f32", "bf16"):
            return reject(f"activation/result element types {x_elem}/{y_elem} (need f32 or bf16)")
        if not is_zero_init(c.init):
            return reject("the accumulator does not start at zero")
        interp = Interpreter(max_elements=self.max_elements)
        try:
            w = weight_matrix(c, interp)
        except InterpError as e:
            return reject(f"the weight is not a foldable constant: {e}")
        origin = weight_origin(interp)
        spec, qw, why = find_exact_format(w, self.formats, self.group_sizes, self.activations)
        if spec is None:
            return reject(why, origin=origin)
        m = int(np.prod(a_shape[:-1])) if len(a_shape) > 1 else 1
        result = c.result
        bias, bias_op = (None, None)
        if self.absorb_bias and y_elem == "f32":
            bias, bias_op = bias_after(result, c.n)
        weights = QLinearWeights(
            qw.q.numpy().astype(np.int8),
            qw.scales.numpy().astype(np.float32),
            None if qw.zero_points is None else qw.zero_points.numpy().astype(np.int8),
            bias)
        func = build_qlinear_function(module, spec, weights, m, x_elem, y_elem, origin=origin)
        replaced = bias_op if bias_op is not None else c.op
        with ir.InsertionPoint(replaced), replaced.location:
            y = emit_qlinear_call(c.a, func, c.n, ir.ShapedType(c.init.type).element_type)
        replaced.results[0].replace_all_uses_with(y)
        erase_dead([replaced, c.op])
        add_report_entry(module, **where, result="recognized", format=spec.describe(), origin=origin,
                     function=ir.StringAttr(func.attributes["sym_name"]).value,
                     bias="absorbed" if bias is not None else "none")

