"""Reshapes that merge dynamic dims, rewritten into forms torch-mlir lowers correctly.

torch-mlir (wheel 20261001) lowers many `aten.view`s that merge two or more dynamic dims
(e.g. `[s0, s1, 64] -> [s0*s1, 64]`, what `nn.Linear` on a 3-D input decomposes into) by
*assuming* the extra dynamic dims have size 1: it emits
`tensor.cast %x : tensor<?x?x64xf32> to tensor<?x1x64xf32>` and a `tensor.collapse_shape`
(or folds that cast into the producer), and the compiled code reads garbage whenever
`s1 != 1`. Whether a given merge is hit depends on how its size list is spelled
(`[s0*s1, 64]`, `[-1, 64]`, `[-1]`, ...); `aten._unsafe_view`, `aten.reshape` and
`aten.flatten.using_ints` go through the same lowering, a 4-D `matmul` fails to
compile, and `[s0, 1, s1] -> [1, s0*s1, 1]` casts `s0` to 1 and aborts the process at run
time. `prims.collapse(x, start, end)` (`end` inclusive) lowers to a plain
`tensor.collapse_shape` of the dynamic dims, which is right for every size, and a view
that only splits dims (`[s0*s1, 64] -> [s0, s1, 64]`, `[s0, 64] -> [s0, 8, 8]`) lowers
correctly (a `tensor.expand_shape` or a `tensor.reshape` with computed sizes). Merges of
one dynamic dim with static ones were lowered correctly in every case tried; they are
rewritten all the same, the rewrite being right by construction.

`fix_dynamic_reshapes(gm)` therefore rewrites every reshape-like node of an exported,
decomposed ATen graph whose input and output dims pair up into groups (the minimal runs
of dims with equal products, proved symbolically from the FakeTensor sizes in
`meta['val']`) of which one merges two or more dims and involves a dynamic size:

    view(x, [s0*s1, 8, 8])  with x: [s0, s1, 64]
      -> view(prims.collapse(x, 0, 1), [s0*s1, 8, 8])     # collapse merges, view splits

Every group of two or more input dims is collapsed into one dim (many-to-many groups
such as `[2*s0, 64] -> [s0, 128]` included: collapsed, then split); a final view with
the node's own size list does the remaining splits, if any. Nodes whose groups only keep
or split dims, and graphs without dynamic sizes, are left untouched; the pass is
idempotent. A dynamic reshape whose dims cannot be paired (sizes the pass cannot prove
equal) is collapsed into one dim and split by the node's size list, which is right for
any sizes. What cannot be rewritten raises `DynamicReshapeError` (a `FrontendError`), so
that the caller runs that graph (or part) in eager instead of compiling a guess: a
dynamic reshape without FakeTensor metadata, to or from rank 0, or whose size list holds
a literal size where the metadata has a dynamic one (sizes specialised to example values
without a guard, as the SymInt inputs of a partitioned part are by `capture`).

Call it on `CapturedGraph.graph_module` right after every `frontend.capture()` -- the
whole graph's and each re-captured part's (partitions around eager ops, regions) -- before
the graph is bound, partitioned or imported.
"""
from __future__ import annotations

import logging
import operator
import re
from typing import Any, Sequence

import sympy
import torch

from lowbit.compiler.frontend import FrontendError

log = logging.getLogger("lowbit.reshape")

aten = torch.ops.aten
prims = torch.ops.prims

# Reshape-like ops (after torch-mlir's decompositions, graphs hold `aten.view` and
# `aten._unsafe_view`; the others are taken as well in case a table keeps them).
_SIZED = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.view_copy.default}
_FLATTEN = {aten.flatten.using_ints}
_RESHAPES = _SIZED | _FLATTEN


class DynamicReshapeError(FrontendError):
    """A reshape of dynamic sizes that lowbit can neither compile correctly nor rewrite.

    `nodes` names the FX nodes concerned; run the graph (or the part holding them) in
    eager."""

    def __init__(self, message: str, nodes: Sequence[str] = ()):
        super().__init__(message)
        self.nodes = list(nodes)


Group = tuple[list[int], list[int]]  # (input dims, output dims) with equal products


def fix_dynamic_reshapes(gm: torch.fx.GraphModule) -> None:
    """Rewrite, in place, the reshapes of `gm` that merge dynamic dims (see the module
    docstring). Static graphs and reshapes torch-mlir lowers correctly stay as they are."""
    for sub in gm.children():  # bodies of higher-order ops (e.g. invoke_subgraph)
        if isinstance(sub, torch.fx.GraphModule):
            fix_dynamic_reshapes(sub)
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _RESHAPES:
            continue
        plan = _plan(node)
        if plan is None:
            continue
        _rewrite(gm.graph, node, plan)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
        log.info("rewrote %d reshape(s) that merge dynamic dims", rewritten)


