"""Compile a captured graph end to end and call it like the original function."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from lowbit.compiler.frontend import CapturedGraph, capture, import_graph
from lowbit.compiler.jit import JitFunction
from lowbit.compiler.pipeline import CompileOptions, Pipeline
from lowbit.compiler.report import register as register_report

ENTRY = "forward"


class FrozenGuard:
    """Notices when a tensor frozen into compiled code was changed after compilation.

    An in-place update bumps the tensor's version counter; rebinding the attribute to a
    new tensor changes the data pointer. Both are cheap to compare per call. Inference
    tensors have no version counter: for them only rebinding is detected.
    """

    def __init__(self, frozen: dict[int, torch.Tensor]):
        self._expected = [(pos, _version(t), t.data_ptr()) for pos, t in frozen.items()]

    def changed(self, args: Sequence[Any]) -> list[int]:
        return [pos for pos, version, ptr in self._expected
                if args[pos].data_ptr() != ptr or _version(args[pos]) != version]


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


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
        self.frozen_guard = FrozenGuard(captured.frozen)
        self.report = pipeline.report

    def frozen_inputs_changed(self, args: Sequence[Any]) -> list[int]:
        """Caller positions of frozen tensors changed since compilation."""
        return self.frozen_guard.changed(args)

    def __call__(self, *args: Any) -> list[Any]:
        cap = self.captured
        inputs = [args[i] for i in cap.input_indices]
        return cap.finish_call(args, self.jit(*inputs))


def compile_captured(captured: CapturedGraph, options: CompileOptions | None = None,
                     pipeline: Pipeline | None = None) -> CompiledGraph:
    pipeline = pipeline or Pipeline(options=options)
    module = import_graph(captured, func_name=ENTRY)
    pipeline.dump(module, "import")
    pipeline.run(module)
    jit = JitFunction(module, ENTRY, captured.input_specs, captured.unique_output_specs())
    compiled = CompiledGraph(captured, jit, pipeline)
    register_report(compiled)
    return compiled


def compile_function(fn, example_inputs: Sequence[Any], freezable: Sequence[int] = (),
                     options: CompileOptions | None = None) -> CompiledGraph:
    """Capture and compile `fn(*example_inputs)` for exactly these input shapes and dtypes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        captured = capture(fn, example_inputs, freezable)
    return compile_captured(captured, options)
