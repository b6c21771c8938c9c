"""PyTorch -> functional ATen graph with frozen weights -> torch-dialect MLIR.

`capture` turns a dynamo FX graph (or any `nn.Module`/`GraphModule`) plus concrete example
inputs into a functional ATen graph via `torch.export` and torch-mlir's decomposition table:
input mutations (KV-cache updates) become extra outputs that the runtime writes back, and
parameters and unmutated buffers are frozen into constants, as inductor's freezing does.
Changing a frozen tensor afterwards needs a recompile; the runtime checks the tensors'
version counters on each call and recompiles when one changed.

Dynamic sizes (`dynamic_dims`): chosen input dims become `torch.export.Dim`s, so one graph
serves every size in the exported range. `TensorSpec` dims are then sympy expressions over
the size symbols (named as the caller named them); the runtime binds the symbols from the
input sizes per call and evaluates output shapes. 0/1 specialization: torch specializes
size-1 dims, but a `Dim(min=1)` exported from an example of size >= 2 keeps size 1 in the
range whenever the traced code never branches on `size == 1` (export checks every guard
against the range), so decode (T=1) and prefill (T>1) share one compile. An example of size
0 or 1 is traced from a stand-in of size 2 (`_generic_examples`). Where the code does
specialize, export's suggested fixes are applied (the range narrows, e.g. to min=2, or
the dim becomes static) and logged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import warnings
from typing import Any, Sequence

import sympy
import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch_mlir import ir
from torch_mlir.extras.fx_decomp_util import get_decomposition_table
from torch_mlir.extras.fx_importer import ContextCache, FxImporter

from lowbit.compiler.decompositions import lowbit_decompositions
from lowbit.compiler.literals import LiteralHooks, split_shared_get_attrs
from lowbit.compiler.jit import write_back
from lowbit.compiler.passmanager import new_context
from lowbit.compiler.tensor_spec import TensorSpec  # noqa: F401  (re-exported: the frontend's signatures)

log = logging.getLogger("lowbit.compiler.frontend")

# position -> {dim index: symbol name or torch.export.Dim}; one name is one symbol.
DynamicDims = dict[int, dict[int, Any]]


class FrontendError(RuntimeError):
    """The PyTorch program could not be captured as a static ATen graph."""


@dataclasses.dataclass
class CapturedGraph:
    """A functional ATen graph whose placeholders are exactly the runtime inputs.

    Outputs of `graph_module` are `[new value of each mutated input..., user outputs...]`.
    """

    graph_module: torch.fx.GraphModule
    input_indices: list[int]          # positions (in the caller's argument list) of runtime inputs
    input_specs: list[TensorSpec]
    frozen: dict[int, torch.Tensor]   # caller position -> frozen tensor (a constant in the graph)
    mutated_inputs: list[int]         # caller positions written back, in output order
    output_specs: list[TensorSpec]
    constant_outputs: dict[int, Any]  # user-output position -> non-tensor value
    # Output position -> earlier position of the same value. The graph returns each value
    # once (a function returning one buffer twice crashes bufferization); the runtime
    # fills repeats in with copies, so callers still get distinct tensors.
    repeated_outputs: dict[int, int] = dataclasses.field(default_factory=dict)
    # Dynamic graphs: size symbol -> (min, max or None) that every call must satisfy.
    symbol_ranges: dict[str, tuple[int, int | None]] = dataclasses.field(default_factory=dict)
    # Caller position -> value of a scalar input the graph was specialised to.
    specialized: dict[int, Any] = dataclasses.field(default_factory=dict)
    # User-output position -> a size output (a SymInt, e.g. `x.shape[1] + 1`) as a sympy
    # expression over the input symbols; computed from the inputs' sizes per call.
    size_outputs: dict[int, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_dynamic(self) -> bool:
        return not all(s.is_static for s in self.input_specs + self.output_specs)

    @property
    def num_user_outputs(self) -> int:
        return (len(self.output_specs) - len(self.mutated_inputs) + len(self.constant_outputs)
                + len(self.size_outputs))

    def unique_output_specs(self) -> list[TensorSpec]:
        return [s for i, s in enumerate(self.output_specs) if i not in self.repeated_outputs]

    def finish_call(self, args, outs: list) -> list:
        """Graph outputs -> the caller's results: repeats expanded, new values of mutated
        inputs written back into them, non-tensor outputs put back in place."""
        outs = self.expand_outputs(outs)
        n_mut = len(self.mutated_inputs)
        for pos, new in zip(self.mutated_inputs, outs[:n_mut]):
            write_back(args[pos], new)
        user = outs[n_mut:]
        if not self.constant_outputs and not self.size_outputs:
            return user
        sizes = self._size_values(args) if self.size_outputs else {}
        result, it = [], iter(user)
        for i in range(self.num_user_outputs):
            if i in self.constant_outputs:
                result.append(self.constant_outputs[i])
            elif i in sizes:
                result.append(sizes[i])
            else:
                result.append(next(it))
        return result

    def _size_values(self, args) -> dict[int, int]:
        """Values of the size outputs for these arguments (a function generated once)."""
        fn = self.__dict__.get("_size_fn")
        if fn is None:
            fn = self.__dict__["_size_fn"] = _size_output_function(self)
        return fn(args)

    def expand_outputs(self, outs: list) -> list:
        """The graph's unique outputs -> all outputs, repeats as copies of their first."""
        if not self.repeated_outputs:
            return list(outs)
        full, it = [], iter(outs)
        for i in range(len(self.output_specs)):
            full.append(full[self.repeated_outputs[i]].clone() if i in self.repeated_outputs else next(it))
        return full


