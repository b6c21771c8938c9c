"""Compile a captured graph end to end and call it like the original function.

Static graphs keep the bare-pointer calling convention (one data pointer per tensor).
Graphs with dynamic dims (`capture(..., dynamic_dims=...)`) are lowered with MLIR's
default memref convention instead -- each tensor is passed as its descriptor's fields
(allocated and aligned pointer, offset, sizes, strides) -- because the bare-pointer
convention only handles static shapes; `JitFunction` fills those fields per call.
"""
from __future__ import annotations

import ctypes
import dataclasses
import operator
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from lowbit.compiler.frontend import NODE_LOCATION_PREFIX, CapturedGraph, FrontendError, capture, import_graph
from lowbit.compiler.isolation import run_isolated
from lowbit.compiler.jit import InputError, JitFunction
from lowbit.compiler.pipeline import CompileOptions, Pipeline, Stage, StageError
from lowbit.compiler.worker import enabled as worker_enabled
from lowbit.compiler.report import register as register_report
from lowbit.runtime.replay import recorder

ENTRY = "forward"


class FrozenGuard:
    """Notices when a tensor frozen into compiled code was changed after compilation.

    An in-place update bumps the tensor's version counter; rebinding the attribute to a
    new tensor changes the data pointer. Both are cheap to compare per call. Inference
    tensors have no version counter: for them only rebinding is detected.
    """

    def __init__(self, frozen: dict[int, torch.Tensor]):
        self._positions = list(frozen)
        self._versions = [_version(t) for t in frozen.values()]
        self._ptrs = [t.data_ptr() for t in frozen.values()]
        # The per-call fast path compares whole lists built by C-level map/itemgetter: it runs
        # once per call over every guarded weight (hundreds), with caches cold from decoding.
        positions = self._positions
        self._pick = (operator.itemgetter(*positions) if len(positions) > 1
                      else (lambda args: (args[positions[0]],)) if positions else (lambda args: ()))

    def changed(self, args: Sequence[Any]) -> list[int]:
        # An inference tensor has no version counter (`_version` raises): the exact path.
        try:
            tensors = self._pick(args)
            if (list(map(_DATA_PTR, tensors)) == self._ptrs
                    and list(map(_VERSION, tensors)) == self._versions):
                return []
        except RuntimeError:
            pass
        return [pos for pos, version, ptr in zip(self._positions, self._versions, self._ptrs)
                if args[pos].data_ptr() != ptr or _version(args[pos]) != version]


_DATA_PTR = torch.Tensor.data_ptr
_VERSION = operator.attrgetter("_version")


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


class CompiledGraph:
    """A compiled graph called with the caller's full argument list.

    Frozen arguments are not passed to native code (they are constants in it); their
    version counters are checked per call so that an in-place weight update is noticed.
    Mutated arguments (e.g. a KV cache) receive their new values after the call.
    """

    def __init__(self, captured: CapturedGraph, jit: JitFunction, pipeline: Pipeline,
                 traps: "Traps | None" = None):
        self.captured = captured
        self.jit = jit
        self.pipeline = pipeline
        self.frozen_guard = FrozenGuard(captured.frozen)
        self.report = pipeline.report
        self.traps = traps

    def frozen_inputs_changed(self, args: Sequence[Any]) -> list[int]:
        """Caller positions of frozen tensors changed since compilation."""
        return self.frozen_guard.changed(args)

    def accepts(self, args: Sequence[Any]) -> bool:
        """Whether a call with the caller's `args` fits the compiled signature (else the
        call would raise `InputError`; e.g. a size outside a dynamic dim's range)."""
        cap = self.captured
        if any(_differs(args[p], v) for p, v in cap.specialized.items()):
            return False
        return self.jit.accepts([args[i] for i in cap.input_indices])

    def __call__(self, *args: Any) -> list[Any]:
        cap = self.captured
        if cap.specialized:
            for pos, value in cap.specialized.items():
                if _differs(args[pos], value):
                    raise InputError(f"input {pos}: the compiled graph is specialised to the value "
                                     f"{value!r}, got {args[pos]!r}")
        inputs = [args[i] for i in cap.input_indices]
        if self.traps is None:
            return cap.finish_call(args, self.jit(*inputs))
        return cap.finish_call(args, self.traps.call(self.jit, inputs))