def _plan(node: torch.fx.Node) -> list[Group] | None:
    """The dim groups of a reshape node to rewrite, or None to leave the node alone."""
    src = node.args[0] if node.args else None
    in_val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    out_val = node.meta.get("val")
    if not isinstance(in_val, torch.Tensor) or not isinstance(out_val, torch.Tensor):
        if _any_symbolic(in_val) or _any_symbolic(out_val):
            raise DynamicReshapeError(f"reshape {node.name} ({node.target}) has no tensor metadata "
                                      "for its dynamic sizes", [node.name])
        return None
    ins = [_expr(d) for d in in_val.shape]
    outs = [_expr(d) for d in out_val.shape]
    if all(e.is_number for e in ins + outs):
        return None  # static: torch-mlir's own lowering is right
    _check_size_list(node, outs)
    if not ins or not outs:
        raise DynamicReshapeError(f"reshape {node.name} ({node.target}) of {_fmt(ins)} into {_fmt(outs)}: "
                                  "a rank-0 side with dynamic sizes; run it in eager", [node.name])
    groups = _pair_dims(ins, outs, _shape_env(in_val, out_val))
    if groups is None:
        # The op itself guarantees equal element counts at run time: collapsing everything
        # and splitting by the node's own size list is right whatever the sizes are.
        log.info("reshape %s: cannot pair the dims of %s and %s symbolically; collapsing all dims",
                 node.name, _fmt(ins), _fmt(outs))
        groups = [(list(range(len(ins))), list(range(len(outs))))]
    if not any(len(gi) > 1 and _dynamic(gi, go, ins, outs) for gi, go in groups):
        return None  # keeps or splits dims only: lowered correctly
    if node.target not in _SIZED and any(len(go) > 1 for _, go in groups):
        # No size list to split with (cannot happen for a valid flatten).
        raise DynamicReshapeError(f"reshape {node.name} ({node.target}) of {_fmt(ins)} into {_fmt(outs)} "
                                  "would need a split without a size list; run it in eager", [node.name])
    log.debug("reshape %s: %s -> %s, groups %s", node.name, _fmt(ins), _fmt(outs), groups)
    return groups


def _check_size_list(node: torch.fx.Node, outs: list[sympy.Expr]) -> None:
    """A literal size (other than -1) for an output dim that the metadata says is dynamic
    means the graph was specialised to example sizes without a guard -- e.g. the sizes of a
    partitioned part that arrive as SymInt inputs, which `capture` turns into constants:
    export then types `view([s0*s1, 64], [2, 5, 64])` as `[2, (s0*s1)//2, 64]` and the
    compiled code would be right for one size only."""
    if node.target not in _SIZED or len(node.args) < 2 or not isinstance(node.args[1], (list, tuple)):
        return
    sizes = node.args[1]
    if len(sizes) != len(outs):
        return
    for d, (size, expr) in enumerate(zip(sizes, outs)):
        if isinstance(size, int) and size != -1 and not expr.is_number:
            raise DynamicReshapeError(
                f"reshape {node.name} ({node.target}) has the literal size {size} for output dim {d}, "
                f"whose size is dynamic ({expr}): its sizes were specialised to example values "
                "without a guard; run it in eager", [node.name])


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node, groups: list[Group]) -> None:
    x = node.args[0]
    val = x.meta["val"]
    with graph.inserting_before(node):
        # Right to left, so that the dims of the groups still to collapse keep their index.
        for gi, _ in reversed(groups):
            if len(gi) < 2:
                continue
            collapsed = graph.call_function(prims.collapse.default, (x, gi[0], gi[-1]))
            val = _fake(prims.collapse.default, val, gi[0], gi[-1])
            _set_meta(collapsed, node, val)
            x = collapsed
        if any(len(go) > 1 for _, go in groups):
            # Only splits are left: the node's own target and size list, on the collapsed input.
            final = graph.call_function(node.target, (x, *node.args[1:]), dict(node.kwargs))
            _set_meta(final, node, node.meta["val"])
            x = final
    node.replace_all_uses_with(x)
    sizes = [a for a in node.all_input_nodes if a is not node.args[0]]
    graph.erase_node(node)
    _erase_if_dead(graph, sizes)
    log.debug("reshape %s -> %s", node.name, x.name)


# Scalar size arithmetic that a replaced reshape may leave without users.
_SIZE_OPS = {operator.mul, operator.add, operator.sub, operator.floordiv, aten.sym_size.int,
             aten.sym_numel.default}