def _size_output_function(cap: "CapturedGraph"):
    """`args -> {user-output position: int}` for the size outputs of `cap`."""
    from torch.utils._sympy.printers import PythonPrinter

    source: dict[str, str] = {}
    for pos, spec in zip(cap.input_indices, cap.input_specs):
        for d, dim in enumerate(spec.shape):
            if isinstance(dim, sympy.Symbol) and str(dim) not in source:
                source[str(dim)] = f"args[{pos}].shape[{d}]"
    printer = PythonPrinter()
    items = []
    for i, expr in cap.size_outputs.items():
        missing = {str(x) for x in expr.free_symbols} - set(source)
        if missing:
            raise FrontendError(f"size output {i} ({expr}) needs {sorted(missing)}, no input's size")
        body = printer.doprint(expr.xreplace({x: sympy.Symbol(f"_v_{x}") for x in expr.free_symbols}))
        items.append(f"{i}: int({body})")
    lets = "".join(f"    _v_{n} = {src}\n" for n, src in source.items())
    code = f"def sizes(args):\n{lets}    return {{{', '.join(items)}}}\n"
    namespace: dict = {}
    exec(compile(code, "<lowbit size outputs>", "exec"), namespace)
    return namespace["sizes"]


class _Wrapped(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def capture(fn: torch.nn.Module | torch.fx.GraphModule, example_inputs: Sequence[Any],
            freezable: Sequence[int] = (), dynamic_dims: DynamicDims | None = None) -> CapturedGraph:
    """Export `fn(*example_inputs)` and freeze the inputs at `freezable` positions that the
    graph does not mutate. Non-tensor inputs are specialised to their example values.

    `dynamic_dims` maps an input position to `{dim index: symbol}`, a symbol being a name
    (the same name in two places is one size) or a `torch.export.Dim` (for a range); those
    dims stay symbolic in the graph (see the module docstring)."""
    from lowbit.compiler.worker import prestart
    prestart()  # the compile worker imports while this graph is exported and bound
    args = tuple(_concrete(a) for a in example_inputs)
    dims = _normalize_dynamic_dims(dynamic_dims, args)
    # Scalar inputs the compiled graph does not depend on: unused by a GraphModule, or
    # SymInts whose value now comes from a tensor's size. Other scalars are specialised.
    sizes_read: set[int] = set()
    if isinstance(fn, torch.fx.GraphModule):
        sizes_read = {i for i, n in enumerate(fn.graph.find_nodes(op="placeholder")) if not n.users}
    if dims and isinstance(fn, torch.fx.GraphModule):
        fn, rewritten = _sizes_for_symint_inputs(fn, dims)
        sizes_read |= rewritten
    # A module (a dynamo GraphModule) is exported as itself, so that every node keeps the
    # `nn_module_stack` of the model code it came from (regions rely on it).
    module = fn if isinstance(fn, torch.nn.Module) else _Wrapped(fn)
    # Outside dynamo's tracing context: a backend may capture while dynamo compiles, and
    # export would otherwise trace in dynamo's fake mode and add guards to its shape env.
    with CAPTURE_LOCK, _export_isolated(), torch._guards.tracing(None):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = _export(module, args, dims, _dynamo_upper_bounds(fn, dims))
        except Exception as e:  # torch.export raises many exception types
            raise FrontendError(f"torch.export could not capture the graph: {type(e).__name__}: {e}") from e
        check_operand_dtypes(ep.graph_module)  # eager's dtype errors, which fake tensors skip
        if dims and getattr(ep, "_guards_code", None):
            # Guards are checked per call by the JIT (symbol ranges and equalities). Those
            # export copies from a dynamo graph's shape env name dynamo's sources
            # (`L['x']`) and break the guard function `run_decompositions` builds.
            ep._guards_code = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = ep.run_decompositions(lowbit_decompositions(get_decomposition_table()))
        except Exception as e:
            raise FrontendError(f"torch.export could not decompose the graph: {type(e).__name__}: {e}") from e

    sig = ep.graph_signature
    gm = ep.graph_module
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user_phs = [n for n, spec in zip(placeholders, sig.input_specs) if spec.kind == InputKind.USER_INPUT]
    if len(user_phs) != len(args):
        raise FrontendError(f"export produced {len(user_phs)} inputs for {len(args)} arguments")
    rename, ranges = _symbols_of(ep, user_phs, dims)
    _reject_symbolic_shapes(gm, set(rename))
    mutated_names = dict(sig.user_inputs_to_mutate.items()) if hasattr(sig, "user_inputs_to_mutate") else {}
    mutated_phs = set(mutated_names.values())
    freezable = set(freezable)

    frozen: dict[int, torch.Tensor] = {}
    specialized: dict[int, Any] = {}
    input_indices: list[int] = []
    input_specs: list[TensorSpec] = []
    const_id = 0
    # Module state that export lifted (parameters/buffers/constants of `fn` itself) is frozen.
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind == InputKind.BUFFER and spec.target in sig.buffers_to_mutate.values():
            raise FrontendError(f"buffer '{spec.target}' is mutated inside the graph; pass it as an input")
        value = ep.state_dict.get(spec.target, ep.constants.get(spec.target) if ep.constants else None)
        const_id = _freeze_placeholder(gm, node, value, const_id)
    for pos, (node, value) in enumerate(zip(user_phs, args)):
        if not isinstance(value, torch.Tensor):
            if node.users:
                if not isinstance(value, (int, float, bool)):
                    raise FrontendError(f"non-tensor input {pos} ({type(value).__name__}) is used by the graph")
                node.replace_all_uses_with(value)
            if isinstance(value, (int, float, bool)) and pos not in sizes_read:
                # A scalar (e.g. a SymInt of dynamo's automatic dynamic shapes that is no
                # tensor's size): export bakes its value into the graph (even where the
                # placeholder then looks unused), so it is checked per call.
                specialized[pos] = value
            graph.erase_node(node)
            continue
        if pos in freezable and node.name not in mutated_phs:
            if pos in dims:
                raise FrontendError(f"input {pos} is frozen (a constant) and cannot have dynamic dims")
            frozen[pos] = value
            const_id = _freeze_placeholder(gm, node, value.detach(), const_id)
        else:
            _check_device(value, pos)
            input_indices.append(pos)
            input_specs.append(_spec_of_node(node, rename, "input"))

    output_node = next(n for n in graph.nodes if n.op == "output")
    outs = list(output_node.args[0])
    placeholder_pos = {n.name: pos for pos, n in enumerate(user_phs)}
    mutated_inputs, output_specs, constant_outputs, size_outputs = [], [], {}, {}
    new_outs = []
    first_position: dict[torch.fx.Node, int] = {}
    repeated: dict[int, int] = {}

    def add_output(node: torch.fx.Node) -> None:
        position = len(output_specs)
        if node in first_position:
            repeated[position] = first_position[node]
        else:
            first_position[node] = position
            new_outs.append(node)
        output_specs.append(_spec_of_node(node, rename, "output"))

    user_idx = 0
    for out, ospec in zip(outs, sig.output_specs):
        if ospec.kind == OutputKind.USER_INPUT_MUTATION:
            mutated_inputs.append(placeholder_pos[ospec.target])
            add_output(out)
        elif ospec.kind == OutputKind.USER_OUTPUT:
            size = out.meta.get("val") if isinstance(out, torch.fx.Node) else None
            if isinstance(size, (torch.SymInt, int)) and not isinstance(size, bool):
                # A size (e.g. passed between parts of a split graph): computed per call.
                expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)
                if expr.is_number:
                    constant_outputs[user_idx] = int(expr)
                elif expr.free_symbols <= set(rename):
                    size_outputs[user_idx] = expr.xreplace(rename)
                else:
                    raise FrontendError(f"graph output {out.name} is a data-dependent size {size}")
            elif isinstance(out, torch.fx.Node):
                add_output(out)
            else:
                constant_outputs[user_idx] = out
            user_idx += 1
        else:
            raise FrontendError(f"unsupported output kind {ospec.kind} for {out}")
    output_node.args = (tuple(new_outs),)
    graph.eliminate_dead_code()
    gm.recompile()
    used = set().union(*(s.symbols for s in input_specs)) if input_specs else set()
    return CapturedGraph(gm, input_indices, input_specs, frozen, mutated_inputs, output_specs,
                         constant_outputs, repeated, {k: v for k, v in ranges.items() if k in used},
                         specialized, size_outputs)


