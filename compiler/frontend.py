"""PyTorch -> functional ATen graph with frozen weights -> torch-dialect MLIR.

`capture` turns a dynamo FX graph (or any `nn.Module`/`GraphModule`) plus concrete example
inputs into a functional ATen graph via `torch.export` and torch-mlir's decomposition table:
input mutations (KV-cache updates) become extra outputs that the runtime writes back, and
parameters and unmutated buffers are frozen into constants, as inductor's freezing does.
Changing a frozen tensor afterwards needs a recompile; the runtime checks the tensors'
version counters on each call and recompiles when one changed.
"""
from __future__ import annotations

import ctypes
import dataclasses
import warnings
from typing import Any, Sequence

import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch_mlir import ir
from torch_mlir.extras.fx_decomp_util import get_decomposition_table
from torch_mlir.extras.fx_importer import ContextCache, FxImporter

from lowbit.compiler.decompositions import lowbit_decompositions
from lowbit.compiler.literals import LiteralHooks, split_shared_get_attrs
from lowbit.compiler.passmanager import new_context


class FrontendError(RuntimeError):
    """The PyTorch program could not be captured as a static ATen graph."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> "TensorSpec":
        return TensorSpec(tuple(t.shape), t.dtype)

    def __str__(self) -> str:
        return f"{str(self.dtype).replace('torch.', '')}{list(self.shape)}"


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

    @property
    def num_user_outputs(self) -> int:
        return len(self.output_specs) - len(self.mutated_inputs) + len(self.constant_outputs)

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
        if not self.constant_outputs:
            return user
        result, it = [], iter(user)
        for i in range(self.num_user_outputs):
            result.append(self.constant_outputs[i] if i in self.constant_outputs else next(it))
        return result

    def expand_outputs(self, outs: list) -> list:
        """The graph's unique outputs -> all outputs, repeats as copies of their first."""
        if not self.repeated_outputs:
            return list(outs)
        full, it = [], iter(outs)
        for i in range(len(self.output_specs)):
            full.append(full[self.repeated_outputs[i]].clone() if i in self.repeated_outputs else next(it))
        return full


def write_back(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for a mutated input (a KV cache), without torch's thread pool when
    both are contiguous and alike: a parallel `copy_` leaves torch's OpenMP workers
    spinning into the next compiled call, where they compete with lowbit's own threads
    (a third of a 2-thread decode step's CPU time went to libgomp's spin)."""
    if (dst.dtype == src.dtype and dst.shape == src.shape and dst.device.type == "cpu"
            and src.device.type == "cpu" and dst.is_contiguous() and src.is_contiguous()):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
    else:
        dst.copy_(src)


class _Wrapped(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def capture(fn: torch.nn.Module | torch.fx.GraphModule, example_inputs: Sequence[Any],
            freezable: Sequence[int] = ()) -> CapturedGraph:
    """Export `fn(*example_inputs)` and freeze the inputs at `freezable` positions that the
    graph does not mutate. Non-tensor inputs are specialised to their example values."""
    module = fn if isinstance(fn, torch.nn.Module) else _Wrapped(fn)
    args = tuple(example_inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, args, strict=False)
            ep = ep.run_decompositions(lowbit_decompositions(get_decomposition_table()))
    except Exception as e:  # torch.export raises many exception types
        raise FrontendError(f"torch.export could not capture the graph: {type(e).__name__}: {e}") from e

    sig = ep.graph_signature
    gm = ep.graph_module
    _reject_symbolic_shapes(gm)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user_phs = [n for n, spec in zip(placeholders, sig.input_specs) if spec.kind == InputKind.USER_INPUT]
    if len(user_phs) != len(args):
        raise FrontendError(f"export produced {len(user_phs)} inputs for {len(args)} arguments")
    mutated_names = dict(sig.user_inputs_to_mutate.items()) if hasattr(sig, "user_inputs_to_mutate") else {}
    mutated_phs = set(mutated_names.values())
    freezable = set(freezable)

    frozen: dict[int, torch.Tensor] = {}
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
                # A scalar (e.g. a SymInt of dynamo's automatic dynamic shapes): the
                # compiled graph is specialised to its value, which is part of the cache key.
                node.replace_all_uses_with(value)
            graph.erase_node(node)
            continue
        if pos in freezable and node.name not in mutated_phs:
            frozen[pos] = value
            const_id = _freeze_placeholder(gm, node, value.detach(), const_id)
        else:
            _check_device(value, pos)
            input_indices.append(pos)
            input_specs.append(TensorSpec.of(value))

    output_node = next(n for n in graph.nodes if n.op == "output")
    outs = list(output_node.args[0])
    placeholder_pos = {n.name: pos for pos, n in enumerate(user_phs)}
    mutated_inputs, output_specs, constant_outputs = [], [], {}
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
        output_specs.append(_spec_of_node(node))

    user_idx = 0
    for out, ospec in zip(outs, sig.output_specs):
        if ospec.kind == OutputKind.USER_INPUT_MUTATION:
            mutated_inputs.append(placeholder_pos[ospec.target])
            add_output(out)
        elif ospec.kind == OutputKind.USER_OUTPUT:
            if isinstance(out, torch.fx.Node):
                add_output(out)
            else:
                constant_outputs[user_idx] = out
            user_idx += 1
        else:
            raise FrontendError(f"unsupported output kind {ospec.kind} for {out}")
    output_node.args = (tuple(new_outs),)
    graph.eliminate_dead_code()
    gm.recompile()
    return CapturedGraph(gm, input_indices, input_specs, frozen, mutated_inputs, output_specs,
                         constant_outputs, repeated)


def _reject_symbolic_shapes(gm: torch.fx.GraphModule) -> None:
    """Compiled code has static shapes; a data-dependent size (e.g. `nonzero`) cannot be
    specialised to its example value, because the next call may produce another."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else [val]
        for v in vals:
            if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape):
                raise FrontendError(f"node {node.name} ({node.target}) has a data-dependent shape "
                                    f"{tuple(v.shape)}; lowbit compiles static shapes only")


def _check_device(t: torch.Tensor, pos: int) -> None:
    if t.device.type != "cpu":
        raise FrontendError(f"input {pos} is on device '{t.device}'; lowbit compiles for the CPU only")


def _spec_of_node(node: torch.fx.Node) -> TensorSpec:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise FrontendError(f"graph output {node.name} is not a tensor ({type(val).__name__})")
    try:
        shape = tuple(int(s) for s in val.shape)
    except TypeError as e:
        raise FrontendError(f"graph output {node.name} has a symbolic shape {tuple(val.shape)}") from e
    return TensorSpec(shape, val.dtype)


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
    context = context or new_context()
    importer = FxImporter(context=context, hooks=LiteralHooks())
    importer._cc.__class__ = _NodeNamedLocations  # same slots: only the location hook differs
    split_shared_get_attrs(captured.graph_module.graph)
    try:
        importer.import_stateless_graph(captured.graph_module.graph, func_name=func_name)
    except Exception as e:
        raise FrontendError(f"torch-mlir's FX importer failed: {type(e).__name__}: {e}") from e
    return importer.module
