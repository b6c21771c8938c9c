"""Graceful fallback: compile what the pipeline can, run the rest in eager.

The whole graph is tried first. When a stage fails, its diagnostic names the FX nodes
whose ops it rejected (every imported op carries the location `lowbit.node:<node>`,
see `frontend.NODE_LOCATION_PREFIX`; older messages name `torch.aten.<op>` /
`torch.operator "<ns>.<op>"`). Those ops are marked unsupported, the captured graph is
split with torch's capability-based partitioner, and each supported part is compiled
alone; the unsupported nodes run in eager between them. This repeats while new
unsupported ops show up. Each unsupported op is named in one `RuntimeWarning` per
process; a whole graph that falls back (capture or a stage failed) is named every time,
so a second model that falls back is not silent.
"""
from __future__ import annotations

import copy
import re
import warnings
from typing import Any, Callable, Sequence

import torch
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from lowbit.compiler.bind import Binding, bind_weights
from lowbit.compiler.compile import CompiledGraph, FrozenGuard, compile_captured
from lowbit.compiler.compile_log import counters, timed
from lowbit.compiler.frontend import (NODE_LOCATION_PREFIX, CapturedGraph, FrontendError, capture,
                                      dynamic_dims_from_meta)
from lowbit.compiler.pipeline import CompileOptions, StageError
from lowbit.compiler.reshape_fixes import fix_dynamic_reshapes
from lowbit.compiler.regions import (RegionRunner, compile_context, compile_regions, restore_module_stacks,
                                     split_regions)
from lowbit.compiler.report import register as register_report
from lowbit.compiler.report import tensor_refs
from lowbit.runtime.replay import Replayer

_warned: set[str] = set()
_NODE_IN_DIAGNOSTIC = re.compile(re.escape(NODE_LOCATION_PREFIX) + r"([A-Za-z0-9_]+)")
_ATEN_NAME = re.compile(r"torch\.aten\.([A-Za-z0-9_]+)")
_CUSTOM_NAME = re.compile(r"torch\.operator\"?\s*\(?.*?name\s*=\s*\"torch\.(\w+)\.(\w+)|"
                          r"torch\.operator \"torch\.(\w+)\.(\w+)")


class UnsupportedOpWarning(RuntimeWarning):
    """An op of the graph runs in eager because lowbit's pipeline cannot compile it."""


def _warn_once(subject: str, reason: str) -> None:
    if subject in _warned:
        return
    _warned.add(subject)
    _warn(subject, reason)


def _warn(subject: str, reason: str) -> None:
    warnings.warn(f"lowbit: cannot compile {subject} ({reason}); running it in eager",
                  UnsupportedOpWarning, stacklevel=4)


def forget_warnings() -> None:
    """Warn again about ops already reported (for tests and long-running processes)."""
    _warned.clear()


def node_op_name(node: torch.fx.Node) -> str | None:
    """`aten.erfinv`, `mylib.myop`: the op packet a call_function node calls."""
    if node.op != "call_function":
        return None
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return str(packet).replace("torch.ops.", "").replace("::", ".")
    return getattr(target, "__name__", str(target))


def rejected_ops(message: str, gm: torch.fx.GraphModule) -> set[str]:
    """Ops of `gm` that a pipeline diagnostic blames, by node location or by op name."""
    nodes = {n.name: n for n in gm.graph.nodes}
    named = {node_op_name(nodes[name]) for name in _NODE_IN_DIAGNOSTIC.findall(message) if name in nodes}
    named |= {f"aten.{op}" for op in _ATEN_NAME.findall(message)}
    for groups in _CUSTOM_NAME.findall(message):
        ns, op = (groups[0], groups[1]) if groups[0] else (groups[2], groups[3])
        named.add(f"{ns}.{op}")
    graph_ops = {node_op_name(n) for n in gm.graph.nodes}
    return {op for op in named if op is not None and op in graph_ops}


class _Supported(OperatorSupportBase):
    def __init__(self, unsupported: set[str]):
        self.unsupported = unsupported

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        name = node_op_name(node)
        return name is not None and name not in self.unsupported


class _CompiledPart(torch.nn.Module):
    def __init__(self, compiled: CompiledGraph, single_output: bool):
        super().__init__()
        self.compiled = compiled
        self.single_output = single_output

    def forward(self, *args):
        outs = self.compiled(*args)
        return outs[0] if self.single_output else tuple(outs)

    # Called per layer and token from the partitioned graph's code: no nn.Module hook
    # dispatch (this internal module never has hooks).
    __call__ = forward


class _Rejected(Exception):
    def __init__(self, ops: set[str], stage: str, detail: str):
        super().__init__(detail)
        self.ops, self.stage, self.detail = ops, stage, detail


