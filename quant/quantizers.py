"""Quantization and dequantization rules of every format (the definitions of docs/formats.md).

Weights (``W`` fp32/bf16 ``[N, K]``) are quantized group by group; statistics are taken over the
real elements of a group only (a short last group is not padded for the statistics). Scale
statistics are computed in float64 and rounded once to fp32; the division ``W / s`` and the
rounding (half to even) are done in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import ACT_ABSMAX_EPS, WEIGHT_SCALE_EPS, LowBitSpec, WeightFormat


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer values ``q`` (int8 ``[N, K]``), fp32 ``scales`` and int8 ``zero_points`` (asymmetric only)."""

    q: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None


#: Weights are processed in blocks of whole rows of at most this many elements: every
#: intermediate of a block stays in the L1/L2 cache, and each torch op on a block is below
#: torch's intra-op grain size (32768), so it runs inline without an OpenMP region (on a
#: busy machine every parallel region waits for a descheduled thread). Whole-matrix
#: temporaries (fp64 copies, [N, K] masks) cost page faults and memory traffic: a 5632x2048
#: layer took 0.3-6 s that way.
_BLOCK_ELEMENTS = 1 << 18


def _run_blocks(fn, n: int, k: int, stop_if=None, blocks=None) -> list:
    """``[fn(r0, r1) for each row block]`` in block order.

    Once a result satisfies ``stop_if`` the remaining blocks are skipped (their results
    are None). Sequential on purpose: spreading blocks over Python threads measured 3x
    slower (GIL hand-offs per op), and bigger blocks with torch's own threads wait on
    OpenMP barriers whenever the machine is busy.
    """
    blocks = list(_row_blocks(n, k)) if blocks is None else blocks
    results: list = [None] * len(blocks)
    for i, (r0, r1) in enumerate(blocks):
        results[i] = fn(r0, r1)
        if stop_if is not None and stop_if(results[i]):
            break
    return results


def _check_weight(weight: torch.Tensor, spec: LowBitSpec) -> torch.Tensor:
    """Type, shape and device checks of a float weight (no data pass); the detached tensor."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    expected = (spec.out_features, spec.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"weight must have shape {list(expected)} [out_features, in_features], "
                         f"got {list(weight.shape)}")
    if weight.device.type != "cpu":
        raise ValueError(f"lowbit.quant works on CPU tensors, got a weight on {weight.device}")
    return weight.detach()


def _row_blocks(n: int, k: int):
    """``(start, stop)`` row ranges of about ``_BLOCK_ELEMENTS`` elements each."""
    rows = max(1, min(n, _BLOCK_ELEMENTS // max(k, 1)))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _block(w: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of ``w`` as a contiguous fp32 tensor (a view when already so)."""
    return w[r0:r1].to(torch.float32).contiguous()


def _raise_if_not_finite(w: torch.Tensor) -> None:
    def finite(r0: int, r1: int) -> bool:
        lo, hi = torch.aminmax(_block(w, r0, r1))  # NaN propagates through min/max
        return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))

    if not all(ok is not False for ok in _run_blocks(finite, *w.shape, stop_if=lambda ok: not ok)):
        raise ValueError("weight contains NaN or infinity; cannot quantize it")


def check_float_weight(weight: torch.Tensor, spec: LowBitSpec) -> torch.Tensor:
    """Validate a float weight ``[out_features, in_features]``; return it as fp32."""
    w = _check_weight(weight, spec)
    if w.numel():
        _raise_if_not_finite(w)
    return w.to(torch.float32)


# --------------------------------------------------------------------------- group layout
# A block of rows ``wb [r, K]`` is cut into at most two *pieces* viewed as ``[r, g, width]``:
# the full scale groups, and the short last group (only when K % G != 0). Scales of a piece
# broadcast as ``[r, g, 1]`` (``[1, 1, 1]`` for per-tensor scales), so nothing is expanded.

