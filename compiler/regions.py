"""Compile a repeated block once: regional compilation of structurally identical layers.

A decoder stacks N copies of one layer (`nn.ModuleList` items `layers.0 ... layers.N-1`).
After binding (`lowbit.compiler.bind`) every weight is a graph input, so the N copies are the
same computation on different buffers. This module

* groups the nodes of a captured graph by the outermost numbered module they come from
  (`nn_module_stack` paths ending in `.<index>`, e.g. `model.layers.7`),
* cuts the graph into one submodule per such instance plus the glue between them (embedding,
  final norm, head), in program order,
* keys every instance by its structure (ops, argument wiring, constant arguments, input shapes,
  dtypes and symbolic dims) and compiles one instance per key; the others call the same
  compiled code with their own inputs (weights, packed buffers, KV caches).

A 16- or 30-layer model thus costs about one layer's compile (plus the glue's). An instance
whose structure differs (a last layer without a cache update, say) simply gets its own key.
"""
from __future__ import annotations

import logging
import operator
import os
import re
import threading
import time
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from lowbit.compiler.compile_log import progress

log = logging.getLogger("lowbit.regions")

_NUMBERED = re.compile(r"\.(\d+)$|\[(\d+)\]$")


def region_of(node: torch.fx.Node) -> Optional[str]:
    """The path of the outermost numbered module `node` belongs to, or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _ in stack.values():
        if _NUMBERED.search(path):
            return path
    return None


def restore_module_stacks(gm: torch.fx.GraphModule, source: Any) -> int:
    """Give nodes of a captured graph the `nn_module_stack` of the dynamo node they come from.

    Exporting a dynamo graph through a wrapper module (as shape-generic capture does) leaves
    every node with the wrapper's stack only; `from_node` provenance still names the dynamo
    node each one was made from. Returns how many nodes got a stack back."""
    if not isinstance(source, torch.fx.GraphModule):
        return 0
    by_name = {n.name: n for n in source.graph.nodes if n.meta.get("nn_module_stack")}
    restored = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or region_of(node) is not None:
            continue
        work = list(node.meta.get("from_node") or [])
        while work:
            ns = work.pop(0)
            src = by_name.get(getattr(ns, "name", None))
            if src is not None:
                node.meta["nn_module_stack"] = src.meta["nn_module_stack"]
                restored += 1
                break
            work.extend(getattr(ns, "from_node", None) or [])
    return restored


def find_regions(gm: torch.fx.GraphModule) -> list[list[torch.fx.Node]]:
    """Node groups, in program order: one per numbered-module instance (repeated layers) and one
    per run of other compute nodes between them. Empty when there is nothing repeated."""
    groups: list[tuple[Optional[str], list[torch.fx.Node]]] = []
    counts: dict[str, int] = {}
    # placeholders and constants (get_attr) become inputs of the regions
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    keys = [region_of(n) for n in nodes]
    # Nodes without a module of their own (made by decompositions) between two nodes of one
    # instance belong to it.
    i = 0
    while i < len(keys):
        if keys[i] is None:
            j = i
            while j < len(keys) and keys[j] is None:
                j += 1
            if 0 < i and j < len(keys) and keys[i - 1] == keys[j]:
                keys[i:j] = [keys[j]] * (j - i)
            i = j
        else:
            i += 1
    for node, key in zip(nodes, keys):
        if groups and groups[-1][0] == key:
            groups[-1][1].append(node)
        else:
            groups.append((key, [node]))
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
    layers = [k for k in counts if k is not None]
    if len(layers) < 2 or any(c != 1 for c in counts.values()):
        return []  # no repeated instances, or one instance interleaved with others: whole graph
    return [nodes for _, nodes in groups]


def structure_key(sub: torch.fx.GraphModule) -> tuple:
    """What makes two region submodules compile to the same code.

    Symbolic sizes are keyed up to a renaming of their symbols: each symbol gets a canonical
    name in order of first appearance (`_SymbolNames`). Dynamo gives every tensor it was told
    is dynamic a symbol of its own, so the layers of a model with a growing cache (transformers'
    `DynamicCache`: one key and one value tensor per layer) have the same structure over
    different symbols (layer 0 `s36`, layer 1 `s51`, ...). A region is compiled generic in its
    dims (`frontend.dynamic_dims_from_meta` names them locally), so one compile serves them
    all; keyed by the raw names, every layer compiled its own copy of the code."""
    index: dict[torch.fx.Node, int] = {}
    items = []
    names = _SymbolNames()

    def ref(a):
        if isinstance(a, torch.fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return tuple(ref(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, ref(v)) for k, v in a.items()))
        if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return str(a)
        if isinstance(a, (int, float, bool, str, type(None))):
            return a
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return ("sym", names.size(a))
        return ("obj", type(a).__name__, str(a))

    for i, node in enumerate(sub.graph.nodes):
        index[node] = i
        val = node.meta.get("val")
        meta = None
        if isinstance(val, torch.Tensor):
            meta = (tuple(names.size(d) for d in val.shape), str(val.dtype))
        elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            meta = ("sym", names.size(val))
        if node.op == "get_attr":
            t = getattr(sub, node.target, None)
            meta = ("attr", tuple(t.shape), str(t.dtype), id(t)) if isinstance(t, torch.Tensor) else ("attr", repr(t))
        target = str(node.target) if node.op == "call_function" else ""  # names differ per instance
        items.append((node.op, target, ref(node.args),
                      ref(node.kwargs), meta))
    items.append(("ranges", names.ranges()))  # a region is captured with its symbols' ranges
    return tuple(items)


class _SymbolNames:
    """Canonical names for the symbols of one region, in order of first appearance."""

    def __init__(self):
        self.names: dict[Any, str] = {}
        self.envs: dict[Any, Any] = {}

    def ranges(self) -> tuple:
        """The value range the shape env holds for each symbol, in canonical order."""
        out = []
        for sym in self.names:
            rng = self.envs[sym].var_to_range.get(sym) if sym in self.envs else None
            out.append(str(rng) if rng is not None else None)
        return tuple(out)

    def size(self, d: Any) -> str:
        """`d` (an int or a symbolic size) as text, its symbols renamed canonically."""
        if not isinstance(d, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return str(d)
        expr = d.node.expr
        # Several new symbols in one expression: named in text order, which may differ between
        # two equivalent regions (a missed sharing, never a wrong one: renaming stays 1:1).
        for sym in sorted(getattr(expr, "free_symbols", ()), key=str):
            if sym not in self.names:
                self.names[sym] = f"_c{len(self.names)}"
                self.envs[sym] = d.node.shape_env
        if not self.names:
            return str(expr)
        import sympy
        return str(expr.xreplace({s: sympy.Symbol(self.names[s], integer=True, positive=True)
                                  for s in expr.free_symbols if s in self.names}))


class RegionRunner(torch.nn.Module):
    """Calls one compiled callable for a region submodule (same interface as the submodule)."""

    def __init__(self, compiled: Callable, single_output: bool):
        super().__init__()
        self.compiled = compiled
        self.single_output = single_output

    def forward(self, *args):
        outs = self.compiled(*args)
        if self.single_output:
            return outs[0] if isinstance(outs, (list, tuple)) else outs
        return tuple(outs)

    # Called per layer and token from the partitioned graph's code: no nn.Module hook
    # dispatch (this internal module never has hooks).
    __call__ = forward


def split_regions(gm: torch.fx.GraphModule, mutated: Sequence[int] = ()) -> Optional[torch.fx.GraphModule]:
    """`gm` cut into region submodules (`fused_<i>`), or None if it has no repeated regions.

    ``mutated``: for each of `gm`'s first outputs, the index of the placeholder it is the new
    value of (a captured graph's mutated inputs, e.g. KV caches); see `donate_updates`."""
    groups = find_regions(gm)
    if not groups:
        return None
    copy = torch.fx.GraphModule(gm, _copy_graph(gm.graph))
    by_name = {n.name: n for n in copy.graph.nodes}
    partitions = [[by_name[n.name] for n in group] for group in groups]
    _local_sizes(copy.graph, partitions)
    fused = fuse_by_partitions(copy, partitions, prefix="region_")
    if mutated:
        donate_updates(fused, mutated)
    return fused


def _row_update_of(node: Any, ph: torch.fx.Node, index_put_rows) -> Optional[torch.fx.Node]:
    """The ``index_put_rows`` node that makes `node` the new value of placeholder `ph` when
    nothing else reads `ph`: `node` itself (``index_put_rows(ph, ...)``), or the update of a
    slice put back in place, ``slice_scatter(ph, index_put_rows(slice(ph, d, a, b), ...), d, a, b)``
    (what ``cache[:b].index_copy_(...)`` becomes); None otherwise."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is index_put_rows:
        return node if node.args[0] is ph and len(ph.users) == 1 else None
    if node.target is not torch.ops.aten.slice_scatter.default or node.args[0] is not ph:
        return None
    inner = node.args[1]
    if not (isinstance(inner, torch.fx.Node) and inner.target is index_put_rows and len(inner.users) == 1):
        return None
    view = inner.args[0]
    if not (isinstance(view, torch.fx.Node) and view.target is torch.ops.aten.slice.Tensor and view.args[0] is ph
            and len(view.users) == 1 and set(ph.users) == {view, node}):
        return None
    def slice_args(n, args):
        names = ("dim", "start", "end", "step")
        full = list(args) + [n.kwargs.get(k) for k in names[len(args):]]
        return [0 if full[0] is None else full[0], full[1], full[2], 1 if full[3] is None else full[3]]
    if slice_args(view, view.args[1:]) != slice_args(node, node.args[2:]):
        return None
    return inner


def donate_updates(fused: torch.fx.GraphModule, mutated: Sequence[int]) -> int:
    """Let regions update the graph's mutated inputs in place instead of returning new values.

    After functionalization a region returns a KV cache's new value,
    ``index_put_rows(cache, ...)`` (or that of a slice of it, put back with ``slice_scatter``),
    and the caller copies it back into the cache: the region's
    compiled code, which sees a plain (read-only) input, copies the whole cache to update a
    row. Where the outer graph's new value of mutated input X is region output k, that output
    is such an update of the region's own input X, and X is read by nothing else, the
    region's op becomes the in-place ``X[...].index_put_(...)`` and output k is dropped; the outer
    graph returns X itself (written back onto itself: a no-op). Captured alone, the region
    then mutates its input, which compiled code updates in place (docs/codegen.md,
    "In-place updates"). Every layer gets the same rewrite, so regions still share code.
    Returns the number of updates donated."""
    index_put_rows = torch.ops.lowbit.index_put_rows.default
    out_node = next(n for n in fused.graph.nodes if n.op == "output")
    placeholders = list(fused.graph.find_nodes(op="placeholder"))
    donated = 0
    for j, ph_index in enumerate(mutated):
        value = out_node.args[0][j]
        if not (isinstance(value, torch.fx.Node) and value.op == "call_function"
                and value.target is operator.getitem):
            continue
        region, k = value.args
        target = placeholders[ph_index]
        if region.op != "call_module" or list(target.users) != [region] or region.args.count(target) != 1:
            continue
        sub = getattr(fused, region.target)
        sub_out = next(n for n in sub.graph.nodes if n.op == "output")
        outs = sub_out.args[0]
        if not isinstance(outs, (tuple, list)) or len(outs) < 2:
            continue
        sub_ph = list(sub.graph.find_nodes(op="placeholder"))[region.args.index(target)]
        node = outs[k]
        update = _row_update_of(node, sub_ph, index_put_rows)
        if update is None or sum(o is node for o in outs) != 1:
            continue
        dim, index, values = update.args[1:]
        update.target = torch.ops.aten.index_put_.default
        update.args = (update.args[0], [None] * dim + [index], values)
        sub_out.args = (tuple(o for i, o in enumerate(outs) if i != k),)
        if node is not update:  # the slice_scatter: its readers read the updated input itself
            node.replace_all_uses_with(sub_ph)
            sub.graph.erase_node(node)
        sub.recompile()
        value.replace_all_uses_with(target)
        fused.graph.erase_node(value)
        for user in list(region.users):
            if user.target is operator.getitem and user.args[1] > k:
                user.args = (region, user.args[1] - 1)
        donated += 1
    if donated:
        fused.recompile()
        log.info("regions update %d mutated input(s) in place", donated)
    return donated


def _is_scalar(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return node.op == "call_function" and isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat,
                                                            torch.SymBool))


def _local_sizes(graph: torch.fx.Graph, partitions: list[list[torch.fx.Node]]) -> None:
    """Sizes (SymInt computations such as `sym_size(x, 1) * 2`) used by a region but computed
    outside it are recomputed inside it, so only tensors cross region boundaries: a size
    passed between compiled parts would be specialised to its example value."""
    owner = {n: i for i, part in enumerate(partitions) for n in part}
    for i, part in enumerate(partitions):
        members = set(part)
        for user in list(part):
            for a in list(user.all_input_nodes):
                if a in members or not _is_scalar(a):
                    continue
                clone = _clone_scalar(graph, a, user, members, part)
                user.replace_input_with(a, clone)
    del owner


def _clone_scalar(graph, node, before, members, part) -> torch.fx.Node:
    args = []
    for a in node.all_input_nodes:
        if a not in members and _is_scalar(a):
            _clone_scalar(graph, a, before, members, part)
    env = {}
    for a in node.all_input_nodes:
        env[a] = next((m for m in members if m.meta.get("_lowbit_clone_of") is a), a)
    with graph.inserting_before(before):
        clone = graph.node_copy(node, lambda a: env.get(a, a))
    clone.meta = dict(node.meta)
    clone.meta["_lowbit_clone_of"] = node
    members.add(clone)
    part.insert(0, clone)
    return clone


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    out = new.graph_copy(graph, env)
    new.output(out)
    for old, n in env.items():
        n.name = old.name
    return new


# Compiled regions by (structure, compile context), shared by every model of the process:
# two models with the same layers but other weights call the same code. Weak values: code
# lives as long as a compiled model uses it, so dropping the models frees it.
_SHARED: "weakref.WeakValueDictionary[tuple, Any]" = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def compile_context(options: Any) -> tuple:
    """What besides a region's structure decides its code: options, ISA, target, passes, and
    the ahead-of-time emission target (`jit.emission_key`: PIC code for another CPU)."""
    from lowbit.compiler.jit import emission_key
    from lowbit.runtime import current_isa

    return (repr(options), current_isa(), os.environ.get("LOWBIT_TARGET", ""),
            os.environ.get("LOWBIT_DISABLE_PASSES", ""), emission_key())


def compile_regions(fused: torch.fx.GraphModule, inputs: Sequence[Any],
                    compile_part: Callable[[torch.fx.GraphModule, list], Callable],
                    context: tuple = ()) -> dict:
    """Compile each region submodule of `fused` once per structure and install the compiled
    callables in place of the submodules. `inputs` are example values of `fused`'s
    placeholders; `compile_part(sub, example_args)` compiles one submodule; `context` (see
    `compile_context`) keys the process-wide sharing of compiled regions. Returns stats."""
    examples: dict[str, list] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_module":
                examples[n.target] = list(self.fetch_args_kwargs_from_env(n)[0])
            return super().run_node(n)

    start = time.perf_counter()
    with torch.no_grad():
        Recorder(fused).run(*inputs)
    record_s = time.perf_counter() - start
    compiled_by_key: dict[tuple, Callable] = {}
    stats = {"regions": 0, "compiled": 0, "record_s": record_s}
    for name, sub in progress(list(fused.named_children()), "lowbit: compiling regions"):
        if name not in examples:
            continue
        stats["regions"] += 1
        key = (structure_key(sub), context)
        compiled = compiled_by_key.get(key)
        if compiled is None and context:
            with _shared_lock:
                compiled = _SHARED.get(key)
            if compiled is not None:
                stats["shared"] = stats.get("shared", 0) + 1
        if compiled is None:
            compiled = compile_part(sub, examples[name])
            stats["compiled"] += 1
            if context and not isinstance(compiled, torch.fx.GraphModule):
                with _shared_lock:
                    _SHARED[key] = compiled
        compiled_by_key[key] = compiled
        out = [n for n in sub.graph.nodes if n.op == "output"][0].args[0]
        single = not isinstance(out, (tuple, list))
        setattr(fused, name, RegionRunner(compiled, single))
    log.info("regional compile: %d region(s), %d compiled (recording example inputs took %.2f s)",
             stats["regions"], stats["compiled"], record_s)
    return stats
