"""Absorb a model's own per-token int8 activation quantization into bound low-bit layers.

Runs on a bound ATen graph (`lowbit.compiler.bind`), where shapes may be symbolic. Matches

    xq = <subgraph of x>          e.g. BitNet a8:  s = 127 / max|x|.clamp(1e-5)
    r  = lowbit.packed_linear(xq, packed, None, ..., act_format="none")   xq = round(x*s).clamp(-128, 127)
    t  = <op of r and of x's subgraph>                                      t = r / s

and produces `t = lowbit.packed_linear(x, packed, None, ..., act_format="int8")`: the kernel
quantizes x itself and divides by the scale in its epilogue.

When the model's own arithmetic differs from the documented one (Hugging Face BitNet computes
`s = 127 * (1 / max)` -- PyTorch's `127 / t` -- and rescales by `r / (s * weight_scale)`), the
second form keeps it exactly: if the layer's input is a float cast of an int8 tensor (values
proven integers in [-128, 127]) and the weight is per-tensor ternary with a power-of-two scale
(read from the packed weight), `packed_linear(xq, ..., act_format="none")` becomes
`act_format="int8_unit"`: the integer kernels take xq with scale 1, and every op of the model
(its scale, quantization and rescale) stays in the graph as it is. Bit-exact because every
partial sum is an integer times the power-of-two scale below 2**24 (K < 2**17). This is the FX twin of the IR pass
`lowbit-recognize-act-quant` (which needs static shapes) and uses the same proof: the
subgraphs are not trusted by their op names but *evaluated with PyTorch* on the pass's probe
rows (ties, zero rows, huge, denormal and sub-floor values, negative maxima, maxima where
`127 / a` and `127 * (1 / a)` round differently, random rows); xq must equal the documented
quantization and t must equal r / s bit for bit on every probe, else nothing changes and the
report says which check failed.
"""
from __future__ import annotations

import logging
import operator
from collections import deque
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger("lowbit.act_quant")

_PACKED = None
_VIEWS = {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "clone", "alias", "_to_copy"}


def _packed_op():
    global _PACKED
    if _PACKED is None:
        _PACKED = torch.ops.lowbit.packed_linear.default
    return _PACKED


