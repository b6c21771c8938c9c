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

import logging
import operator
import re
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
    """Positions of tensor inputs, beyond `freezable`, that are module attributes in fact."""
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
    return out