def _concrete(value: Any) -> Any:
    """A symbolic scalar (dynamo hands a backend SymInts for size inputs) -> its example value."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        if hint is None:
            raise FrontendError(f"symbolic input {value} has no example value")
        return type(hint)(hint) if not isinstance(value, torch.SymInt) else int(hint)
    return value


def _dim_symbol_name(symbol: Any) -> str:
    return symbol if isinstance(symbol, str) else symbol.__name__


def _normalize_dynamic_dims(dynamic_dims: DynamicDims | None, args: tuple) -> DynamicDims:
    """Validate `dynamic_dims` against the example inputs; dims become non-negative."""
    out: DynamicDims = {}
    for pos, dims in (dynamic_dims or {}).items():
        if not isinstance(pos, int) or not 0 <= pos < len(args):
            raise ValueError(f"dynamic_dims: input position {pos!r} is out of range for {len(args)} inputs")
        value = args[pos]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"dynamic_dims: input {pos} is a {type(value).__name__}, not a tensor")
        fixed = {}
        for d, symbol in dims.items():
            if not isinstance(d, int) or not -value.dim() <= d < value.dim():
                raise ValueError(f"dynamic_dims: input {pos} has rank {value.dim()}, no dim {d!r}")
            if isinstance(symbol, str):
                if not symbol.isidentifier():
                    raise ValueError(f"dynamic_dims: symbol name {symbol!r} of input {pos} dim {d} "
                                     "is not a Python identifier")
            elif not hasattr(symbol, "__name__") or not hasattr(symbol, "min"):
                raise ValueError(f"dynamic_dims: input {pos} dim {d}: expected a name or a "
                                 f"torch.export.Dim, got {type(symbol).__name__}")
            fixed[d % value.dim()] = symbol
        if fixed:
            out[pos] = fixed
    return out


def _dynamo_upper_bounds(fn: Any, dims: DynamicDims) -> dict[str, int]:
    """Finite upper bounds dynamo holds for the dynamic dims' symbols (`mark_dynamic(max=...)`),
    by symbol name: export is given the same range, so a guard dynamo already proved for it
    (e.g. transformers' `q_len != cache_len` with a static cache) does not fail the export."""
    if not isinstance(fn, torch.fx.GraphModule):
        return {}
    phs = fn.graph.find_nodes(op="placeholder")
    out: dict[str, int] = {}
    for pos, ds in dims.items():
        ev = phs[pos].meta.get("example_value") if pos < len(phs) else None
        for d, name in ds.items():
            size = ev.shape[d] if isinstance(ev, torch.Tensor) and d < ev.dim() else None
            if isinstance(name, str) and isinstance(size, torch.SymInt):
                upper = size.node.shape_env.var_to_range.get(size.node.expr)
                upper = getattr(upper, "upper", None)
                if upper is not None and upper.is_integer and upper.is_number and upper < 2 ** 62:
                    out[name] = int(upper)  # unbounded (int_oo) is left to export
    return out


def _export(module: torch.nn.Module, args: tuple, dims: DynamicDims, upper: dict[str, int] | None = None):
    # Export marks its inputs' dynamic dims on the tensor objects and strips every marking
    # afterwards -- including the caller's `mark_dynamic`, which dynamo guards on (a backend
    # capturing dynamo's example inputs would make dynamo recompile on every call). Export
    # traces aliases instead.
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    if not dims:
        return torch.export.export(module, args, strict=False)
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    # A name refers to the Dim of that name if the caller gave one (for its range).
    made: dict[str, Any] = {_dim_symbol_name(sym): sym for ds in dims.values() for sym in ds.values()
                            if not isinstance(sym, str)}

    def dim(symbol):
        if not isinstance(symbol, str):
            return symbol
        if symbol not in made:
            bound = {"max": upper[symbol]} if upper and symbol in upper else {}
            made[symbol] = torch.export.Dim(symbol, min=1, **bound)
        return made[symbol]

    per_input = tuple({d: dim(sym) for d, sym in dims[p].items()} if p in dims else None
                      for p in range(len(args)))
    # `_Wrapped.forward(*args)` has one parameter holding every input; a module's forward one
    # parameter per input.
    shapes: Any = (per_input,) if _varargs_forward(module) else per_input
    args = _generic_examples(args, dims)
    for attempt in range(4):
        try:
            return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        except torch._dynamo.exc.UserError as e:
            fixes = _suggested_fixes(str(e))
            if not fixes or attempt == 3:
                raise
            log.info("dynamic dims: applying torch.export's suggested fixes: %s", "; ".join(fixes))
            shapes = refine_dynamic_shapes_from_suggested_fixes(
                "Suggested fixes:\n" + "\n".join("  " + f for f in fixes), shapes)
    raise AssertionError("unreachable")


def _varargs_forward(module: torch.nn.Module) -> bool:
    """Whether `module.forward` takes its inputs as `*args` (one dynamic_shapes entry for all)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _generic_examples(args: tuple, dims: DynamicDims) -> tuple:
    """Examples for export in which every dynamic dim has size >= 2.

    Export (like dynamo) specializes an example size of 0 or 1, and its hint-based
    decisions (contiguity, broadcasting, matmul folding) then guard on `== 1`. Non-strict
    export traces fake tensors, so only the shapes and dtypes of the examples matter: a
    dynamic dim of size < 2 is traced from a zero tensor of size 2 instead (every input
    dim with the same symbol alike). Export still checks every guard against the range
    (min 1), so the graph is valid at size 1 unless export says otherwise."""
    small = {_dim_symbol_name(sym) for p, ds in dims.items() for d, sym in ds.items() if args[p].shape[d] < 2}
    if not small:
        return args
    out = list(args)
    for p, ds in dims.items():
        shape = list(args[p].shape)
        grown = [d for d, sym in ds.items() if _dim_symbol_name(sym) in small]
        if grown:
            for d in grown:
                shape[d] = 2
            out[p] = torch.zeros(shape, dtype=args[p].dtype, device=args[p].device)
    return tuple(out)


def _suggested_fixes(message: str) -> list[str]:
    """The `name = ...` lines under "Suggested fixes:" of an export constraint error."""
    if "Suggested fixes:" not in message:
        return []
    fixes = []
    for line in message.split("Suggested fixes:", 1)[1].splitlines():
        line = line.strip()
        if not line:
            if fixes:
                break
            continue
        if " = " not in line:
            break
        fixes.append(line)
    return fixes


def _symbols_of(ep, user_phs: list[torch.fx.Node], dims: DynamicDims):
    """Export's size symbols -> the caller's names, and each symbol's (min, max)."""
    from torch.utils._sympy.numbers import int_oo

    rename: dict[sympy.Symbol, sympy.Symbol] = {}
    for node in user_phs:  # every symbol of an input size, under export's name first
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt):
                    for x in s.node.expr.free_symbols:
                        rename.setdefault(x, sympy.Symbol(str(x), integer=True, positive=True))
    for pos, ds in dims.items():
        val = user_phs[pos].meta.get("val")
        for d, symbol in ds.items():
            size = val.shape[d]
            name = _dim_symbol_name(symbol)
            if not isinstance(size, torch.SymInt) or not isinstance(size.node.expr, sympy.Symbol):
                log.info("dynamic dims: input %d dim %d (%s) was specialized to %s by torch.export",
                         pos, d, name, size)
                continue
            rename[size.node.expr] = sympy.Symbol(name, integer=True, positive=True)
    ranges: dict[str, tuple[int, int | None]] = {}
    for sym, new in rename.items():
        vr = ep.range_constraints.get(sym)
        lo = int(vr.lower) if vr is not None and vr.lower != -int_oo else 0
        hi = None if vr is None or vr.upper == int_oo else int(vr.upper)
        ranges[str(new)] = (max(lo, 0), hi)
    return rename, ranges


