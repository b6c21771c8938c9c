"""Graceful fallback: compile what the pipeline can, run the rest in eager.

The whole graph is tried first. When a stage rejects an op, the diagnostics name it
(`torch.aten.<op>` / `torch.operator "<ns>.<op>"`); those ATen nodes are marked
unsupported, the captured graph is split with torch's capability-based partitioner, and
each supported part is compiled alone. One warning per unsupported op names it.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Sequence

import torch
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from lowbit.compiler.compile import CompiledGraph, compile_captured
from lowbit.compiler.frontend import CapturedGraph, FrontendError, capture
from lowbit.compiler.pipeline import CompileOptions, StageError

_warned_ops: set[str] = set()
_OP_IN_DIAGNOSTIC = re.compile(r"(?:'|\")?torch\.(?:aten|prims|operator\s+\"[\w.]+)\.?([\w.]*)")
_ATEN_NAME = re.compile(r"torch\.aten\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")
_CUSTOM_NAME = re.compile(r"torch\.operator \"torch\.([\w]+)\.([\w]+)")


def _warn_once(op: str, reason: str) -> None:
    if op in _warned_ops:
        return
    _warned_ops.add(op)
    warnings.warn(f"lowbit: cannot compile {op} ({reason}); running it in eager", RuntimeWarning,
                  stacklevel=3)


def ops_named_in(message: str) -> set[str]:
    """ATen overload packet names (e.g. 'aten.cumsum') mentioned in a pipeline diagnostic."""
    names = {f"aten.{m.split('.')[0]}" for m in _ATEN_NAME.findall(message)}
    names |= {f"{ns}.{op}" for ns, op in _CUSTOM_NAME.findall(message)}
    return names


def _node_op_name(node: torch.fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return str(packet).replace("torch.ops.", "").replace("::", ".")
    return getattr(target, "__name__", str(target))


class _Supported(OperatorSupportBase):
    def __init__(self, unsupported: set[str]):
        self.unsupported = unsupported

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        name = _node_op_name(node)
        return name is not None and name not in self.unsupported


class _CompiledPart(torch.nn.Module):
    def __init__(self, compiled: CompiledGraph, single_output: bool):
        super().__init__()
        self.compiled = compiled
        self.single_output = single_output

    def forward(self, *args):
        outs = self.compiled(*args)
        return outs[0] if self.single_output else tuple(outs)


class _EagerGraph:
    """Runs a (possibly partitioned) captured graph and applies its input mutations."""

    def __init__(self, captured: CapturedGraph, gm: torch.fx.GraphModule):
        self.captured = captured
        self.gm = gm

    def frozen_inputs_changed(self, args) -> list[int]:
        return []

    def __call__(self, *args):
        cap = self.captured
        outs = self.gm(*[args[i] for i in cap.input_indices])
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        n_mut = len(cap.mutated_inputs)
        for pos, new in zip(cap.mutated_inputs, outs[:n_mut]):
            args[pos].copy_(new)
        user, result, it = outs[n_mut:], [], None
        it = iter(user)
        for i in range(cap.num_user_outputs):
            result.append(cap.constant_outputs[i] if i in cap.constant_outputs else next(it))
        return result


def _partition_and_compile(captured: CapturedGraph, args: Sequence[Any], unsupported: set[str],
                           options: CompileOptions) -> Callable:
    gm = captured.graph_module
    partitioner = CapabilityBasedPartitioner(gm, _Supported(unsupported), allows_single_node_partition=True)
    partitions = partitioner.propose_partitions()
    fused = partitioner.fuse_partitions(partitions)
    # Record each submodule's example inputs by running the split graph once in eager.
    examples: dict[str, list[torch.Tensor]] = {}

    class Recorder(torch.fx.Interpreter):
        def call_module(self, target, a, kw):
            examples[target] = list(a)
            return super().call_module(target, a, kw)

    Recorder(fused).run(*[args[i] for i in captured.input_indices])
    for name, example in examples.items():
        sub = getattr(fused, name)
        try:
            sub_captured = capture(sub, example)
            compiled = compile_captured(sub_captured, options)
        except (FrontendError, StageError) as e:
            _warn_once(f"a partition with {_describe(sub)}", f"{type(e).__name__}: {_first_line(e)}")
            continue
        out = [n for n in sub.graph.nodes if n.op == "output"][0].args[0]
        single = not isinstance(out, (tuple, list))
        setattr(fused, name, _CompiledPart(compiled, single))
    return _EagerGraph(captured, fused)


def _describe(gm: torch.fx.GraphModule) -> str:
    ops = sorted({_node_op_name(n) for n in gm.graph.nodes if n.op == "call_function"} - {None})
    return ", ".join(ops[:6]) + (" ..." if len(ops) > 6 else "")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


def compile_with_fallback(fn, args: Sequence[Any], freezable: Sequence[int],
                          options: CompileOptions, max_rounds: int = 4) -> Callable:
    """Compile `fn` for `args`; on failure, partition around the ops the pipeline rejects."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            captured = capture(fn, args, freezable)
    except FrontendError as e:
        _warn_once("the graph", f"capture failed: {_first_line(e)}")
        return fn
    unsupported: set[str] = set()
    for _ in range(max_rounds):
        try:
            if not unsupported:
                return compile_captured(captured, options)
            return _partition_and_compile(captured, args, unsupported, options)
        except StageError as e:
            named = ops_named_in(str(e.cause)) - unsupported
            graph_ops = {_node_op_name(n) for n in captured.graph_module.graph.nodes}
            named &= graph_ops
            if not named:
                _warn_once("the graph", f"stage '{e.stage}' failed: {_first_line(e.cause)}")
                return _EagerGraph(captured, captured.graph_module)
            for op in sorted(named):
                _warn_once(op, f"rejected by stage '{e.stage}'")
            unsupported |= named
    return _EagerGraph(captured, captured.graph_module)