class Traps:
    """The trap flag of compiled code (passes/guard_traps.py): cleared before a
    call, read after it; a set bit raises the exception eager raises for that fault.

    The flag is one word per compiled module, so calls of one module that can trap are
    serialized (only graphs with integer division or data-dependent indexing have one)."""

    def __init__(self, address: int, messages: list[str]):
        self.flag = ctypes.c_int32.from_address(address)
        self.messages = messages
        self.lock = threading.Lock()

    @staticmethod
    def of(module, jit: JitFunction) -> "Traps | None":
        from lowbit.passes.guard_traps import FLAG_LOOKUP, TRAPS_ATTR
        from torch_mlir import ir
        if TRAPS_ATTR not in module.operation.attributes:
            return None
        messages = [ir.StringAttr(a).value for a in ir.ArrayAttr(module.operation.attributes[TRAPS_ATTR])]
        address = jit.engine.raw_lookup(FLAG_LOOKUP)
        if not address:
            raise RuntimeError(f"compiled code has trap checks but no '{FLAG_LOOKUP}' flag")
        return Traps(address, messages)

    def call(self, jit: JitFunction, inputs: list) -> list:
        with self.lock:
            self.flag.value = 0
            rec = recorder()
            if rec is not None:
                rec.trap(self)
            outs = jit(*inputs)
            bits = self.flag.value
        if bits:
            raise self.error(bits)
        return outs

    def error(self, bits: int) -> Exception:
        from lowbit.passes.guard_traps import DIVISION_BY_ZERO
        raised = [m for i, m in enumerate(self.messages) if bits & (1 << i)]
        if DIVISION_BY_ZERO in raised:
            return RuntimeError("ZeroDivisionError")  # eager's exception, word for word
        detail = "; ".join(raised)
        if any("index" in m for m in raised):
            return IndexError(f"index out of range in compiled code ({detail}); eager raises here too")
        return RuntimeError(f"a run-time check of compiled code failed: {detail}")


def _differs(arg: Any, value: Any) -> bool:
    return type(arg) is not type(value) or arg != value


def compile_captured(captured: CapturedGraph, options: CompileOptions | None = None,
                     pipeline: Pipeline | None = None) -> CompiledGraph:
    pipeline = pipeline or Pipeline(options=options)
    if captured.is_dynamic:
        pipeline.stages = descriptor_calling_convention(pipeline.stages)
    module = _import(captured, pipeline)
    mark_writable_inputs(module, captured)
    pipeline.dump(module, "import")
    if worker_enabled():
        module = run_isolated(pipeline, module, captured)
    else:
        pipeline.run(module)
    jit = JitFunction(module, ENTRY, captured.input_specs, captured.unique_output_specs(),
                      symbol_ranges=captured.symbol_ranges, alias_outputs=inplace_outputs(module, captured))
    compiled = CompiledGraph(captured, jit, pipeline, Traps.of(module, jit))
    register_report(compiled)
    return compiled


def _entry(module):
    from torch_mlir import ir
    for op in module.body.operations:
        if op.operation.name == "func.func" and ir.StringAttr(op.operation.attributes["sym_name"]).value == ENTRY:
            return op.operation
    raise FrontendError(f"the imported module has no '{ENTRY}' function")


def mark_writable_inputs(module, captured: CapturedGraph) -> None:
    """Tell bufferization which entry arguments it may write: only the inputs the graph
    mutates (their new values are results, e.g. KV caches). Everything else -- the user's
    tensors, weights bound as buffers -- is read-only (`bufferization.writable = false`),
    so an op updating a copy of an input never writes into the caller's tensor. Also
    records the input count for `lowbit-inplace-results`."""
    from torch_mlir import ir
    from lowbit.passes.inplace_results import NUM_INPUTS_ATTR

    func = _entry(module)
    mutated = set(captured.mutated_inputs)
    with module.context:
        old = list(ir.ArrayAttr(func.attributes["arg_attrs"])) if "arg_attrs" in func.attributes else []
        attrs = []
        for k, pos in enumerate(captured.input_indices):
            entries = {a.name: a.attr for a in ir.DictAttr(old[k])} if k < len(old) else {}
            entries["bufferization.writable"] = ir.BoolAttr.get(pos in mutated)
            attrs.append(ir.DictAttr.get(entries))
        func.attributes["arg_attrs"] = ir.ArrayAttr.get(attrs)
        func.attributes[NUM_INPUTS_ATTR] = ir.IntegerAttr.get(ir.IntegerType.get_signless(64),
                                                              len(captured.input_indices))


