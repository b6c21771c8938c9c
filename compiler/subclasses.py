"""Tensor-subclass parameters (torchao, optimum-quanto, ...) become plain tensors before capture.

Quantization libraries store a quantized weight as a *traceable wrapper subclass*: a tensor
type holding plain inner tensors (codes, scales, zero points) that implements
`__tensor_flatten__` / `__tensor_unflatten__` and dequantizes in its `__torch_function__` /
`__torch_dispatch__`. Dynamo hands such a weight to the backend as one graph input;
`torch.export` cannot capture it (IndexError in `set_missing_meta_vals`).

`flatten_subclass_inputs` rewrites the dynamo graph instead: each subclass input becomes one
placeholder per inner tensor (recursively) plus a call that rebuilds the subclass with
`__tensor_unflatten__` inside the graph. Exporting that graph traces through the
library's own dequantization, which becomes an ordinary ATen subgraph over the inner
tensors -- module state, so binding (`compiler/bind.py`) evaluates it and proves the weight
low-bit. Nothing here knows a particular library.

`FlattenedCall` is what the backend keeps: it takes the caller's arguments (with the
subclass tensors), flattens them per call (a few attribute reads per weight) and forwards
the guards the backend asks about (`frozen_inputs_changed`, `state_replaced`) in the
caller's positions.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lowbit.compiler.report import tensor_refs

log = logging.getLogger("lowbit.subclasses")


@dataclasses.dataclass
class _Leaf:
    """A plain tensor at flat position `index`."""

    index: int


@dataclasses.dataclass
class _Wrapper:
    """A subclass tensor: its type, flatten context, outer size/stride and inner tensors."""

    cls: type
    ctx: Any
    names: list[str]
    inner: list[Any]            # _Leaf | _Wrapper, in `names` order
    size: tuple
    stride: tuple


class SubclassFlattenError(ValueError):
    """A subclass input that cannot be flattened (no `__tensor_flatten__` protocol)."""


def _flatten_one(t: torch.Tensor, out: list[torch.Tensor]) -> Any:
    if not is_traceable_wrapper_subclass(t):
        out.append(t)
        return _Leaf(len(out) - 1)
    names, ctx = t.__tensor_flatten__()
    inner = [_flatten_one(getattr(t, n), out) for n in names]
    return _Wrapper(type(t), ctx, list(names), inner, tuple(t.shape), tuple(t.stride()))


def _rebuild(plan: Any, flat: Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(plan, _Leaf):
        return flat[plan.index]
    inner = {n: _rebuild(p, flat) for n, p in zip(plan.names, plan.inner)}
    return plan.cls.__tensor_unflatten__(inner, plan.ctx, plan.size, plan.stride)


def _same_structure(plan: Any, t: Any) -> bool:
    """`t` flattens like `plan` (type and context; inner tensors are checked by the callee)."""
    if isinstance(plan, _Leaf):
        return isinstance(t, torch.Tensor) and not is_traceable_wrapper_subclass(t)
    if type(t) is not plan.cls:
        return False
    names, ctx = t.__tensor_flatten__()
    if list(names) != plan.names or not _ctx_equal(ctx, plan.ctx) or tuple(t.shape) != plan.size:
        return False
    return all(_same_structure(p, getattr(t, n)) for p, n in zip(plan.inner, names))


def _ctx_equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a context holding tensors: compare by identity
        return a is b


def _describe(t: torch.Tensor) -> str:
    return f"{type(t).__module__}.{type(t).__qualname__}"


def subclass_positions(args: Sequence[Any]) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and is_traceable_wrapper_subclass(a)]


def _unflatten_function(plan: Any, name: str, dequantize: bool) -> Callable:
    """The graph node's target that rebuilds a subclass from its inner tensors (export traces
    through it); a function, so the FX code refers to it by name."""
    def unflatten(*flat: torch.Tensor) -> torch.Tensor:
        t = _rebuild(plan, flat)
        return t.dequantize() if dequantize else t

    unflatten.__name__ = unflatten.__qualname__ = name
    return unflatten


@dataclasses.dataclass
class Flattened:
    """A dynamo graph rewritten to take plain tensors, with the maps back to the caller."""

    gm: torch.fx.GraphModule
    args: list[Any]               # the flat example arguments
    freezable: list[int]          # flat positions of module state
    dynamic_dims: dict            # flat positions
    plans: list[Any]              # per caller position: _Leaf/_Wrapper over flat positions
    origin: list[int]             # flat position -> caller position
    types: dict[int, str]         # caller position -> subclass type name

    def flatten(self, args: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        checked = self.__dict__.setdefault("_checked", {})  # pos -> weakref of a checked subclass
        for pos, (plan, a) in enumerate(zip(self.plans, args)):
            if isinstance(plan, _Wrapper):
                ref = checked.get(pos)
                if ref is not None and ref() is a:
                    # the same weight object as last call: its type and context were checked,
                    # only its inner tensors are read (a few getattr; a full check is ~25 us)
                    _inner_of(plan, a, out)
                    continue
                if not _same_structure(plan, a):
                    raise SubclassFlattenError(
                        f"input {pos} was a {plan.cls.__qualname__} with context {plan.ctx!r} at compile "
                        f"time and is now {type(a).__qualname__}"
                        + (f" with context {a.__tensor_flatten__()[1]!r}" if is_traceable_wrapper_subclass(a) else ""))
                _flatten_one(a, out)
                try:
                    checked[pos] = weakref.ref(a)
                except TypeError:
                    pass
            else:
                out.append(a)
        return out


def _inner_of(plan: Any, t: Any, out: list) -> None:
    if isinstance(plan, _Leaf):
        out.append(t)
        return
    for name, p in zip(plan.names, plan.inner):
        _inner_of(p, getattr(t, name), out)


def flatten_subclass_inputs(gm: torch.fx.GraphModule, args: Sequence[Any], freezable: Sequence[int],
                            dynamic_dims: Optional[dict] = None, dequantize: bool = False) -> Optional[Flattened]:
    """The rewritten graph when some inputs are traceable wrapper subclasses, else None."""
    positions = subclass_positions(args)
    if not positions or not isinstance(gm, torch.fx.GraphModule):
        return None
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(args):
        return None
    new_gm = torch.fx.GraphModule(gm, _copy_graph(gm.graph))
    graph = new_gm.graph
    new_phs = list(graph.find_nodes(op="placeholder"))
    flat: list[Any] = []
    plans: list[Any] = []
    origin: list[int] = []
    state = set(freezable)
    flat_freezable: list[int] = []
    flat_dims: dict = {}
    types: dict[int, str] = {}
    for pos, (ph, a) in enumerate(zip(new_phs, args)):
        start = len(flat)
        if pos in positions:
            plan = _flatten_one(a, flat)
            types[pos] = _describe(a)
            inner_phs = []
            with graph.inserting_before(ph):
                for j in range(start, len(flat)):
                    p = graph.placeholder(f"{ph.name}_inner{j - start}")
                    p.meta.update({k: v for k, v in ph.meta.items() if k in ("grapharg",)})
                    p.meta["example_value"] = _fake_like(ph.meta.get("example_value"), flat[j])
                    inner_phs.append(p)
            with graph.inserting_after(inner_phs[-1] if inner_phs else ph):
                shifted = _shift(plan, start)
                target = _unflatten_function(shifted, f"unflatten_{ph.name}", dequantize)
                node = graph.call_function(target, tuple(inner_phs))
                node.meta.update({k: v for k, v in ph.meta.items() if k != "grapharg"})
            ph.replace_all_uses_with(node)
            graph.erase_node(ph)
            plans.append(plan)
        else:
            flat.append(a)
            plans.append(_Leaf(start))
            if dynamic_dims and pos in dynamic_dims:
                flat_dims[start] = dynamic_dims[pos]
        origin.extend([pos] * (len(flat) - start))
        if pos in state:
            flat_freezable.extend(range(start, len(flat)))
    new_gm.recompile()
    log.info("flattened %d tensor-subclass input(s) (%s) into %d plain tensors", len(positions),
             ", ".join(sorted(set(types.values()))), sum(1 for p in origin if p in types))
    return Flattened(new_gm, flat, flat_freezable, flat_dims, plans, origin, types)


def _shift(plan: Any, start: int) -> Any:
    """The same plan with positions relative to the node's own inner arguments."""
    if isinstance(plan, _Leaf):
        return _Leaf(plan.index - start)
    return dataclasses.replace(plan, inner=[_shift(p, start) for p in plan.inner])


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def _fake_like(example: Any, real: torch.Tensor) -> Any:
    """A fake tensor of the inner tensor's shape in the example's fake mode (or None)."""
    mode = getattr(example, "fake_mode", None)
    if mode is None:
        return None
    try:
        return mode.from_tensor(real, static_shapes=True)
    except Exception:
        return None


