"""Low-bit weights dequantized in a low precision: the numerics policy "dequant-rounding".

A library's dequantization is rarely bit-exact `q * s` in fp32: GPTQ computes
`fp16(scale * (q - z))`, hqq `((q - z) * s)` with a *float* zero point in its compute dtype,
and the result is then cast to the activations' dtype. The value-only proof
(`passes.lib_recognize.find_exact_format`) rejects such weights. This module recognises them
from what the weight subgraph reads:

1. the scales are a floating-point tensor of module state the subgraph reads, of `N * g`
   elements for `g` = 1 (per channel) or `ceil(K / G)` groups, laid out `[N, g]` or `[g, N]`
   (torchao, hqq, quanto: `[N, g]`; GPTQ/AWQ: `[g, N]`);
2. divided by its scale, each weight is an integer code plus a per-group offset: an integer
   zero point (GPTQ, torchao asymmetric), or a float one (hqq) -- read from a zero-point tensor
   of the same size when the subgraph has one that fits, else estimated from the codes;
3. the kernel computes with the scales' own values (upcast exactly to fp32):
   `W' = q * s` (+ the integer zero point), or for float zero points
   `W' = q_sym * s + o[n, g]` with a per-group offset `o` that the compiled graph adds as
   `sum_{k in g} x[k] * o[n, g]` (a small matmul on the group sums of x);
4. accepted when every element of `W'` lies within the rounding of the model's own dequant
   dtype `d` (the lowest float precision among the subgraph's values):
   `|W - W'| <= 2 u_d (|W'| + |o| ) + tiny`, `u_d` = 2^-11 (fp16), 2^-8 (bf16), 2^-24 (fp32),
   i.e. at most the two roundings (`q - z`, then `* s`) the model's own arithmetic makes.

`lowbit.options(dequant_numerics="bit-exact")` turns this off (only bit-exact proofs).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import torch

from lowbit.quant.formats import WEIGHT_FORMATS, LowBitSpec

#: Unit roundoff of each dequant dtype.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}
#: Format preference for integer codes (fewest bits first).
_SYM = ("int1", "ternary", "int2_sym", "int4_sym", "int8")
_ASYM = ("int2_asym", "int4_asym")
_BY_BITS = ("int1", "ternary", "int2_sym", "int2_asym", "int4_sym", "int4_asym", "int8")


@dataclasses.dataclass
class DequantMatch:
    spec: LowBitSpec
    q: torch.Tensor                      # int8 [N, K]
    scales: torch.Tensor                 # fp32 scale_shape
    zero_points: Optional[torch.Tensor]  # int8 scale_shape (asymmetric formats)
    offsets: Optional[torch.Tensor]      # fp32 [N, groups]: float zero points folded, else None
    max_error: float                     # max |W - W'|
    tolerance: str                       # e.g. "fp16 dequant rounding"
    zero_kind: str                       # "none" | "integer" | "float"
    perm: Optional[torch.Tensor] = None  # int64 [K]: act-order, the kernel reads x[..., perm]


def _groupwise(s: np.ndarray, k: int, width: int) -> np.ndarray:
    """[N, groups] per-group values expanded to [N, K] (groups of `width`, the last short)."""
    return np.repeat(s, width, axis=1)[:, :k]


def _orientations(t: torch.Tensor, n: int, g: int):
    flat = t.detach().reshape(-1)
    yield flat.reshape(n, g)
    if g > 1 or flat.numel() != n:
        yield flat.reshape(g, n).t()


def _group_counts(k: int, group_sizes: Sequence[int]):
    yield k, 1  # per channel
    for gs in sorted(set(group_sizes), reverse=True):
        if gs < k:
            yield gs, -(-k // gs)


def match_dequant(w: torch.Tensor, leaves: Sequence[torch.Tensor], low_dtype: torch.dtype,
                  formats: Sequence[str], group_sizes: Sequence[int], act_format: str = "none"
                  ) -> tuple[Optional[DequantMatch], str]:
    """Recognise `w` ([N, K], as the matmul reads it) as codes x scales (+ zero points) read
    from `leaves` (the float tensors of module state its subgraph reads). Returns
    (match, "") or (None, reason).

    Act-order (GPTQ `desc_act`): when an integer leaf of K elements maps each k to its group
    (`g_idx`, not sorted), the columns are reordered so that groups are contiguous; the match
    carries the permutation, and the caller feeds the kernel `x[..., perm]`."""
    found, why = _match(w, leaves, low_dtype, formats, group_sizes, act_format)
    if found is not None:
        return found, ""
    n, k = w.shape
    for perm in _group_orders(leaves, k):
        pf, _ = _match(w[:, perm], leaves, low_dtype, formats, group_sizes, act_format)
        if pf is not None:
            pf.perm = perm
            return pf, ""
    return None, why


def _group_orders(leaves: Sequence[torch.Tensor], k: int):
    """Stable sorts of act-order group indices: integer leaves of K values that are not
    non-decreasing, whose sort makes every group a contiguous run."""
    for t in leaves:
        if t.is_floating_point() or t.dtype == torch.bool or t.numel() != k or t.dim() != 1:
            continue
        gi = t.detach().to(torch.int64)
        if gi.min() < 0 or bool((gi[1:] >= gi[:-1]).all()):
            continue
        yield torch.sort(gi, stable=True).indices


def _match(w, leaves, low_dtype, formats, group_sizes, act_format):
    n, k = w.shape
    wd = w.detach().to(torch.float64).numpy()
    if not np.all(np.isfinite(wd)):
        return None, "the weight has NaN or infinite values"
    u = UNIT_ROUNDOFF.get(low_dtype, 2.0 ** -24)
    floats = [t for t in leaves if t.is_floating_point() and t.numel() > 0]
    tried = False
    # group sizes: the allowed ones, and those the scale tensors imply (any multiple of 8
    # that divides K: libraries pick their own, e.g. 24 or 100-wide rows cut in 4)
    implied = {k // (t.numel() // n) for t in floats if t.numel() % n == 0 and 0 < t.numel() // n <= k
               and k % (t.numel() // n) == 0}
    group_sizes = sorted(set(group_sizes) | {gs for gs in implied if gs % 8 == 0}, reverse=True)
    for gs, g in _group_counts(k, group_sizes):
        scale_leaves = [t for t in floats if t.numel() == n * g]
        for leaf in scale_leaves:
            for s in _orientations(leaf, n, g):
                tried = True
                sd = s.to(torch.float64).numpy()
                if not np.all(np.isfinite(sd)) or np.any(sd <= 0):
                    continue
                found = _fit(wd, sd, gs, g, u, [t for t in scale_leaves if t is not leaf], formats,
                             act_format, low_dtype, s)
                if found is not None:
                    return found, ""
    if not tried:
        return None, ("no scale tensor found: the weight subgraph reads no floating-point module state of "
                      f"N x groups elements (N = {n}, K = {k}, groups of {'/'.join(map(str, group_sizes))})")
    return None, (f"the weight is not codes x the scales its subgraph reads within {low_dtype} dequant "
                  "rounding (or needs a format the option 'formats' does not enable, or act-order groups)")


def _fit(wd, sd, gs, g, u, zero_leaves, formats, act_format, low_dtype, s_tensor) -> Optional[DequantMatch]:
    n, k = wd.shape
    s_full = _groupwise(sd, k, gs)
    r = wd / s_full
    tiny = 2.0 ** -30 * s_full
    granularity = "channel" if g == 1 else "group"
    group_size = 0 if g == 1 else gs
    allowed = set(formats)
    # integer zero point (or none)
    c = np.rint(r)
    if 2 * u * (np.max(np.abs(c)) + 1) >= 0.25:
        return None  # the dequant dtype cannot tell neighbouring codes apart: nothing to prove
    if np.all(np.abs((c - r) * s_full) <= 2 * u * np.abs(wd) + tiny):
        for fmt in _BY_BITS:
            if fmt not in allowed:
                continue
            got = _integer_codes(c, fmt, gs, k)
            if got is None:
                continue
            q, z = got
            spec = LowBitSpec(fmt, granularity, group_size, k, n, act_format)
            wq = (q.astype(np.float64) - (0 if z is None else _groupwise(z.astype(np.float64), k, gs))) * s_full
            return DequantMatch(spec, torch.from_numpy(q.astype(np.int8)), _f32(sd), None if z is None else
                                torch.from_numpy(z.astype(np.int8)), None, float(np.max(np.abs(wq - wd))),
                                f"{_name(low_dtype)} dequant rounding", "integer" if z is not None else "none")
    # float zero point: W = (c + f) * s with f the per-group fraction
    offsets = None
    for z_leaf in zero_leaves:
        for z, f in _zero_candidates(z_leaf, sd, n, g):
            cz = np.rint(r - _groupwise(f, k, gs))
            wq = (cz + _groupwise(f, k, gs)) * s_full
            if np.all(np.abs(wq - wd) <= 2 * u * (np.abs(wq) + np.abs(_groupwise(f, k, gs) * s_full)) + tiny):
                offsets = (cz, f)
                break
        if offsets is not None:
            break
    if offsets is None:
        f = _circular_offset(r, n, k, gs)
        cz = np.rint(r - _groupwise(f, k, gs))
        wq = (cz + _groupwise(f, k, gs)) * s_full
        if not np.all(np.abs(wq - wd) <= 2 * u * (np.abs(wq) + np.abs(_groupwise(f, k, gs) * s_full)) + tiny):
            return None
        offsets = (cz, f)
    cz, f = offsets
    for fmt in _SYM:
        if fmt not in allowed:
            continue
        got = _shift_codes(cz, f, sd, fmt, gs, k)
        if got is None:
            continue
        q, scale, offset = got
        spec = LowBitSpec(fmt, granularity, group_size, k, n, act_format)
        wq = q.astype(np.float64) * _groupwise(scale, k, gs) + _groupwise(offset, k, gs)
        return DequantMatch(spec, torch.from_numpy(q.astype(np.int8)), _f32(scale), None,
                            torch.from_numpy(offset.astype(np.float32)), float(np.max(np.abs(wq - wd))),
                            f"{_name(low_dtype)} dequant rounding", "float")
    return None


def _zero_candidates(z_leaf: torch.Tensor, sd: np.ndarray, n: int, g: int):
    """(z, f) readings of a zero-point tensor: `(q - z) * s` (hqq, f = -z) or `q * s - z`
    (quanto's shift, f = -z / s)."""
    for z in _orientations(z_leaf, n, g):
        zd = z.to(torch.float64).numpy()
        yield z, -zd
        yield z, -zd / sd


def _f32(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _group_minmax(c: np.ndarray, width: int, k: int):
    n = c.shape[0]
    g = -(-k // width)
    pad = g * width - k
    lo = np.pad(c, ((0, 0), (0, pad)), constant_values=np.inf).reshape(n, g, width).min(-1)
    hi = np.pad(c, ((0, 0), (0, pad)), constant_values=-np.inf).reshape(n, g, width).max(-1)
    return lo, hi


def _integer_codes(c: np.ndarray, fmt: str, gs: int, k: int):
    """(q, z or None) for integer codes `c` = q - z in format `fmt`, else None."""
    f = WEIGHT_FORMATS[fmt]
    values = np.array(f.values)
    if not f.asymmetric:
        return (c, None) if np.isin(c, values).all() else None
    lo, hi = _group_minmax(c, gs, k)
    z = np.clip(-lo, 0, f.qmax)  # smallest zero point that makes every code >= 0
    if np.any(hi + z > f.qmax) or np.any(lo + z < 0):
        return None
    n = c.shape[0]
    return c + _groupwise(z, k, gs), z


def _shift_codes(cz: np.ndarray, f: np.ndarray, sd: np.ndarray, fmt: str, gs: int, k: int):
    """W = (cz + f) s as q * scale + offset with q in the symmetric format `fmt`."""
    n = cz.shape[0]
    lo, hi = _group_minmax(cz, gs, k)
    fm = WEIGHT_FORMATS[fmt]
    if fmt == "int1":  # two adjacent codes a, a+1 -> -1, +1 at half the scale
        if np.any(hi - lo > 1):
            return None
        a = lo
        q = 2 * (cz - _groupwise(a, k, gs)) - 1
        return q, sd / 2, (a + f + 0.5) * sd
    if np.any(hi - lo > fm.qmax - fm.qmin):
        return None
    t = lo - fm.qmin  # shift each group's codes to start at qmin
    q = cz - _groupwise(t, k, gs)
    if not np.isin(q, np.array(fm.values)).all():
        return None
    return q, sd, (t + f) * sd


def _circular_offset(r: np.ndarray, n: int, k: int, width: int) -> np.ndarray:
    """Per-group fractional offset f in (-0.5, 0.5] with r - f ~ integers."""
    g = -(-k // width)
    pad = g * width - k
    ang = 2 * math.pi * r
    cs = np.pad(np.cos(ang), ((0, 0), (0, pad))).reshape(n, g, width).sum(-1)
    sn = np.pad(np.sin(ang), ((0, 0), (0, pad))).reshape(n, g, width).sum(-1)
    return np.arctan2(sn, cs) / (2 * math.pi)


def subgraph_leaves(w, ev) -> tuple[list[torch.Tensor], torch.dtype]:
    """The module-state tensors the weight subgraph of FX node `w` reads, and the lowest float
    precision among its values (the model's dequant dtype)."""
    leaves, seen, work = [], set(), [w]
    low, low_u = torch.float32, UNIT_ROUNDOFF[torch.float32]
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            uu = UNIT_ROUNDOFF.get(val.dtype)
            if uu is not None and uu > low_u:
                low, low_u = val.dtype, uu
        if n.op in ("placeholder", "get_attr"):
            t = ev.value(n) if (n.op == "get_attr" or n in ev.values) else None
            if isinstance(t, torch.Tensor):
                leaves.append(t)
        work.extend(n.all_input_nodes)
    return leaves, low


def add_offset_correction(graph: torch.fx.Graph, x: torch.fx.Node, out: torch.fx.Node,
                          offsets: torch.Tensor, spec: LowBitSpec, add_input, name: str,
                          provenance: dict) -> torch.fx.Node:
    """`out + group_sums(x) @ offsets^T` after `out` (the float zero points' term
    `sum_g o[n, g] * sum_{k in g} x[k]`), in fp32, rounded to `out`'s dtype once."""
    aten = torch.ops.aten
    k, g = spec.in_features, spec.num_groups
    width = spec.group_width
    pad = g * width - k
    ot = add_input(offsets.to(torch.float32).t().contiguous(), name)  # [g, N]
    x_val = x.meta.get("val")
    out_val = out.meta.get("val")
    nodes = []

    def emit(target, args, kwargs=None):
        node = graph.call_function(target, args, kwargs or {})
        node.meta.update(provenance)
        vals = torch.fx.node.map_arg((args, kwargs or {}), lambda a: a.meta.get("val"))
        try:
            node.meta["val"] = target(*vals[0], **vals[1])
        except Exception:
            pass
        nodes.append(node)
        return node

    with graph.inserting_after(out):
        xf = x
        if x_val is not None and x_val.dtype != torch.float32:
            xf = emit(aten._to_copy.default, (xf,), {"dtype": torch.float32})
        if pad:
            xf = emit(aten.constant_pad_nd.default, (xf, [0, pad], 0.0))
        grouped = emit(aten.view.default, (xf, [-1, g, width]))
        sums = emit(aten.sum.dim_IntList, (grouped, [2]))
        corr = emit(aten.mm.default, (sums, ot))
        of = out
        if out_val is not None and out_val.dtype != torch.float32:
            of = emit(aten._to_copy.default, (out,), {"dtype": torch.float32})
        total = emit(aten.add.Tensor, (of, corr))
        if out_val is not None and out_val.dtype != torch.float32:
            total = emit(aten._to_copy.default, (total,), {"dtype": out_val.dtype})
    # `inserting_after(out)` puts each new node right after `out`: restore program order
    anchor = out
    for node in nodes:
        anchor.append(node)
        anchor = node
    return total
