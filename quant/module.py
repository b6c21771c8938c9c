"""`LowBitLinear`: an ``nn.Linear`` replacement holding packed low-bit weights."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import op as _op  # noqa: F401  (registers torch.ops.lowbit.linear)
from .config import QuantConfig
from .formats import LowBitSpec
from .packing import check_packed_tensor, pack_codes, unpack_codes
from .quantizers import (
    QuantizedWeight,
    check_weight_tensors,
    dequantize_weight,
    exact_representation,
    quantize_weight,
)

_EXTRA_STATE_VERSION = 1


class LowBitLinear(nn.Module):
    """``y = x @ W^T + bias`` with W stored packed (see docs/formats.md).

    Buffers (all in ``state_dict``): ``packed`` uint8 ``[N, ceil(K*bits/8)]``, ``scales`` fp32,
    ``zero_points`` int8 (asymmetric formats only), ``bias`` fp32 (if any). The format itself
    travels in the module's extra state, so loading a state dict of another format fails
    instead of silently reinterpreting the bytes. Inference only (no autograd).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: QuantConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else QuantConfig()
        spec = config.spec_for(in_features, out_features)
        self._spec = spec
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("packed", torch.zeros(spec.packed_shape, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(spec.scale_shape, dtype=torch.float32))
        zp_shape = spec.zero_point_shape
        self.register_buffer("zero_points", None if zp_shape is None else torch.zeros(zp_shape, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self.register_load_state_dict_post_hook(_validate_after_load)

    @property
    def spec(self) -> LowBitSpec:
        return self._spec

    @property
    def config(self) -> QuantConfig:
        return QuantConfig.from_spec(self._spec)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` must not cast the quantized state: scales
        # and bias are fp32 by the format (a bf16 round trip would change the weights), and
        # the layer already takes and returns any float activation dtype. Device moves apply.
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype != torch.float32:
                return t.to(device=out.device)
            return out

        return super()._apply(keep_fp32, recurse)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_spec(cls, spec: LowBitSpec, bias: bool = True) -> "LowBitLinear":
        """An (all-zero) module for ``spec``, e.g. to load a checkpoint into."""
        return cls(spec.in_features, spec.out_features, bias, QuantConfig.from_spec(spec))

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig | None = None) -> "LowBitLinear":
        """Quantize an ``nn.Linear`` (fp32/bf16/fp16 weights) under ``config``.

        With ``config.detect_exact`` (default), weights that are already exactly
        representable in the format are stored losslessly (see :func:`exact_representation`).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        config = config if config is not None else QuantConfig()
        spec = config.spec_for(linear.in_features, linear.out_features)
        qw = exact_representation(linear.weight, spec) if config.detect_exact else None
        if qw is None:
            qw = quantize_weight(linear.weight, spec)
        return cls._from_quantized_weight(spec, qw, linear.bias)

    @classmethod
    def from_lowbit_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          config: QuantConfig | None = None) -> "LowBitLinear":
        """Store a float weight that is *already* low-bit (e.g. ternary x scale) losslessly.

        Raises ValueError if ``weight`` is not exactly representable in the format with the
        config's scale granularity.
        """
        config = config if config is not None else QuantConfig()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D float tensor [out_features, in_features]")
        spec = config.spec_for(weight.shape[1], weight.shape[0])
        qw = exact_representation(weight, spec)
        if qw is None:
            raise ValueError(f"weight is not exactly representable as {spec.describe()}: its values "
                             f"are not q * s with q in {list(spec.format.values)} per scale group")
        return cls._from_quantized_weight(spec, qw, bias)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, scales: torch.Tensor,
                       zero_points: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                       config: QuantConfig, in_features: int | None = None) -> "LowBitLinear":
        """Build a module from already-quantized tensors.

        ``weight`` is either the packed uint8 tensor ``[N, ceil(K*bits/8)]`` (then
        ``in_features`` is required) or an integer tensor of values ``q[N, K]`` of any other
        integer dtype. ``scales``/``zero_points`` must have the exact shapes and dtypes of
        docs/formats.md. Everything is validated; bad data raises ValueError/TypeError.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor (packed uint8 or integer values q[N, K])")
        if weight.dtype.is_floating_point:
            raise TypeError(f"from_quantized takes integer weights, got {weight.dtype}; "
                            "for float tensors holding low-bit values use from_lowbit_float")
        n = weight.shape[0]
        if weight.dtype == torch.uint8:
            if in_features is None:
                raise ValueError("in_features is required when weight is packed (uint8)")
            spec = config.spec_for(in_features, n)
            check_packed_tensor(weight, spec.format, in_features, n)
            q = unpack_codes(weight, spec.format, in_features)
        else:
            if in_features is not None and in_features != weight.shape[1]:
                raise ValueError(f"in_features={in_features} does not match q of shape {list(weight.shape)}")
            spec = config.spec_for(weight.shape[1], n)
            q = weight
        check_weight_tensors(scales, zero_points, spec)
        return cls._from_quantized_weight(spec, QuantizedWeight(q, scales, zero_points), bias)

    @classmethod
    def _from_quantized_weight(cls, spec: LowBitSpec, qw: QuantizedWeight,
                               bias: torch.Tensor | None) -> "LowBitLinear":
        packed = pack_codes(qw.q, spec.format)  # range-checks q
        module = cls.from_spec(spec, bias=bias is not None)
        module.packed.copy_(packed)
        module.scales.copy_(qw.scales)
        if qw.zero_points is not None:
            module.zero_points.copy_(qw.zero_points)
        if bias is not None:
            if tuple(bias.shape) != (spec.out_features,) or not bias.dtype.is_floating_point:
                raise ValueError(f"bias must be a float tensor of shape [{spec.out_features}], "
                                 f"got {list(bias.shape)} {bias.dtype}")
            module.bias.copy_(bias.detach().to(torch.float32))
        return module

    # ----------------------------------------------------------------- use
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lowbit.linear(x, self.packed, self.scales, self.zero_points, self.bias,
                                       *self._spec.op_attributes())

    def int_weight(self) -> torch.Tensor:
        """The integer values ``q`` (int8 ``[N, K]``), unpacked and validated."""
        return unpack_codes(self.packed, self._spec.format, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``W[N, K]`` as the op's weight-only path defines it."""
        return dequantize_weight(self.int_weight(), self.scales, self.zero_points, self._spec)

    def validate(self) -> None:
        """Check every buffer against the format (shapes, dtypes, codes, padding, scales)."""
        spec = self._spec
        check_packed_tensor(self.packed, spec.format, spec.in_features, spec.out_features)
        unpack_codes(self.packed, spec.format, spec.in_features)
        check_weight_tensors(self.scales, self.zero_points, spec)
        if self.bias is not None and not bool(torch.isfinite(self.bias).all()):
            raise ValueError("bias contains NaN or infinity")

    def extra_repr(self) -> str:
        s = self._spec
        gran = f"group_size={s.group_size}" if s.granularity == "group" else f"granularity={s.granularity}"
        act = s.act_format if not s.act_group_size else f"{s.act_format}, act_group_size={s.act_group_size}"
        return (f"in_features={s.in_features}, out_features={s.out_features}, bias={self.bias is not None}, "
                f"weights={s.weight_format}, {gran}, activations={act}")

    # ----------------------------------------------------------------- state dict
    def get_extra_state(self) -> dict[str, Any]:
        return {"version": _EXTRA_STATE_VERSION, "spec": self._spec.to_dict()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("version") != _EXTRA_STATE_VERSION or "spec" not in state:
            raise ValueError(f"unrecognised LowBitLinear extra state {state!r}")
        saved = LowBitSpec.from_dict(dict(state["spec"]))
        if saved != self._spec:
            raise ValueError(f"state dict holds a {saved.describe()} layer "
                             f"(in={saved.in_features}, out={saved.out_features}) but this module is "
                             f"{self._spec.describe()} (in={self.in_features}, out={self.out_features})")


def _validate_after_load(module: LowBitLinear, incompatible_keys: Any) -> None:
    module.validate()
