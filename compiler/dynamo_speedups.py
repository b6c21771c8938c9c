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
        from torch._dynamo.variables import invoke_subgraph
        from torch._guards import ChainedSource
    except ImportError:  # pragma: no cover - a build without dynamo
        return False
    if (not callable(getattr(invoke_subgraph, "is_reusable", None))
            or not callable(getattr(invoke_subgraph, "stamp_out_subgraph", None))
            or "clone" not in vars(ChainedSource)
            or not callable(getattr(guards, "profile_guard_manager", None))
            or "profile_guard_manager" not in guards.CheckFunctionManager.__init__.__code__.co_names):
        log.debug("dynamo speedups: torch's code differs from what was read; not installed")
        return False
    _installed["is_reusable"] = invoke_subgraph.is_reusable
    _installed["stamp_out_subgraph"] = invoke_subgraph.stamp_out_subgraph
    _installed["clone"] = ChainedSource.clone
    _installed["profile_guard_manager"] = guards.profile_guard_manager
    invoke_subgraph.is_reusable = _memoizing(invoke_subgraph.is_reusable)
    invoke_subgraph.stamp_out_subgraph = _memoizing(invoke_subgraph.stamp_out_subgraph)
    ChainedSource.clone = _memoized_clone(ChainedSource.clone)
    guards.profile_guard_manager = _unprofiled(guards.profile_guard_manager)
    log.debug("dynamo speedups installed (memoized source remapping in nested_compile_region reuse checks and "
              "stamp-outs; no guard latency measurement unless logged)")
    return True


def uninstall() -> None:
    """Restore torch's own functions (tests compare both)."""
    if not _installed:
        return
    from torch._dynamo import guards
    from torch._dynamo.variables import invoke_subgraph
    from torch._guards import ChainedSource

    invoke_subgraph.is_reusable = _installed.pop("is_reusable")
    invoke_subgraph.stamp_out_subgraph = _installed.pop("stamp_out_subgraph")
    ChainedSource.clone = _installed.pop("clone")
    guards.profile_guard_manager = _installed.pop("profile_guard_manager")


def installed() -> bool:
    return bool(_installed)