class FlattenedCall:
    """The compiled flat graph, called with the caller's (subclass) arguments."""

    def __init__(self, compiled: Callable, flat: Flattened, args: Sequence[Any]):
        self.compiled = compiled
        self.flat = flat
        # explain(model) finds compiled graphs (the registered inner one) by the ids of the
        # model's parameters, which are the subclass tensors, not their inner tensors.
        self.state_ids = tensor_refs(args[p] for p in flat.types)
        inner_ids = getattr(compiled, "state_ids", None)
        if isinstance(inner_ids, dict):
            inner_ids.update(self.state_ids)

    def __call__(self, *args):
        return self.compiled(*self.flat.flatten(args))

    @property
    def captured(self):
        return getattr(self.compiled, "captured", None)

    @property
    def guarded(self) -> bool:
        return bool(getattr(self.compiled, "guarded", False))

    @property
    def report(self) -> list[dict]:
        return list(getattr(self.compiled, "report", []))

    def frozen_inputs_changed(self, args: Sequence[Any]) -> list[int]:
        check = getattr(self.compiled, "frozen_inputs_changed", None)
        if check is None:
            return []
        try:
            flat = self.flat.flatten(args)
        except SubclassFlattenError:
            return sorted(self.flat.types)
        return sorted({self.flat.origin[i] for i in check(flat)})

    def state_replaced(self, args: Sequence[Any]) -> bool:
        check = getattr(self.compiled, "state_replaced", None)
        return bool(check(self.flat.flatten(args))) if check is not None else False

    def accepts(self, args: Sequence[Any]) -> bool:
        inner = getattr(self.compiled, "inner", self.compiled)
        accepts = getattr(inner, "accepts", None)
        if accepts is None:
            return True
        try:
            flat = self.flat.flatten(args)
        except SubclassFlattenError:
            return False
        derived = list(getattr(getattr(self.compiled, "binding", None), "derived", []))
        return bool(accepts(flat + derived))


