"""Weights computed elementwise from 8-bit integer codes: the low-bit proof on the table of codes.

A packed low-bit checkpoint unpacks its weights in the model's own forward. Hugging Face
BitNet's `BitLinear` reads 2-bit codes packed four to a byte, shifts and masks them into a
uint8 tensor `c` (values 0, 1, 2), and hands the matmul `W = convert(c, float32) - 1`. The
generic proof (`passes.lib_recognize.find_exact_format`) evaluates W in fp32 and searches it
element by element; at BitNet-b1.58-2B4T size that was ~1.4 s per weight, most of a compile.

Here the proof runs on the *table* of the codes instead. When the weight is an integer tensor
`c` of 8 bits followed only by elementwise ops whose other operands are Python numbers
(`convert_element_type`, `_to_copy` to a dtype, `add`/`sub`/`rsub` with alpha 1, `mul`,
true `div`, `neg`) and transposes, every element of W is `F(c[i])` for the same function F:
each of those ops is one IEEE operation (correctly rounded in the op's dtype, or an integer
operation), a function of the element's value alone. So the set of W's values is
`{F(v) : v in c}`, computed exactly by running the model's own ops on a tensor holding each
code in `[min(c), max(c)]` once; a few rows of c are also run through the ops in full and must
equal the table bit for bit (a guard against any kernel that is not elementwise after all).

The table decides only what it can decide exactly as `find_exact_format` would: formats are
tried fewest bits first, and the first spec that reproduces W exactly wins. So it answers
"ternary, per tensor, scale s" when (1) ternary is the first enabled format, or int1 is
before it and W holds a zero (int1 codes times a scale >= 1e-8 are never zero: int1 fails at
every granularity); (2) every non-zero table value has the same magnitude s (fp32) and a code
present in c (an end of its range) maps to one: then W's values lie in {-s, 0, s}, the only
per-tensor ternary scale reproducing them is s (any candidate `find_exact_format` accepts has
`1 * scale == s`), and the codes are `q = W / s` exactly. Anything else (per-channel or group
scales, other formats, non-finite values, an all-zero weight) returns None and the caller
runs the full proof as before: this adds no weight to what is recognised, and rejects none.

Cost: evaluating c (uint8 work) plus a min/max pass, at most one compare pass, and one pass
writing the int8 codes: tens of milliseconds for a 6912 x 2560 weight instead of seconds.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger("lowbit.bind")

aten = torch.ops.aten
prims = torch.ops.prims

_CASTS = {prims.convert_element_type.default, aten._to_copy.default}
_ARITH = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar,
          aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default}
_COPIES = {aten.clone.default, aten.alias.default}
_CODE_DTYPES = (torch.uint8, torch.int8)
#: Rows of c run through the model's ops in full, compared with the table.
_CHECK_ROWS = 4


def _number(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _tail_step(node: torch.fx.Node) -> Optional[tuple[str, torch.fx.Node]]:
    """("op" | "transpose" | "copy", its tensor operand) if `node` is one step of an
    elementwise tail, else None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    t, args, kwargs = node.target, node.args, node.kwargs
    src = args[0]
    if t is aten.t.default and len(args) == 1:
        return "transpose", src
    if t is aten.permute.default and len(args) == 2 and list(args[1]) == [1, 0]:
        return "transpose", src
    if t is aten.transpose.int and len(args) == 3 and sorted(d % 2 for d in args[1:]) == [0, 1]:
        return "transpose", src
    if t in _COPIES and len(args) == 1 and not kwargs:
        return "copy", src
    if t is prims.convert_element_type.default and len(args) == 2 and not kwargs:
        return "op", src
    if t is aten._to_copy.default and len(args) == 1 and set(kwargs) <= {"dtype", "layout", "device"} \
            and kwargs.get("layout") in (None, torch.strided) and kwargs.get("device") in (None, torch.device("cpu")):
        return "op", src
    if t in _ARITH:
        if t is aten.neg.default:
            return ("op", src) if len(args) == 1 and not kwargs else None
        if len(args) != 2 or not _number(args[1]):
            return None
        if set(kwargs) - {"alpha"} or kwargs.get("alpha", 1) != 1:
            return None
        return "op", src
    return None


def _tail(w: torch.fx.Node) -> Optional[tuple[torch.fx.Node, list[torch.fx.Node], bool]]:
    """(codes node, the elementwise ops from it to `w` in program order, transposed) or None."""
    ops: list[torch.fx.Node] = []
    transposed = False
    node = w
    while True:
        step = _tail_step(node)
        if step is None:
            break
        kind, src = step
        if kind == "transpose":
            transposed = not transposed
        elif kind == "op":
            ops.append(node)
        node = src
    if not ops:
        return None
    return node, ops[::-1], transposed