def _sizes_for_symint_inputs(gm: torch.fx.GraphModule, dims: DynamicDims) -> tuple[torch.fx.GraphModule, set[int]]:
    """Dynamo (and a graph split into parts) passes a symbolic size also as an int input
    (`s0`, `s0 + s1`); where a tensor input has the same size expression in a dynamic dim,
    the int's uses read that size instead (`aten.sym_size`), so the size stays symbolic
    and the int input becomes unused (it is dropped at capture). Other SymInt inputs stay
    specialised to their values (checked per call, see `CapturedGraph.specialized`).
    Returns the graph and the positions of the int inputs it no longer reads."""
    phs = gm.graph.find_nodes(op="placeholder")

    def meta_value(node):
        return node.meta.get("example_value", node.meta.get("val"))

    where: dict[Any, tuple[int, int]] = {}
    for pos, ds in dims.items():
        val = meta_value(phs[pos]) if pos < len(phs) else None
        if not isinstance(val, torch.Tensor):
            continue
        for d in ds:
            size = val.shape[d]
            if isinstance(size, torch.SymInt):
                where.setdefault(size.node.expr, (pos, d))
    todo = []
    for node in phs:
        ev = meta_value(node)
        if isinstance(ev, torch.SymInt) and node.users:
            hit = where.get(ev.node.expr)
            if hit is not None:
                todo.append((node.name, hit))
    if not todo:
        return gm, set()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)  # shallow-copies node meta: no tensor copies
    graph.output(out)
    new_phs = graph.find_nodes(op="placeholder")
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for name, (pos, d) in todo:
        node = next(n for n in new_phs if n.name == name)
        with graph.inserting_before(first_op):
            size = graph.call_function(torch.ops.aten.sym_size.int, (new_phs[pos], d))
        size.meta = dict(node.meta)
        node.replace_all_uses_with(size)
    positions = {i for i, n in enumerate(phs) if any(n.name == name for name, _ in todo)}
    return torch.fx.GraphModule(gm, graph), positions