def _pieces(spec: LowBitSpec) -> list[tuple[int, int, int, int, int]]:
    """``(col_start, col_stop, first_group, groups, width)`` of each piece of a row."""
    k = spec.in_features
    if spec.granularity != "group":
        return [(0, k, 0, 1, k)]
    width = spec.group_size
    full, tail = divmod(k, width)
    out = []
    if full:
        out.append((0, full * width, 0, full, width))
    if tail:
        out.append((full * width, k, full, 1, tail))
    return out


def _piece_view(t: torch.Tensor, piece: tuple[int, int, int, int, int]) -> torch.Tensor:
    c0, c1, _, groups, width = piece
    return t[:, c0:c1].view(t.shape[0], groups, width)


@dataclass
class _Stats:
    """Per-group statistics, float64 ``[R, G]``: ``hi = max(max W, 0)``, ``lo = min(min W, 0)``,
    ``absmean`` (ternary and int1 only)."""

    hi: torch.Tensor
    lo: torch.Tensor
    absmean: torch.Tensor | None

    def finite(self) -> bool:
        ok = bool(torch.isfinite(self.hi).all()) and bool(torch.isfinite(self.lo).all())
        return ok and (self.absmean is None or bool(torch.isfinite(self.absmean).all()))


def _needs_absmean(spec: LowBitSpec) -> bool:
    return spec.format.name in ("ternary", "int1")


def _block_stats(wb: torch.Tensor, spec: LowBitSpec) -> _Stats:
    """Statistics of the groups of a block of whole rows (channel / group granularity)."""
    his, los, sums = [], [], []
    for piece in _pieces(spec):
        v = _piece_view(wb, piece)
        his.append(v.amax(dim=-1))
        los.append(v.amin(dim=-1))
        if _needs_absmean(spec):
            width = piece[4]
            if width != spec.group_width:
                # The short last group is summed zero-padded to the full group width, as
                # the statistics have always been taken (same float64 summation order).
                padded = wb.new_zeros((wb.shape[0], 1, spec.group_width))
                padded[:, :, :width] = v
                v = padded
            sums.append(v.abs().sum(dim=-1, dtype=torch.float64))
    hi = torch.cat(his, dim=1).to(torch.float64).clamp(min=0.0)
    lo = torch.cat(los, dim=1).to(torch.float64).clamp(max=0.0)
    absmean = None
    if sums:
        width = spec.group_width
        counts = torch.full((spec.num_groups,), float(width), dtype=torch.float64)
        counts[-1] = spec.in_features - (spec.num_groups - 1) * width
        absmean = torch.cat(sums, dim=1) / counts
    return _Stats(hi, lo, absmean)


def _tensor_stats(w: torch.Tensor, spec: LowBitSpec, minmax: bool = True) -> _Stats:
    """Statistics of all of W as one group (per-tensor scales), one pass over the rows.

    The float64 sum of |W| is taken per row, then per block, then over blocks in order, so
    it does not depend on the thread count (torch's whole-tensor reduction does). Without
    ``minmax`` only the sum is taken (``hi``/``lo`` are NaN when it is not finite, else 0).
    """
    absmean = _needs_absmean(spec)

    def block(r0: int, r1: int) -> tuple[float, float, float]:
        wb = _block(w, r0, r1)
        mn = mx = 0.0
        if minmax:
            mn, mx = (float(v) for v in torch.aminmax(wb))
        total = float(wb.abs().sum(dim=-1, dtype=torch.float64).sum()) if absmean else 0.0
        return mn, mx, total

    parts = _run_blocks(block, *w.shape)
    hi = max([0.0] + [p[1] for p in parts])
    lo = min([0.0] + [p[0] for p in parts])
    total = 0.0
    for p in parts:
        total += p[2]
    if any(p[0] != p[0] or p[1] != p[1] for p in parts) or total != total or total == float("inf"):
        hi = lo = float("nan")  # NaN anywhere (max/min would silently drop it)
    one = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    return _Stats(one(hi), one(lo), one(total) / float(w.numel()) if absmean else None)


def _floor_scale(s64: torch.Tensor) -> torch.Tensor:
    return s64.to(torch.float32).clamp(min=WEIGHT_SCALE_EPS)


