"""Shared pieces of the dense-matmul passes (`lowbit-dense-tile`, `lowbit-dense-brgemm-calls`).

* recognising a matmul on tensors (`linalg.matmul`, `linalg.batch_matmul`, a matmul-like
  `linalg.generic`, B possibly transposed) and reading a constant B at compile time;
* the marker attribute that the tiling pass puts on the BRGEMM tiles and the call pass
  consumes after bufferization;
* the cache sizes that tile sizes are derived from.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func
from torch_mlir.passmanager import PassManager
from lowbit.passes.transform_script import run_transform
from lowbit.passes.vectorize_support import func_ops, walk  # shared IR walkers

# On a tile: "packed" (B is a packed constant, blocked generic) or "rowmajor" (B row-major).
BRGEMM_ATTR = "lowbit.brgemm"
# Temporary tag for addressing one payload op from a transform script.
TILE_TAG = "lowbit.dense_tile"


def inside(op: ir.Operation, names: set[str]) -> bool:
    parent = op.parent
    while parent is not None and parent.operation.name != "func.func":
        if parent.operation.name in names:
            return True
        parent = parent.parent
    return False


@functools.lru_cache(maxsize=None)
def cache_bytes(level: int, default: int) -> int:
    """Size of the data/unified cache at `level` of CPU 0 (sysfs), or `default`."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.exists() else []:
        try:
            if int((index / "level").read_text()) != level:
                continue
            if (index / "type").read_text().strip() == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            return int(text.rstrip("KMG")) * mult
        except (OSError, ValueError):
            continue
    return default


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def static_shape(value: ir.Value) -> list[int] | None:
    t = value.type
    if not isinstance(t, ir.RankedTensorType) and not isinstance(t, ir.MemRefType):
        try:
            t = ir.RankedTensorType(t)
        except ValueError:
            return None
    if not t.has_static_shape:
        return None
    return list(t.shape)


def element_name(t: ir.Type) -> str:
    return str(ir.ShapedType(t).element_type)


def _maps(op: ir.Operation) -> list[ir.AffineMap]:
    return [ir.AffineMapAttr(a).value for a in op.attributes["indexing_maps"]]


def _map(text: str) -> ir.AffineMap:
    return ir.AffineMapAttr(ir.Attribute.parse(f"affine_map<{text}>")).value


@dataclasses.dataclass
class Matmul:
    """A recognised C[(b,) m, n] += A[(b,) m, k] * B[(b,) k, n] (B given as B^T when b_transposed).

    Sizes are None when dynamic (a shape-generic compile: token count, KV length)."""

    op: ir.Operation
    a: ir.Value
    b: ir.Value
    c: ir.Value
    batch: int | None   # batch size of a bmm (None: dynamic, or not a bmm; see `bmm`)
    m: int | None
    n: int | None
    k: int | None
    dtype: str          # "f32" | "bf16" (A and B)
    b_transposed: bool  # b holds [n, k]
    bmm: bool = False

    @property
    def static(self) -> bool:
        return None not in (self.m, self.n, self.k) and (not self.bmm or self.batch is not None)


def ranked_shape(value: ir.Value) -> list[int | None] | None:
    """The shape of a ranked tensor/memref value, None per dynamic dim (None if unranked)."""
    t = value.type
    if not isinstance(t, (ir.RankedTensorType, ir.MemRefType)):
        try:
            t = ir.RankedTensorType(t)
        except ValueError:
            return None
    return [None if ir.ShapedType.is_dynamic_size(d) else d for d in t.shape]


_MM = ["(d0, d1, d2) -> (d0, d2)", "(d0, d1, d2) -> (d2, d1)", "(d0, d1, d2) -> (d0, d1)"]
_MM_BT = ["(d0, d1, d2) -> (d0, d2)", "(d0, d1, d2) -> (d1, d2)", "(d0, d1, d2) -> (d0, d1)"]
_BMM = ["(d0, d1, d2, d3) -> (d0, d1, d3)", "(d0, d1, d2, d3) -> (d0, d3, d2)",
        "(d0, d1, d2, d3) -> (d0, d1, d2)"]


