"""lowbit-tile-qlinear: choose cache tiles for every qlinear function.

Matches each `@lowbit_qlinear_*` function (the canonical low-bit linear form) and produces
a `lowbit.tiles = {m_tile, n_tile, kblock, threads}` attribute that the runtime lowering
turns into `scf.forall` over (N tiles, M tiles) and a BRGEMM over K-blocks:

- kblock (the BRGEMM batch step): the scale group when scales are per group (the kernel
  requires it), else all of K rounded up to the format's K granule (one K-block: the
  kernel's per-block epilogue and row sums are paid once; measured ~5% faster at M = 1
  than 256-wide blocks);
- n_tile (output rows per task): whole 64-row kernel blocks, small enough that every thread
  gets several tasks (GEMV load balance), so one task's weight panel stays in L2;
- m_tile (tokens per kernel call): as many rows as keep the activation panel in half of L2.

A bound function (weights packed at bind time, `lowbit.bound`) keeps the kblock it was
packed with; a dynamic token count tiles as if M were unbounded.

Options override each choice (0 = automatic); `target` overrides the cache description
(`l1=48K,l2=1M,l3=32M,cores=2`, as `LOWBIT_TARGET`).
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir

from lowbit.compiler.target import Target, host_target
from lowbit.passes.qlinear import QLINEAR_ATTR, bound_info, is_bound, qlinear_functions, spec_from_attr
from lowbit.passes.registry import ModulePass, register_pass

TILES_ATTR = "lowbit.tiles"
KERNEL_NB = 64          # rows per packed n-block (LOWBIT_QGEMM_NB)
K_GRANULE = {"int1": 8}  # values of k per packed step; 4 for every other format
TASKS_PER_THREAD = 4


def k_granule(weight_format: str) -> int:
    return K_GRANULE.get(weight_format, 4)


MAX_KBLOCK = 65536  # int8 row sums of one K-block must fit the kernel's int32 accumulators


def choose_kblock(k: int, group: int, granule: int) -> int:
    if group < k:
        return group
    kp = -(-k // granule) * granule
    if kp <= MAX_KBLOCK:
        return kp
    for kb in range(MAX_KBLOCK, granule - 1, -granule):  # the widest block that divides K
        if k % kb == 0:
            return kb
    return 4096


def choose_tiles(m: int, n: int, k: int, group: int, weight_format: str, act_bytes: int,
                 target: Target, threads: int) -> dict[str, int]:
    kblock = choose_kblock(k, group, k_granule(weight_format))
    kp = -(-k // kblock) * kblock
    nblocks = -(-n // KERNEL_NB)
    per_task = max(1, nblocks // max(1, threads * TASKS_PER_THREAD))
    n_tile = min(per_task, 8) * KERNEL_NB
    m_tile = max(1, min(m, (target.l2 // 2) // max(1, kp * act_bytes)))
    return {"m_tile": m_tile, "n_tile": n_tile, "kblock": kblock, "threads": threads}


@register_pass
@dataclasses.dataclass
class TileQLinear(ModulePass):
    """Choose (m_tile, n_tile, kblock) for qlinear functions from the target's caches."""

    NAME = "lowbit-tile-qlinear"
    m_tile: int = 0
    n_tile: int = 0
    kblock: int = 0
    threads: int = 0
    target: str = ""

    def run(self, module: ir.Operation) -> None:
        target = Target.from_spec(self.target, host_target()) if self.target else host_target()
        threads = self.threads or target.cores
        for func in qlinear_functions(module):
            spec, _ = spec_from_attr(func.attributes[QLINEAR_ATTR])
            x_type = ir.RankedTensorType(ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value).inputs[0])
            m = x_type.shape[0]
            if ir.ShapedType.is_dynamic_size(m):
                m = 1 << 30  # shape-generic code: tiles for any token count
            act_bytes = 1 if spec.act_format in ("int8", "int8_unit") else (4 if str(x_type.element_type) == "f32" else 2)
            tiles = choose_tiles(m, spec.out_features, spec.in_features, spec.group_width,
                                 spec.weight_format, act_bytes, target, threads)
            for key in ("m_tile", "n_tile", "kblock"):
                if getattr(self, key):
                    tiles[key] = getattr(self, key)
            if is_bound(func):
                tiles["kblock"] = bound_info(func)["kblock"]  # the weight was packed with it
            if tiles["n_tile"] % KERNEL_NB:
                raise ValueError(f"n-tile must be a multiple of {KERNEL_NB}, got {tiles['n_tile']}")
            i64 = ir.IntegerType.get_signless(64)
            func.attributes[TILES_ATTR] = ir.DictAttr.get(
                {key: ir.IntegerAttr.get(i64, value) for key, value in tiles.items()})