def _apply(ops: list[torch.fx.Node], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for op in ops:
            x = op.target(x, *op.args[1:], **op.kwargs)
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits of a tensor (so -0.0 and 0.0, or NaNs, compare as what they are)."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def prove_per_tensor_ternary(w: torch.fx.Node, ev, formats, act_format: str):
    """(LowBitSpec, int8 codes [N, K], fp32 scales [1, 1]) of the matmul weight `w` ([K, N] as
    the matmul reads it) if the code table proves it per-tensor ternary exactly as
    `find_exact_format` would find it; None when the table cannot decide (see module doc)."""
    from lowbit.passes.lib_recognize import parse_formats
    from lowbit.quant.formats import LowBitSpec

    tail = _tail(w)
    if tail is None:
        return None
    codes_node, ops, transposed = tail
    allowed = parse_formats(formats)
    if "ternary" not in allowed or allowed.index("ternary") > (1 if allowed[0] == "int1" else 0):
        return None
    codes_meta = codes_node.meta.get("val")
    w_meta = w.meta.get("val")
    if not isinstance(codes_meta, torch.Tensor) or codes_meta.dtype not in _CODE_DTYPES or codes_meta.dim() != 2:
        return None
    if not isinstance(w_meta, torch.Tensor) or w_meta.dim() != 2 or not w_meta.is_floating_point():
        return None
    if not ev.is_constant(codes_node):
        return None
    c = ev.value(codes_node)
    if not isinstance(c, torch.Tensor) or c.dtype not in _CODE_DTYPES or c.dim() != 2 or c.numel() == 0:
        return None
    k, n = (int(d) for d in w_meta.shape)
    if tuple(c.shape) != ((n, k) if transposed else (k, n)):
        return None
    c = c.detach()
    lo, hi = (int(v) for v in torch.aminmax(c))
    codes = torch.arange(lo, hi + 1, dtype=torch.int16).to(c.dtype)
    table = _apply(ops, codes)
    if table.dtype != w_meta.dtype or tuple(table.shape) != tuple(codes.shape):
        return None
    rows = c[:_CHECK_ROWS]
    full = _apply(ops, rows)
    if not torch.equal(_bits(full), _bits(table[(rows.to(torch.int64) - lo)])):
        log.debug("code table of %s disagrees with the model's ops on its first rows", w.name)
        return None
    t32 = table.to(torch.float32)
    if not bool(torch.isfinite(t32).all()):
        return None
    nonzero = t32 != 0
    mags = t32.abs()[nonzero]
    if mags.numel() == 0 or not bool((mags == mags[0]).all()):
        return None
    if not (bool(nonzero[0]) or bool(nonzero[-1])):
        return None  # the non-zero codes are all inside the range: present or not, unknown
    if allowed[0] == "int1" and not _holds_a_zero(c, codes, nonzero):
        return None
    s = mags[0].clone()
    q_table = torch.round(t32 / s).clamp(-1, 1)
    if not torch.equal(q_table * s, t32):  # holds by construction; == as the full proof compares
        return None
    q = _lookup(c, q_table.to(torch.int8), lo)
    q_nk = q if transposed else q.t().contiguous()
    spec = LowBitSpec("ternary", "tensor", 0, k, n, act_format)
    return spec, q_nk, s.reshape(1, 1)


def _holds_a_zero(c: torch.Tensor, codes: torch.Tensor, nonzero: torch.Tensor) -> bool:
    if not (bool(nonzero[0]) and bool(nonzero[-1])):
        return True  # an end of the range (present in c) maps to zero
    zeros = codes[~nonzero]
    for part in (c[:1], c):  # a zero code is usually in the first row already
        if bool(torch.isin(part, zeros).any()):
            return True
    return False


def _lookup(c: torch.Tensor, q_table: torch.Tensor, lo: int) -> torch.Tensor:
    """int8 `q_table[c - lo]`, one pass: byte arithmetic when the table steps by +1 per code."""
    q_lo = int(q_table[0])
    step = torch.arange(q_lo, q_lo + q_table.numel(), dtype=torch.int16)
    if torch.equal(q_table.to(torch.int16), step):
        # consecutive codes are consecutive bytes mod 256 (uint8 and two's complement int8):
        # q = byte - (byte(lo) - q_lo) mod 256, read as int8 (|q| <= 1 fits)
        shift = (lo - q_lo) % 256
        b = c.contiguous().view(torch.uint8)
        return (b - shift).view(torch.int8) if shift else b.clone().view(torch.int8)
    lut = np.zeros(256, dtype=np.int8)
    lut[(np.arange(lo, lo + q_table.numel()) % 256)] = q_table.numpy()
    return torch.from_numpy(np.take(lut, c.contiguous().view(torch.uint8).numpy()))
