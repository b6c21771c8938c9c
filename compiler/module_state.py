"""Module state that is not a registered parameter or buffer, found in a dynamo graph's inputs.

Quantization libraries keep part of a weight outside `nn.Module`'s registries: hqq's
`HQQLinear` holds its scales and zero points in a dict attribute (`self.meta['scale']`) and
its bias as a plain tensor attribute. Dynamo passes such tensors to the backend as graph
inputs like any other, with a *source* naming where it read them (`L['self'].meta['zero']`,
`L['fn']._modules['0'].bias`). A tensor reached through an attribute of an object the
function was given is module state in fact: binding may read it now and pack weights from it,
with the same change detection as parameters (identity, version counter).

Tensors the graph writes in place (a cache kept in a plain attribute), tensors with dynamic
sizes, and attributes of objects passed as arguments (`L['past_key_values'].key_cache`: per-call
data) are left as runtime inputs: a weight packed from them would be stale.
"""
from __future__ import annotations

import functools
import logging
import operator
import re
import threading
import weakref
from typing import Any, Sequence

import torch

log = logging.getLogger("lowbit.module_state")

# `L['self']`, `L['args'][0]`, `G['table']`: the root a dynamo source starts from.
_ROOT = re.compile(r"^(?:L|G)\[[^\]]*\](?:\[\d+\])?")
# Roots that are the module itself (`torch.compile(module)` traces `fn`, a method `self`) or a
# global: an object passed as an argument (a KV cache object) holds per-call data, not state.
_MODULE_ROOT = re.compile(r"^(?:L\['(?:self|fn)'\]|G\[)")


def source_name(node: torch.fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    name = getattr(getattr(grapharg, "source", None), "name", "")
    return name() if callable(name) else (name or "")


def is_attribute_source(name: str) -> bool:
    """The source reads an attribute of an object passed in (`L['self'].meta['scale']`), not
    an argument itself (`L['x']`, `L['args'][0]`)."""
    m = _ROOT.match(name)
    return bool(m) and "." in name[m.end():] and bool(_MODULE_ROOT.match(name))


def _written_in_place(node: torch.fx.Node) -> bool:
    for user in node.users:
        target = user.target
        if target is operator.setitem and user.args and user.args[0] is node:
            return True
        name = getattr(target, "__name__", "") if user.op == "call_function" else str(target)
        if name.endswith("_") and not name.endswith("__") and user.args and user.args[0] is node:
            return True
    return False


def attribute_state_positions(gm: torch.fx.GraphModule, args: Sequence[Any],
                              freezable: Sequence[int]) -> list[int]:
    """Positions of tensor inputs, beyond `freezable`, that are module attributes in fact.

    Called by the backend when dynamo hands it `gm` (`backend.freezable_positions`), before
    dynamo builds its guards: all module state of the graph is watched for `.data` writes
    (`watch_data_writes`) for as long as `gm` -- which the backend's callable keeps -- lives."""
    if not isinstance(gm, torch.fx.GraphModule):
        return []
    known = set(freezable)
    out = []
    for pos, (node, value) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), args)):
        if pos in known or not isinstance(value, torch.Tensor):
            continue
        name = source_name(node)
        example = node.meta.get("example_value")
        dynamic = isinstance(example, torch.Tensor) and any(not isinstance(d, int) for d in example.shape)
        if is_attribute_source(name) and not dynamic and not _written_in_place(node):
            out.append(pos)
            log.debug("input %d (%s) is module state held outside parameters/buffers", pos, name)
    state = sorted(p for p in known | set(out) if p < len(args))
    weights = _weight_inputs(gm, state)
    # Parameters always (a `WatchedParameter` passes for an `nn.Parameter` everywhere, its
    # `.data` being a plain tensor); other tensors only where they may become packed weights:
    # torch checks some tensor types exactly (see `watch_data_writes`).
    watch_data_writes(gm, [args[p] for p in state if isinstance(args[p], torch.nn.Parameter) or p in weights])
    return out


_MATMUL_FUNCTIONS = {torch._C._nn.linear, torch.nn.functional.linear, torch.matmul, torch.mm, torch.addmm,
                     torch.bmm, torch.baddbmm, operator.matmul}
_MATMUL_METHODS = {"matmul", "mm", "addmm", "bmm", "__matmul__", "__rmatmul__"}


