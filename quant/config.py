"""`QuantConfig`: what a user asks for; it resolves to a :class:`LowBitSpec` per layer."""
from __future__ import annotations

from dataclasses import dataclass

from .formats import LowBitSpec, canonical_weight_format


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a linear layer.

    Args:
        weights: weight format: "ternary", "int1", "int2_asym" (alias "int2"), "int2_sym",
            "int4_sym" (alias "int4"), "int4_asym" or "int8".
        activations: "none" (weight-only; fp32/bf16 activations) or "int8" (BitNet a8,
            dynamic per-token absmax).
        group_size: scales per group of this many consecutive input features (a positive
            multiple of 8, e.g. 32/64/128/256). None: no groups, see ``granularity``.
        granularity: "tensor" (ternary only), "channel" or "group". Default: "group" when
            ``group_size`` is set, else "tensor" for ternary (BitNet b1.58) and "channel" for
            every other format.
        act_group_size: with int8 activations, one activation scale per block of this many
            input features instead of one per token.
        detect_exact: when quantizing float weights, first check whether they already are
            exactly representable in the format (e.g. a ternary QAT export) and if so store
            that representation losslessly instead of re-quantizing.
    """

    weights: str = "ternary"
    activations: str = "none"
    group_size: int | None = None
    granularity: str | None = None
    act_group_size: int | None = None
    detect_exact: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", canonical_weight_format(self.weights))
        granularity = self.granularity
        if granularity is None:
            if self.group_size is not None:
                granularity = "group"
            else:
                granularity = "tensor" if self.weights == "ternary" else "channel"
        elif self.group_size is not None and granularity != "group":
            raise ValueError(f"group_size={self.group_size} conflicts with granularity={granularity!r}")
        if granularity == "group" and self.group_size is None:
            raise ValueError("granularity='group' needs a group_size")
        object.__setattr__(self, "granularity", granularity)
        if not isinstance(self.detect_exact, bool):
            raise TypeError(f"detect_exact must be a bool, got {self.detect_exact!r}")
        self.spec_for(1, 1)  # validates the remaining fields

    def spec_for(self, in_features: int, out_features: int) -> LowBitSpec:
        """The :class:`LowBitSpec` of a ``Linear(in_features, out_features)`` under this config."""
        return LowBitSpec(
            weight_format=self.weights,
            granularity=self.granularity,
            group_size=self.group_size or 0,
            in_features=in_features,
            out_features=out_features,
            act_format=self.activations,
            act_group_size=self.act_group_size or 0,
        )

    @classmethod
    def from_spec(cls, spec: LowBitSpec) -> "QuantConfig":
        return cls(
            weights=spec.weight_format,
            activations=spec.act_format,
            group_size=spec.group_size or None,
            granularity=spec.granularity,
            act_group_size=spec.act_group_size or None,
        )
