"""Weights are data, not code: recognise low-bit matmuls on the tensors and bind them as buffers.

Runs on a captured ATen graph (`frontend.CapturedGraph`) whose module state -- parameters and
buffers -- are still graph *inputs* (placeholders), before anything is imported into MLIR.

Matches every matmul whose weight operand is computed from module state only:

* `aten.mm(x, w)` / `aten.addmm(b, x, w)` where `w` ([K, N]) and `b` derive from parameters,
  buffers and constants through any subgraph (an `nn.Linear` weight's transpose, a model's own
  dequantization of packed integer codes: shifts, masks, zero points, scales, reshapes...);
* `lowbit.linear(x, packed, scales, zero_points, bias, ...)` (`LowBitLinear` layers), whose codes
  are unpacked with the documented storage layout.

The weight subgraph is *evaluated with PyTorch on the real tensors* (vectorized, once per
weight) and the result is proven to be exactly low-bit by the same search the IR-level
recognizer uses (`passes.lib_recognize.find_exact_format`: every value bit for bit). Sibling
layers that read the same activation with the same format (q/k/v, gate/up) are merged into one.
Each recognised layer is packed for the microkernels (`lowbit_qpack`, native) and the matmul
becomes

    lowbit.packed_linear(x, <packed bytes: a new graph input>, <bias: a new input or None>, ...)

so the graph -- and the MLIR made from it -- carries each weight's format, shape and tiling,
never its bytes. Module state that nothing reads any more (the fp or storage-packed weights)
is dropped from the graph's inputs; what stays (norm weights, embeddings, fp heads) is
passed at run time, so structurally identical layers compile to identical code.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import operator
import threading
import time
import weakref
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from lowbit.compiler import heap
from lowbit.compiler.frontend import CapturedGraph, TensorSpec
from lowbit.compiler.packed_linear import packed_linear  # noqa: F401  (registers the op)
from lowbit.quant.threads import one_intra_op_thread

log = logging.getLogger("lowbit.bind")

aten = torch.ops.aten
_MM = {aten.mm.default, aten.addmm.default}
_KERNEL_NB = 64
# Node metadata a replacement inherits: where it came from (regions, reports, diagnostics).
_PROVENANCE = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


@dataclasses.dataclass
class BoundLayer:
    """One packed low-bit layer (possibly several merged siblings) of a bound graph."""

    spec: Any                  # LowBitSpec of the packed weight (merged: N is the sum)
    origin: str                # "lowbit.linear" | "fp-weights" | "dequant-subgraph"
    kblock: int
    packed: torch.Tensor       # int8 [bytes]
    bias: Optional[torch.Tensor]
    names: list[str]           # FX node names of the matmuls it replaces
    location: str = ""
    offsets: Optional[torch.Tensor] = None  # fp32 [N, groups]: float zero points (dequant_match)
    numerics: str = "bit-exact"
    perm: Optional[torch.Tensor] = None     # int64 [K]: act-order, the kernel reads x[:, perm]
    # (n, k) of the first non-zero code in row-major order, () if all are zero, None unknown:
    # where `act_quant` probes the packed weight's scale without unpacking it
    nonzero_at: Optional[tuple] = None

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + (0 if self.bias is None else self.bias.numel() * 4)


@dataclasses.dataclass
class Binding:
    """What binding added to a captured graph: derived runtime inputs and their report."""

    layers: list[BoundLayer]
    derived: list[torch.Tensor]            # appended after the caller's arguments, in order
    sources: list[int]                     # caller positions the derived tensors were computed from
    report: list[dict]
    state_positions: list[int] = dataclasses.field(default_factory=list)  # all module state read
    seconds: float = 0.0

    def extend(self, args: Sequence[Any]) -> list[Any]:
        return list(args) + self.derived


@dataclasses.dataclass
class _Found:
    node: torch.fx.Node
    x: torch.fx.Node
    spec: Any
    q: torch.Tensor
    scales: torch.Tensor
    zero_points: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    origin: str
    sources: set[int]
    key: tuple = ()            # identity of the weight (see _weight_key); () = not cacheable
    offsets: Optional[torch.Tensor] = None  # float zero points folded (see dequant_match)
    numerics: str = "bit-exact"
    perm: Optional[torch.Tensor] = None     # act-order column order (see dequant_match)


class _ConstantEvaluator:
    """Values of graph nodes that depend on module state only, computed on demand."""

    def __init__(self, gm: torch.fx.GraphModule, values: dict[torch.fx.Node, Any]):
        self.gm = gm
        self.values = dict(values)          # placeholder -> tensor (module state only)
        self.constant: dict[torch.fx.Node, bool] = {}

    def is_constant(self, node: Any) -> bool:
        if not isinstance(node, torch.fx.Node):
            return True
        hit = self.constant.get(node)
        if hit is not None:
            return hit
        if node.op == "placeholder":
            result = node in self.values
        elif node.op == "get_attr":
            result = True
        elif node.op == "call_function":
            result = _is_pure(node) and all(self.is_constant(a) for a in node.all_input_nodes)
        else:
            result = False
        self.constant[node] = result
        return result

    def sources(self, node: torch.fx.Node, positions: dict[torch.fx.Node, int]) -> set[int]:
        seen, out, work = set(), set(), [node]
        while work:
            n = work.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in positions:
                out.add(positions[n])
            work.extend(n.all_input_nodes)
        return out

    def value(self, node: Any):
        if not isinstance(node, torch.fx.Node):
            return node
        if node in self.values:
            return self.values[node]
        if node.op == "get_attr":
            v = _fetch_attr(self.gm, node.target)
        else:
            args = torch.fx.node.map_arg(node.args, self.value)
            kwargs = torch.fx.node.map_arg(node.kwargs, self.value)
            with torch.no_grad():
                v = node.target(*args, **kwargs)
        self.values[node] = v
        return v

    def forget_intermediates(self) -> None:
        """Drop computed weight intermediates (they can be large fp32 copies)."""
        for node in list(self.values):
            if node.op == "call_function":
                del self.values[node]


def _is_pure(node: torch.fx.Node) -> bool:
    target = node.target
    if target in (operator.getitem,):
        return True
    schema = getattr(target, "_schema", None)
    if schema is None:
        return False
    return not schema.is_mutable and not any(a.alias_info is not None and a.alias_info.is_write
                                             for a in schema.arguments)


def _fetch_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _location(node: torch.fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [l.strip() for l in trace.strip().splitlines() if l.strip().startswith("File ")]
    return f"{node.name} @ {lines[-1]}" if lines else node.name


def bind_weights(captured: CapturedGraph, args: Sequence[Any], state_positions: Sequence[int], *,
                 activations: str = "none", formats: Sequence[str] | None = None,
                 group_sizes: Sequence[int] | None = None, merge_siblings: bool = True,
                 numerics: str = "bit-exact") -> Binding:
    """Recognise and pack the low-bit matmuls of `captured` (modified in place).

    `state_positions`: caller positions of module state (parameters and buffers): their
    values are read now; every other input is an activation. Returns the `Binding`; the
    caller passes `binding.extend(args)` to the compiled graph. `numerics`: "bit-exact", or
    "dequant-rounding" to also accept library weights dequantized in a low precision
    (`compiler/dequant_match.py`).
    """
    if numerics not in ("bit-exact", "dequant-rounding"):
        raise ValueError(f"dequant_numerics must be 'bit-exact' or 'dequant-rounding', got {numerics!r}")
    with one_intra_op_thread():   # many small ops: see lowbit.quant.threads
        return _bind_weights(captured, args, state_positions, activations, formats, group_sizes,
                             merge_siblings, numerics)


def _bind_weights(captured: CapturedGraph, args: Sequence[Any], state_positions: Sequence[int],
                  activations: str, formats: Sequence[str] | None, group_sizes: Sequence[int] | None,
                  merge_siblings: bool, numerics: str) -> Binding:
    from lowbit.passes.lib_recognize import DEFAULT_FORMATS, DEFAULT_GROUP_SIZES

    start = time.perf_counter()
    formats = list(formats or DEFAULT_FORMATS)
    group_sizes = list(group_sizes or DEFAULT_GROUP_SIZES)
    gm = captured.graph_module
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    position = dict(zip(placeholders, captured.input_indices))
    state = set(state_positions)
    values = {n: args[p] for n, p in position.items()
              if p in state and isinstance(args[p], torch.Tensor)}
    ev = _ConstantEvaluator(gm, values)
    report: list[dict] = []
    found: list[_Found] = []
    # [mm node, x, fp weight [K, N], sources, packed panels or None, cache entry or None]:
    # weights that are not low-bit, pre-packed for BRGEMM below
    dense: list[list] = []

    config = (tuple(formats), tuple(group_sizes), activations, numerics)
    for node in list(graph.nodes):
        if node.op != "call_function" or (node.target not in _MM and node.target is not torch.ops.lowbit.linear.default):
            continue
        key, key_positions = _weight_key(node, ev, position, args, config)
        cached = _lookup(key)
        if cached is not None:
            hit = _found_from_cache(node, cached, report, key, key_positions)
            if hit is not None:
                found.append(hit)
            elif cached.dense is not None:
                dense.append([node, node.args[0], None, set(key_positions), cached.dense, None])
            continue
        n_dense, n_report = len(dense), len(report)
        if node.target in _MM:
            hit = _match_mm(node, ev, position, formats, group_sizes, activations, report, dense, numerics)
        else:
            hit = _match_lowbit_linear(node, ev, position, report, unpack=False)
        if hit is not None:
            hit.key = key
            found.append(hit)
        if key:
            entry = _remember(key, key_positions, hit, report[n_report:], args)
            if len(dense) > n_dense:
                dense[-1][5] = entry  # the panels, once packed, are remembered with it
        ev.forget_intermediates()

    groups = _sibling_groups(found) if merge_siblings else [[f] for f in found]
    order = {n: i for i, n in enumerate(graph.nodes)}
    layers: list[BoundLayer] = []
    derived: list[torch.Tensor] = []
    sources: set[int] = set()
    last_ph = placeholders[-1] if placeholders else None
    n_args = len(args)
    fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in graph.nodes])

    def add_input(tensor: torch.Tensor, name: str) -> torch.fx.Node:
        nonlocal last_ph
        if last_ph is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                ph = graph.placeholder(name)
        else:
            with graph.inserting_after(last_ph):
                ph = graph.placeholder(name)
        last_ph = ph
        # Static shape: a packed buffer's size is part of the layer, never a dynamic dim.
        ph.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else None
        ph.meta["tensor_meta"] = _extract_tensor_metadata(tensor)
        captured.input_indices.append(n_args + len(derived))
        captured.input_specs.append(TensorSpec.of(tensor))
        derived.append(tensor)
        return ph

    replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # matmul node -> what computes it now
    for group in groups:
        gkey = tuple(f.key for f in group) if all(f.key for f in group) else None
        layer = _LAYERS.get(gkey) if gkey is not None else None
        if layer is None:
            for f in group:
                if f.q is None:  # known from an earlier binding of these tensors: evaluate now
                    _materialize(f, ev, position, formats, group_sizes, activations, numerics)
            layer = _pack_group(group)
            for f in group:
                f.q = None  # the packed layer holds the codes now
            if gkey is not None:
                _LAYERS[gkey] = layer
        idx = len(layers)
        packed_ph = add_input(layer.packed, f"lowbit_packed_{idx}")
        bias_ph = add_input(layer.bias, f"lowbit_bias_{idx}") if layer.bias is not None else None
        x = group[0].x
        while x in replaced:  # the input is an earlier layer's output, rewritten above
            x = replaced[x]
        spec = layer.spec
        if layer.perm is not None:  # act-order: the codes are packed with groups contiguous
            perm_ph = add_input(layer.perm, f"lowbit_perm_{idx}")
            first_node = min(group, key=lambda f: order[f.node]).node
            with graph.inserting_before(first_node):
                x = graph.call_function(aten.index_select.default, (x, 1, perm_ph))
            x_meta = group[0].x.meta.get("val")
            if isinstance(x_meta, torch.Tensor):
                x.meta["val"] = x_meta.new_empty(x_meta.shape)
        first = min(group, key=lambda f: order[f.node]).node
        with graph.inserting_before(first):
            call = graph.call_function(torch.ops.lowbit.packed_linear.default,
                                       (x, packed_ph, bias_ph, spec.weight_format, spec.granularity,
                                        spec.group_size, spec.in_features, spec.out_features,
                                        layer.kblock, spec.act_format))
        provenance = {k: first.meta[k] for k in _PROVENANCE if k in first.meta}
        call.meta.update(provenance)
        x_val = x.meta.get("val")
        out_dtype = x_val.dtype if isinstance(x_val, torch.Tensor) else torch.float32
        if isinstance(x_val, torch.Tensor):
            call.meta["val"] = x_val.new_empty((*x_val.shape[:-1], spec.out_features))
        offset, anchor = 0, call
        if layer.offsets is not None:  # float zero points: + group sums of x @ offsets^T
            from lowbit.compiler.dequant_match import add_offset_correction
            call_out = add_offset_correction(graph, x, call, layer.offsets, spec, add_input,
                                             f"lowbit_offsets_{idx}", provenance)
            anchor = call_out
        else:
            call_out = call
        for f in group:
            n = f.spec.out_features
            if len(group) == 1:
                out = call_out
            else:
                with graph.inserting_after(anchor):
                    out = graph.call_function(aten.slice.Tensor, (call_out, -1, offset, offset + n))
                out.meta.update(provenance)
                anchor = out
                if isinstance(x_val, torch.Tensor):
                    out.meta["val"] = x_val.new_empty((*x_val.shape[:-1], n))
            offset += n
            old = f.node.meta.get("val")
            if isinstance(old, torch.Tensor) and old.dtype != out_dtype:
                with graph.inserting_after(anchor):
                    cast = graph.call_function(aten._to_copy.default, (out,), {"dtype": old.dtype})
                cast.meta["val"] = old
                cast.meta.update(provenance)
                out = anchor = cast
            f.node.replace_all_uses_with(out)
            replaced[f.node] = out
            graph.erase_node(f.node)
            sources |= f.sources
        layers.append(layer)
        layer.names = [f.node.name for f in group]
        report.append(dict(kind="matmul", origin=layer.origin, result="recognized", format=spec.describe(),
                           location=layer.location, packed_bytes=layer.nbytes,
                           node=call.name, numerics=layer.numerics,
                           merged=len(group) if len(group) > 1 else 0))

    if any(l.spec.act_format == "none" for l in layers):
        from lowbit.compiler.act_quant import absorb_activation_quantization
        absorb_activation_quantization(graph, report, layers=layers)

    for node, x, w, srcs, packed, entry in dense:
        if packed is None:
            packed = _pack_dense(w)
            if entry is not None and packed is not None:
                entry.dense_ref = weakref.ref(packed)
        if packed is None:
            continue
        fmt = str(packed.dtype).replace("torch.", "")
        ph = add_input(packed, f"lowbit_dense_{len(derived)}")
        with graph.inserting_before(node):
            call = graph.call_function(torch.ops.lowbit.packed_matmul.default, (x, ph))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        sources |= srcs
        report.append(dict(kind="matmul", origin="dense", result="packed for BRGEMM",
                           format=fmt, location=_location(call),
                           packed_bytes=packed.numel() * packed.element_size()))

    _drop_state_assertions(graph, ev)
    graph.eliminate_dead_code()
    _drop_unused_inputs(captured, graph)
    gm.recompile()
    dense.clear()   # evaluated fp weights (the panels are inputs now)
    heap.release()  # unpacked codes and evaluated weights were freed: give the pages back
    binding = Binding(layers, derived, sorted(sources), report, sorted(state), time.perf_counter() - start)
    log.info("bound %d low-bit layer(s) (%d matmuls, %.1f MiB packed) in %.2f s", len(layers), len(found),
             sum(l.nbytes for l in layers) / 2**20, binding.seconds)
    return binding


def _match_mm(node, ev: _ConstantEvaluator, position, formats, group_sizes, activations,
              report, dense: Optional[list] = None, numerics: str = "bit-exact") -> Optional[_Found]:
    from lowbit.compiler.code_table import prove_per_tensor_ternary
    from lowbit.passes.lib_recognize import find_exact_format
    from lowbit.quant.quantizers import QuantizedWeight

    if node.target is aten.addmm.default:
        b, x, w = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
    else:
        (x, w), b = node.args[:2], None
    if not isinstance(w, torch.fx.Node) or ev.is_constant(x):
        return None
    if not ev.is_constant(w):
        why = _not_state_reason(w, ev)
        if why:
            report.append(dict(kind="matmul", location=_location(node), result="not bound", reason=why))
        return None
    if b is not None and not ev.is_constant(b):
        return None
    x_val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if not isinstance(x_val, torch.Tensor) or x_val.dtype not in (torch.float32, torch.bfloat16):
        return None
    where = dict(kind="matmul", location=_location(node))
    origin = "fp-weights" if _is_plain_weight(w, ev) else "dequant-subgraph"
    try:  # integer codes through elementwise ops: the same proof on the table of the codes
        by_table = prove_per_tensor_ternary(w, ev, formats, activations)
    except Exception as e:  # the full evaluation below reports what is wrong
        log.debug("code table of %s not decided: %s: %s", w.name, type(e).__name__, e)
        by_table = None
    try:
        wv = ev.value(w) if by_table is None else None
        bv = ev.value(b) if b is not None else None
    except Exception as e:  # the weight subgraph is the model's code: any error means "not ours"
        report.append(dict(where, result="not recognized", reason=f"the weight could not be evaluated: "
                           f"{type(e).__name__}: {e}"))
        return None
    if by_table is not None:
        spec, q, scales = by_table
        k, n = spec.in_features, spec.out_features
        qw = QuantizedWeight(q, scales, None)
        why = ""
    else:
        if not isinstance(wv, torch.Tensor) or wv.dim() != 2 or not wv.is_floating_point():
            return None
        k, n = wv.shape
        w_nk = wv.detach().t().to(torch.float32).contiguous().numpy()
        spec, qw, why = find_exact_format(w_nk, formats, group_sizes, activations)
    offsets, perm, numerics_note = None, None, "bit-exact"
    if spec is None and numerics == "dequant-rounding" and origin == "dequant-subgraph":
        from lowbit.compiler.dequant_match import match_dequant, subgraph_leaves
        leaves, low = subgraph_leaves(w, ev)
        dm, why2 = match_dequant(wv.detach().t(), leaves, low, _tolerant_formats(formats), group_sizes,
                                 activations)
        if dm is not None:
            spec, offsets, perm = dm.spec, dm.offsets, dm.perm
            qw = type("QW", (), {})()
            qw.q, qw.scales, qw.zero_points = dm.q, dm.scales.reshape(spec.scale_shape), dm.zero_points
            numerics_note = (f"within {dm.tolerance} (max |err| {dm.max_error:.2g}"
                             + (", float zero point" if dm.zero_kind == "float" else "") + ")")
            if offsets is not None:
                origin = "dequant-subgraph (float zero)"
            if perm is not None:
                origin = "dequant-subgraph (act-order)"
                numerics_note = numerics_note[:-1] + ", act-order g_idx)"
        else:
            why = f"{why}; {why2}"
    if spec is None:
        report.append(dict(where, origin=origin, result="not recognized", reason=why))
        if dense is not None and b is None and wv.dtype == x_val.dtype:
            dense.append([node, x, wv.detach(), ev.sources(w, position), None, None])
        return None
    bias = None
    if bv is not None:
        bias = torch.as_tensor(bv).detach().to(torch.float32).broadcast_to((n,)) \
            if torch.as_tensor(bv).numel() in (1, n) else None
        if bias is None:
            return None
        bias = bias.contiguous()
        if x_val.dtype != torch.float32:
            return None  # bf16 addmm rounds x@w before adding b; the kernel adds in fp32
    return _Found(node, x, spec, qw.q, qw.scales, qw.zero_points, bias, origin,
                  ev.sources(w, position) | (ev.sources(b, position) if b is not None else set()),
                  offsets=offsets, numerics=numerics_note, perm=perm)


def _merged_numerics(notes: list[str]) -> str:
    """One note for merged siblings: the member with the largest error speaks for all."""
    import re

    def err(note):
        m = re.search(r"max \|err\| ([0-9.e+-]+)", note)
        return float(m.group(1)) if m else 0.0
    return max(notes, key=err)


def _tolerant_formats(formats) -> list[str]:
    """The tolerant path serves library checkpoints: their 4-bit codes (GPTQ/AWQ/torchao int4,
    3-bit GPTQ codes in int4) run on the int4 kernels even when the bit-exact search is
    limited to the 1/2-bit formats."""
    return sorted(set(formats) | {"int4_sym", "int4_asym"})


def _not_state_reason(w: torch.fx.Node, ev: _ConstantEvaluator) -> str:
    """Why a weight that reads module state is not bindable: the runtime inputs it also reads
    (tensors dynamo passes that are neither parameters, buffers nor module attributes).
    Empty for products of activations (attention scores: their subgraph holds a matmul)."""
    seen, inputs, reads_state, work = set(), [], False, [w]
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n in ev.values:
                reads_state = True
            else:
                inputs.append(n.name)
        elif n.op == "call_function":
            if n.target in _MM or n.target in (aten.bmm.default, torch.ops.lowbit.linear.default):
                return ""
            if not _is_pure(n):
                return f"the weight is computed by {n.target}, which has side effects"
        work.extend(n.all_input_nodes)
    if not inputs or not reads_state:
        return ""
    return ("the weight depends on graph input(s) " + ", ".join(sorted(inputs)[:4])
            + " that are not module state (not a parameter, buffer or module attribute)")


def _is_plain_weight(w: torch.fx.Node, ev: _ConstantEvaluator) -> bool:
    """A parameter read directly or through views/transposes/casts (a QAT checkpoint)."""
    views = {aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default,
             aten._to_copy.default, aten.clone.default, aten.expand.default,
             torch.ops.prims.convert_element_type.default}  # the cast a bf16 Linear decomposes to
    while w.op == "call_function" and w.target in views:
        w = w.args[0]
    return w.op in ("placeholder", "get_attr")


def _match_lowbit_linear(node, ev: _ConstantEvaluator, position, report, unpack: bool = True) -> Optional[_Found]:
    """A `lowbit.linear` on module state. Its spec is in the op's arguments; with
    `unpack=False` the codes are left in storage (`q` None) until the layer is packed, so a
    model's layers are not all unpacked to int8 at once (that was the compile's memory peak)."""
    from lowbit.quant.formats import LowBitSpec
    from lowbit.quant.packing import unpack_codes

    x, packed, scales, zp, bias, *attrs = node.args
    spec = LowBitSpec(*attrs)
    where = dict(kind="matmul", origin="lowbit.linear", location=_location(node))
    if spec.act_group_size:
        report.append(dict(where, result="not recognized",
                           reason="per-K-block activation scales are not compiled (runs in eager)"))
        return None
    if not all(ev.is_constant(t) for t in (packed, scales, zp, bias)):
        report.append(dict(where, result="not recognized", reason="weights are not module state"))
        return None
    pv, sv = ev.value(packed), ev.value(scales)
    zv = ev.value(zp) if zp is not None else None
    bv = ev.value(bias) if bias is not None else None
    q = unpack_codes(pv.detach(), spec.format, spec.in_features) if unpack else None
    s = sv.detach().to(torch.float32).reshape(spec.scale_shape)
    z = None if zv is None else zv.detach().to(torch.int8).reshape(spec.scale_shape)
    b = None if bv is None else bv.detach().to(torch.float32).reshape(-1).contiguous()
    srcs = set()
    for t in (packed, scales, zp, bias):
        if isinstance(t, torch.fx.Node):
            srcs |= ev.sources(t, position)
    return _Found(node, x, spec, q, s, z, b, "lowbit.linear", srcs)


def _sibling_groups(found: list[_Found]) -> list[list[_Found]]:
    """Layers on the same activation with the same format and K merge into one (q/k/v,
    gate/up): one activation quantization and one kernel call. Members other than the last
    must have N a multiple of the kernels' 64-row n-block, so each keeps whole blocks."""
    buckets: dict[tuple, list[_Found]] = {}
    order: list[tuple] = []
    for f in found:
        s = f.spec
        key = (_same_value_key(f.x), s.weight_format, s.granularity, s.group_size, s.in_features, s.act_format)
        if "act-order" in f.origin:
            key = key + (id(f),)  # each layer reads x in its own column order: never merged
        elif "float zero" in f.origin:
            key = key + ("float zero",)  # merged only with layers whose offsets concatenate
        if key not in buckets:
            buckets[key] = []
            order.append(key)
        buckets[key].append(f)
    groups = []
    for key in order:
        members = buckets[key]
        current: list[_Found] = []
        for f in members:
            current.append(f)
            if f.spec.out_features % _KERNEL_NB:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
    return groups


