"""Ahead-of-time compilation: a model -> an artifact directory that runs without the compiler.

    lowbit.aot.compile(model, [(tokens, pos), (tokens1, pos1)], dynamic_shapes=({1: "T"}, {0: "T"}),
                       path="out/")

How: the model is traced by dynamo exactly as `torch.compile(backend="lowbit")` would trace
it (one graph per example set), and every graph is compiled by the same backend code
(binding, regions, fallback) while `jit.emission(...)` makes each compiled entry position-
independent code for the chosen target (`aot_target`). The compiled program is then
written down:

* `code.so`: every compiled entry's object file, its symbols made local except the entry
  (renamed `lowbit_entry_<i>`), linked into one shared library by gcc. Its undefined
  symbols are lowbit's runtime (`lowbit_*`, `_mlir_memref_to_llvm_*`), OpenMP (`__kmpc_*`)
  and libc/libm; the loader loads the first two before opening it;
* `weights.safetensors`: the module state the program reads (norms, embeddings, ...) and
  the packed low-bit / BRGEMM buffers that binding derived, 64-byte aligned, deduplicated
  by content; mutable buffers (KV caches) are stored only if not all zero;
* `manifest.json`: entries and their signatures (size expressions as JSON trees), the
  programs (what `BoundGraph` / `PartitionedGraph` / `CompiledGraph` / regions do, as a
  node list of ATen ops by qualified name, compiled-entry calls and eager sub-graphs), the
  user-level inputs and output structure, target, versions and sha256 of every file.

Anything of the program that has no serialized form raises `UnserializableGraphError`
naming it (an op that is not an ATen/lowbit op or an `operator` function, an argument
value of another type, a module that is not a compiled part).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import operator
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Sequence

import torch
import torch.fx

import lowbit
from lowbit.compiler import aot_target, jit
from lowbit.compiler.artifact_format import (CODE, FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, ArtifactError,
                                             UnserializableGraphError, canonical_json, dtype_name, expr_to_json,
                                             sha256_file, spec_to_json, value_to_json, write_safetensors)

log = logging.getLogger("lowbit.aot")

TRAP_FLAG = "_mlir_lowbit_traps"   # lowbit.passes.guard_traps.FLAG_SYMBOL: the run-time check flag word
LOADABLE_NAMESPACES = ("aten", "prims", "lowbit")
OPERATOR_FUNCTIONS = ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne",
                      "lt", "le", "gt", "ge")


# ----------------------------------------------------------------------------- tracing
def _example_sets(example_inputs) -> list[tuple]:
    if isinstance(example_inputs, tuple):
        return [example_inputs]
    if isinstance(example_inputs, list) and example_inputs and all(isinstance(e, tuple) for e in example_inputs):
        return list(example_inputs)
    raise ArtifactError("example_inputs must be a tuple of inputs, or a list of such tuples (one per "
                        f"signature, e.g. prefill and decode), got {type(example_inputs).__name__}")


def _mark_dynamic(example: tuple, dynamic_shapes) -> None:
    if dynamic_shapes is None:
        return
    if not isinstance(dynamic_shapes, (tuple, list)) or len(dynamic_shapes) != len(example):
        raise ArtifactError(f"dynamic_shapes must have one item (None or {{dim: name}}) per input "
                            f"({len(example)}), got {dynamic_shapes!r}")
    for i, (t, dims) in enumerate(zip(example, dynamic_shapes)):
        if not dims:
            continue
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"dynamic_shapes[{i}] names dims of a non-tensor input")
        for d, dim in dims.items():
            if not isinstance(d, int) or not -t.dim() <= d < t.dim():
                raise ArtifactError(f"dynamic_shapes[{i}]: dim {d!r} is not a dim of a rank-{t.dim()} input")
            if t.shape[d] < 2:
                continue  # dynamo specialises sizes 0 and 1: this example is its own static signature
            lo, hi = getattr(dim, "min", None), getattr(dim, "max", None)
            kwargs = {}
            if isinstance(lo, int) and lo >= 2:
                kwargs["min"] = lo
            if isinstance(hi, int) and hi < 2 ** 62:
                kwargs["max"] = hi
            torch._dynamo.mark_dynamic(t, d, **kwargs)


class _Recorded:
    """One dynamo graph: its example inputs, the backend's callable for it (made while dynamo's
    metadata is still on the graph: sources of the inputs, symbolic sizes) and the symbolic
    size expression of each placeholder's example value."""

    def __init__(self, gm, example_inputs):
        from lowbit.compiler.backend import lowbit_backend

        self.gm, self.example_inputs = gm, example_inputs
        self.user_inputs = self.outputs = self.result = None
        self.callable = lowbit_backend(gm, example_inputs)
        self.shapes = []
        for node in gm.graph.find_nodes(op="placeholder"):
            ev = node.meta.get("example_value")
            if isinstance(ev, torch.SymInt):
                self.shapes.append(str(ev.node.expr))
            elif isinstance(ev, torch.Tensor):
                self.shapes.append([str(s.node.expr) if isinstance(s, torch.SymInt) else None for s in ev.shape])
            else:
                self.shapes.append(None)


