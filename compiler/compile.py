"""Compile a captured graph end to end and call it like the original function."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from lowbit.compiler.frontend import CapturedGraph, capture, import_graph
from lowbit.compiler.jit import JitFunction
from lowbit.compiler.pipeline import CompileOptions, Pipeline

ENTRY = "forward"


class CompiledGraph:
    """A compiled graph called with the caller's full argument list.

    Frozen arguments are not passed to native code (they are constants in it); their
    version counters are checked per call so that an in-place weight update is noticed.
    Mutated arguments (e.g. a KV cache) receive their new values after the call.
    """

    def __init__(self, captured: CapturedGraph, jit: JitFunction, pipeline: Pipeline):
        self.captured = captured
        self.jit = jit
        self.pipeline = pipeline
        self._frozen_versions = {pos: t._version for pos, t in captured.frozen.items()}
        self._frozen_ptrs = {pos: t.data_ptr() for pos, t in captured.frozen.items()}
        self._n_mut = len(captured.mutated_inputs)

    def frozen_inputs_changed(self, args: Sequence[Any]) -> list[int]:
        changed = []
        for pos, version in self._frozen_versions.items():
            t = args[pos]
            if t._version != version or t.data_ptr() != self._frozen_ptrs[pos]:
                changed.append(pos)
        return changed

    def __call__(self, *args: Any) -> list[Any]:
        cap = self.captured
        inputs = [args[i] for i in cap.input_indices]
        outs = self.jit(*inputs)
        for pos, new in zip(cap.mutated_inputs, outs[: self._n_mut]):
            args[pos].copy_(new)
        user = outs[self._n_mut:]
        if not cap.constant_outputs:
            return user
        result, it = [], iter(user)
        for i in range(cap.num_user_outputs):
            result.append(cap.constant_outputs[i] if i in cap.constant_outputs else next(it))
        return result


def compile_captured(captured: CapturedGraph, options: CompileOptions | None = None,
                     pipeline: Pipeline | None = None) -> CompiledGraph:
    pipeline = pipeline or Pipeline(options=options)
    module = import_graph(captured, func_name=ENTRY)
    pipeline.dump(module, "import")
    pipeline.run(module)
    jit = JitFunction(module, ENTRY, captured.input_specs, captured.output_specs)
    return CompiledGraph(captured, jit, pipeline)


def compile_function(fn, example_inputs: Sequence[Any], freezable: Sequence[int] = (),
                     options: CompileOptions | None = None) -> CompiledGraph:
    """Capture and compile `fn(*example_inputs)` for exactly these input shapes and dtypes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        captured = capture(fn, example_inputs, freezable)
    return compile_captured(captured, options)


def signature_key(args: Sequence[Any]) -> tuple:
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.dtype, a.device.type))
        else:
            key.append((type(a).__name__, a if isinstance(a, (int, float, bool, str, type(None))) else id(a)))
    return tuple(key)
