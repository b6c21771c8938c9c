"""Speedups of dynamo's own tracing that leave what it produces unchanged.

A model whose repeated layer is a `torch.compiler.nested_compile_region` is traced once per
layer *structure*; for every other call dynamo checks that the traced region is valid for that
call (`torch._dynamo.variables.invoke_subgraph.is_reusable`) before stamping it out. The check
re-evaluates the region's guards (216 for a Llama layer) on sources remapped from the traced
call's arguments to this call's (`L['self'].layers[0].attention.wq` -> `...layers[7]...`), and
remaps the ~150 sources the region read to look for mutations. Each remap is
`Source.clone(transform_fn)`, which rebuilds the whole source chain with
`dataclasses.replace` at every level, again for every source sharing that chain's prefix: in
torch 2.13, ~5200 rebuilt sources per check, 30 checks for a 16-layer model's prefill and decode
graphs, ~40% of dynamo's time in a warm-cache compile of the 953M model (~1.2 s of ~3 s).

`install()` memoizes those clones for the duration of one `is_reusable` call: a source chain
is rebuilt once per check, not once per source that contains it. What is computed is the same
(`clone` is a pure function of the source and the transform, which inside `is_reusable` is one
fixed dictionary lookup), only not computed again; outside `is_reusable`, `clone` runs torch's
own code untouched. Nothing about guards is skipped: every guard is still evaluated on its
remapped source.

The same memo serves each stamp-out (`stamp_out_subgraph`: the reused region's call for layer
*i*, whose ~20 tensor sources are remapped one by one, each with a new
`lambda s: source_replacement.get(s, s)`). Transforms are memoized by what they compute: the
function itself, or for a closure its code object and the objects its cells hold (the same
code over the same dictionary is the same mapping; torch builds that dictionary once per
stamp-out and does not change it while remapping).

Guard building measures the new guards' evaluation time once per graph for a metric
(`profile_guard_manager`, after flushing the CPU caches: ~20 ms per graph, ~2% of a warm
compile of the 953M model); the figure only goes to the `guards` debug log and the compile
metrics' `guard_latency_us`. Unless that log or a structured trace (`TORCH_TRACE`) is on,
the measurement is skipped and the metric reads 0; the guards are the same, and dynamo's check
that they pass on the frame that built them still runs.

Every FX node dynamo creates for a call records, for a `trace_call` debug log line, the
"file:line in function (qualified name)" of the instruction it comes from
(`InstructionTranslatorBase.get_line_of_code_header`); the qualified name comes from
`funcname_cache`, which tokenizes the whole source file on first use (~5 files, ~0.04 s of a
warm compile of the 953M model, once per process). The header is read only by the lazily
formatted messages of the `trace_call` / `trace_source` logs: unless one of them is on, the
header leaves out the qualified name, so no file is tokenized. Graphs, node metadata and
guards do not contain it.

The reuse checks and stamp-outs read every remapped source's value with `Source.get_value`,
which `eval`s the source's name template (`tmp._modules['wq']`) as a string: compiled anew each
time (~10,000 evaluations per warm compile of the 953M model, ~6 us of compiling each). The
`eval` that `torch._guards` calls is replaced by one that compiles each distinct expression
once and evaluates the code object with the same globals and locals: the same values.

Installed by `lowbit.compiler.backend` (i.e. before dynamo traces anything for
`backend="lowbit"`), only on the torch versions whose code was read for this (2.13); on any
other version nothing is patched.
"""
from __future__ import annotations

import functools
import logging
import threading

import torch

log = logging.getLogger("lowbit.dynamo_speedups")

_SUPPORTED = ("2.13.",)
_state = threading.local()  # .memo: {transform key: (objects, transform, {source: clone})} inside is_reusable /
                           # stamp_out_subgraph, else None
_installed: dict[str, object] = {}  # name -> the original, while installed


def _transform_key(fn) -> tuple:
    """What identifies a transform's mapping: the function, or for a closure its code and the
    identities of the objects in its cells (kept alive by the memo with the key, so that no id
    is reused while the memo lives)."""
    cells = getattr(fn, "__closure__", None)
    code = getattr(fn, "__code__", None)
    if not cells or code is None or getattr(fn, "__defaults__", None) or getattr(fn, "__kwdefaults__", None):
        return (fn,)
    try:
        held = tuple(c.cell_contents for c in cells)
    except ValueError:  # an empty cell
        return (fn,)
    return (code, fn.__globals__.get("__name__"), *(id(h) for h in held)), held


def _memoized_clone(original):
    @functools.wraps(original)
    def clone(self, transform_fn=None):
        memo = getattr(_state, "memo", None)
        if memo is None or transform_fn is None:
            return original(self, transform_fn)
        # Keyed by what the transform computes (`_transform_key`; its objects are kept alive by
        # the memo) and the source (frozen dataclass: hash and == by fields).
        key = _transform_key(transform_fn)
        entry = memo.get(key[0])
        if entry is None:
            entry = memo[key[0]] = (key[1:], transform_fn, {})
        done = entry[2]
        hit = done.get(self)
        if hit is None:
            hit = done[self] = original(self, transform_fn)  # recursion on `base` comes back here
        return hit
    clone._lowbit_original = original
    return clone


def _memoizing(original):
    @functools.wraps(original)
    def is_reusable(*args, **kwargs):
        outer = getattr(_state, "memo", None)
        _state.memo = {} if outer is None else outer
        try:
            return original(*args, **kwargs)
        finally:
            _state.memo = outer  # the memo lives for one check (and its transforms with it)
    is_reusable._lowbit_original = original
    return is_reusable


