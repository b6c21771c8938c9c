"""Pass base class and the by-name registry used by `lowbit-opt` and the pipeline.

A lowbit pass is a small dataclass in the style of xDSL: its fields are its typed
options, its docstring says what it matches and what it produces, and `run` rewrites a
`builtin.module` in place. Passes run inside an upstream `PassManager` as Python-defined
passes, so they mix freely with upstream passes in one textual pipeline.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar

from torch_mlir import ir


class PassError(RuntimeError):
    """A lowbit pass found IR it must reject; the message names the op and the reason."""


class ModulePass:
    """Base class: subclasses are dataclasses with a `NAME` and a `run(module)` method."""

    NAME: ClassVar[str] = ""

    def run(self, module: ir.Operation) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []

    @classmethod
    def from_options(cls, text: str) -> "ModulePass":
        """Build an instance from MLIR-style option text: `n-block=64 verbose=true`."""
        fields = {f.name: f for f in cls.options()}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for item in _split_options(text):
            key, sep, value = item.partition("=")
            attr = key.strip().replace("-", "_")
            if attr not in fields:
                known = ", ".join(f.name.replace("_", "-") for f in cls.options()) or "none"
                raise ValueError(f"pass '{cls.NAME}' has no option '{key.strip()}' (options: {known})")
            kwargs[attr] = _parse_value(hints[attr], value.strip() if sep else "true", cls.NAME, key)
        return cls(**kwargs)

    def option_text(self) -> str:
        parts = []
        for f in self.options():
            v = getattr(self, f.name)
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, (list, tuple)):
                v = ",".join(str(x) for x in v)
            parts.append(f"{f.name.replace('_', '-')}={v}")
        return " ".join(parts)


_REGISTRY: dict[str, type[ModulePass]] = {}


def register_pass(cls: type[ModulePass]) -> type[ModulePass]:
    """Class decorator: make `cls` available by `cls.NAME` in pipelines and `lowbit-opt`."""
    if not cls.NAME:
        raise ValueError(f"{cls.__name__} has no NAME")
    if cls.NAME in _REGISTRY and _REGISTRY[cls.NAME] is not cls:
        raise ValueError(f"pass name {cls.NAME!r} registered twice")
    _REGISTRY[cls.NAME] = cls
    return cls


def registered_passes() -> dict[str, type[ModulePass]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def lookup_pass(name: str) -> type[ModulePass] | None:
    _load_all()
    return _REGISTRY.get(name)


def _load_all() -> None:
    # Importing the package imports every pass module, which registers it.
    import lowbit.passes  # noqa: F401


def _split_options(text: str) -> list[str]:
    text = text.strip()
    if not text:
        return []
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        if ch.isspace() and depth == 0:
            if cur:
                items.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        items.append(cur)
    return items


def _parse_value(hint, raw: str, pass_name: str, key: str):
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if raw.lower() in ("true", "1"):
                return True
            if raw.lower() in ("false", "0"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw, 0)
        if hint is float:
            return float(raw)
        if hint is str:
            return raw.strip("\"'")
        if origin in (list, tuple):
            (elem,) = set(typing.get_args(hint)) - {Ellipsis}
            vals = [_parse_value(elem, v, pass_name, key) for v in raw.strip("[]").split(",") if v]
            return vals if origin is list else tuple(vals)
    except ValueError:
        pass
    raise ValueError(f"pass '{pass_name}': option '{key}' expects {getattr(hint, '__name__', hint)}, got {raw!r}")