def _zero_points_for(lo: torch.Tensor, s: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.round(-lo / s).clamp(0, qmax).to(torch.int8)


def _rule_scales(stats: _Stats, fmt: WeightFormat, rule: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) of ``rule`` from group statistics.

    "standard" is the format's quantization rule; "absmax" (``s = max|W|``), "hi"
    (``s = max(W) / qmax``) and "lo" (``s = min(W) / qmin``) are the extra candidates that
    :func:`exact_representation` tries.
    """
    hi, lo = stats.hi, stats.lo
    if rule == "absmax":
        return _floor_scale(torch.maximum(hi, -lo)), None
    if rule == "hi":
        return _floor_scale(hi / float(fmt.qmax)), None
    if rule == "lo":
        return _floor_scale(lo / float(fmt.qmin)), None
    if fmt.name in ("ternary", "int1"):
        return _floor_scale(stats.absmean), None
    if fmt.asymmetric:
        s = _floor_scale((hi - lo) / float(fmt.qmax))
        return s, _zero_points_for(lo.to(torch.float32), s, fmt.qmax)
    return _floor_scale(torch.maximum(hi / float(fmt.qmax), lo / float(fmt.qmin))), None


def _quantize_block(wb: torch.Tensor, spec: LowBitSpec, s: torch.Tensor, z: torch.Tensor | None,
                    q_out: torch.Tensor | None = None, check: bool = False) -> torch.Tensor | None:
    """Quantize a block of rows with scales ``s`` (``[r, G]`` or ``[1, 1]``) and zero points ``z``.

    Writes int8 q into ``q_out`` (a ``[r, K]`` view) if given. With ``check``, returns the
    per-group bool ``[r, G]`` (``[1, 1]`` per tensor) "dequantizing q gives wb exactly".
    All arithmetic is the definition's: fp32 ``round(W / s)`` (+ z), clamp, ``(q - z) * s``.
    """
    fmt = spec.format
    per_tensor = spec.granularity == "tensor"
    exact = []
    for piece in _pieces(spec):
        v = _piece_view(wb, piece)
        g0, groups = piece[2], piece[3]
        sp = s.view(1, 1, 1) if per_tensor else s[:, g0:g0 + groups].unsqueeze(-1)
        zp = None
        if z is not None:
            zp = (z.view(1, 1, 1) if per_tensor else z[:, g0:g0 + groups].unsqueeze(-1)).to(torch.float32)
        if fmt.name == "int1":
            r = torch.where(v >= 0, 1.0, -1.0)
        else:
            r = torch.div(v, sp)
            r.round_()
            if zp is not None:
                r.add_(zp)
            r.clamp_(fmt.qmin, fmt.qmax)
        if q_out is not None:
            _piece_view(q_out, piece).copy_(r)
        if check:
            d = r - zp if zp is not None else r
            d = d * sp
            eq = d == v
            exact.append(eq.all().reshape(1, 1) if per_tensor else eq.all(dim=-1))
    if not check:
        return None
    if per_tensor:
        return torch.stack(exact).all().reshape(1, 1)
    return torch.cat(exact, dim=1)


def _new_outputs(spec: LowBitSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    q = torch.empty((spec.out_features, spec.in_features), dtype=torch.int8)
    s = torch.empty(spec.scale_shape, dtype=torch.float32)
    z = torch.empty(spec.scale_shape, dtype=torch.int8) if spec.format.asymmetric else None
    return q, s, z


def quantize_weight(weight: torch.Tensor, spec: LowBitSpec) -> QuantizedWeight:
    """Quantize a float weight by the format's rule (see docs/formats.md, "Quantization rules")."""
    w = _check_weight(weight, spec)
    q, scales, zps = _new_outputs(spec)
    if spec.granularity == "tensor":
        stats = _tensor_stats(w, spec, minmax=not _needs_absmean(spec))
        if not stats.finite():
            raise ValueError("weight contains NaN or infinity; cannot quantize it")
        s, z = _rule_scales(stats, spec.format, "standard")
        scales.copy_(s)
        _run_blocks(lambda r0, r1: _quantize_block(_block(w, r0, r1), spec, s, z, q[r0:r1]), *w.shape)
        return QuantizedWeight(q, scales, None)

    def block(r0: int, r1: int) -> bool:
        wb = _block(w, r0, r1)
        stats = _block_stats(wb, spec)
        if not stats.finite():
            return False
        s, z = _rule_scales(stats, spec.format, "standard")
        scales[r0:r1] = s
        if z is not None:
            zps[r0:r1] = z
        _quantize_block(wb, spec, s, z, q[r0:r1])
        return True

    if not all(ok is not False for ok in _run_blocks(block, *w.shape, stop_if=lambda ok: not ok)):
        raise ValueError("weight contains NaN or infinity; cannot quantize it")
    return QuantizedWeight(q, scales, zps)


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                      spec: LowBitSpec) -> torch.Tensor:
    """fp32 ``W = q * s`` or ``W = (q - z) * s`` (one fp32 multiply per element)."""
    qi = q.to(torch.int32)
    if zero_points is not None:
        qi = qi - expand_groups(zero_points.to(torch.int32), spec)
    return qi.to(torch.float32) * expand_groups(scales.to(torch.float32), spec)