def compile_subclass_graph(fn, args: Sequence[Any], freezable: Sequence[int], dynamic_dims,
                           compile_fn: Callable, warn: Callable[[str, str], None]) -> Optional[Callable]:
    """Compile a dynamo graph with tensor-subclass inputs over their inner tensors.

    First the subclass is rebuilt inside the graph, so export traces its own `linear` /
    `__torch_dispatch__` (activation quantization included, e.g. torchao's int8 dynamic
    activations). A library whose dispatch export cannot trace (optimum-quanto returns
    NotImplemented for ops of the functional trace) is retried with the weight rebuilt and
    `.dequantize()`d: the model then multiplies by the library's own dequantized weight.
    None when no input is a subclass; `fn` itself (with one warning naming the subclass
    types) when neither capture works."""
    flat = flatten_subclass_inputs(fn, args, freezable, dynamic_dims)
    if flat is None:
        return None
    failures: list[str] = []
    inner = compile_fn(flat.gm, flat.args, flat.freezable, flat.dynamic_dims, on_capture_failure=failures.append)
    if inner is flat.gm and all(_own_dequantize(plan.cls) for plan in flat.plans if isinstance(plan, _Wrapper)):
        log.info("capture through %s failed (%s); retrying with the weights dequantized",
                 ", ".join(sorted(set(flat.types.values()))), failures[-1] if failures else "")
        flat = flatten_subclass_inputs(fn, args, freezable, dynamic_dims, dequantize=True)
        inner = compile_fn(flat.gm, flat.args, flat.freezable, flat.dynamic_dims, on_capture_failure=failures.append)
    if inner is flat.gm:
        warn("the graph", f"capture failed through tensor-subclass weight(s) "
                          f"{', '.join(sorted(set(flat.types.values())))}: {failures[-1] if failures else '?'}")
        return fn
    return FlattenedCall(inner, flat, args)


def _own_dequantize(cls: type) -> bool:
    """The subclass defines its own `dequantize()` (torch.Tensor's would just dispatch)."""
    fn = getattr(cls, "dequantize", None)
    return callable(fn) and fn is not torch.Tensor.dequantize