def _is_mul_add_body(op: ir.Operation, in_type: str) -> bool:
    """Body computes out + a * b (with a, b extended to f32 when the inputs are bf16)."""
    block = op.regions[0].blocks[0]
    names = [o.operation.name for o in block.operations]
    allowed = {"arith.mulf", "arith.addf", "arith.extf", "linalg.yield"}
    if not set(names) <= allowed or names.count("arith.mulf") != 1 or names.count("arith.addf") != 1:
        return False
    if in_type == "bf16" and names.count("arith.extf") != 2:
        return False
    if in_type == "f32" and "arith.extf" in names:
        return False
    add = [o for o in block.operations if o.operation.name == "arith.addf"][0]
    out_arg = block.arguments[len(block.arguments) - 1]
    return any(v == out_arg for v in add.operation.operands)


def is_elementwise_cast(op: ir.Operation, cast: str) -> bool:
    """`op` is a one-input `linalg.generic` with identity maps whose body only applies
    `cast` (e.g. `arith.extf`, `arith.truncf`) to its input."""
    if op.name != "linalg.generic" or len(op.operands) != 2:
        return False
    if not all(str(m) == str(ir.AffineMap.get_identity(m.n_dims)) for m in _maps(op)):
        return False
    return [o.operation.name for o in op.regions[0].blocks[0].operations] == [cast, "linalg.yield"]


def bf16_source(value: ir.Value) -> ir.Value | None:
    """If `value` is an f32 tensor made by an elementwise `extf` of a bf16 tensor (how
    torch-mlir lowers bf16 addmm), the bf16 tensor; else None."""
    owner = value.owner
    if isinstance(owner, ir.Block):
        return None
    owner = owner.operation if hasattr(owner, "operation") else owner
    if not is_elementwise_cast(owner, "arith.extf") or element_name(owner.operands[0].type) != "bf16":
        return None
    return owner.operands[0]


def match_matmul(op: ir.Operation) -> Matmul | None:
    """The matmul `op` computes, if it is one the BRGEMM kernels run; else None.

    Accepted: static or dynamic sizes (ranked); A and B both f32 or both bf16; C f32 (bf16
    products are accumulated in f32, as torch-mlir lowers bf16 matmuls); plain (unfused)
    bodies.
    """
    name = op.name
    if name not in ("linalg.matmul", "linalg.batch_matmul", "linalg.generic"):
        return None
    if len(op.operands) != 3 or len(op.results) != 1:
        return None
    a, b, c = op.operands[0], op.operands[1], op.operands[2]
    shapes = [ranked_shape(v) for v in (a, b, c)]
    if any(s is None for s in shapes) or not isinstance(c.type, ir.RankedTensorType):
        return None
    ta, tb, tc = (element_name(v.type) for v in (a, b, c))
    if ta != tb or ta not in ("f32", "bf16") or tc != "f32":
        return None
    maps = [str(m) for m in _maps(op)]
    if name == "linalg.generic":
        iters = [str(a) for a in op.attributes["iterator_types"]]
        if len(iters) != 3 or "reduction" not in iters[2] or any("reduction" in i for i in iters[:2]):
            return None
        if not _is_mul_add_body(op, ta):
            return None
    else:
        # Named ops may carry a cast (e.g. extf) in their region; their maps say the rest.
        pass
    canon = {tuple(str(_map(x)) for x in _MM): ("mm", False),
             tuple(str(_map(x)) for x in _MM_BT): ("mm", True),
             tuple(str(_map(x)) for x in _BMM): ("bmm", False)}
    kind = canon.get(tuple(maps))
    if kind is None:
        return None
    if ta == "f32":
        # f32 products of bf16 values are exact, so a bf16 kernel on the sources (f32
        # accumulation) computes the same matmul without materialising f32 copies.
        sa, sb = bf16_source(a), bf16_source(b)
        if sa is not None and sb is not None:
            a, b, ta = sa, sb, "bf16"
    if kind[0] == "bmm":
        (bs, m, k), n = shapes[0], shapes[2][2]
        return Matmul(op, a, b, c, bs, m, n, k, ta, False, bmm=True)
    (m, k) = shapes[0]
    n = shapes[2][1]
    return Matmul(op, a, b, c, None, m, n, k, ta, kind[1])