def expand_groups(t: torch.Tensor, spec: LowBitSpec) -> torch.Tensor:
    """Broadcast a per-group tensor (``spec.scale_shape``) to one entry per weight ``[R, K]``."""
    if spec.granularity == "tensor":
        return t.reshape(1, 1)
    return t.repeat_interleave(spec.group_width, dim=1)[:, : spec.in_features]


def _candidate_rules(fmt: WeightFormat) -> list[str]:
    rules = ["standard"] if fmt.asymmetric else ["standard", "absmax", "hi"]
    if not fmt.asymmetric and fmt.qmin < 0 and fmt.name != "int1":
        rules.append("lo")
    return rules


def _candidates(stats: _Stats, fmt: WeightFormat):
    """Candidate ``(s, z)`` in the documented order: per rule, the scale, one fp32 ulp up, down."""
    lo32 = stats.lo.to(torch.float32)
    for rule in _candidate_rules(fmt):
        base, _ = _rule_scales(stats, fmt, rule)
        for s in (base, torch.nextafter(base, torch.tensor(float("inf"))),
                  torch.nextafter(base, torch.tensor(0.0)).clamp(min=WEIGHT_SCALE_EPS)):
            yield s, (_zero_points_for(lo32, s, fmt.qmax) if fmt.asymmetric else None)


def exact_representation(weight: torch.Tensor, spec: LowBitSpec) -> QuantizedWeight | None:
    """The format's representation of ``weight`` if it reproduces every value exactly, else None.

    For weights that are already low-bit (e.g. a QAT checkpoint exported as ternary-valued
    floats ``q * s``). Each group takes the first candidate scale that reproduces it bit for
    bit. Candidates: the format's standard rule, then for symmetric formats ``max|W|``,
    ``max(W)/qmax`` and ``min(W)/qmin``; each also one fp32 ulp up and down. The result is
    verified: dequantizing it gives ``weight`` (as fp32) exactly. Detection succeeds for
    every symmetric-format weight whose groups contain an end value of the value set (or,
    for ternary/int1, any non-zero); for asymmetric formats it is best effort.

    Cost: candidates are tried block of rows by block of rows, and the search stops at the
    first block holding a group that no candidate reproduces, so ordinary (not low-bit)
    weights are rejected after reading a few rows (plus one finiteness pass).
    """
    w = _check_weight(weight, spec)
    fmt = spec.format
    q, scales, zps = _new_outputs(spec)
    blocks = list(_row_blocks(*w.shape))
    failed = lambda ok: not ok  # noqa: E731
    if spec.granularity == "tensor":
        stats = _tensor_stats(w, spec)
        if not stats.finite():
            raise ValueError("weight contains NaN or infinity; cannot quantize it")
        for s, z in _candidates(stats, fmt):
            # One group: the first candidate exact on every block wins. The first block is
            # tried alone: most candidates (and ordinary weights) fail there.
            def exact(r0: int, r1: int, s=s, z=z) -> bool:
                return bool(_quantize_block(_block(w, r0, r1), spec, s, z, q[r0:r1], check=True).all())

            if exact(*blocks[0]) and all(_run_blocks(exact, *w.shape, stop_if=failed, blocks=blocks[1:])):
                scales.copy_(s)
                return QuantizedWeight(q, scales, None)
        return None

    def block(r0: int, r1: int) -> bool:
        wb = _block(w, r0, r1)
        stats = _block_stats(wb, spec)
        chosen_s = chosen_z = done = None
        for s, z in _candidates(stats, fmt):
            exact = _quantize_block(wb, spec, s, z, check=True)
            if chosen_s is None:
                chosen_s, chosen_z, done = s, z, exact
            else:
                take = exact & ~done
                chosen_s = torch.where(take, s, chosen_s)
                if z is not None:
                    chosen_z = torch.where(take, z, chosen_z)
                done = done | exact
            if bool(done.all()):
                break
        if not bool(done.all()):
            return False  # a group no candidate reproduces: W is not exactly representable
        scales[r0:r1] = chosen_s
        if chosen_z is not None:
            zps[r0:r1] = chosen_z
        _quantize_block(wb, spec, chosen_s, chosen_z, q[r0:r1])
        return True

    _raise_if_not_finite(w)
    if not block(*blocks[0]):
        return None
    if not all(_run_blocks(block, *w.shape, stop_if=failed, blocks=blocks[1:])):
        return None
    return QuantizedWeight(q, scales, zps)


