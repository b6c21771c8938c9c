"""`torch.compile(model, backend="lowbit")`: the dynamo backend.

Dynamo hands us an FX graph and real example inputs. Parameters and buffers among them
are frozen into the compiled code (unless the graph mutates them); every other input is
passed at run time. The returned callable compiles once per input signature (shapes,
dtypes) and caches the result, so a shape change recompiles instead of failing.
Graphs that need autograd run in eager: lowbit compiles inference.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import warnings
from typing import Any, Callable, Sequence

import torch

from lowbit.compiler.compile_log import counters
from lowbit.compiler.partition import compile_with_fallback
from lowbit.compiler.pipeline import CompileOptions

log = logging.getLogger("lowbit.backend")


def _unwrap_nested_compiles() -> None:
    """transformers' BitNet layers carry helpers wrapped in their own `torch.compile`, on which
    dynamo fails before any backend is reached ("object of type 'NoneType' has no len()").
    `torch.compile(..., backend="lowbit")` imports this module, before dynamo traces: when
    transformers is loaded, unwrap those helpers on its classes (`lowbit.hf.patch_transformers`;
    same arithmetic in eager), so a user's plain `torch.compile(model.forward)` just works."""
    import sys
    if "transformers" in sys.modules:
        from lowbit.hf import patch_transformers
        patch_transformers()


_unwrap_nested_compiles()


def _speed_up_dynamo() -> None:
    """Before dynamo traces anything for this backend: memoize the source remapping of its
    `nested_compile_region` reuse checks (`lowbit.compiler.dynamo_speedups`; same guards, same
    graphs, ~40% less dynamo time for a 16-layer Llama)."""
    from lowbit.compiler import dynamo_speedups
    dynamo_speedups.install()


_speed_up_dynamo()
_options_stack: list[CompileOptions] = []


def current_options() -> CompileOptions:
    return _options_stack[-1] if _options_stack else CompileOptions()


@contextlib.contextmanager
def options(**kwargs):
    """`with lowbit.options(activations="int8"): compiled(x)` -- options for graphs compiled
    inside the block (see `CompileOptions`). Unknown names raise TypeError."""
    _options_stack.append(dataclasses.replace(current_options(), **kwargs))
    try:
        yield _options_stack[-1]
    finally:
        _options_stack.pop()


