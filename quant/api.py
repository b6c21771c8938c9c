"""`quantize_`: swap matching ``nn.Linear`` modules of a model for `LowBitLinear` (and
``nn.Embedding`` modules a filter selects for `LowBitEmbedding`), in place."""
from __future__ import annotations

from typing import Callable, Union

from torch import nn

from .config import QuantConfig
from .embedding import LowBitEmbedding
from .module import LowBitLinear
from .threads import one_intra_op_thread

FilterFn = Callable[[nn.Module, str], bool]
ConfigFn = Callable[[nn.Linear, str], Union[QuantConfig, None]]


def quantize_(model: nn.Module, config: QuantConfig | ConfigFn | None = None,
              filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (that ``filter_fn`` accepts) by a `LowBitLinear`.

    Args:
        model: modified in place (and returned for convenience). If ``model`` itself is an
            ``nn.Linear`` it cannot be replaced in place: use ``LowBitLinear.from_float``.
        config: a `QuantConfig` for all selected layers, or a function
            ``(linear, fqn) -> QuantConfig | None`` choosing per layer (None keeps the layer).
            Calling ``quantize_`` several times with different filters also mixes formats:
            layers that are already `LowBitLinear` are never touched again.
        filter_fn: ``(module, fqn) -> bool`` like torchao; default selects every nn.Linear.
            An ``nn.Embedding`` is quantized only when a filter selects it (weights "int8" or
            "int4_sym", activations "none": a `LowBitEmbedding`); other modules are skipped
            whatever it returns.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_ replaces submodules in place; for a bare nn.Linear use "
                        "LowBitLinear.from_float(linear, config)")
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig) and not callable(config):
        raise TypeError(f"config must be a QuantConfig or a callable, got {type(config).__name__}")
    # Collect first: replacing while iterating named_modules() would visit new modules.
    # Exact type match: subclasses such as MultiheadAttention's out_proj are used through
    # their .weight by their owner, so swapping them would break the owner.
    targets = [(fqn, m) for fqn, m in model.named_modules(remove_duplicate=False)
               if (type(m) is nn.Linear and (filter_fn is None or filter_fn(m, fqn)))
               or (type(m) is nn.Embedding and filter_fn is not None and filter_fn(m, fqn))]
    with one_intra_op_thread():   # hundreds of small ops per layer: see lowbit.quant.threads
        _replace(model, targets, config)
    return model


def _replace(model: nn.Module, targets: list, config: QuantConfig | ConfigFn) -> None:
    replaced: dict[int, nn.Module] = {}  # a module shared by several parents stays shared
    for fqn, linear in targets:
        if id(linear) in replaced:
            _set_submodule(model, fqn, replaced[id(linear)])
            continue
        layer_config = config if isinstance(config, QuantConfig) else config(linear, fqn)
        if layer_config is None:
            continue
        if not isinstance(layer_config, QuantConfig):
            raise TypeError(f"config function returned {type(layer_config).__name__} for {fqn!r}, "
                            "expected QuantConfig or None")
        try:
            kind = LowBitEmbedding if type(linear) is nn.Embedding else LowBitLinear
            replacement = kind.from_float(linear, layer_config)
        except (ValueError, TypeError) as e:
            raise type(e)(f"cannot quantize {fqn!r}: {e}") from e
        replaced[id(linear)] = replacement
        _set_submodule(model, fqn, replacement)


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, name, module)