def _outputs_without_running(gm: torch.fx.GraphModule, args) -> Any:
    """What dynamo needs back from the graph during tracing: outputs of the right shapes and
    dtypes (zeros). They come from running the graph on fake tensors: running it for real would
    run every low-bit layer through its eager reference op (minutes for a 1B model) and write
    the model's KV caches. Falls back to the real run if the graph has no fake implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        mode = FakeTensorMode()
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with mode:
            out = gm.forward(*fakes)
    except Exception as e:  # noqa: BLE001 (any failure: compute the outputs for real)
        log.info("tracing: no fake run of the graph (%s: %s); running it", type(e).__name__, e)
        return gm.forward(*args)

    def real(t):
        if isinstance(t, torch.Tensor):
            return torch.zeros([int(d) for d in t.shape], dtype=t.dtype)
        return t
    return torch.utils._pytree.tree_map(real, out)


def trace(model: Callable, example_sets: list[tuple], dynamic_shapes) -> list[_Recorded]:
    """Dynamo graphs of `model` for each example set (as `torch.compile` makes them)."""
    import torch._dynamo

    recorded: list[_Recorded] = []
    pending: list = []

    def backend(gm, example_inputs):
        rec = _Recorded(gm, list(example_inputs))
        recorded.append(rec)
        pending.append(rec)

        def run(*args):
            out = _outputs_without_running(gm, args)
            rec.outputs = out
            return out
        return run

    from lowbit.compiler.own_code import compile_entry
    compiled = compile_entry(model, backend=backend, fullgraph=True)
    for example in example_sets:
        _mark_dynamic(example, dynamic_shapes)
        pending.clear()
        before = len(recorded)
        with torch.no_grad():
            result = compiled(*example)
        if len(recorded) == before:
            raise ArtifactError("dynamo made no new graph for an example set: two example sets have the same "
                                "signature (drop one, or change its shapes)")
        for rec in recorded[before:]:
            rec.user_inputs = example
            rec.result = result
    return recorded


# ----------------------------------------------------------------------------- serialization
class _Writer:
    def __init__(self):
        self.entries: list[Any] = []              # JitFunction, index = entry number
        self.traps: list[Any] = []                # its Traps (run-time checks) or None
        self._entry_ids: dict[int, int] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_content: dict[tuple, str] = {}

    def entry(self, fn, traps=None) -> str:
        if getattr(fn, "object_bytes", None) is None:
            raise UnserializableGraphError(
                f"compiled entry {getattr(fn, 'func_name', fn)!r} was not built for an artifact (no object code); "
                "it may come from a JIT compile shared in this process")
        i = self._entry_ids.get(id(fn))
        if i is None:
            i = self._entry_ids[id(fn)] = len(self.entries)
            self.entries.append(fn)
            self.traps.append(traps)
        return f"e{i}"

    def tensor(self, t: torch.Tensor, prefix: str) -> str:
        t = t.detach()
        if t.device.type != "cpu":
            raise UnserializableGraphError(f"tensor {prefix} is on {t.device}; artifacts hold CPU tensors")
        t = t.contiguous()
        raw = t.view(torch.uint8) if t.dtype != torch.bool and t.numel() else t.to(torch.uint8)
        digest = hashlib.sha256(memoryview(raw.reshape(-1).numpy())).hexdigest() if t.numel() else "empty"
        key = (digest, tuple(t.shape), t.dtype)
        name = self._by_content.get(key)
        if name is None:
            name = f"{prefix}.{len(self.tensors)}" if prefix in ("derived", "const") else prefix
            while name in self.tensors:
                name += "_"
            self._by_content[key] = name
            self.tensors[name] = t
        return name

    # -- compiled callables -------------------------------------------------------------
    def callable(self, obj: Any) -> dict:
        from lowbit.compiler.compile import CompiledGraph
        from lowbit.compiler.partition import BoundGraph, PartitionedGraph

        if isinstance(obj, CompiledGraph):
            return {"kind": "compiled", "entry": self.entry(obj.jit, getattr(obj, "traps", None)),
                    "contract": contract(obj.captured)}
        if isinstance(obj, PartitionedGraph):
            return {"kind": "partitioned", "contract": contract(obj.captured), "graph": self.graph(obj.gm)}
        if isinstance(obj, BoundGraph):
            return {"kind": "bound", "derived": [self.tensor(t, "derived") for t in obj.binding.derived],
                    "inner": self.callable(obj.inner)}
        if isinstance(obj, torch.fx.GraphModule):
            return {"kind": "graph", "graph": self.graph(obj)}
        raise UnserializableGraphError(f"a compiled part of type {type(obj).__name__} has no serialized form")

    def graph(self, gm: torch.fx.GraphModule) -> dict:
        from lowbit.compiler.partition import _CompiledPart
        from lowbit.compiler.regions import RegionRunner

        index: dict[torch.fx.Node, int] = {}
        nodes = []

        def ref(n):
            return index[n]

        for node in gm.graph.nodes:
            index[node] = len(nodes)
            if node.op == "placeholder":
                nodes.append({"op": "placeholder"})
            elif node.op == "get_attr":
                value = operator.attrgetter(node.target)(gm)
                if not isinstance(value, torch.Tensor):
                    raise UnserializableGraphError(f"constant {node.target} of type {type(value).__name__}")
                nodes.append({"op": "constant", "tensor": self.tensor(value, "const")})
            elif node.op == "call_function":
                nodes.append({"op": "call", "target": op_name(node.target),
                              "args": value_to_json(list(node.args), ref),
                              "kwargs": value_to_json(dict(node.kwargs), ref)})
            elif node.op == "call_module":
                sub = gm.get_submodule(node.target)
                if isinstance(sub, (RegionRunner, _CompiledPart)):
                    body = {"kind": "runner", "single": bool(sub.single_output), "inner": self.callable(sub.compiled)}
                elif isinstance(sub, torch.fx.GraphModule):
                    body = {"kind": "graph", "graph": self.graph(sub)}
                else:
                    raise UnserializableGraphError(f"module {node.target} of type {type(sub).__name__} "
                                                   "is neither compiled nor an FX graph")
                nodes.append({"op": "module", "body": body, "args": value_to_json(list(node.args), ref),
                              "kwargs": value_to_json(dict(node.kwargs), ref)})
            elif node.op == "output":
                nodes.append({"op": "output", "value": value_to_json(node.args[0], ref)})
            else:
                raise UnserializableGraphError(f"FX node {node.name} ({node.op} {node.target}) has no serialized form")
        return {"nodes": nodes}


def op_name(target: Any) -> str:
    """`aten::add.Tensor` for an OpOverload, `operator.getitem` for an operator function."""
    if isinstance(target, torch._ops.OpOverload):
        name = target.name() if "." in target.name() else target.name() + ".default"
        if target.namespace not in LOADABLE_NAMESPACES:
            raise UnserializableGraphError(
                f"op {name} runs in eager (it was not compiled) and is not an ATen or lowbit op, so a process "
                "that loads the artifact may not have it")
        return name
    if getattr(target, "__module__", None) == "_operator" and target.__name__ in OPERATOR_FUNCTIONS:
        return f"operator.{target.__name__}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        raise UnserializableGraphError(f"op {target} without an overload")
    raise UnserializableGraphError(
        f"the call {getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)} is not an ATen/lowbit "
        "op or an operator function, so it cannot run without the compiler")


def contract(cap) -> dict:
    """What `CapturedGraph.finish_call` and the argument selection of a compiled graph do."""
    sources: dict[str, list[int]] = {}
    for pos, spec in zip(cap.input_indices, cap.input_specs):
        for d, dim in enumerate(spec.shape):
            if not isinstance(dim, int) and getattr(dim, "is_Symbol", False) and str(dim) not in sources:
                sources[str(dim)] = [pos, d]
    return {
        "input_indices": list(cap.input_indices),
        "mutated_inputs": list(cap.mutated_inputs),
        "n_outputs": len(cap.output_specs),
        "num_user_outputs": cap.num_user_outputs,
        "repeated_outputs": {str(k): v for k, v in cap.repeated_outputs.items()},
        "constant_outputs": {str(k): value_to_json(v, None) for k, v in cap.constant_outputs.items()},
        "size_outputs": {str(k): expr_to_json(v) for k, v in cap.size_outputs.items()},
        "size_sources": sources,
        "specialized": {str(k): value_to_json(v, None) for k, v in cap.specialized.items()},
    }


def traps_manifest(traps, symbol: str) -> dict | None:
    """The run-time checks of an entry (`compile.Traps`): its flag symbol and, per bit, the
    message and the kind of exception eager raises (zero: ZeroDivisionError text, index:
    IndexError, other: RuntimeError)."""
    if traps is None:
        return None
    from lowbit.passes.guard_traps import DIVISION_BY_ZERO

    kinds = ["zero" if m == DIVISION_BY_ZERO else "index" if "index" in m else "other" for m in traps.messages]
    return {"symbol": symbol, "messages": list(traps.messages), "kinds": kinds}


def _entry_manifest(fn) -> dict:
    return {"symbol": None, "func": fn.func_name, "dynamic": fn.dynamic,
            "inputs": [spec_to_json(s) for s in fn.input_specs],
            "outputs": [spec_to_json(s) for s in fn.output_specs],
            "symbol_ranges": {k: [lo, hi] for k, (lo, hi) in fn.symbol_ranges.items()},
            # [output, input] pairs the code updates in place (passes/inplace_results.py): the
            # caller passes the input as that output's buffer and skips a whole-buffer copy
            "alias_outputs": sorted([int(o), int(i)] for o, i in getattr(fn, "alias_outputs", {}).items())}


# ----------------------------------------------------------------------------- linking
def link(entries: list, out_path: str, extra_flags: Sequence[str] = ()) -> list[str]:
    """Objects of `entries` -> one shared library; returns the entry symbols."""
    for tool in ("objcopy", "gcc"):
        if shutil.which(tool) is None:
            raise ArtifactError(f"linking an artifact needs `{tool}` (binutils / gcc) on PATH")
    symbols = []
    with tempfile.TemporaryDirectory(prefix="lowbit-link-") as tmp:
        objects = []
        for i, fn in enumerate(entries):
            raw = os.path.join(tmp, f"raw{i}.o")
            obj = os.path.join(tmp, f"e{i}.o")
            with open(raw, "wb") as f:
                f.write(fn.object_bytes)
            packed = f"_mlir_{fn.func_name}"
            symbol = f"lowbit_entry_{i}"
            # Every entry defines `forward`, `_mlir_forward` and its helpers: keep only the
            # packed entry global, under a name of its own.
            _run(["objcopy", f"--keep-global-symbol={packed}", f"--keep-global-symbol={TRAP_FLAG}", raw, obj])
            _run(["objcopy", f"--redefine-sym={packed}={symbol}", f"--redefine-sym={TRAP_FLAG}=lowbit_traps_{i}", obj])
            objects.append(obj)
            symbols.append(symbol)
        _run(["gcc", "-shared", "-o", out_path, *objects, "-lm", "-Wl,-z,now", *extra_flags])
    return symbols


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ArtifactError(f"`{' '.join(cmd[:2])} ...` failed: {r.stderr.strip()[:2000]}")


def versions() -> dict:
    from lowbit.runtime.library import load_runtime

    try:
        mlir = importlib.metadata.version("torch-mlir")
    except importlib.metadata.PackageNotFoundError:
        mlir = "unknown"
    return {"lowbit": lowbit.__version__, "torch": torch.__version__, "torch_mlir": mlir,
            "runtime_abi": int(load_runtime().lowbit_rt_abi_version())}


# ----------------------------------------------------------------------------- entry point
def compile(model: Callable, example_inputs, dynamic_shapes=None, path: str | os.PathLike = None, *,
            target: str | None = None, options: dict | None = None, overwrite: bool = False,
            model_info: dict | None = None) -> str:
    """Compile `model` for the example inputs and write an artifact directory at `path`.

    `model`: an `nn.Module` (or a `torch.export.ExportedProgram`, run as `ep.module()`).
    `example_inputs`: a tuple of inputs, or a list of tuples (one per signature: e.g. a prefill
    and a decode step). `dynamic_shapes`: for every input None or `{dim: name or torch.export.Dim}`;
    a dim of size >= 2 in an example is compiled for any size (dynamo's 0/1 specialisation
    makes a size-1 example its own static signature). `target`: `avx512`, `avx2`, `portable`
    or None (the best this CPU runs). `options`: `lowbit.options(...)` keywords.
    Returns the path. Raises `ArtifactError` (or a subclass) naming what failed.
    """
    from lowbit.compiler.backend import LowbitCallable, options as lowbit_options

    if path is None:
        raise ArtifactError("lowbit.aot.compile needs path= (the artifact directory to write)")
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise ArtifactError(f"{path} exists (overwrite=True, or lowbit compile --force, replaces it)")
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.nn.Module):
        raise ArtifactError(f"model must be an nn.Module or an ExportedProgram, got {type(model).__name__}")
    code_target = aot_target.best_for_host() if target is None else aot_target.get(target)
    sets = [tuple(e) for e in _example_sets(example_inputs)]
    for k, example in enumerate(sets):
        for i, t in enumerate(example):
            if not isinstance(t, torch.Tensor):
                raise ArtifactError(f"example set {k} input {i}: artifacts take tensor inputs, got {type(t).__name__}")
    # Private copies: mark_dynamic annotates the tensors; identities map graph inputs back.
    sets = [tuple(t.clone() for t in example) for example in sets]

    t0 = time.perf_counter()
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    state_by_id = {id(t): name for name, t in state.items()}
    initial = {name: t.detach().clone() for name, t in model.named_buffers()}  # before the tracing runs mutate them
    with lowbit_options(**(options or {})):
        recorded = trace(model, sets, dynamic_shapes)
    trace_s = time.perf_counter() - t0
    with torch.no_grad():  # the tracing runs wrote the model's buffers (KV caches): undo that
        for name, t in model.named_buffers():
            if name in initial and not torch.equal(t, initial[name]):
                t.copy_(initial[name])

    writer = _Writer()
    programs = []
    used_state: dict[str, dict] = {}
    settings = jit.Emission(f"aot:{code_target.name}", aot_target.annotate(code_target))
    t1 = time.perf_counter()
    with jit.emission(settings), torch.no_grad():
        for k, rec in enumerate(recorded):
            if not isinstance(rec.callable, LowbitCallable):
                raise ArtifactError(f"graph {k} needs autograd; compile under torch.no_grad() inputs "
                                    "that do not require grad")
            compiled = rec.callable._compile(rec.example_inputs)
            from lowbit.compiler.partition import BoundGraph, PartitionedGraph
            from lowbit.compiler.compile import CompiledGraph
            if not isinstance(compiled, (BoundGraph, PartitionedGraph, CompiledGraph)):
                raise UnserializableGraphError(f"graph {k} could not be compiled at all (it would run in eager; "
                                               "see the warnings above)")
            programs.append(_program(writer, k, rec, compiled, state_by_id, used_state, initial))
    compile_s = time.perf_counter() - t1

    # Static programs first: the loader takes the first that accepts a call.
    programs.sort(key=lambda p: p["dynamic"])
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        t2 = time.perf_counter()
        symbols = link(writer.entries, os.path.join(tmp, CODE))
        link_s = time.perf_counter() - t2
        write_safetensors(os.path.join(tmp, WEIGHTS), writer.tensors, {"format": FORMAT})
        entries = {}
        for i, (fn, sym) in enumerate(zip(writer.entries, symbols)):
            e = _entry_manifest(fn)
            e["symbol"] = sym
            e["traps"] = traps_manifest(writer.traps[i], f"lowbit_traps_{i}")
            entries[f"e{i}"] = e
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "versions": versions(),
            "target": {"name": code_target.name, "cpu": code_target.cpu, "features": list(code_target.features),
                       "requires": list(code_target.requires)},
            "build": {"runtime_isa": lowbit.runtime.current_isa(), "options": dict(options or {}),
                      "seconds": {"trace": round(trace_s, 3), "compile": round(compile_s, 3),
                                  "link": round(link_s, 3)}},
            "model": dict(model_info or {}),
            "inputs": [{"dtype": dtype_name(t.dtype), "rank": t.dim()} for t in sets[0]],
            "state": used_state,
            "entries": entries,
            "programs": programs,
            "files": {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                             "sha256": sha256_file(os.path.join(tmp, name))} for name in (CODE, WEIGHTS)},
        }
        manifest["manifest_sha256"] = hashlib.sha256(canonical_json(manifest)).hexdigest()
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("artifact %s: %d program(s), %d entries, trace %.1f s, compile %.1f s, link %.1f s", path,
             len(programs), len(writer.entries), trace_s, compile_s, link_s)
    return path


def _program(writer: _Writer, k: int, rec: _Recorded, compiled: Any, state_by_id: dict, used_state: dict,
             initial: dict) -> dict:
    from lowbit.compiler.partition import BoundGraph

    gm, args = rec.gm, rec.example_inputs
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    inner = compiled.inner if isinstance(compiled, BoundGraph) else compiled
    cap = inner.captured
    n = len(args)
    needed = {i for i in list(cap.input_indices) + list(cap.mutated_inputs) + list(cap.specialized) if i < n}
    mutated = {i for i in cap.mutated_inputs if i < n}
    user_ids = {id(t): i for i, t in enumerate(rec.user_inputs)}
    # Size symbols of the user inputs: which (input, dim) each comes from.
    sym_source: dict[str, list[int]] = {}
    for shape, value in zip(rec.shapes, args):
        if isinstance(value, torch.Tensor) and id(value) in user_ids and isinstance(shape, list):
            for d, s in enumerate(shape):
                if s is not None:
                    sym_source.setdefault(s, [user_ids[id(value)], d])
    sources = []
    for pos, (node, value) in enumerate(zip(placeholders, args)):
        if pos not in needed:
            sources.append(None)
        elif isinstance(value, torch.Tensor) and id(value) in user_ids:
            sources.append({"input": user_ids[id(value)]})
        elif isinstance(value, torch.Tensor) and id(value) in state_by_id:
            name = state_by_id[id(value)]
            sources.append({"state": name})
            if name not in used_state:
                init = initial.get(name, value) if pos in mutated else value
                zeros = pos in mutated and not bool(init.any())
                used_state[name] = {"dtype": dtype_name(value.dtype), "shape": list(value.shape),
                                    "mutable": pos in mutated,
                                    "tensor": None if zeros else writer.tensor(init, f"state.{name}")}
            elif pos in mutated:
                used_state[name]["mutable"] = True
        elif isinstance(value, torch.Tensor):
            log.info("graph %d input %s is a tensor from outside the model; stored as a constant", k, node.name)
            sources.append({"constant": writer.tensor(value, "const")})
        elif isinstance(value, (int, torch.SymInt)):
            expr = rec.shapes[pos] if isinstance(rec.shapes[pos], str) else None
            if expr in sym_source:
                sources.append({"size": sym_source[expr]})
            else:
                raise UnserializableGraphError(f"graph {k} input {node.name} is an int not derived from an input size")
        else:
            raise UnserializableGraphError(f"graph {k} input {node.name} of type {type(value).__name__}")
    # The guard: user inputs' specs as the top-level capture saw them (symbols, ranges).
    user_specs: list[Any] = [None] * len(rec.user_inputs)
    for pos, spec in zip(cap.input_indices, cap.input_specs):
        if pos < n and sources[pos] and "input" in sources[pos]:
            user_specs[sources[pos]["input"]] = spec
    for i, t in enumerate(rec.user_inputs):
        if user_specs[i] is None:
            raise UnserializableGraphError(f"graph {k}: user input {i} is not read by the compiled program")
    leaves, spec = torch.utils._pytree.tree_flatten(rec.result)
    outs = rec.outputs if isinstance(rec.outputs, (list, tuple)) else [rec.outputs]
    if len(leaves) != len(outs) or any(a is not b for a, b in zip(leaves, outs)):
        raise UnserializableGraphError(f"graph {k}: the model's outputs are not exactly the graph's outputs "
                                       "(return tensors computed by the model, in a tuple/list/dict)")
    symbol_ranges = {s: [lo, hi] for s, (lo, hi) in cap.symbol_ranges.items()}
    return {
        "dynamic": not all(s.is_static for s in user_specs),
        "guard": {"inputs": [spec_to_json(s) for s in user_specs], "symbol_ranges": symbol_ranges},
        "args": sources,
        "body": writer.callable(compiled),
        "output_tree": torch.utils._pytree.treespec_dumps(spec),
    }