def _name(node: torch.fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", "") if packet is not None else getattr(node.target, "__name__", "")


def _val(node: Any):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _hint(d) -> int:
    return int(d) if isinstance(d, int) else int(d.node.hint)


def absorb_activation_quantization(graph: torch.fx.Graph, report: list[dict], search_depth: int = 12,
                                   seed: int = 0, layers: Optional[list] = None) -> int:
    """Rewrite every verified pattern (see the module docstring); returns how many.

    ``layers``: bind's `BoundLayer`s in placeholder order (``lowbit_packed_<i>``), for the
    int8_unit form's scale check; without them only the first form is tried."""
    count = 0
    by_name = {f"lowbit_packed_{i}": layer for i, layer in enumerate(layers or [])}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _packed_op():
            continue
        if node.args[9] != "none":
            continue
        done = _unit_scale(node, by_name, report)
        if not done and node.args[2] is None:
            done = _absorb(graph, node, report, search_depth, seed)
        count += int(done)
    if count:
        graph.eliminate_dead_code()
    return count


_CASTS = {"_to_copy", "convert_element_type"}
# ops that only rearrange (never change) values: prims' collapse appears for dynamic shapes
_SHAPE_ONLY = (_VIEWS - _CASTS) | {"collapse", "collapse_view", "view_of", "expand", "permute", "transpose", "t"}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _int8_source(x: torch.fx.Node, depth: int = 8) -> Optional[torch.fx.Node]:
    """The int8 tensor x is a (view of a) float cast of, else None."""
    n = x
    for _ in range(depth):
        if not isinstance(n, torch.fx.Node) or n.op != "call_function":
            return None
        name = _name(n)
        src = n.args[0] if n.args else None
        if name in _CASTS and isinstance(src, torch.fx.Node):
            v_in, v_out = _val(src), _val(n)
            if isinstance(v_in, torch.Tensor) and isinstance(v_out, torch.Tensor) and v_out.dtype in _FLOATS:
                if v_in.dtype == torch.int8:
                    return src
                if v_in.dtype in _FLOATS:  # float -> float casts keep integers < 256 exact
                    n = src
                    continue
            return None
        if name in _SHAPE_ONLY and isinstance(src, torch.fx.Node):
            n = src
            continue
        return None
    return None


def _pow2_tensor_scale(layer) -> tuple[Optional[float], str]:
    """The per-tensor scale of a packed ternary layer if it is a power of two, with why not."""
    import math
    from lowbit.runtime.qgemm import PackedWeight, packed_layout, qlinear, unpack_weight
    spec = layer.spec
    if spec.weight_format != "ternary" or spec.granularity != "tensor":
        return None, f"the weight is {spec.describe()}, not per-tensor ternary"
    if spec.in_features >= 2 ** 17:
        return None, f"K = {spec.in_features}: integer sums could exceed 2**24"
    total, kbb, nbb, nkb = packed_layout("ternary", spec.out_features, spec.in_features, layer.kblock)
    pw = PackedWeight(layer.packed.view(torch.uint8), "ternary", spec.out_features, spec.in_features,
                      layer.kblock, kbb, nbb, nkb)
    at = getattr(layer, "nonzero_at", None)  # where binding saw the first non-zero code (None: not recorded)
    if at is None:
        nz = unpack_weight(pw).nonzero()
        at = tuple(int(i) for i in nz[0]) if nz.numel() else ()
    if not at:
        return 1.0, ""  # all-zero weight: any scale gives exact zeros
    n, k = at
    e = torch.zeros(1, spec.in_features)
    e[0, k] = 1.0
    s = abs(float(qlinear(e, pw, mode="weight_only")[0, n]))
    mant, _ = math.frexp(s)
    if s == 0.0 or mant != 0.5:
        return None, f"the weight's scale {s!r} is not a power of two"
    return s, ""


def _unit_scale(node: torch.fx.Node, layers: dict, report: list[dict]) -> bool:
    """The int8_unit form (see the module docstring)."""
    src = _int8_source(node.args[0])
    if src is None:
        return False
    layer = layers.get(getattr(node.args[1], "name", None))
    where = dict(kind="act-quant", location=node.name)
    if layer is None:
        report.append(dict(where, result="not absorbed", reason="the packed weight is unknown to the pass"))
        return False
    scale, why = _pow2_tensor_scale(layer)
    if scale is None:
        report.append(dict(where, result="not absorbed", reason=why))
        return False
    args = list(node.args)
    args[9] = "int8_unit"
    node.args = tuple(args)
    for entry in report:  # the layer's own entry now describes the int8 layer
        if entry.get("node") == node.name:
            entry["format"] = str(entry.get("format", "")).replace("a=none", "a=int8_unit")
    report.append(dict(where, result="absorbed", numerics="exact",
                       format="int8 values from the model (scale 1); the model's rescale kept"))
    log.info("int8 activations of %s taken as they are (act_format int8_unit)", node.name)
    return True


def _single_user_through_views(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_function" and _name(user) in _VIEWS and user.args[0] is node:
            node = user
            continue
        return user


def _candidates(xq: torch.fx.Node, k: int, depth_limit: int) -> list[torch.fx.Node]:
    """Float nodes with xq's element count and last dim K, walking back from xq, nearest first."""
    want = _val(xq)
    if not isinstance(want, torch.Tensor):
        return []
    out, seen = [], set()
    queue = deque([(xq, 0)])
    while queue:
        n, depth = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        v = _val(n)
        if n is not xq and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1 \
                and v.shape[-1] == k and v.numel() == want.numel() and v.dtype in (torch.float32, torch.bfloat16):
            out.append(n)
        if depth >= depth_limit or n.op != "call_function":
            continue
        for a in n.all_input_nodes:
            queue.append((a, depth + 1))
    return out


def _evaluate(targets: list[torch.fx.Node], env: dict) -> list:
    """Values of `targets` computed from `env` (node -> value) by running the graph's nodes."""
    cache = dict(env)

    def value(n):
        if not isinstance(n, torch.fx.Node):
            return n
        if n in cache:
            return cache[n]
        if n.op == "placeholder" and isinstance(_val(n), (int, torch.SymInt)):
            cache[n] = _hint(_val(n))  # a size input: probes have the example's sizes
            return cache[n]
        if n.op != "call_function":
            raise _Unsupported(f"{n.name} ({n.op}) depends on more than the activation")
        if n.target is _packed_op():
            raise _Unsupported("the subgraph runs another low-bit layer")
        args = torch.fx.node.map_arg(n.args, value)
        kwargs = torch.fx.node.map_arg(n.kwargs, value)
        with torch.no_grad():
            out = n.target(*args, **kwargs)
        cache[n] = out
        return out

    return [value(t) for t in targets]


class _Unsupported(Exception):
    pass


def _absorb(graph: torch.fx.Graph, node: torch.fx.Node, report: list[dict], depth: int, seed: int) -> bool:
    from lowbit.passes.recognize_act_quant import documented_quantization, probe_rows

    xq, n = node.args[0], node.args[7]
    rescale = _single_user_through_views(node)
    xq_val = _val(xq)
    if rescale is None or not isinstance(xq_val, torch.Tensor):
        return False
    k = xq_val.shape[-1]
    cands = _candidates(xq, k, depth)
    if not cands:
        return False
    where = dict(kind="act-quant", location=node.name)
    reasons = []
    for x in cands:
        ok, why = _verify(x, xq, node, rescale, k, n, seed, documented_quantization, probe_rows)
        if ok:
            new = list(node.args)
            new[0], new[9] = x, "int8"
            with graph.inserting_before(rescale):
                call = graph.call_function(_packed_op(), tuple(new))
            call.meta = dict(node.meta)
            out = call
            t_val, x_val = _val(rescale), _val(x)
            if isinstance(x_val, torch.Tensor) and isinstance(t_val, torch.Tensor):
                call.meta["val"] = x_val.new_empty((*x_val.shape[:-1], n))
                if tuple(t_val.shape) != tuple(call.meta["val"].shape):
                    with graph.inserting_before(rescale):
                        out = graph.call_function(torch.ops.aten.reshape.default, (call, list(t_val.shape)))
                    out.meta = dict(rescale.meta)
                if t_val.dtype != x_val.dtype:
                    with graph.inserting_before(rescale):
                        out = graph.call_function(torch.ops.aten._to_copy.default, (out,), {"dtype": t_val.dtype})
                    out.meta = dict(rescale.meta)
            rescale.replace_all_uses_with(out)
            for entry in report:  # the layer's own entry now describes the int8 layer
                if entry.get("node") == node.name:
                    entry["node"] = call.name
                    entry["format"] = str(entry.get("format", "")).replace("a=none", "a=int8")
            report.append(dict(where, result="absorbed", numerics="exact"))
            log.info("absorbed the activation quantization of %s", node.name)
            return True
        reasons.append(why)
    # The nearest candidate whose subgraph evaluated explains best why it failed.
    evaluated = [w for w in reasons if not w.startswith("cannot evaluate")] or reasons
    report.append(dict(where, result="not absorbed", reason=evaluated[0]))
    return False


def _verify(x, xq, node, rescale, k, n, seed, documented_quantization, probe_rows) -> tuple[bool, str]:
    x_val, r_val, t_val = _val(x), _val(node), _val(rescale)
    if not all(isinstance(v, torch.Tensor) for v in (x_val, r_val, t_val)):
        return False, "shapes unknown"
    x_shape = [_hint(d) for d in x_val.shape]
    r_shape = [_hint(d) for d in r_val.shape]
    t_shape = [_hint(d) for d in t_val.shape]
    rows = int(np.prod(x_shape[:-1])) if len(x_shape) > 1 else 1
    if t_shape[-1] != n or int(np.prod(t_shape)) != rows * n:
        return False, f"rescaled result shape {t_shape} does not match the input {x_shape}"
    rng = np.random.default_rng(seed)
    all_rows = probe_rows(k, max(24, rows), rng)
    for p in range(-(-len(all_rows) // rows)):
        idx = (np.arange(rows) + p * rows) % len(all_rows)
        xp = all_rows[idx]
        yp = (rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-2, 2)).astype(np.float32)
        yp[rng.random((rows, n)) < 0.1] = 0.0
        x_t = torch.from_numpy(xp).reshape(x_shape).to(x_val.dtype)
        y_t = torch.from_numpy(yp).reshape(r_shape).to(r_val.dtype)
        if x_val.dtype != torch.float32:
            xp = x_t.float().reshape(rows, k).numpy()  # the probe as the model sees it
            yp = y_t.float().reshape(rows, n).numpy()
        try:
            got_xq, got_t = _evaluate([xq, rescale], {x: x_t, node: y_t})
        except _Unsupported as e:
            return False, f"cannot evaluate the activation subgraph: {e}"
        except Exception as e:  # the model's own ops on probe values
            return False, f"cannot evaluate the activation subgraph: {type(e).__name__}: {e}"
        xq_doc, s_doc = documented_quantization(xp)
        with np.errstate(all="ignore"):
            want = yp / s_doc[:, None]
        got_xq = got_xq.float().reshape(rows, k).numpy()
        got_t = got_t.float().reshape(rows, n).numpy()
        if t_val.dtype != torch.float32:
            want = torch.from_numpy(want).to(t_val.dtype).float().numpy()
        if not np.array_equal(got_xq, xq_doc):
            bad = tuple(np.argwhere(got_xq != xq_doc)[0])
            return False, (f"the quantized input is not round_half_even(x * 127 / max(|x|, 1e-5)).clamp(-128, 127) "
                           f"(probe value {xp[bad]!r}: model {got_xq[bad]!r}, documented {xq_doc[bad]!r})")
        if not np.array_equal(got_t, want, equal_nan=True):
            return False, "the matmul result is not rescaled by exactly r / s (per-token division)"
    return True, ""