def inplace_outputs(module, captured: CapturedGraph) -> dict[int, int]:
    """{entry output index: entry input index} for mutated inputs the compiled code updated
    in place (`lowbit.inplace_results`, passes/inplace_results.py) whose output is that
    input's new value: the JIT passes the input as the output buffer."""
    from torch_mlir import ir
    from lowbit.passes.inplace_results import RESULTS_ATTR

    attrs = module.operation.attributes
    if RESULTS_ATTR not in attrs:
        return {}
    unique = [i for i in range(len(captured.output_specs)) if i not in captured.repeated_outputs]
    n_mut = len(captured.mutated_inputs)
    aliases = {}
    for pair in ir.ArrayAttr(attrs[RESULTS_ATTR]):
        i, u = (ir.IntegerAttr(v).value for v in ir.ArrayAttr(pair))
        full = unique[u] if u < len(unique) else None
        if full is not None and full < n_mut and captured.mutated_inputs[full] == captured.input_indices[i]:
            aliases[u] = i
    return aliases


def _import(captured: CapturedGraph, pipeline: Pipeline):
    """torch-dialect module of the graph; an importer failure is a `StageError` of stage
    "import" naming the nodes whose dtypes the importer cannot represent (complex128,
    uint64, ...), so that the partitioner runs those ops in eager."""
    try:
        return import_graph(captured, func_name=ENTRY)
    except FrontendError as e:
        nodes = unimportable_nodes(captured.graph_module.graph)
        named = "".join(f"\n  cannot import {NODE_LOCATION_PREFIX}{n.name} ({why})" for n, why in nodes)
        directory = pipeline.dump_dir or Path(tempfile.mkdtemp(prefix="lowbit-repro-"))
        directory.mkdir(parents=True, exist_ok=True)
        repro = directory / "repro-import.py"
        repro.write_text(captured.graph_module.code)
        raise StageError("import", FrontendError(f"{e}{named}"), repro,
                         "(torch-mlir's FX importer; the reproducer holds the FX graph's code)") from e


def unimportable_nodes(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, str]]:
    """Nodes with a tensor dtype or a dtype argument torch-mlir's FX importer has no type for."""
    from torch_mlir.extras.fx_importer import TORCH_DTYPE_TO_INT, TORCH_DTYPE_TO_MLIR_TYPE

    def tensor_dtypes(value):
        vals = value if isinstance(value, (list, tuple)) else [value]
        return [v.dtype for v in vals if isinstance(v, torch.Tensor)]

    out = []
    for node in graph.nodes:
        if node.op not in ("call_function", "get_attr"):
            continue
        dtypes = tensor_dtypes(node.meta.get("val"))
        for arg in node.all_input_nodes:
            dtypes += tensor_dtypes(arg.meta.get("val"))
        bad = sorted({str(d) for d in dtypes if d not in TORCH_DTYPE_TO_MLIR_TYPE})
        bad += sorted({str(a) for a in list(node.args) + list(node.kwargs.values())
                       if isinstance(a, torch.dtype) and a not in TORCH_DTYPE_TO_INT})
        if bad:
            out.append((node, "dtype " + ", ".join(sorted(set(bad)))))
    return out


BARE_POINTER_FUNC_TO_LLVM = "convert-func-to-llvm{use-bare-ptr-memref-call-conv=1}"


def descriptor_calling_convention(stages: list[Stage]) -> list[Stage]:
    """`stages` with functions lowered to LLVM with memref descriptors (MLIR's default
    convention), which dynamic shapes need, instead of bare pointers."""
    out = []
    for stage in stages:
        passes = ["convert-func-to-llvm" if p == BARE_POINTER_FUNC_TO_LLVM else p for p in stage.passes]
        out.append(dataclasses.replace(stage, passes=passes))
    return out


def compile_function(fn, example_inputs: Sequence[Any], freezable: Sequence[int] = (),
                     options: CompileOptions | None = None,
                     dynamic_dims: dict[int, dict[int, Any]] | None = None) -> CompiledGraph:
    """Capture and compile `fn(*example_inputs)` for these input dtypes and shapes; dims
    named in `dynamic_dims` (see `capture`) take any size in their exported range."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        captured = capture(fn, example_inputs, freezable, dynamic_dims=dynamic_dims)
    return compile_captured(captured, options)
