"""Shared helpers of the low-bit recognition passes: matmul matching, format search, cleanup.

* `match_contraction` classifies a linalg op as "y[..., n] = sum_k x[..., k] * B(n, k)"
  (named `linalg.matmul` / `batch_matmul` / `*_transpose_b`, or a `linalg.generic` whose
  maps and body say so) and names its activation, weight and accumulator operands.
* `find_exact_format` searches the allowed formats (lowest bit width first) and
  granularities (coarsest first) for one that reproduces a float weight bit for bit.
* `erase_dead` removes the side-effect-free producers a rewrite left without users.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch
from torch_mlir import ir

from lowbit.passes.interp import (
    InterpError, Interpreter, affine_maps, defining_op, dim_position, is_float_type, iterator_kinds,
    static_shape,
)
from lowbit.quant.formats import WEIGHT_FORMATS, LowBitSpec, canonical_weight_format
from lowbit.quant.quantizers import QuantizedWeight, exact_representation

#: Formats in the order the search prefers them (fewest bits first).
FORMAT_PREFERENCE = ("int1", "ternary", "int2_sym", "int2_asym", "int4_sym", "int4_asym", "int8")
DEFAULT_FORMATS = ("ternary", "int1", "int2_sym", "int2_asym")
DEFAULT_GROUP_SIZES = (256, 128, 64, 32)


@dataclasses.dataclass
class Contraction:
    """A matmul-like op: `out[..., n] = init + sum_k a[..., k] * w[n, k]`."""

    op: ir.Operation
    a: ir.Value            # activation, shape [..., K]
    b: ir.Value            # weight operand as the op reads it
    init: ir.Value         # accumulator init
    b_n_axis: int          # axis of `b` that is N
    b_k_axis: int          # axis of `b` that is K
    b_batch_axes: tuple    # axes of `b` indexed by batch loops (weight must be equal along them)
    k: int
    n: int

    @property
    def result(self) -> ir.Value:
        return self.op.results[0]


_NAMED_MAPS = {
    # (a dims, b dims, out dims) over loops; the last loop is the reduction.
    "linalg.matmul": ((0, 2), (2, 1), (0, 1)),
    "linalg.matmul_transpose_b": ((0, 2), (1, 2), (0, 1)),
    "linalg.batch_matmul": ((0, 1, 3), (0, 3, 2), (0, 1, 2)),
    "linalg.batch_matmul_transpose_b": ((0, 1, 3), (0, 2, 3), (0, 1, 2)),
}


def _body_is_mul_add(block: ir.Block) -> bool:
    """The body computes `out + a * b` (operand order free; `arith.extf` on a or b allowed)."""
    ops = [o.operation for o in block.operations]
    args = list(block.arguments)
    a_arg, b_arg, out_arg = args
    values = {a_arg: "a", b_arg: "b", out_arg: "out"}
    for op in ops[:-1]:
        if op.name == "arith.extf" and values.get(op.operands[0]) in ("a", "b"):
            values[op.results[0]] = values[op.operands[0]]
        elif op.name == "arith.mulf" and {values.get(op.operands[0]), values.get(op.operands[1])} == {"a", "b"}:
            values[op.results[0]] = "prod"
        elif op.name == "arith.addf" and {values.get(op.operands[0]), values.get(op.operands[1])} == {"out", "prod"}:
            values[op.results[0]] = "sum"
        else:
            return False
    term = ops[-1]
    return term.name == "linalg.yield" and values.get(term.operands[0]) == "sum"


def _map_dims(op: ir.Operation) -> Optional[list[tuple[int, ...]]]:
    """Each indexing map's results as loop positions, or None if one is not a plain dim."""
    dims = []
    for m in affine_maps(op):
        d = [dim_position(e) for e in m.results]
        if None in d:
            return None
        dims.append(tuple(d))
    return dims if len(dims) == 3 else None


