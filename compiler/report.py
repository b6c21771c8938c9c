"""What the compiler did with every matmul: `lowbit.explain(...)` and `LOWBIT_REPORT=1`.

Passes record decisions in the module attribute `lowbit.report` (recognised or not, and
why); after the runtime-calls stage this module adds, for each qlinear function, the
tiles, packed bytes, the fused epilogue (residual add / activation folded into the kernel)
and the ISA its kernels run with. Compiled graphs are kept in a weak
registry so that `explain(model)` finds the graphs whose frozen weights belong to `model`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import weakref
from typing import Any, Iterable

import torch
from torch_mlir import ir

from lowbit.passes.pack_weights import PACKED_ATTR, dict_attr_values
from lowbit.passes.qlinear import QLINEAR_ATTR, epilogue_from_attr, qlinear_functions, read_report, spec_from_attr
from lowbit.passes.tile_qlinear import TILES_ATTR

_COLUMNS = ("kind", "origin", "result", "format", "numerics", "epilogue", "tiles", "packed_bytes", "isa",
            "reason", "location")


def collect_report(module: ir.Module) -> list[dict]:
    """Report entries of a module after the runtime-calls stage."""
    from lowbit.runtime import current_isa

    entries = read_report(module.operation)
    for func in qlinear_functions(module.operation):
        name = ir.StringAttr(func.attributes["sym_name"]).value
        mine = [e for e in entries if e.get("function") == name]
        if not mine:
            spec, origin = spec_from_attr(func.attributes[QLINEAR_ATTR])
            mine = [{"kind": "matmul", "origin": origin, "result": "recognized",
                     "format": spec.describe(), "function": name}]
            entries.extend(mine)
        lowered = "lowbit.lowered" in func.attributes
        epilogue = epilogue_from_attr(func.attributes[QLINEAR_ATTR]).describe()
        for entry in mine:
            if entry.get("kind") == "matmul":
                # what the kernel's epilogue does after scales/bias (fused residual add,
                # activation); "none" when nothing was folded into it
                entry["epilogue"] = epilogue
            if TILES_ATTR in func.attributes:
                t = dict_attr_values(func.attributes[TILES_ATTR])
                entry["tiles"] = f"m{t['m_tile']} n{t['n_tile']} kb{t['kblock']}"
            if PACKED_ATTR in func.attributes:
                entry["packed_bytes"] = dict_attr_values(func.attributes[PACKED_ATTR])["bytes"]
            entry["isa"] = current_isa() if lowered else "generic (loops)"
            if not lowered and entry.get("result") == "recognized":
                entry["result"] = "recognized, generic path"
            if entry.get("merged_from"):
                entry["result"] = f"recognized, merged into {name}"
    for e in entries:
        loc = e.get("location", "")
        if loc.startswith("loc("):
            e["location"] = _short_location(loc)
    return entries


def _short_location(loc: str) -> str:
    # loc("lowbit.node:linear"(callsite("file.py":145:0 at ...))) -> linear @ file.py:145
    name = loc.split('"')[1] if '"' in loc else loc
    name = name.replace("lowbit.node:", "")
    parts = loc.split('"')
    where = f"{os.path.basename(parts[3])}:{parts[4].split(':')[1]}" if len(parts) > 4 and ":" in parts[4] else ""
    return f"{name} @ {where}" if where else name


@dataclasses.dataclass
class Report:
    entries: list[dict]

    def matmuls(self) -> list[dict]:
        return [e for e in self.entries if e.get("kind") == "matmul"]

    def __str__(self) -> str:
        if not self.entries:
            return "lowbit: no matmuls were examined"
        cols = [c for c in _COLUMNS if any(c in e for e in self.entries)]
        rows = [[str(e.get(c, "")) for c in cols] for e in self.entries]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)


_REGISTRY: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register(compiled) -> None:
    """Called for every compiled graph; prints its report when LOWBIT_REPORT=1."""
    _REGISTRY.add(compiled)
    if os.environ.get("LOWBIT_REPORT", "") not in ("", "0"):
        print(f"lowbit report ({len(compiled.report)} entries):\n{Report(compiled.report)}", file=sys.stderr)


def tensor_refs(tensors: Iterable[torch.Tensor]) -> dict[int, weakref.ref]:
    """A compiled graph's module state as id -> weak reference: `explain` finds the graphs of a
    module by its tensors without keeping them alive, and an id alone is not enough (CPython
    gives a freed tensor's id to the next tensor allocated, so a graph that outlives its model
    would be reported for an unrelated one)."""
    return {id(t): weakref.ref(t) for t in tensors}


def explain(obj: Any, *example_inputs: Any) -> Report:
    """The compiler's report for a compiled graph, or for every graph compiled from `obj`.

    `obj` may be a compiled graph, a `torch.compile(..., backend="lowbit")` module, or the
    original `nn.Module`; with `example_inputs`, `obj` is compiled and run once first.
    """
    if hasattr(obj, "report") and isinstance(obj.report, list):
        return Report(list(obj.report))
    module = getattr(obj, "_orig_mod", obj)
    if example_inputs:
        from lowbit.compiler.own_code import compile_entry
        compiled = compile_entry(module, backend="lowbit")
        with torch.no_grad():
            compiled(*example_inputs)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"explain() needs a compiled graph or an nn.Module, got {type(obj).__name__}")
    owned = {id(t): t for t in (*module.parameters(), *module.buffers())}
    entries = []
    for compiled in list(_REGISTRY):
        refs = getattr(compiled, "state_ids", None)
        if refs is None:  # weights frozen into the code (the graph keeps them alive)
            frozen = getattr(getattr(compiled, "captured", None), "frozen", {}).values()
            mine = any(owned.get(id(t)) is t for t in frozen)
        else:
            mine = any(owned.get(i) is ref() for i, ref in refs.items() if i in owned)
        if mine:
            entries.extend(compiled.report)
    return Report(entries)