def _same_value_key(x: torch.fx.Node):
    """Nodes computing the same value from one source (each nn.Linear on a 3-D input gets its
    own view/collapse of the activation) share a key, so their layers can merge."""
    if x.op == "call_function" and x.target in _VIEW_LIKE and isinstance(x.args[0], torch.fx.Node):
        return ("view", x.args[0], repr(x.args[1:]), repr(sorted(x.kwargs.items())))
    return x


_VIEW_LIKE = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
              torch.ops.prims.collapse.default}


def _pack_group(group: list[_Found]) -> BoundLayer:
    from lowbit.compiler.target import host_target
    from lowbit.passes.tile_qlinear import choose_kblock, k_granule
    from lowbit.quant.formats import LowBitSpec
    from lowbit.runtime.qgemm import pack_weight

    first = group[0].spec
    n = sum(f.spec.out_features for f in group)
    spec = LowBitSpec(first.weight_format, first.granularity, first.group_size, first.in_features, n,
                      first.act_format)
    q = torch.cat([f.q for f in group]) if len(group) > 1 else group[0].q

    def rows(t, f):
        return t.reshape(1, 1).expand(f.spec.out_features, 1) if t.numel() == 1 else t.reshape(f.spec.out_features, -1)

    if first.granularity == "tensor" and len(group) == 1:
        scales = group[0].scales.reshape(1, 1).expand(n, 1).contiguous()
    else:
        scales = torch.cat([rows(f.scales, f) for f in group]).contiguous()
        if first.granularity == "tensor":
            spec = LowBitSpec(first.weight_format, "channel", 0, first.in_features, n, first.act_format)
    zero = None
    if group[0].zero_points is not None:
        zero = torch.cat([rows(f.zero_points, f) for f in group]).contiguous()
    bias = None
    if any(f.bias is not None for f in group):
        bias = torch.cat([f.bias if f.bias is not None else torch.zeros(f.spec.out_features)
                          for f in group]).to(torch.float32).contiguous()
    kblock = choose_kblock(spec.in_features, spec.group_width, k_granule(spec.weight_format))
    offsets = None
    if all(f.offsets is not None for f in group):
        offsets = torch.cat([f.offsets.reshape(f.spec.out_features, -1) for f in group]) if len(group) > 1 \
            else group[0].offsets
    pw = pack_weight(q.to(torch.int8).contiguous(), scales.to(torch.float32), spec.weight_format,
                     group=spec.group_width, zero=zero, kblock=kblock)
    origins = {f.origin for f in group}
    return BoundLayer(spec, origins.pop() if len(origins) == 1 else "mixed", kblock,
                      pw.data.view(torch.int8), bias, [], _location(group[0].node), offsets,
                      _merged_numerics([f.numerics for f in group]),
                      group[0].perm if len(group) == 1 else None, _first_nonzero(q))