def inline_nested_regions(gm: torch.fx.GraphModule) -> int:
    """Inline every `invoke_subgraph` call (`torch.compiler.nested_compile_region`) of a dynamo
    graph in place, so that the rest of the frontend sees one flat graph. Returns the number of
    calls inlined (0: nothing to do, `gm` untouched).

    Dynamo traces a marked region (a decoder layer's `forward`) once and stamps out one
    `invoke_subgraph(subgraph_i, identifier, *operands)` call per use, each with that use's
    weights and buffers as operands; tracing a 16-layer model then costs about one layer's
    trace. lowbit compiles the repeated layers once anyway (`lowbit.compiler.regions`), from a
    flat graph: each call is replaced by a copy of the subgraph's nodes on its own operands. A
    buffer the region mutates (a KV cache's `index_copy_`) is a placeholder of the subgraph, so
    the copy mutates that call's operand, exactly as a flat trace of the layer does.

    The subgraph's nodes carry the `nn_module_stack` of the call that was traced (`layers.0`);
    each copy gets its own call's stack instead (`layers.7`, `layers.7.attention`, ...), which
    the regions pass uses to cut one region per layer. Regions nested in regions are inlined
    innermost first. A call whose result is used other than through `getitem` (dynamo always
    unpacks it) is left alone, and the graph then runs in eager like any graph the frontend
    cannot capture."""
    invoke = torch.ops.higher_order.invoke_subgraph
    if not any(m.graph.find_nodes(op="call_function", target=invoke)
               for m in gm.modules() if isinstance(m, torch.fx.GraphModule)):
        return 0
    import operator
    done: set[int] = set()
    count = 0

    def visit(mod: torch.fx.GraphModule) -> None:
        nonlocal count
        if id(mod) in done:
            return
        done.add(id(mod))
        for child in list(mod.children()):  # bodies first: a region nested in a region
            if isinstance(child, torch.fx.GraphModule):
                visit(child)
        calls = list(mod.graph.find_nodes(op="call_function", target=invoke))
        if not calls:
            return
        first_site: dict[str, dict] = {}
        for node in calls:
            first_site.setdefault(str(node.args[1]), dict(node.meta.get("nn_module_stack") or {}))
        attrs: dict[tuple[int, str], str] = {}
        for node in calls:
            if any(u.op != "call_function" or u.target is not operator.getitem or u.args[0] is not node
                   for u in node.users):
                log.info("invoke_subgraph %s has a result used without getitem; not inlined", node.name)
                continue
            body = node.args[0]
            sub = getattr(mod, str(body.target)) if isinstance(body, torch.fx.Node) else body
            if not isinstance(sub, torch.fx.GraphModule):
                log.info("invoke_subgraph %s: body %r is not a GraphModule; not inlined", node.name, body)
                continue
            _inline_call(mod, node, sub, first_site[str(node.args[1])], attrs)
            count += 1
        mod.graph.lint()
        mod.delete_all_unused_submodules()
        mod.recompile()

    visit(gm)
    if count:
        _rename_in_program_order(gm)
    log.debug("inlined %d invoke_subgraph calls", count)
    return count


