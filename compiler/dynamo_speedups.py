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
remapped source. Installed by `lowbit.compiler.backend` (i.e. before dynamo traces anything for
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
_state = threading.local()  # .memo: {transform_fn: {source: clone}} inside is_reusable, else None
_installed: dict[str, object] = {}  # name -> the original, while installed


def _memoized_clone(original):
    @functools.wraps(original)
    def clone(self, transform_fn=None):
        memo = getattr(_state, "memo", None)
        if memo is None or transform_fn is None:
            return original(self, transform_fn)
        # Keyed by the transform object itself (kept alive by the memo, so its id cannot be
        # reused while the memo lives) and the source (frozen dataclass: hash and == by fields).
        done = memo.setdefault(transform_fn, {})
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
        from torch._dynamo.variables import invoke_subgraph
        from torch._guards import ChainedSource
    except ImportError:  # pragma: no cover - a build without dynamo
        return False
    if not callable(getattr(invoke_subgraph, "is_reusable", None)) or "clone" not in vars(ChainedSource):
        log.debug("dynamo speedups: torch's code differs from what was read; not installed")
        return False
    _installed["is_reusable"] = invoke_subgraph.is_reusable
    _installed["clone"] = ChainedSource.clone
    invoke_subgraph.is_reusable = _memoizing(invoke_subgraph.is_reusable)
    ChainedSource.clone = _memoized_clone(ChainedSource.clone)
    log.debug("dynamo speedups installed (memoized source remapping in nested_compile_region reuse checks)")
    return True


def uninstall() -> None:
    """Restore torch's own functions (tests compare both)."""
    if not _installed:
        return
    from torch._dynamo.variables import invoke_subgraph
    from torch._guards import ChainedSource

    invoke_subgraph.is_reusable = _installed.pop("is_reusable")
    ChainedSource.clone = _installed.pop("clone")


def installed() -> bool:
    return bool(_installed)