def freezable_positions(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[int]:
    """Positions of inputs that are module state: parameters and registered buffers."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    positions = []
    for pos, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.nn.Parameter):
            positions.append(pos)
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "")
        source = source() if callable(source) else source
        if isinstance(value, torch.Tensor) and ("._buffers[" in source or "_parameters[" in source):
            positions.append(pos)
    from lowbit.compiler.module_state import attribute_state_positions  # issue 12: hqq's meta dict
    return sorted(set(positions) | set(attribute_state_positions(gm, example_inputs, positions)))


class LowbitCallable:
    """What the backend returns to dynamo: compile per input signature, then call.

    The signature is the shape and dtype of every runtime tensor input and the value of
    every scalar input (dynamo's automatic dynamic shapes pass sizes as ints); frozen
    inputs are not part of it because their guard recompiles when they change.
    """

    def __init__(self, gm: torch.fx.GraphModule, freezable: list[int], options: CompileOptions,
                 dynamic_dims: dict | None = None, key_code: str | None = None):
        self.gm = gm
        self._key_code = key_code  # the graph's code for the program key, taken before inlining
        self.freezable = freezable
        self.options = options
        # Dims dynamo made symbolic (automatic dynamic shapes, mark_dynamic): one compile
        # serves every size, so they are not part of the cache key; nor are the SymInt
        # inputs that carry those sizes.
        self.dynamic_dims = dynamic_dims or {}
        symbols = {s for dims in self.dynamic_dims.values() for s in dims.values()}
        self._size_inputs = {i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))
                             if isinstance(n.meta.get("example_value"), torch.SymInt)
                             and str(n.meta["example_value"].node.expr) in symbols}
        self.cache: dict[tuple, Callable] = {}
        self.unsupported: set[str] = set()  # ops that fell back to eager, shared by all signatures
        self._lock = threading.RLock()
        self._guarded: dict[tuple, Callable] = {}  # key -> frozen-tensor check of the entry
        frozen = set(freezable)
        self._keyed = [i for i in range(len(gm.graph.find_nodes(op="placeholder"))) if i not in frozen]

    def _compile(self, args: Sequence[Any]) -> Callable:
        counters["backend_compiles"] += 1
        from lowbit.compiler import compile_cache
        from lowbit.compiler.jit import emission_key

        key = None
        if compile_cache.enabled() and not emission_key() and self.options.weights == "bind":
            key = compile_cache.program_key(self.gm, args, self.freezable, self.dynamic_dims, self._size_inputs,
                                            self.options, code=self._key_code)
            hit = compile_cache.lookup_program(key, args, self.freezable)
            if hit is not None:
                from lowbit.compiler.report import register as register_report

                counters["program_cache_hits"] += 1
                register_report(hit)
                return hit
        compiled = compile_with_fallback(self.gm, args, self.freezable, self.options, self.unsupported,
                                         dynamic_dims=self.dynamic_dims)
        if key is not None:
            compile_cache.store_program(key, args, self.freezable, compiled)
        return compiled

    def signature(self, args: Sequence[Any]) -> tuple:
        key = []
        for i in self._keyed:
            a = args[i]
            if i in self._size_inputs:
                continue
            if isinstance(a, torch.Tensor):
                dyn = self.dynamic_dims.get(i)
                shape = tuple(None if dyn and d in dyn else s for d, s in enumerate(a.shape)) if dyn else a.shape
                key.append((shape, a.dtype, a.device))
            else:
                key.append(a if isinstance(a, (int, float, bool, str, type(None))) else id(a))
        return tuple(key)

    def __call__(self, *args: Any):
        key = self.signature(args)
        fn = self.cache.get(key)
        if fn is not None and not _accepts(fn, args):
            fn = None  # e.g. export narrowed a dynamic dim's range: another entry for this call
        if fn is None:
            with self._lock:  # two threads missing at once compile once
                fn = self.cache.get(key)
                if fn is None or not _accepts(fn, args):
                    fn = self._compile_entry(key, args)
        else:
            check = self._guarded.get(key)
            if check is not None and check(args):
                if getattr(fn, "state_replaced", lambda a: False)(args):
                    # Other tensors than at compile time (another model of the same code, as
                    # dynamo reuses graphs across module instances): bind them. Compiled
                    # regions are shared, so this costs a capture and a binding, not codegen.
                    log.info("module state replaced since compilation; binding the new weights")
                else:
                    warnings.warn("lowbit: a parameter or buffer that compiled code was specialised to "
                                  "changed after compilation (in-place update); recompiling",
                                  RuntimeWarning, stacklevel=2)
                fn = self._compile_entry(key, args)
        return fn(*args)

    def replayer(self, args: Sequence[Any]) -> tuple[Any, Callable[[Sequence[Any]], Any] | None] | None:
        """(the `runtime.replay.Replayer` of the compiled entry that serves `args` as they are
        now, the entry's frozen-tensor check or None), or None when there is no such entry or
        a frozen tensor changed. A caller that runs the replayer directly (`lowbit.generate`'s
        native decode loop) skips this per-call check and must run the returned one
        whenever code that could change those tensors ran in between."""
        key = self.signature(args)
        fn = self.cache.get(key)
        if fn is None or not _accepts(fn, args):
            return None
        check = self._guarded.get(key)
        if check is not None and check(args):
            return None
        rep = getattr(fn, "replayer", None)
        return None if rep is None else (rep, check)

    def _compile_entry(self, key: tuple, args: Sequence[Any]) -> Callable:
        fn = self.cache[key] = self._compile(args)
        check = getattr(fn, "frozen_inputs_changed", None)
        captured = getattr(fn, "captured", None)
        if check is not None and (getattr(fn, "guarded", False) or (captured is not None and captured.frozen)):
            self._guarded[key] = check
        else:
            self._guarded.pop(key, None)
        return fn


def _accepts(fn: Callable, args: Sequence[Any]) -> bool:
    """Whether a compiled entry takes these arguments (sizes in its compiled ranges)."""
    inner = getattr(fn, "inner", fn)
    accepts = getattr(inner, "accepts", None)
    return True if accepts is None else bool(accepts(list(args) + list(getattr(getattr(fn, "binding", None), "derived", []))))


def lowbit_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs) -> Callable:
    """The `torch_dynamo_backends` entry point (`backend="lowbit"`)."""
    from lowbit.compiler import env

    env.validate()  # a malformed LOWBIT_* variable is the user's error, not a reason to run eager
    options = CompileOptions(**kwargs.get("options", {})) if kwargs.get("options") else current_options()
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        # Freezing weights would silently drop gradients; training is not what lowbit compiles.
        warnings.warn("lowbit: graph requires autograd (run under torch.no_grad() or "
                      "torch.inference_mode() to compile it); running it in eager", RuntimeWarning)
        return gm.forward
    from lowbit.compiler import compile_cache
    from lowbit.compiler.frontend import dynamic_dims_from_dynamo, inline_nested_regions

    cached = compile_cache.enabled() and options.weights == "bind"
    # The program key's view of the graph, before inlining: the nested regions' code once
    # each, not once per call (`compile_cache.graph_code`)
    key_code = compile_cache.graph_code(gm) if cached else None
    # `torch.compiler.nested_compile_region` (a layer traced once): one flat graph from here on
    inline_nested_regions(gm)
    freezable = freezable_positions(gm, example_inputs)
    from lowbit.compiler.jit import emission_key

    if cached and not emission_key():  # the weights' digest for the program key, while dynamo builds guards
        compile_cache.prefetch_state_digests([example_inputs[i] for i in freezable if i < len(example_inputs)])
    return LowbitCallable(gm, freezable, options, dynamic_dims_from_dynamo(gm, example_inputs), key_code=key_code)