def match_contraction(op: ir.Operation) -> Optional[Contraction]:
    """`Contraction` for a matmul-like op, else None (not a matmul this pass handles)."""
    name = op.name
    if name in _NAMED_MAPS:
        if "cast" in op.attributes:
            return None  # unsigned casts on named ops: not handled
        if "indexing_maps" in op.attributes:
            dims = _map_dims(op)
            if dims is None:
                return None
        else:
            dims = _NAMED_MAPS[name]
        a_dims, b_dims, out_dims = dims
        nloops = max(max(d) for d in dims) + 1
        kinds = ["parallel" if d in out_dims else "reduction" for d in range(nloops)]
    elif name == "linalg.generic":
        if len(op.operands) != 3 or len(op.results) != 1:
            return None
        dims = _map_dims(op)
        if dims is None:
            return None
        a_dims, b_dims, out_dims = dims
        kinds = iterator_kinds(op)
        if not _body_is_mul_add(op.regions[0].blocks[0]):
            return None
    else:
        return None
    red = [d for d, k in enumerate(kinds) if k == "reduction"]
    par = [d for d, k in enumerate(kinds) if k == "parallel"]
    if len(red) != 1 or list(out_dims) != par or not par:
        return None
    k_d, n_d = red[0], out_dims[-1]
    if list(a_dims) != list(out_dims[:-1]) + [k_d]:
        return None
    if n_d not in b_dims or k_d not in b_dims or len(set(b_dims)) != len(b_dims):
        return None
    batch_axes = tuple(i for i, d in enumerate(b_dims) if d not in (n_d, k_d))
    if any(b_dims[i] not in out_dims[:-1] for i in batch_axes):
        return None
    a, b, init = op.operands
    for v in (a, b, init):
        if not isinstance(v.type, ir.RankedTensorType) or not is_float_type(v.type):
            return None
    try:
        a_shape, out_shape = static_shape(a.type), static_shape(init.type)
    except InterpError:
        return None
    return Contraction(op, a, b, init, b_dims.index(n_d), b_dims.index(k_d), batch_axes,
                       k=a_shape[-1], n=out_shape[-1])


def weight_matrix(c: Contraction, interp: Interpreter) -> np.ndarray:
    """Evaluate the weight operand and return it as fp32 W[N, K] (raises InterpError)."""
    b = interp.value(c.b)
    if c.b_batch_axes:
        first = b
        for ax in sorted(c.b_batch_axes, reverse=True):
            if not np.all(np.take(first, [0], axis=ax) == first):
                raise InterpError("the weight differs across the batch dimension")
            first = np.take(first, 0, axis=ax)
        b = first
        n_ax = c.b_n_axis - sum(1 for ax in c.b_batch_axes if ax < c.b_n_axis)
    else:
        n_ax = c.b_n_axis
    w = b if n_ax == 0 else b.T
    return np.ascontiguousarray(w, dtype=np.float32)


def weight_origin(interp: Interpreter) -> str:
    """"fp-weights" if the weight was a float constant (maybe transposed / broadcast /
    reshaped), "dequant-subgraph" if it was computed from other data."""
    plain = {"linalg.transpose", "linalg.broadcast", "tensor.empty", "tensor.expand_shape",
             "tensor.collapse_shape", "tensor.cast", "linalg.copy"}
    for op in interp.visited_ops:
        if op.name == "arith.constant" and is_float_type(op.results[0].type):
            continue
        if op.name not in plain:
            return "dequant-subgraph"
    return "fp-weights"


def is_zero_init(value: ir.Value) -> bool:
    """The accumulator starts at +0.0 everywhere (a constant fill or splat)."""
    try:
        arr = Interpreter().value(value)
    except InterpError:
        return False
    return bool(np.all(arr == 0) and not np.any(np.signbit(arr)))


def parse_formats(names: Sequence[str]) -> list[str]:
    out = [canonical_weight_format(n) for n in names]
    return sorted(set(out), key=FORMAT_PREFERENCE.index)


