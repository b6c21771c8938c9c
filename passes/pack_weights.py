"""lowbit-pack-weights: pre-pack qlinear weights into the microkernels' blocked layout.

Matches each tiled `@lowbit_qlinear_*` function (it needs `lowbit.tiles.kblock`) and
produces module-level constants the runtime lowering reads:

    memref.global "private" constant @lowbit_qlinear_0_packed : memref<BYTESxi8> = dense<...>
    memref.global "private" constant @lowbit_qlinear_0_bias : memref<Nxf32> = dense<...>

plus a `lowbit.packed = {symbol, bias, bytes, kblock, kblock_bytes, nblock_bytes,
num_kblocks}` attribute on the function. The packing routine is the runtime's own
(`lowbit_qpack`), so the compiler and the kernels agree on the layout by construction.
The reference body (and its unpacked constants) stays until the runtime lowering
replaces it; afterwards nothing references the unpacked copies and they are dropped.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch_mlir import ir
from torch_mlir.dialects import memref

from lowbit.passes.qlinear import QLINEAR_ATTR, is_bound, qlinear_functions, read_weights, spec_from_attr
from lowbit.passes.registry import ModulePass, PassError, register_pass
from lowbit.passes.tile_qlinear import TILES_ATTR

PACKED_ATTR = "lowbit.packed"


def _global(module_body: ir.Block, name: str, array: np.ndarray, element: ir.Type) -> None:
    array = np.ascontiguousarray(array)
    mtype = ir.MemRefType.get(list(array.shape), element)
    value = ir.DenseElementsAttr.get(array, type=element, shape=list(array.shape))
    with ir.InsertionPoint(module_body):
        memref.GlobalOp(sym_name=name, type_=mtype, sym_visibility="private", initial_value=value,
                        constant=True, alignment=64)


def dict_attr_values(attr: ir.Attribute) -> dict:
    out = {}
    for named in ir.DictAttr(attr):
        a = named.attr
        out[named.name] = ir.StringAttr(a).value if isinstance(a, ir.StringAttr) else ir.IntegerAttr(a).value
    return out


@register_pass
@dataclasses.dataclass
class PackWeights(ModulePass):
    """Pack the codes, scales and zero points of qlinear functions with the runtime's packer."""

    NAME = "lowbit-pack-weights"

    def run(self, module: ir.Operation) -> None:
        from lowbit.runtime.qgemm import pack_weight  # loads the native runtime

        body = module.regions[0].blocks[0]
        for func in qlinear_functions(module):
            if PACKED_ATTR in func.attributes or is_bound(func):
                continue  # bound functions get their weights packed at bind time, as buffers
            if TILES_ATTR not in func.attributes:
                raise PassError(f"{ir.StringAttr(func.attributes['sym_name']).value}: run "
                                "lowbit-tile-qlinear before lowbit-pack-weights")
            spec, _ = spec_from_attr(func.attributes[QLINEAR_ATTR])
            tiles = dict_attr_values(func.attributes[TILES_ATTR])
            w = read_weights(func)
            scales = w.scales
            if spec.granularity == "tensor":
                scales = np.broadcast_to(scales.reshape(1, 1), (spec.out_features, 1))
            try:
                pw = pack_weight(torch.from_numpy(np.ascontiguousarray(w.q)),
                                 torch.from_numpy(np.array(scales, dtype=np.float32)), spec.weight_format,  # writable copy
                                 group=spec.group_width,
                                 zero=None if w.zero_points is None else torch.from_numpy(w.zero_points),
                                 kblock=tiles["kblock"])
            except ValueError as e:
                raise PassError(f"cannot pack {spec.describe()} weights: {e}") from None
            name = ir.StringAttr(func.attributes["sym_name"]).value
            i8 = ir.IntegerType.get_signless(8)
            _global(body, f"{name}_packed", pw.data.numpy().view(np.int8), i8)
            fields = {"symbol": f"{name}_packed", "bias": "", "bytes": int(pw.data.numel()),
                      "kblock": pw.kblock, "kblock_bytes": pw.kblock_bytes,
                      "nblock_bytes": pw.nblock_bytes, "num_kblocks": pw.num_kblocks}
            if w.bias is not None:
                _global(body, f"{name}_bias", w.bias.astype(np.float32), ir.F32Type.get())
                fields["bias"] = f"{name}_bias"
            i64 = ir.IntegerType.get_signless(64)
            func.attributes[PACKED_ATTR] = ir.DictAttr.get(
                {k: ir.StringAttr.get(v) if isinstance(v, str) else ir.IntegerAttr.get(i64, v)
                 for k, v in fields.items()})