def constant_of(value: ir.Value) -> tuple[np.ndarray, bool] | None:
    """The compile-time value of a 2-D B operand and whether it is transposed ([n, k]).

    Looks through `linalg.transpose` (permutation [1, 0]) of a constant, the form
    torch-mlir gives a Linear weight. bf16 data is returned as uint16 bit patterns.
    """
    transposed = False
    owner = value.owner
    if isinstance(owner, ir.Block):
        return None
    owner = owner.operation if hasattr(owner, "operation") else owner
    if owner.name == "linalg.transpose":
        perm = list(ir.DenseI64ArrayAttr(owner.attributes["permutation"]))
        if perm != [1, 0]:
            return None
        transposed = True
        src = owner.operands[0].owner
        if isinstance(src, ir.Block):
            return None
        owner = src.operation if hasattr(src, "operation") else src
    if owner.name != "arith.constant":
        return None
    attr = owner.attributes["value"]
    if not isinstance(attr, ir.DenseElementsAttr):
        try:
            attr = ir.DenseElementsAttr(attr)
        except ValueError:
            return None  # dense_resource and friends: contents not readable here
    array = _dense_to_numpy(attr)
    if array is None:
        return None
    return array, transposed


def _dense_to_numpy(attr: ir.DenseElementsAttr) -> np.ndarray | None:
    t = ir.RankedTensorType(attr.type)
    elem = str(t.element_type)
    shape = list(t.shape)
    if elem == "f32":
        if attr.is_splat:
            return np.full(shape, ir.FloatAttr(attr.get_splat_value()).value, dtype=np.float32)
        return np.array(attr).reshape(shape)
    if elem == "bf16":
        # The Python buffer protocol has no bf16: let MLIR fold a bitcast to i16.
        i16 = ir.RankedTensorType.get(shape, ir.IntegerType.get_signless(16))
        with ir.Location.unknown():
            tmp = ir.Module.create()
            with ir.InsertionPoint(tmp.body):
                f = func.FuncOp("bits", ir.FunctionType.get([], [i16]))
                with ir.InsertionPoint(f.add_entry_block()):
                    cst = arith.ConstantOp(t, attr)
                    func.ReturnOp([arith.BitcastOp(i16, cst.result).result])
            PassManager.parse("builtin.module(canonicalize)").run(tmp.operation)
        ret = tmp.body.operations[0].regions[0].blocks[0].operations
        folded = [o for o in ret if o.operation.name == "arith.constant"]
        if not folded:
            return None
        bits = ir.DenseElementsAttr(folded[0].operation.attributes["value"])
        if bits.is_splat:
            v = ir.IntegerAttr(bits.get_splat_value()).value & 0xFFFF
            return np.full(shape, v, dtype=np.uint16)
        return np.array(bits).reshape(shape).view(np.uint16)
    return None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_divisor_at_most(n: int, limit: int, multiple_of: int = 1) -> int | None:
    """Largest d <= limit with d | n and multiple_of | d (None if there is none)."""
    best = None
    for d in divisors(n):
        if d <= limit and d % multiple_of == 0:
            best = d
    return best


def match_tag(value: int) -> str:
    return (f"transform.structured.match attributes{{{TILE_TAG} = {value} : i64}} in %root "
            f": (!transform.any_op) -> !transform.any_op")