def _first_nonzero(q: torch.Tensor, rows: int = 16) -> tuple:
    """(n, k) of the first non-zero of `q` in row-major order, () if none; reads only the
    rows up to it (a whole-matrix `nonzero()` lists two thirds of a ternary weight)."""
    for r0 in range(0, q.shape[0], rows):
        hit = q[r0:r0 + rows].nonzero()
        if hit.numel():
            return int(hit[0, 0]) + r0, int(hit[0, 1])
    return ()


# Side-effecting checks that export leaves on tensors (e.g. after a `.to(dtype)` in a model's own
# dequantization): dead-code elimination keeps them, and with them the whole weight subgraph.
_ASSERTIONS = {aten._assert_tensor_metadata.default, aten._assert_async.msg, aten._assert_async.default}


def _drop_state_assertions(graph: torch.fx.Graph, ev: "_ConstantEvaluator") -> None:
    """Remove assertions on values computed from module state only. Binding evaluated those
    values on the real tensors (and packs from them), so a check at run time is moot; left in,
    it keeps the weight subgraph -- the unpacking of every packed weight -- and its storage
    inputs alive in the compiled code, run on every call."""
    for node in list(graph.nodes):
        if (node.op == "call_function" and node.target in _ASSERTIONS and not node.users
                and node.all_input_nodes and all(ev.is_constant(a) for a in node.all_input_nodes)):
            graph.erase_node(node)