def candidate_specs(n: int, k: int, formats: Sequence[str], group_sizes: Sequence[int],
                    act_format: str = "none"):
    """LowBitSpecs to try, in preference order: fewer bits first, then coarser scales."""
    grans = [("tensor", 0), ("channel", 0)] + [("group", g) for g in sorted(set(group_sizes), reverse=True)
                                              if g < k]
    for fmt in parse_formats(formats):
        for gran, g in grans:
            if gran == "tensor" and fmt != "ternary":
                continue
            yield LowBitSpec(fmt, gran, g, k, n, act_format)


def find_exact_format(w: np.ndarray, formats: Sequence[str], group_sizes: Sequence[int],
                      act_format: str = "none") -> tuple[Optional[LowBitSpec], Optional[QuantizedWeight], str]:
    """(spec, quantized, "") for the first spec that reproduces `w` [N, K] exactly, else
    (None, None, reason). The reason names a disabled format that would fit, if any."""
    n, k = w.shape
    if not np.all(np.isfinite(w)):
        return None, None, "the weight has NaN or infinite values"
    found = _search(w, formats, group_sizes, act_format)
    if found is not None:
        return found[0], found[1], ""
    allowed = parse_formats(formats)
    distinct = max(len(np.unique(row)) for row in w[: min(n, 64)])
    grans = "/".join(str(g) for g in sorted(group_sizes, reverse=True))
    reason = (f"the weight is not exactly {' or '.join(allowed)} values x scales (per tensor, channel "
              f"or group of {grans}); its rows hold up to {distinct} distinct values")
    others = [f for f in FORMAT_PREFERENCE if f not in allowed]
    if others:
        other = _search(w, others, group_sizes, act_format)
        if other is not None:
            reason += f"; it fits {other[0].describe().split()[0]}, which the option 'formats' does not enable"
    return None, None, reason


SAMPLE_ROWS = 8


def _search(w, formats, group_sizes, act_format):
    n, k = w.shape
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    # A spec that fails on a few rows fails on all of them: per-channel and per-group scales
    # make every row its own problem, and a per-tensor scale that fits the whole matrix fits
    # any subset of its rows (the sample's smallest non-zero |w| is that scale). Rejecting on
    # a row sample first turns the proof that a large fp weight (an output head) is not
    # low-bit from seconds of full-matrix passes, with several fp copies of it, into
    # milliseconds.
    rows = np.unique(np.linspace(0, n - 1, SAMPLE_ROWS).astype(np.int64)) if n > 2 * SAMPLE_ROWS else None
    sample = w[rows] if rows is not None else None
    sample_t = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)) if rows is not None else None
    for spec in candidate_specs(n, k, formats, group_sizes, act_format):
        if sample is not None:
            small = dataclasses.replace(spec, out_features=len(rows))
            if _exact(sample, sample_t, small) is None:
                continue
        qw = _exact(w, wt, spec)
        if qw is not None:
            return spec, qw
    return None


def _exact(w: np.ndarray, wt: torch.Tensor, spec: LowBitSpec) -> Optional[QuantizedWeight]:
    qw = exact_representation(wt, spec)
    if qw is None and not spec.format.asymmetric:
        qw = _exact_by_smallest_step(w, spec)
    return qw


