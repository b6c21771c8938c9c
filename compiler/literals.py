"""Import frozen tensors as MLIR literals without going through Python lists.

torch-mlir's default literal path converts a tensor with `tensor.tolist()` (minutes for a
large weight) and types uint8 data as signless. This hook builds a `DenseElementsAttr`
straight from the tensor's buffer with the exact element type (`ui8` for uint8, `bf16`
for bfloat16), which the compiler's passes can also read back as numpy arrays, and
imports each distinct tensor once.
"""
from __future__ import annotations

import torch
from torch_mlir import ir
from torch_mlir.dialects import torch as torch_d
from torch_mlir.extras.fx_importer import FxImporterHooks

_ELEMENT_TYPES = {
    torch.float32: lambda: ir.F32Type.get(),
    torch.float64: lambda: ir.F64Type.get(),
    torch.float16: lambda: ir.F16Type.get(),
    torch.bfloat16: lambda: ir.BF16Type.get(),
    torch.int8: lambda: ir.IntegerType.get_signed(8),
    torch.uint8: lambda: ir.IntegerType.get_unsigned(8),
    torch.int16: lambda: ir.IntegerType.get_signed(16),
    torch.int32: lambda: ir.IntegerType.get_signed(32),
    torch.int64: lambda: ir.IntegerType.get_signed(64),
}


def _numpy_view(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


class LiteralHooks(FxImporterHooks):
    def __init__(self):
        self._cache: dict[int, tuple[torch.Tensor, ir.Value]] = {}

    def resolve_literal(self, gni, literal, info):
        if not isinstance(literal, torch.Tensor) or literal.dtype not in _ELEMENT_TYPES:
            return None
        if literal.numel() <= 1 and literal.dtype != torch.bfloat16:
            # torch-mlir's splat path handles scalars well, except bf16 (it needs ml_dtypes)
            return None
        hit = self._cache.get(id(literal))
        if hit is not None and hit[0] is literal:
            return hit[1]
        t = literal.detach().contiguous()
        # DenseElementsAttr wants signless integers for the raw buffer; the tensor type
        # carries torch's signedness as the vtensor's dtype.
        element = _ELEMENT_TYPES[t.dtype]()
        storage = element
        if isinstance(element, ir.IntegerType) and not element.is_unsigned:
            storage = ir.IntegerType.get_signless(element.width)
        attr = ir.DenseElementsAttr.get(_numpy_view(t), type=storage, shape=list(t.shape))
        vtensor_type = gni._cc.tensor_to_vtensor_type(t)
        value = torch_d.ValueTensorLiteralOp(attr, results=[vtensor_type]).result
        self._cache[id(literal)] = (literal, value)
        return value


def split_shared_get_attrs(graph: torch.fx.Graph) -> None:
    """Give every use of a `get_attr` its own node.

    torch-mlir's importer keys its "already imported" check on the attribute name but
    records the value under the node, so a constant used twice would be imported twice
    into the same node. One node per use avoids that; `LiteralHooks` dedups the data.
    """
    for node in list(graph.nodes):
        if node.op != "get_attr" or len(node.users) <= 1:
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_before(user):
                clone = graph.get_attr(node.target)
            clone.meta = dict(node.meta)
            user.replace_input_with(node, clone)
