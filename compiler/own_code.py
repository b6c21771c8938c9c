"""Entry functions with a code object of their own, for dynamo.

Dynamo keeps the graphs it compiled for a function, with their guards, on the function's
*code object*, and stops compiling that code once it holds `recompile_limit` (8) entries:
from then on the function runs in eager, behind one warning. Every instance of a model class
shares its forward's code (every transformers model shares the code of transformers'
`deprecate_kwarg` wrapper around forward), so each model compiled in a process adds entries
to the same code object: the fifth `lowbit.generate` in a process (two graphs per call) ran
its model in eager, ~300x slower, and every earlier call's compiled programs stayed alive
on that code object.

lowbit's own entry points (`lowbit.generate`, `lowbit.hf.compile`, `lowbit.aot`, `explain`)
therefore hand dynamo a copy of the function whose code object is new. Its entries are its
own, and they are released when the copy dies (the compiled callable was dropped). Dynamo
alone would keep them: a code object's entries reference it back through dynamo's tables
(`orig_code_map`, `guard_failures`), a cycle through the code object's extra slot that the
garbage collector cannot see, so every graph compiled for it (and the weights it packed)
would stay alive. When the copy dies, its entries are reset (`torch._dynamo.reset_code`,
which also drops the compiled graphs dynamo installed as globals of the function's module)
and its guard-failure record removed.
"""
from __future__ import annotations

import copy
import types
import weakref
from typing import Any, Callable

import torch


def with_own_code(fn: Callable) -> Callable:
    """`fn` (a function, a bound method, or a module: its bound forward) with a code object
    nobody else holds; same behaviour, globals, defaults and closure. Other callables are
    returned as they are."""
    if isinstance(fn, torch.nn.Module):
        return with_own_code(fn.forward)
    if isinstance(fn, types.MethodType):
        return types.MethodType(with_own_code(fn.__func__), fn.__self__)
    if not isinstance(fn, types.FunctionType):
        return fn
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    own.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
    own.__dict__.update(fn.__dict__)
    for attr in ("__module__", "__qualname__", "__doc__", "__annotations__"):
        setattr(own, attr, getattr(fn, attr))
    weakref.finalize(own, _forget, own.__code__)
    return own


def _forget(code: types.CodeType) -> None:
    import torch._dynamo
    from torch._dynamo import convert_frame, utils
    with convert_frame.compile_lock:
        torch._dynamo.reset_code(code)
        utils.guard_failures.pop(code, None)


def compile_entry(fn: Callable, **compile_kwargs: Any) -> Callable:
    """`torch.compile` of `fn` through a code object of its own (see the module docstring).

    A module with hooks is compiled as the module (its hooks run inside the compiled call);
    its entries then share the class's forward code like any `torch.compile(module)`."""
    if isinstance(fn, torch.nn.Module) and _has_hooks(fn):
        return torch.compile(fn, **compile_kwargs)
    return torch.compile(with_own_code(fn), **compile_kwargs)


def _has_hooks(module: torch.nn.Module) -> bool:
    from torch.nn.modules import module as m
    local = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
             getattr(module, "_backward_pre_hooks", {}))
    global_ = (m._global_forward_hooks, m._global_forward_pre_hooks, m._global_backward_hooks,
               getattr(m, "_global_backward_pre_hooks", {}))
    return any(local) or any(global_)