def _exact_by_smallest_step(w: np.ndarray, spec: LowBitSpec) -> Optional[QuantizedWeight]:
    """Symmetric formats: scale = the smallest non-zero |w| of each group.

    Complements `exact_representation`, whose candidates need a group to hold an end
    value of the format (e.g. -8 or 7 for int4): dequantized codes that never reach the
    ends still contain the step +-s whenever they contain a +-1 code."""
    n, k = w.shape
    width = k * n if spec.granularity == "tensor" else spec.group_width
    groups = -(-k // width) if spec.granularity != "tensor" else 1
    flat = w.reshape(1, n * k) if spec.granularity == "tensor" else w
    rows = flat.shape[0]
    pad = groups * width - flat.shape[1]
    padded = np.pad(np.abs(flat), ((0, 0), (0, pad)), constant_values=np.inf).reshape(rows, groups, width)
    nonzero = np.where(padded > 0, padded, np.inf)
    s = nonzero.min(axis=-1).astype(np.float32)
    s[~np.isfinite(s)] = 1.0
    s_full = np.repeat(s, width, axis=1)[:, : flat.shape[1]]
    with np.errstate(all="ignore"):
        q = np.rint(flat / s_full)
    values = np.array(spec.format.values)
    if not np.isin(q, values).all():
        return None
    if not np.array_equal((q.astype(np.float32) * s_full).astype(np.float32), flat):
        return None
    q = q.astype(np.int8).reshape(n, k)
    return QuantizedWeight(torch.from_numpy(q), torch.from_numpy(s.reshape(spec.scale_shape).copy()), None)


def bias_after(result: ir.Value, n: int) -> tuple[Optional[np.ndarray], Optional[ir.Operation]]:
    """If the matmul result's only use is `r + b[n]` with a constant b: (b as fp32, that op)."""
    uses = list(result.uses)
    if len(uses) != 1:
        return None, None
    op = uses[0].owner
    op = op.operation if hasattr(op, "operation") else op
    if op.name != "linalg.generic" or len(op.operands) != 3 or len(op.results) != 1:
        return None, None
    if op.results[0].type != result.type:
        return None, None
    maps, kinds = affine_maps(op), iterator_kinds(op)
    rank = len(static_shape(result.type))
    if any(k != "parallel" for k in kinds) or len(kinds) != rank:
        return None, None
    ident = list(range(rank))
    pos = [[dim_position(e) for e in m.results] for m in maps]
    operands = list(op.operands)
    if operands[0] == result and pos[0] == ident:
        bias_idx = 1
    elif operands[1] == result and pos[1] == ident:
        bias_idx = 0
    else:
        return None, None
    if pos[2] != ident or pos[bias_idx] != [rank - 1]:
        return None, None
    block = op.regions[0].blocks[0]
    body = [o.operation for o in block.operations]
    if len(body) != 2 or body[0].name != "arith.addf" or body[1].operands[0] != body[0].results[0]:
        return None, None
    args = list(block.arguments)
    # addf is commutative bit for bit (IEEE), so either operand order is the same sum.
    if not ((body[0].operands[0] == args[0] and body[0].operands[1] == args[1])
            or (body[0].operands[0] == args[1] and body[0].operands[1] == args[0])):
        return None, None
    try:
        b = Interpreter().value(operands[bias_idx])
    except InterpError:
        return None, None
    if b.shape != (n,):
        return None, None
    return np.asarray(b, dtype=np.float32), op


def _is_pure(op: ir.Operation) -> bool:
    name = op.name
    if not (name.startswith("arith.") or name.startswith("math.") or name.startswith("tensor.")
            or name.startswith("linalg.")):
        return False
    if len(op.results) == 0:
        return False
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                if not _is_pure_body_op(inner.operation):
                    return False
    return True


def _is_pure_body_op(op: ir.Operation) -> bool:
    n = op.name
    return n.startswith("arith.") or n.startswith("math.") or n in ("linalg.yield", "linalg.index",
                                                                     "tensor.extract", "tensor.yield")


def _has_uses(op: ir.Operation) -> bool:
    return any(True for r in op.results for _ in r.uses)


def erase_dead(roots: Sequence[ir.Operation]) -> None:
    """Erase each root and, transitively, its side-effect-free producers once unused.

    Only ops directly in a function body are considered; an op with side effects in its
    body (e.g. `cf.assert`) is kept."""
    work: list[ir.Operation] = []
    for r in roots:
        _push(work, r)
    while work:
        op = work.pop()
        if _has_uses(op) or not _is_pure(op):
            continue
        producers = [defining_op(v) for v in op.operands]
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    producers += [defining_op(v) for v in inner.operation.operands]
        producers = [p for p in producers if p is not None and _parent_name(p) == "func.func"]
        op.erase()
        for p in producers:
            _push(work, p)


def _push(work: list, op: Optional[ir.Operation]) -> None:
    if op is not None and not any(op == w for w in work):
        work.append(op)


def _parent_name(op: ir.Operation) -> str:
    try:
        return op.parent.name
    except Exception:
        return ""


def location_of(op: ir.Operation) -> str:
    return str(op.location)