def _unprofiled(original):
    import logging as _logging

    from torch._dynamo.guards import guards_log
    from torch._logging._internal import trace_log

    @functools.wraps(original)
    def profile_guard_manager(*args, **kwargs):
        if guards_log.isEnabledFor(_logging.DEBUG) or trace_log.handlers:
            return original(*args, **kwargs)  # someone reads the figure: measure as torch does
        return 0.0
    profile_guard_manager._lowbit_original = original
    return profile_guard_manager


def _header_without_funcname(original):
    import logging as _logging

    from torch._dynamo import output_graph, symbolic_convert

    readers = (symbolic_convert.trace_call_log, symbolic_convert.trace_source_log, output_graph.trace_call_log)

    @functools.wraps(original)
    def get_line_of_code_header(self, lineno=None):
        if any(r.isEnabledFor(_logging.DEBUG) for r in readers):
            return original(self, lineno)  # someone reads the header: torch's, with the qualified name
        if lineno is None:
            lineno = self.lineno
        depth = f" (inline depth: {self.inline_depth})" if self.inline_depth > 0 else ""
        return f"{self.f_code.co_filename}:{lineno} in {self.f_code.co_name}{depth}"
    get_line_of_code_header._lowbit_original = original
    return get_line_of_code_header


_CODE: dict[str, object] = {}  # expression -> its compiled code (torch._guards' evals)


def _eval_compiled_once(expression, globals=None, locals=None):
    """`eval`, with a string compiled once per distinct string (an expression has no
    annotations: the `__future__` flags `eval` would inherit change nothing)."""
    if isinstance(expression, str):
        code = _CODE.get(expression)
        if code is None:
            if len(_CODE) > 50_000:
                _CODE.clear()
            code = _CODE[expression] = compile(expression, "<string>", "eval", dont_inherit=True)
        expression = code
    return eval(expression, globals, locals)


def supported() -> bool:
    return torch.__version__.startswith(_SUPPORTED)


def install() -> bool:
    """Patch dynamo (idempotent). Returns whether the speedup is active."""
    if _installed:
        return True
    if not supported():
        log.debug("torch %s: dynamo speedups not installed (read for %s)", torch.__version__, _SUPPORTED)
        return False
    try:
        from torch._dynamo import guards
        from torch._dynamo.symbolic_convert import InstructionTranslatorBase
        from torch._dynamo.variables import invoke_subgraph
        from torch._guards import ChainedSource
    except ImportError:  # pragma: no cover - a build without dynamo
        return False
    if (not callable(getattr(invoke_subgraph, "is_reusable", None))
            or not callable(getattr(invoke_subgraph, "stamp_out_subgraph", None))
            or "clone" not in vars(ChainedSource)
            or not callable(getattr(guards, "profile_guard_manager", None))
            or "profile_guard_manager" not in guards.CheckFunctionManager.__init__.__code__.co_names
            or "get_line_of_code_header" not in vars(InstructionTranslatorBase)
            or "get_funcname" not in InstructionTranslatorBase.get_line_of_code_header.__code__.co_names
            or "eval" in vars(torch._guards)
            or "eval" not in ChainedSource.get_value.__code__.co_names):
        log.debug("dynamo speedups: torch's code differs from what was read; not installed")
        return False
    _installed["is_reusable"] = invoke_subgraph.is_reusable
    _installed["stamp_out_subgraph"] = invoke_subgraph.stamp_out_subgraph
    _installed["clone"] = ChainedSource.clone
    _installed["profile_guard_manager"] = guards.profile_guard_manager
    _installed["get_line_of_code_header"] = InstructionTranslatorBase.get_line_of_code_header
    invoke_subgraph.is_reusable = _memoizing(invoke_subgraph.is_reusable)
    invoke_subgraph.stamp_out_subgraph = _memoizing(invoke_subgraph.stamp_out_subgraph)
    ChainedSource.clone = _memoized_clone(ChainedSource.clone)
    guards.profile_guard_manager = _unprofiled(guards.profile_guard_manager)
    InstructionTranslatorBase.get_line_of_code_header = _header_without_funcname(
        InstructionTranslatorBase.get_line_of_code_header)
    torch._guards.eval = _eval_compiled_once  # module global: only torch._guards' calls see it
    log.debug("dynamo speedups installed (memoized source remapping in nested_compile_region reuse checks and "
              "stamp-outs, source values evaluated from compiled expressions; no guard latency measurement, "
              "no source tokenizing for log headers unless logged)")
    return True


def uninstall() -> None:
    """Restore torch's own functions (tests compare both)."""
    if not _installed:
        return
    from torch._dynamo import guards
    from torch._dynamo.symbolic_convert import InstructionTranslatorBase
    from torch._dynamo.variables import invoke_subgraph
    from torch._guards import ChainedSource

    invoke_subgraph.is_reusable = _installed.pop("is_reusable")
    invoke_subgraph.stamp_out_subgraph = _installed.pop("stamp_out_subgraph")
    ChainedSource.clone = _installed.pop("clone")
    guards.profile_guard_manager = _installed.pop("profile_guard_manager")
    InstructionTranslatorBase.get_line_of_code_header = _installed.pop("get_line_of_code_header")
    del torch._guards.eval


def installed() -> bool:
    return bool(_installed)