def _erase_if_dead(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Erase the size computations among `nodes` (and their inputs) that lost all users."""
    work, erased = list(nodes), set()
    while work:
        n = work.pop()
        if n in erased or n.op != "call_function" or n.users or n.target not in _SIZE_OPS:
            continue
        work += n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)


_CAST = re.compile(r"tensor\.cast %\S+ : tensor<([^>]*)> to tensor<([^>]*)>")


def dynamic_to_static_casts(ir_text: str) -> list[str]:
    """The `tensor.cast`s of a (torch-to-linalg) module that give a dynamic dim a static
    size, e.g. `?x?x64xf32 -> ?x1x64xf32` -- torch-mlir's signature of a merged dynamic dim
    assumed to be 1. A diagnostic: a cast found here is suspect, not necessarily wrong."""
    bad = []
    for src, dst in _CAST.findall(ir_text):
        s, d = src.split("x"), dst.split("x")
        if len(s) == len(d) and any(a == "?" and b != "?" for a, b in zip(s[:-1], d[:-1])):
            bad.append(f"{src} -> {dst}")
    return bad


def _pair_dims(ins: list[sympy.Expr], outs: list[sympy.Expr], shape_env) -> list[Group] | None:
    """Split the input and output dims into consecutive groups of equal products, each as
    small as possible; None when a pairing cannot be proved."""
    if not ins or not outs:
        return None
    pin = _prefix_products(ins)
    pout = _prefix_products(outs)
    if not _equal(pin[-1], pout[-1], shape_env):
        return None
    groups: list[Group] = []
    i = j = 0
    n, m = len(ins), len(outs)
    while i < n and j < m:
        found = None
        for k in range(i + 1, n + 1):
            for l in range(j + 1, m + 1):
                if _equal(pin[k], pout[l], shape_env):
                    found = (k, l)
                    break
            if found:
                break
        if found is None:
            return None
        k, l = found
        groups.append((list(range(i, k)), list(range(j, l))))
        i, j = k, l
    # Dims left over on one side have size 1 (the totals are equal): join the last group.
    if i < n or j < m:
        if not all(_equal(e, sympy.Integer(1), shape_env) for e in ins[i:] + outs[j:]):
            return None
        gi, go = groups[-1]
        groups[-1] = (gi + list(range(i, n)), go + list(range(j, m)))
    return groups


def _prefix_products(dims: list[sympy.Expr]) -> list[sympy.Expr]:
    out = [sympy.Integer(1)]
    for d in dims:
        out.append(out[-1] * d)
    return out


def _equal(a: sympy.Expr, b: sympy.Expr, shape_env) -> bool:
    diff = sympy.expand(a - b)
    if diff == 0:
        return True
    if diff.is_number:
        return False
    if shape_env is not None:
        try:
            known = shape_env._maybe_evaluate_static(sympy.Eq(a, b))
        except Exception:  # noqa: BLE001 - an unprovable relation is simply not known
            known = None
        return known is not None and bool(known)
    return False


def _dynamic(gi: list[int], go: list[int], ins, outs) -> bool:
    return any(not ins[d].is_number for d in gi) or any(not outs[d].is_number for d in go)


def _expr(d: Any) -> sympy.Expr:
    if isinstance(d, torch.SymInt):
        return sympy.sympify(d.node.expr)
    return sympy.Integer(int(d))


def _any_symbolic(val: Any) -> bool:
    return isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape)


def _shape_env(*vals: torch.Tensor):
    for v in vals:
        for d in v.shape:
            if isinstance(d, torch.SymInt):
                return d.node.shape_env
    return None


def _fake(op, val: torch.Tensor, *args):
    """`op(val, *args)` on the FakeTensor `val` (under its fake mode): the new node's meta."""
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        from torch._guards import detect_fake_mode
        mode = detect_fake_mode([val])
    if mode is None:
        return op(val, *args)
    with mode:
        return op(val, *args)


def _set_meta(new: torch.fx.Node, old: torch.fx.Node, val: torch.Tensor) -> None:
    """`old`'s provenance (stack trace, module stack, ...) with `val` and its tensor_meta."""
    meta = {k: v for k, v in old.meta.items() if k not in ("val", "tensor_meta")}
    meta["val"] = val
    if "tensor_meta" in old.meta:
        try:
            from torch.fx.passes.shape_prop import _extract_tensor_metadata
            meta["tensor_meta"] = _extract_tensor_metadata(val)
        except Exception:  # noqa: BLE001 - optional metadata
            pass
    new.meta = meta


def _fmt(dims: list[sympy.Expr]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


__all__ = ["DynamicReshapeError", "dynamic_to_static_casts", "fix_dynamic_reshapes"]