def _rename_in_program_order(gm: torch.fx.GraphModule) -> None:
    """Name the nodes of an inlined graph as a flat trace names them: in program order, each
    from its base name (`xf`, `xf_1`, `xf_2`, ... across layers). Stamped-out copies otherwise
    keep the body's names plus a suffix, out of program order; names matter downstream, where
    provenance (`from_node`) is matched to this graph's nodes by name
    (`regions.restore_module_stacks`)."""
    import re
    from torch.fx.graph import _Namespace
    # In place, with a fresh namespace (rebuilding the graph node by node took seconds on the
    # 16-layer graph: `create_node` walks every argument with pytree).
    namespace = _Namespace()
    for node in gm.graph.nodes:
        base = node.name if node.op == "placeholder" else (re.sub(r"_\d+$", "", node.name) or node.name)
        node.name = namespace.create_name(base, node)
    gm.graph._graph_namespace = namespace
    gm.recompile()


def _inline_call(mod: torch.fx.GraphModule, node: torch.fx.Node, sub: torch.fx.GraphModule,
                 traced_site: dict, attrs: dict) -> None:
    """Replace one `invoke_subgraph` call `node` in `mod` by a copy of `sub`'s nodes."""
    operands = node.args[2:]
    phs = sub.graph.find_nodes(op="placeholder")
    if len(phs) != len(operands):
        raise FrontendError(f"invoke_subgraph {node.name}: {len(operands)} operands for a body with "
                            f"{len(phs)} inputs")
    env: dict[torch.fx.Node, Any] = dict(zip(phs, operands))
    relabel = _stack_relabeler(sub, traced_site, dict(node.meta.get("nn_module_stack") or {}))
    with mod.graph.inserting_before(node):
        for sub_node in sub.graph.nodes:
            if sub_node.op in ("placeholder", "output"):
                continue
            new = mod.graph.node_copy(sub_node, lambda n: env[n])
            if sub_node.op == "get_attr":
                key = (id(sub), str(sub_node.target))
                if key not in attrs:
                    value = _get_attr_path(sub, str(sub_node.target))
                    name = _fresh_attr_name(mod, str(sub_node.target).replace(".", "_"))
                    if isinstance(value, torch.nn.Module):
                        mod.add_submodule(name, value)
                    else:
                        setattr(mod, name, value)
                    attrs[key] = name
                new.target = attrs[key]
            stack = sub_node.meta.get("nn_module_stack")
            if stack is not None:
                new.meta["nn_module_stack"] = relabel(stack)
            env[sub_node] = new
    results = sub.graph.output_node().args[0]
    for user in list(node.users):
        value = results[user.args[1]]
        value = env.get(value, value) if isinstance(value, torch.fx.Node) else value
        if isinstance(value, torch.fx.Node):
            user.replace_all_uses_with(value)
        else:  # a constant result: put it in place in every use
            for use in list(user.users):
                use.args = torch.fx.node.map_aggregate(use.args, lambda a: value if a is user else a)
                use.kwargs = torch.fx.node.map_aggregate(use.kwargs, lambda a: value if a is user else a)
        mod.graph.erase_node(user)
    body = node.args[0]
    mod.graph.erase_node(node)
    if isinstance(body, torch.fx.Node) and not body.users:
        mod.graph.erase_node(body)


def _stack_relabeler(sub: torch.fx.GraphModule, traced_site: dict, site: dict):
    """`nn_module_stack` of a subgraph node -> that of its copy at the call with stack `site`.

    The body's stacks start with `base`: the stack of the call that was traced when it is a
    prefix of them all (a marked `forward`: `layers.0`), else their common prefix. That part
    becomes `site`; deeper entries get their path renamed from the base's module to the site's
    (`layers.0.attention` -> `layers.7.attention`) under a key of their own."""
    stacks = [list(n.meta["nn_module_stack"].items()) for n in sub.graph.nodes
              if n.meta.get("nn_module_stack")]
    base = list(traced_site.items())
    if not all(s[:len(base)] == base for s in stacks):
        base = []
        if stacks:
            for i, item in enumerate(stacks[0]):
                if all(len(s) > i and s[i] == item for s in stacks):
                    base.append(item)
                else:
                    break
    old_path = base[-1][1][0] if base else None
    site_items = list(site.items())
    new_path = site_items[-1][1][0] if site_items else None
    if site_items == base:
        return lambda stack: dict(stack)

    def relabel(stack: dict) -> dict:
        items = list(stack.items())
        if items[:len(base)] != base:
            return dict(stack)
        out = dict(site_items)
        for key, (path, cls) in items[len(base):]:
            if (old_path is not None and new_path is not None and path.startswith(old_path)
                    and path[len(old_path):len(old_path) + 1] in ("", ".", "[")):
                path = new_path + path[len(old_path):]
                key = f"{key}@{new_path}"
            out[key] = (path, cls)
        return out
    return relabel


def _get_attr_path(mod: torch.nn.Module, target: str) -> Any:
    obj: Any = mod
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fresh_attr_name(mod: torch.nn.Module, stem: str) -> str:
    name, i = stem, 0
    while hasattr(mod, name):
        name, i = f"{stem}_{i}", i + 1
    return name


