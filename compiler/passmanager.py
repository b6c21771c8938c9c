"""Textual pass pipelines that mix upstream MLIR passes with lowbit's Python passes.

`builtin.module(canonicalize, lowbit-pack-weights{n-block=32}, func.func(cse))` becomes
one upstream `PassManager`: upstream elements are parsed by MLIR, lowbit elements
(registered by name in `lowbit.passes`) are added as Python-defined passes. lowbit passes
run on the module; they may not be nested inside `func.func(...)`.
"""
from __future__ import annotations

from torch_mlir import ir
from torch_mlir.dialects import torch as torch_d
from torch_mlir.passmanager import PassManager

from lowbit.passes.registry import ModulePass, PassError, lookup_pass


class PipelineError(RuntimeError):
    """A pipeline string is malformed or names an unknown pass or option."""


def new_context() -> ir.Context:
    """An MLIR context with every upstream dialect and the torch dialect loaded."""
    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    # The torch_c (TorchConversion) dialect has no Python registration hook; running a
    # pass that depends on it loads it, so our passes can create torch_c casts.
    with ctx, ir.Location.unknown():
        PassManager.parse("builtin.module(torch-func-backend-type-conversion)").run(
            ir.Module.create().operation)
    return ctx


def split_top_level(text: str) -> list[str]:
    """Split `a, b{x=1,y}, c(d, e)` at commas outside braces and parentheses."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced brackets in pipeline: {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PipelineError(f"unbalanced brackets in pipeline: {text!r}")
    tail = "".join(cur).strip()
    if tail:
        items.append(tail)
    return [i for i in items if i]


def _unwrap_module(text: str) -> str:
    text = text.strip()
    if text.startswith("builtin.module(") and text.endswith(")"):
        return text[len("builtin.module("):-1]
    return text


def parse_element(element: str) -> tuple[str, str]:
    """`name{options}` -> (name, options); `name(nested)` -> (name, '')."""
    name = element
    opts = ""
    if "{" in element and (("(" not in element) or element.index("{") < element.index("(")):
        name, _, rest = element.partition("{")
        if not rest.endswith("}"):
            raise PipelineError(f"malformed pass options in {element!r}")
        opts = rest[:-1]
    elif "(" in element:
        name = element.partition("(")[0]
    return name.strip(), opts


class LowbitPassManager:
    """An upstream PassManager whose Python passes report errors as Python exceptions."""

    def __init__(self, pipeline: str, context: ir.Context):
        self.context = context
        self.pipeline = pipeline
        self.passes: list[ModulePass] = []
        self._errors: list[BaseException] = []
        with context:
            self.pm = PassManager("builtin.module")
            pending: list[str] = []
            for element in split_top_level(_unwrap_module(pipeline)):
                name, opts = parse_element(element)
                cls = lookup_pass(name)
                if cls is None:
                    if name.startswith("lowbit-"):
                        raise PipelineError(f"unknown lowbit pass '{name}' (see `lowbit-opt --list-passes`)")
                    pending.append(element)
                    continue
                if pending:
                    self._add_upstream(pending)
                    pending = []
                try:
                    instance = cls.from_options(opts)
                except ValueError as e:
                    raise PipelineError(str(e)) from None
                self.passes.append(instance)
                self.pm.add(self._wrap(instance), name=cls.__name__, argument=cls.NAME,
                            description=cls.summary())
            if pending:
                self._add_upstream(pending)

    def _add_upstream(self, elements: list[str]) -> None:
        text = ", ".join(elements)
        try:
            self.pm.add(text)
        except ValueError as e:
            raise PipelineError(f"cannot parse pipeline elements '{text}': {e}") from None

    def _wrap(self, instance: ModulePass):
        # The C++ PassManager holds this function; it must not reference `self` (which holds
        # the PassManager): Python's GC cannot see that cycle through C++, so every pass
        # manager and its whole MLIR context (~3 MB) used to stay alive forever.
        errors = self._errors

        def run(op, pass_):
            try:
                with op.context, ir.Location.unknown(op.context):
                    instance.run(op)
            except BaseException as e:  # re-raised by run() after the PassManager returns
                errors.append(e)
                pass_.signal_pass_failure()
        return run

    def run(self, module: ir.Module | ir.Operation) -> None:
        op = module.operation if isinstance(module, ir.Module) else module
        self._errors.clear()
        try:
            self.pm.run(op)
        except ir.MLIRError:
            if self._errors:
                raise self._errors[0] from None
            raise
        if self._errors:
            raise self._errors[0]


def run_pipeline(module: ir.Module, pipeline: str) -> None:
    LowbitPassManager(pipeline, module.context).run(module)


__all__ = ["LowbitPassManager", "PassError", "PipelineError", "new_context", "run_pipeline",
           "split_top_level"]