def _is_matmul(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _MATMUL_METHODS
    if node.op != "call_function":
        return False
    if node.target in _MATMUL_FUNCTIONS:
        return True
    # torch.ops.<ns>.<op> (a packet) or torch.ops.<ns>.<op>.<overload>
    name = getattr(node.target, "_qualified_op_name", None) or getattr(getattr(node.target, "_schema", None), "name", "")
    return name in _MATMUL_OPS


_MATMUL_OPS = {"lowbit::linear", "aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm"}


def _weight_inputs(gm: torch.fx.GraphModule, state: Sequence[int]) -> set[int]:
    """Positions of module state that reaches a matmul (or `lowbit.linear`) through a subgraph
    of module state only: what binding may pack (a weight, its codes, scales, bias)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    state_nodes = {placeholders[p] for p in state if p < len(placeholders)}
    constant: dict[torch.fx.Node, bool] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            constant[n] = n in state_nodes and not _written_in_place(n)
        elif n.op == "get_attr":
            constant[n] = True
        elif n.op in ("call_function", "call_method"):
            constant[n] = all(constant.get(a, False) for a in n.all_input_nodes)
        else:
            constant[n] = False
    work = [a for n in gm.graph.nodes if _is_matmul(n) for a in n.all_input_nodes if constant.get(a)]
    seen, found = set(), set()
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.add(n)
        else:
            work.extend(a for a in n.all_input_nodes if constant.get(a))
    return {i for i, p in enumerate(placeholders) if p in found}


# ----------------------------------------------------------------------------- `.data` writes
#
# `t.data` is an alias of `t` with a version counter of its own, so `w.data.mul_(2)` changes the
# values without moving `w._version`: the guards of compiled code that packed `w` (the version
# counter and data pointer of every source tensor, `compile.FrozenGuard`) would not see it.
# While a lowbit-compiled graph is alive, the module state it was given is therefore switched
# to a subclass of its own class whose `data` getter returns `self.detach()`: the same storage
# and, unlike `.data`, the same version counter, so every in-place write through `.data` bumps
# the counter the guards compare. Assigning `t.data = other` still goes to the real setter (it
# changes the data pointer, which the guards compare too). The switch happens when dynamo hands
# the graph to the backend, before dynamo builds its guards, so they record the watched class
# (no extra recompile); it is undone when the last such graph is dropped.
#
# Only tensors whose class is exactly `nn.Parameter` or `torch.Tensor` are switched; tensor
# subclasses keep their class (a torchao/quanto weight's `.data` is its own `detach`, which
# shares the inner tensors' version counters the guards compare). Parameters are switched
# always; other tensors (buffers, attributes) only where binding may pack them: when they reach
# a matmul or `lowbit.linear` through module state alone (`_weight_inputs`). torch checks some
# types exactly -- aot_autograd's first-call custom-op check (`HANDLED_TYPES`, aot_eager and
# inductor) refuses a `WatchedTensor` argument, while it looks through a parameter's `.data` --
# so norm weights, rotary tables and KV caches stay plain tensors. Cost: nothing per call; one
# Python property call when user code reads `.data`.

_TENSOR_DATA = torch._C.TensorBase.data  # the C getset descriptor (`.data` / `.data =`)


def _data_get(self):
    return self.detach()


def _data_set(self, value):
    _TENSOR_DATA.__set__(self, value)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor sharing `t`'s storage, version counter, requires_grad and attributes."""
    out = torch.Tensor.detach(t)
    if t.requires_grad:
        out.requires_grad_(True)
    if t.__dict__:
        out.__dict__.update(t.__dict__)
    return out


class WatchedParameter(torch.nn.Parameter):
    """An `nn.Parameter` whose `.data` shares its version counter (see above)."""

    data = property(_data_get, _data_set, doc="`self.detach()`: writes through it bump `self._version`")

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = torch.nn.Parameter(self.detach().clone(memory_format=torch.preserve_format), self.requires_grad)
        memo[id(self)] = result
        return result

    def __repr__(self) -> str:
        return "Parameter containing:\n" + torch.Tensor.__repr__(_plain(self))

    # `Parameter.__reduce_ex__` rebuilds a plain `nn.Parameter` from `self.data`: no class saved.


class WatchedTensor(torch.Tensor):
    """A plain tensor (a buffer) whose `.data` shares its version counter (see above)."""

    data = property(_data_get, _data_set, doc="`self.detach()`: writes through it bump `self._version`")
    # Stay a plain tensor for torch functions and dynamo, as nn.Parameter does.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        plain = _plain(self)
        result = torch.Tensor.__deepcopy__(plain, memo)
        memo.pop(id(plain), None)  # a temporary: its id is free again once it is gone
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        return torch.Tensor.__reduce_ex__(_plain(self), proto)  # saved (pickled) as a plain tensor

    def __repr__(self, *args, **kwargs) -> str:
        return torch.Tensor.__repr__(_plain(self), *args, **kwargs)


_WATCHED = {torch.nn.Parameter: WatchedParameter, torch.Tensor: WatchedTensor}
_ORIGINAL = {w: base for base, w in _WATCHED.items()}
_watch_lock = threading.RLock()  # re-entrant: a weakref callback may run during a collection
_watch_counts: dict[int, list] = {}  # id(tensor) -> [weakref to it, number of live owners]


def watch_data_writes(owner: Any, tensors: Sequence[Any]) -> int:
    """Make in-place writes through `.data` of `tensors` visible to version-counter guards
    for as long as `owner` lives (see above). Returns how many tensors are watched for it."""
    refs = []
    seen = set()
    with _watch_lock:
        for t in tensors:
            if not isinstance(t, torch.Tensor) or id(t) in seen:
                continue
            cls = type(t)
            if cls not in _WATCHED and cls not in _ORIGINAL:
                continue  # a tensor subclass of its own: left alone
            seen.add(id(t))
            entry = _watch_counts.get(id(t))
            if entry is None or entry[0]() is not t:
                entry = _watch_counts[id(t)] = [weakref.ref(t, functools.partial(_forget, id(t))), 0]
            if cls in _WATCHED:
                t.__class__ = _WATCHED[cls]
            entry[1] += 1
            refs.append((id(t), entry[0]))
    if refs:
        weakref.finalize(owner, _release, refs)
        log.debug("watching .data writes of %d module state tensors", len(refs))
    return len(refs)


def _forget(key: int, ref: weakref.ref) -> None:
    with _watch_lock:
        entry = _watch_counts.get(key)
        if entry is not None and entry[0] is ref:
            del _watch_counts[key]


def _release(refs: list) -> None:
    """The owner was dropped: tensors no other compiled graph watches get their class back."""
    with _watch_lock:
        for key, ref in refs:
            entry = _watch_counts.get(key)
            if entry is None or entry[0] is not ref:
                continue
            entry[1] -= 1
            if entry[1] > 0:
                continue
            del _watch_counts[key]
            t = ref()
            if t is not None and type(t) in _ORIGINAL:
                t.__class__ = _ORIGINAL[type(t)]


def watched(t: torch.Tensor) -> bool:
    """Whether `.data` writes of `t` are currently visible to lowbit's guards."""
    return type(t) in _ORIGINAL