def quantize_activations_int8(x: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet a8: ``s_x = 127 / max(|x|).clamp(min=1e-5)``, ``xq = clamp(round(x * s_x), -128, 127)``.

    ``x`` is fp32 ``[M, K]``; the max is per row (``block == 0``) or per K-block of ``block``
    columns. Returns ``xq`` as fp32 holding integers (exact) and fp32 ``s_x`` ``[M, B]``.
    """
    m, k = x.shape
    width = k if block == 0 else block
    blocks = -(-k // width)
    padded = torch.zeros((m, blocks * width), dtype=torch.float32)
    padded[:, :k] = x
    absmax = padded.view(m, blocks, width).abs().amax(dim=-1)
    # A true fp32 division: PyTorch evaluates `127.0 / tensor` as `127.0 * reciprocal(tensor)`,
    # which can differ in the last ulp from the documented 127 / max.
    s_x = torch.full_like(absmax, 127.0) / absmax.clamp(min=ACT_ABSMAX_EPS)
    s_full = s_x.repeat_interleave(width, dim=1)[:, :k]
    xq = torch.round(x * s_full).clamp(-128, 127)
    return xq, s_x


def check_weight_tensors(scales: torch.Tensor, zero_points: torch.Tensor | None, spec: LowBitSpec,
                         check_values: bool = True) -> None:
    """Validate scale / zero-point tensors against ``spec`` (shape, dtype, and if asked, values)."""
    fmt: WeightFormat = spec.format
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(scales).__name__}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if tuple(scales.shape) != spec.scale_shape:
        raise ValueError(f"scales for {spec.describe()} with K={spec.in_features}, N={spec.out_features} "
                         f"must have shape {list(spec.scale_shape)}, got {list(scales.shape)}")
    if fmt.asymmetric:
        if zero_points is None:
            raise ValueError(f"format {fmt.name} is asymmetric and needs zero_points")
        if zero_points.dtype != torch.int8:
            raise TypeError(f"zero_points must be int8, got {zero_points.dtype}")
        if tuple(zero_points.shape) != spec.scale_shape:
            raise ValueError(f"zero_points must have the scales' shape {list(spec.scale_shape)}, "
                             f"got {list(zero_points.shape)}")
    elif zero_points is not None:
        raise ValueError(f"format {fmt.name} is symmetric and takes no zero_points")
    if check_values:
        if not bool((torch.isfinite(scales) & (scales > 0)).all()):
            raise ValueError("scales must be finite and > 0")
        if zero_points is not None and zero_points.numel():
            lo, hi = int(zero_points.min()), int(zero_points.max())
            if lo < 0 or hi > fmt.qmax:
                raise ValueError(f"zero_points of {fmt.name} must lie in [0, {fmt.qmax}], found [{lo}, {hi}]")