class PartitionedGraph:
    """A captured graph whose supported parts are compiled and the rest runs in eager.

    Called with the caller's full argument list; applies the graph's input mutations.
    """

    def __init__(self, captured: CapturedGraph, gm: torch.fx.GraphModule, unsupported: set[str]):
        self.captured = captured
        self.gm = gm
        self.unsupported = frozenset(unsupported)
        self.frozen_guard = FrozenGuard(captured.frozen)

    def frozen_inputs_changed(self, args: Sequence[Any]) -> list[int]:
        """Caller positions of frozen tensors changed since compilation."""
        return self.frozen_guard.changed(args)

    def __call__(self, *args):
        cap = self.captured
        outs = self.gm(*[args[i] for i in cap.input_indices])
        return cap.finish_call(args, list(outs) if isinstance(outs, (tuple, list)) else [outs])


def _partition_and_compile(captured: CapturedGraph, args: Sequence[Any], unsupported: set[str],
                           options: CompileOptions) -> PartitionedGraph:
    # Partitioning rewrites the module in place: work on a copy of the graph that shares
    # the (possibly large) frozen constants, so a later round starts from the original.
    gm = torch.fx.GraphModule(captured.graph_module, copy.deepcopy(captured.graph_module.graph))
    partitioner = CapabilityBasedPartitioner(gm, _Supported(unsupported), allows_single_node_partition=True)
    fused = partitioner.fuse_partitions(partitioner.propose_partitions())
    # Each part's example inputs come from running the split graph once in eager; the
    # graph is functional, so this has no side effects.
    examples: dict[str, tuple[list[Any], list[int]]] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_module":
                # Parent constants (get_attr) stay frozen inside the part.
                frozen = [i for i, a in enumerate(n.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
                examples[n.target] = (list(self.fetch_args_kwargs_from_env(n)[0]), frozen)
            return super().run_node(n)

    Recorder(fused).run(*[args[i] for i in captured.input_indices])
    for name, (example, frozen) in examples.items():
        sub = getattr(fused, name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                sub_captured = capture(sub, example, frozen,
                                       dynamic_dims=dynamic_dims_from_meta(sub.graph.find_nodes(op="placeholder")))
                fix_dynamic_reshapes(sub_captured.graph_module)
            compiled = cached_compile(sub_captured, options)
        except StageError as e:
            raise _Rejected(rejected_ops(str(e.cause), sub_captured.graph_module), e.stage,
                            _first_line(e.cause)) from e
        except FrontendError as e:
            _warn_once(f"a part of the graph with {_describe(sub)}", f"capture failed: {_first_line(e)}")
            continue
        out = [n for n in sub.graph.nodes if n.op == "output"][0].args[0]
        single = not isinstance(out, (tuple, list))
        setattr(fused, name, _CompiledPart(compiled, single))
    return PartitionedGraph(captured, fused, unsupported)


def _describe(gm: torch.fx.GraphModule) -> str:
    ops = sorted({node_op_name(n) for n in gm.graph.nodes if n.op == "call_function"} - {None})
    return ", ".join(ops[:6]) + (" ..." if len(ops) > 6 else "")


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    line = (errors or lines or [type(e).__name__])[0]
    return line[:300]


class BoundGraph:
    """A compiled graph whose low-bit weights were bound as packed runtime buffers.

    Called with the caller's arguments; appends the derived buffers (`bind.Binding`) and
    runs the inner `CompiledGraph` / `PartitionedGraph`. Module state is read at run time,
    so only the tensors the packed buffers were made from are guarded: a change to one of
    them (version counter or rebinding) makes the backend compile again.
    """

    def __init__(self, inner: Callable, binding: Binding, args: Sequence[Any]):
        self.inner = inner
        self.binding = binding
        self.captured = getattr(inner, "captured", None)
        self.frozen_guard = FrozenGuard({p: args[p] for p in binding.sources if isinstance(args[p], torch.Tensor)})
        self.state_ids = tensor_refs(args[p] for p in binding.state_positions if isinstance(args[p], torch.Tensor))
        self._source_ptrs = [(p, args[p].data_ptr()) for p in binding.sources if isinstance(args[p], torch.Tensor)]
        self._replay = Replayer(inner, binding.derived)

    def frozen_inputs_changed(self, args: Sequence[Any]) -> list[int]:
        return self.frozen_guard.changed(args)

    @property
    def guarded(self) -> bool:
        return bool(self.binding.sources)

    def state_replaced(self, args: Sequence[Any]) -> bool:
        """All source tensors are other tensors than at binding (another model instance)."""
        return all(args[p].data_ptr() != ptr for p, ptr in self._source_ptrs)

    @property
    def report(self) -> list[dict]:
        return merge_reports(self.binding.report, inner_reports(self.inner))

    @property
    def replayer(self) -> Replayer:
        return self._replay

    def __call__(self, *args):
        return self._replay(*args)


def inner_reports(compiled: Any) -> list[dict]:
    """Pipeline report entries of a compiled graph and of every compiled part of a partitioned one."""
    if isinstance(compiled, CompiledGraph):
        return list(compiled.report)
    if isinstance(compiled, PartitionedGraph):
        out, seen = [], set()
        for sub in compiled.gm.children():
            part = getattr(sub, "compiled", None) if isinstance(sub, (_CompiledPart, RegionRunner)) else None
            if part is not None and id(part) not in seen:  # regions share compiled code
                seen.add(id(part))
                out += inner_reports(part)
        return out
    return []


def merge_reports(bound: list[dict], pipeline: list[dict]) -> list[dict]:
    """Binding's entries (what was recognised, from where) completed with what the pipeline
    did with each bound layer (tiles, epilogue, ISA), matched by the FX node name."""
    by_node = {}
    rest = []
    for e in pipeline:
        names = _NODE_IN_DIAGNOSTIC.findall(str(e.get("location", ""))) + [str(e.get("location", "")).split(" @")[0]]
        if e.get("origin") == "bound":
            for name in names:
                by_node.setdefault(name, e)
        else:
            rest.append(e)
    out = []
    for e in bound:
        merged = dict(e)
        p = by_node.get(e.get("node", ""))
        if p is not None:
            for key in ("tiles", "epilogue", "isa", "function"):
                if key in p:
                    merged[key] = p[key]
            if p.get("result", "").startswith("recognized,"):
                merged["result"] = p["result"]
        merged.pop("node", None)
        out.append(merged)
    return out + rest


def compile_with_fallback(fn, args: Sequence[Any], freezable: Sequence[int],
                          options: CompileOptions, known_unsupported: set[str] | None = None,
                          max_rounds: int = 8, dynamic_dims: dict | None = None,
                          on_capture_failure: Callable[[str], None] | None = None) -> Callable:
    """Compile `fn` for `args`; on failure, partition around the ops the pipeline rejects.

    Module state (`freezable` positions) stays a runtime input; low-bit matmuls found on
    it are bound as packed buffers (`lowbit.compiler.bind`), unless `options.weights` is
    "freeze" (the earlier design: state becomes constants of the compiled code).
    Returns a `BoundGraph` (or, when freezing, a `CompiledGraph` / `PartitionedGraph`),
    or `fn` itself (with a warning) when the graph cannot be captured.
    `known_unsupported` (updated in place) carries ops found unsupported by earlier
    compilations of the same graph, e.g. for another input shape, so they are not retried.
    """
    from lowbit.compiler.subclasses import compile_subclass_graph  # issue 12 hook
    compiled = compile_subclass_graph(fn, args, freezable, dynamic_dims, lambda *a, **k: compile_with_fallback(
        *a[:3], options, known_unsupported, max_rounds, *a[3:], **k), _warn)
    if compiled is not None:  # tensor-subclass weights: compiled over their inner tensors
        return compiled
    bind = options.weights == "bind"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            captured = capture(fn, args, () if bind else freezable, dynamic_dims=dynamic_dims)
            fix_dynamic_reshapes(captured.graph_module)
    except FrontendError as e:
        if on_capture_failure is not None:
            on_capture_failure(_first_line(e))
        else:
            _warn("the graph", f"capture failed: {_first_line(e)}")
        return fn
    if not bind:
        return _compile_rounds(captured, args, options, known_unsupported, max_rounds)
    if options.regions:
        restore_module_stacks(captured.graph_module, fn)  # before binding copies them onto its ops
    with timed("bind weights"):
        binding = bind_weights(captured, args, freezable, activations=options.activations,
                               numerics=getattr(options, "dequant_numerics", "bit-exact"))
    inner = None
    if options.regions:
        inner = _compile_by_region(captured, binding.extend(args), options, known_unsupported, max_rounds)
    if inner is None:
        inner = _compile_rounds(captured, binding.extend(args), options, known_unsupported, max_rounds)
    if inner is captured.graph_module:
        return fn
    bound = BoundGraph(inner, binding, args)
    register_report(bound)
    return bound


def _compile_by_region(captured: CapturedGraph, args: Sequence[Any], options: CompileOptions,
                       known_unsupported: set[str] | None, max_rounds: int) -> Callable | None:
    """Repeated layers compiled once (`lowbit.compiler.regions`); None when there are none."""
    fused = split_regions(captured.graph_module,
                          mutated=[captured.input_indices.index(p) for p in captured.mutated_inputs])
    if fused is None:
        return None

    def compile_part(sub: torch.fx.GraphModule, example: list) -> Callable:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                phs = sub.graph.find_nodes(op="placeholder")
                part = capture(sub, example, (), dynamic_dims=_with_upper_bounds(dynamic_dims_from_meta(phs), phs))
                fix_dynamic_reshapes(part.graph_module)
        except FrontendError as e:
            _warn_once(f"a region of the graph with {_describe(sub)}", f"capture failed: {_first_line(e)}")
            return sub
        compiled = _compile_rounds(part, example, options, known_unsupported, max_rounds)
        return sub if compiled is part.graph_module else compiled

    stats = compile_regions(fused, [args[i] for i in captured.input_indices], compile_part,
                            compile_context(options))
    counters["region_reuses"] += stats["regions"] - stats["compiled"]
    return PartitionedGraph(captured, fused, set())


def _with_upper_bounds(dims: dict, placeholders: Sequence[torch.fx.Node]) -> dict:
    """`dims` (names from `dynamic_dims_from_meta`) with a `torch.export.Dim` carrying the
    finite upper bound the graph's shape env holds for a symbol, as the whole graph's capture
    had it from dynamo (`frontend._dynamo_upper_bounds`). A region re-exported with an
    unbounded dim fails where the model's code relied on the bound: transformers' mask code
    with a static cache guards ``q_len != max_cache_len``, proved for the query's range
    [2, max_cache_len - 1] (`lowbit.hf.mark_seq_dims`) and a violated constraint without it
    (every prefill layer then ran in eager)."""
    import sympy
    made: dict[str, Any] = {}
    out: dict = {}
    for pos, ds in dims.items():
        val = placeholders[pos].meta.get("val")
        out[pos] = dict(ds)
        for d, name in ds.items():
            size = val.shape[d] if isinstance(val, torch.Tensor) and d < val.dim() else None
            if not (isinstance(name, str) and isinstance(size, torch.SymInt)
                    and isinstance(size.node.expr, sympy.Symbol) and str(size.node.expr) == name):
                continue
            rng = size.node.shape_env.var_to_range.get(size.node.expr)
            upper = getattr(rng, "upper", None)
            if upper is None or not (upper.is_integer and upper.is_number) or upper >= 2 ** 62:
                continue  # unbounded (int_oo): left to export
            if name not in made:
                made[name] = torch.export.Dim(name, min=1, max=int(upper))
            out[pos][d] = made[name]
    return out


def cached_compile(captured: CapturedGraph, options: CompileOptions) -> CompiledGraph:
    """`compile_captured`, through the persistent compile cache (`compile_cache`) when it is on
    and no ahead-of-time emission is active (artifacts need their own object code)."""
    from lowbit.compiler import compile_cache
    from lowbit.compiler.jit import emission_key

    if emission_key() or not compile_cache.enabled():
        return compile_captured(captured, options)
    key = compile_cache.key(captured, options)
    hit = compile_cache.lookup(key)
    if hit is not None:
        counters["cache_hits"] += 1
        from lowbit.compiler.pipeline import Pipeline

        pipeline = Pipeline(options=options)
        pipeline.report = hit.report
        compiled = CompiledGraph(captured, hit.fn, pipeline, hit.traps)
        compiled.cache_key = key
        register_report(compiled)
        return compiled
    compiled = compile_captured(captured, options)
    if compile_cache.store(key, compiled.jit, compiled.report, getattr(compiled, "traps", None)):
        compiled.cache_key = key  # whole programs stored in the cache refer to it
    return compiled


def _compile_rounds(captured: CapturedGraph, args: Sequence[Any], options: CompileOptions,
                    known_unsupported: set[str] | None, max_rounds: int) -> Callable:
    known = known_unsupported if known_unsupported is not None else set()
    unsupported = {node_op_name(n) for n in captured.graph_module.graph.nodes} & known
    for _ in range(max_rounds):
        try:
            if not unsupported:
                with timed(f"compile a graph of {len(captured.graph_module.graph.nodes)} nodes"):
                    return cached_compile(captured, options)
            return _partition_and_compile(captured, args, unsupported, options)
        except StageError as e:
            rejected = _Rejected(rejected_ops(str(e.cause), captured.graph_module), e.stage, _first_line(e.cause))
        except _Rejected as e:
            rejected = e
        new = rejected.ops - unsupported
        if not new:
            _warn("the graph", f"stage '{rejected.stage}' failed: {rejected.detail}")
            return PartitionedGraph(captured, captured.graph_module, set())
        for op in sorted(new):
            _warn_once(op, f"rejected by stage '{rejected.stage}': {rejected.detail}")
        unsupported |= new
        known |= new
    _warn("the graph", f"still failing after {max_rounds} partitioning rounds")
    return PartitionedGraph(captured, captured.graph_module, set())