def dynamic_dims_from_dynamo(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> DynamicDims:
    """The dims dynamo made symbolic (`mark_dynamic`, automatic dynamic shapes), read from
    the placeholders' FakeTensor `example_value`s, named by dynamo's symbols (`s0`, ...).

    A dim whose size is an expression rather than a plain symbol (e.g. `2*s0`) is left to
    torch.export, which ties it to the symbol. SymInt scalar inputs are handled by
    `capture` (see `_sizes_for_symint_inputs`)."""
    phs = gm.graph.find_nodes(op="placeholder")
    out: DynamicDims = {}
    for pos, (node, value) in enumerate(zip(phs, example_inputs)):
        ev = node.meta.get("example_value")
        if isinstance(ev, torch.Tensor) and isinstance(value, torch.Tensor):
            ds = _symbolic_dims(ev)
            if ds:
                out[pos] = ds
    return out


def dynamic_dims_from_meta(placeholder_nodes: Sequence[torch.fx.Node]) -> DynamicDims:
    """The symbolic dims of an exported graph's placeholders (`meta['val']`), by position in
    `placeholder_nodes`, named by their symbols -- e.g. for re-capturing part of a graph.

    A dim whose size is an expression (`s0 + s1`: a part's input made by a `cat` in the
    part before) gets a name of its own (`expr0`, the same for the same expression): the
    part is exported with it as an independent size, and export ties it to the others if
    the part's code relates them. Left static, the part would be specialised to one size."""
    out: DynamicDims = {}
    names: dict[Any, str] = {}
    for pos, node in enumerate(placeholder_nodes):
        val = node.meta.get("val", node.meta.get("example_value"))
        if not isinstance(val, torch.Tensor):
            continue
        ds = {}
        for d, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt) or size.node.expr.is_number:
                continue
            expr = size.node.expr
            if isinstance(expr, sympy.Symbol):
                ds[d] = str(expr)
            else:
                ds[d] = names.setdefault(expr, f"expr{len(names)}")
        if ds:
            out[pos] = ds
    return out


def _symbolic_dims(val: torch.Tensor) -> dict[int, str]:
    return {d: str(s.node.expr) for d, s in enumerate(val.shape)
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol)}


def _reject_symbolic_shapes(gm: torch.fx.GraphModule, input_symbols: set) -> None:
    """Sizes must be functions of the input sizes: a data-dependent size (e.g. `nonzero`)
    cannot be computed before the call, because the next call may produce another."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else [val]
        for v in vals:
            if not isinstance(v, torch.Tensor):
                continue
            free = set()
            for d in v.shape:
                if isinstance(d, torch.SymInt):
                    free |= d.node.expr.free_symbols
            if free - input_symbols:
                raise FrontendError(f"node {node.name} ({node.target}) has a data-dependent shape "
                                    f"{tuple(v.shape)}; lowbit compiles shapes that follow from the "
                                    "input sizes only")


# Ops whose eager CPU kernels require their operands to share a dtype but whose fake-tensor
# (meta) implementations do not check it: export would trace `linear(fp16 x, fp32 w)` as
# if x were fp32, and compiled code would silently compute `m(x.float())`. Value: the
# positions of the operands that must agree.
_SAME_DTYPE_OPERANDS = {
    "linear": (0, 1, 2), "mm": (0, 1), "addmm": (0, 1, 2), "bmm": (0, 1), "baddbmm": (0, 1, 2),
    "addbmm": (0, 1, 2), "matmul": (0, 1), "mv": (0, 1), "addmv": (0, 1, 2), "dot": (0, 1),
    "vdot": (0, 1), "conv1d": (0, 1, 2), "conv2d": (0, 1, 2), "conv3d": (0, 1, 2),
    "convolution": (0, 1, 2), "conv_transpose1d": (0, 1, 2), "conv_transpose2d": (0, 1, 2),
    "scaled_dot_product_attention": (0, 1, 2),
}


def check_operand_dtypes(gm: torch.fx.GraphModule) -> None:
    """Raise the error eager PyTorch raises for a matmul-like op whose operands' dtypes
    differ. The op is run once for real on zero tensors of the traced shapes and dtypes
    (only when the dtypes differ), so the exception is eager's own."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        if getattr(node.target, "namespace", None) != "aten":
            continue  # e.g. lowbit.linear: its own checks, and its operands differ by design
        positions = _SAME_DTYPE_OPERANDS.get(getattr(packet, "__name__", ""))
        if positions is None:
            continue
        vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args]
        dtypes = {vals[i].dtype for i in positions if i < len(vals) and isinstance(vals[i], torch.Tensor)}
        if len(dtypes) < 2:
            continue

        def real(v):
            if isinstance(v, torch.Tensor):
                return torch.zeros([_hint(d) for d in v.shape], dtype=v.dtype)
            return v

        kwargs = {k: real(v.meta.get("val") if isinstance(v, torch.fx.Node) else v) for k, v in node.kwargs.items()}
        node.target(*[real(v) for v in vals], **kwargs)  # raises eager's error, if eager has one


def _hint(d) -> int:
    if isinstance(d, int):
        return d
    hint = d.node.hint
    return int(hint) if hint is not None else 1  # an unbacked size: any valid size shows the error


# --- captures under threads -------------------------------------------------------
# torch.export raises process-global flags while it traces: `torch.fx._symbolic_trace.
# _is_fx_tracing_flag` and `torch.compiler._is_exporting_flag`. Another thread that calls a
# dynamo-compiled function meanwhile reads them as its own: dynamo's entry wrapper raises
# "Detected that you are using FX to symbolically trace a dynamo-optimized function", and
# `torch._dynamo.disable`d functions enter `fx.traceback.annotate`, which edits the global
# `fx.traceback.current_meta` concurrently with the export ("KeyError: 'custom'"). So:
#  - captures run one at a time under dynamo's own compile lock (an RLock), so that they
#    never overlap a dynamo compile either (both edit fx.traceback's globals);
#  - the two readers answer False in a thread other than the one lowbit's capture runs in.
#    They are patched in place (their code object), because dynamo binds
#    `is_fx_symbolic_tracing` into each compiled function's wrapper when it is created.