def _drop_unused_inputs(captured: CapturedGraph, graph: torch.fx.Graph) -> None:
    """Remove placeholders nothing reads any more (weights now packed) from the graph and
    from the captured graph's runtime inputs."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    keep_idx, keep_spec = [], []
    for node, pos, spec in zip(placeholders, captured.input_indices, captured.input_specs):
        if node.users or pos in captured.mutated_inputs:
            keep_idx.append(pos)
            keep_spec.append(spec)
        else:
            graph.erase_node(node)
    captured.input_indices[:] = keep_idx
    captured.input_specs[:] = keep_spec


def _pack_dense(w: torch.Tensor) -> Optional[torch.Tensor]:
    """B [K, N] in the BRGEMM panel layout, shaped as `lowbit.packed_matmul` takes it; None
    when the layout does not apply (N not a multiple of the 32-wide panel, odd bf16 K)."""
    from lowbit.runtime.brgemm import NB, pack_b

    k, n = w.shape
    if n % NB or k == 0 or (w.dtype == torch.bfloat16 and k % 2):
        return None
    packed = pack_b(w.t().contiguous(), transposed=True)
    if w.dtype == torch.float32:
        return packed.reshape(n // NB, k, NB)
    return packed.reshape(n // NB, k // 2, NB, 2)


# ----------------------------------------------------------------------------- reuse across compiles
#
# Every compile of a model (a new shape signature, dynamo's recompile with symbolic sizes, a
# partitioned part) captures and binds the same weights again. Binding results are therefore
# remembered per weight *identity*: the source tensors (identity, version counter, data
# pointer, checked through weak references) plus the structure of the weight's subgraph and
# the recognition options. A match result is a few fields (format, origin); packed layers
# and dense panels are shared through weak references, so a second compile neither proves,
# unpacks nor packs again, and holds no second copy of the packed weights.


@dataclasses.dataclass
class _Entry:
    spec: Any                       # LowBitSpec, or None when not low-bit
    origin: str
    refs: tuple                     # weakrefs to the source tensors
    versions: tuple
    report: Optional[dict]          # the "not recognized" entry, replayed
    dense_ref: Any = None           # weakref to the dense packed panels

    @property
    def dense(self):
        return self.dense_ref() if self.dense_ref is not None else None


_MATCHES: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
_MAX_MATCHES = 8192
_LAYERS: "weakref.WeakValueDictionary[tuple, BoundLayer]" = weakref.WeakValueDictionary()
_cache_lock = threading.Lock()
def _subgraph_signature(node: Any, ev: "_ConstantEvaluator", position: dict, rank: dict) -> tuple:
    """Structure of the constant subgraph computing `node` (ops and wiring, not names).

    Inputs are named by `rank` (their order among the weight's sources), not by position:
    another capture of the same model (dynamo's recompile adds or drops size inputs) must
    give the same key."""
    order: dict[torch.fx.Node, int] = {}
    items = []

    def visit(n):
        if not isinstance(n, torch.fx.Node):
            return ("c", repr(n))
        if n in order:
            return ("%", order[n])
        if n.op == "placeholder":
            sig = ("in", rank.get(position.get(n)))
        elif n.op == "get_attr":
            t = _fetch_attr(ev.gm, n.target)
            sig = ("attr", id(t))
        else:
            args = tuple(visit(a) for a in n.args)
            kwargs = tuple(sorted((k, visit(v)) for k, v in n.kwargs.items()))
            sig = (str(n.target), args, kwargs)
        order[n] = len(order)
        items.append(sig)
        return ("%", order[n])

    visit(node)
    return tuple(items)


def _weight_key(node: torch.fx.Node, ev: "_ConstantEvaluator", position: dict, args: Sequence[Any],
                config: tuple) -> tuple[tuple, tuple[int, ...]]:
    """(identity key, caller positions of the weight's source tensors); ((), ()) = not cacheable.

    The key holds no positions, so a binding is found again from any capture of the model."""
    if node.target is torch.ops.lowbit.linear.default:
        weights, attrs = node.args[1:5], tuple(node.args[5:])
    elif node.target is aten.addmm.default:
        weights, attrs = (node.args[2], node.args[0]), (repr(sorted(node.kwargs.items())),)
    else:
        weights, attrs = (node.args[1],), ()
    if not all(ev.is_constant(w) for w in weights) or ev.is_constant(node.args[0] if node.target is not aten.addmm.default else node.args[1]):
        return (), ()
    x = node.args[1] if node.target is aten.addmm.default else node.args[0]
    x_val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    sources = set()
    for w in weights:
        if isinstance(w, torch.fx.Node):
            sources |= ev.sources(w, position)
    # The version counter is part of the key: packed layers (`_LAYERS`) are looked up by it,
    # and an in-place update of a source tensor must pack again, not reuse the old bytes.
    positions = tuple(sorted(sources))
    tensors = tuple((id(args[p]), args[p].data_ptr(), _version(args[p]), tuple(args[p].shape),
                     str(args[p].dtype))
                    for p in positions if isinstance(args[p], torch.Tensor))
    if len(tensors) != len(sources):
        return (), ()
    rank = {p: i for i, p in enumerate(positions)}
    return (str(node.target), attrs, config, str(getattr(x_val, "dtype", None)),
            tuple(_subgraph_signature(w, ev, position, rank) for w in weights), tensors), positions


def _lookup(key: tuple) -> Optional[_Entry]:
    if not key:
        return None
    with _cache_lock:
        entry = _MATCHES.get(key)
        if entry is None:
            return None
        alive = all(r() is not None for r in entry.refs)
        same = alive and all(_version(r()) == v for r, v in zip(entry.refs, entry.versions))
        if not same:
            del _MATCHES[key]
            return None
        _MATCHES.move_to_end(key)
        return entry


def _version(t: torch.Tensor):
    return None if t.is_inference() else t._version


def _remember(key: tuple, positions: tuple[int, ...], hit: Optional["_Found"], report: list[dict],
              args) -> _Entry:
    tensors = [args[p] for p in positions]
    entry = _Entry(hit.spec if hit is not None else None, hit.origin if hit is not None else "",
                   tuple(weakref.ref(t) for t in tensors),
                   tuple(_version(t) for t in tensors),
                   None if hit is not None or not report or report[-1].get("result") != "not recognized"
                   else dict(report[-1]))
    with _cache_lock:
        _MATCHES[key] = entry
        while len(_MATCHES) > _MAX_MATCHES:
            _MATCHES.popitem(last=False)
    return entry


def _found_from_cache(node: torch.fx.Node, entry: _Entry, report: list[dict], key: tuple,
                      positions: tuple[int, ...]) -> Optional["_Found"]:
    """A layer recognised before from the same tensors; its codes are computed only if its
    packed layer is not alive any more (`_materialize`)."""
    if entry.spec is None:
        if entry.report is not None:
            report.append(dict(entry.report, location=_location(node)))
        return None
    x = node.args[1] if node.target is aten.addmm.default else node.args[0]
    return _Found(node, x, entry.spec, None, None, None, None, entry.origin, set(positions), key)


def _materialize(f: "_Found", ev: "_ConstantEvaluator", position: dict, formats, group_sizes,
                 activations, numerics: str = "bit-exact") -> None:
    """Compute the codes, scales and bias of a layer known only from the cache, or whose codes
    were left in storage by the match (`_match_lowbit_linear(unpack=False)`)."""
    scratch: list[dict] = []
    if f.node.target is torch.ops.lowbit.linear.default:
        hit = _match_lowbit_linear(f.node, ev, position, scratch)
    else:
        hit = _match_mm(f.node, ev, position, formats, group_sizes, activations, scratch, None, numerics)
    if hit is None or hit.spec != f.spec:
        raise RuntimeError(f"lowbit.bind: cached recognition of {f.node.name} no longer holds ({scratch})")
    f.q, f.scales, f.zero_points, f.bias = hit.q, hit.scales, hit.zero_points, hit.bias
    f.offsets, f.numerics, f.perm = hit.offsets, hit.numerics, hit.perm