def _compile_lock():
    try:
        from torch._dynamo.convert_frame import compile_lock
        return compile_lock
    except ImportError:  # pragma: no cover - older/newer torch layouts
        return threading.RLock()


CAPTURE_LOCK = _compile_lock()
_capturing_thread: int | None = None
_readers_patched = False


def _foreign_export() -> bool:
    """A lowbit capture is tracing in another thread (so the global flags are not ours)."""
    owner = _capturing_thread
    return owner is not None and owner != threading.get_ident()


_READER_TEMPLATE = """
def _lowbit_reader():
    return {original}() and not _lowbit_foreign_export()
"""


def _patch_reader(function) -> None:
    if getattr(function, "_lowbit_thread_aware", False):
        return
    import types
    if function.__code__.co_freevars or function.__code__.co_argcount:
        return  # not the zero-argument reader we know: leave torch alone
    namespace = function.__globals__
    original = f"_lowbit_original_{function.__name__}"
    namespace[original] = types.FunctionType(function.__code__, namespace, function.__name__,
                                             function.__defaults__, function.__closure__)
    namespace["_lowbit_foreign_export"] = _foreign_export
    scratch: dict = {}
    exec(compile(_READER_TEMPLATE.format(original=original), "<lowbit>", "exec"), namespace, scratch)
    function.__code__ = scratch["_lowbit_reader"].__code__
    function._lowbit_thread_aware = True


def _install_thread_aware_readers() -> None:
    global _readers_patched
    if _readers_patched:
        return
    import torch.fx._symbolic_trace as symbolic_trace
    for reader in (getattr(symbolic_trace, "is_fx_symbolic_tracing", None),
                   getattr(torch.compiler, "is_exporting", None)):
        if reader is not None:
            _patch_reader(reader)
    _readers_patched = True


@contextlib.contextmanager
def _export_isolated():
    """Mark this thread as the one whose capture owns torch's global tracing flags."""
    global _capturing_thread
    _install_thread_aware_readers()
    previous = _capturing_thread
    _capturing_thread = threading.get_ident()
    try:
        yield
    finally:
        _capturing_thread = previous


def _check_device(t: torch.Tensor, pos: int) -> None:
    if t.device.type != "cpu":
        raise FrontendError(f"input {pos} is on device '{t.device}'; lowbit compiles for the CPU only")


def _spec_of_node(node: torch.fx.Node, rename: dict | None = None, what: str = "output") -> TensorSpec:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise FrontendError(f"graph {what} {node.name} is not a tensor ({type(val).__name__})")
    shape = []
    for s in val.shape:
        if isinstance(s, torch.SymInt):
            expr = s.node.expr
            if expr.is_number:
                shape.append(int(expr))
                continue
            if rename is None or expr.free_symbols - set(rename):
                raise FrontendError(f"graph {what} {node.name} has a data-dependent shape {tuple(val.shape)}")
            shape.append(expr.xreplace(rename))
        else:
            shape.append(int(s))
    return TensorSpec(tuple(shape), val.dtype)


def _freeze_placeholder(gm: torch.fx.GraphModule, node: torch.fx.Node, value, const_id: int) -> int:
    """Replace a placeholder by a constant attribute of `gm` (imported as a literal)."""
    if isinstance(value, torch.Tensor):
        _check_device(value, -1)
        value = value.detach().contiguous()
    name = f"_lowbit_frozen_{const_id}"
    if isinstance(value, torch.Tensor):
        gm.register_buffer(name, value)
    else:
        setattr(gm, name, value)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
    attr.meta = dict(node.meta)
    node.replace_all_uses_with(attr)
    gm.graph.erase_node(node)
    return const_id + 1


NODE_LOCATION_PREFIX = "lowbit.node:"


class _NodeNamedLocations(ContextCache):
    """Gives every imported op the location `lowbit.node:<fx node name>(<source loc>)`.

    MLIR keeps locations through lowering, so a diagnostic from any later stage names the
    FX node (and hence the ATen op) that produced the failing op; the fallback relies on it.
    """

    __slots__ = ()

    def get_node_location(self, node: torch.fx.Node) -> ir.Location:
        child = super().get_node_location(node) or ir.Location.unknown(context=self._c)
        return ir.Location.name(NODE_LOCATION_PREFIX + node.name, childLoc=child, context=self._c)


def import_graph(captured: CapturedGraph, func_name: str = "forward",
                 context: ir.Context | None = None) -> ir.Module:
    """FX graph -> torch-dialect MLIR module (`func.func @<func_name>`)."""
    return import_fx_graph(captured.graph_module.graph, func_name, context)


def import_fx_graph(graph: torch.fx.Graph, func_name: str = "forward",
                    context: ir.Context | None = None) -> ir.Module:
    """An ATen FX graph (placeholders with `meta["val"]`) -> torch-dialect MLIR module."""
    context = context or new_context()
    importer = FxImporter(context=context, hooks=LiteralHooks())
    importer._cc.__class__ = _NodeNamedLocations  # same slots: only the location hook differs
    split_shared_get_attrs(graph)
    try:
        importer.import_stateless_graph(graph, func_name=func_name)
    except Exception as e:
        raise FrontendError(f"torch-mlir's FX importer failed: {type(e).__name__}: {e}") from e
    return importer.module
