"""The low-bit formats: value sets, code assignment and the layout of one quantized linear.

Everything here is plain data. `docs/formats.md` is the prose version of this module;
the two must agree (the tests check the tables against each other where they can).

Vocabulary (used throughout `lowbit.quant`):

* ``q``     -- the integer weight value, int8 tensor ``[N, K]`` (N = out features, K = in).
* ``code``  -- the unsigned storage code of ``q`` (its index in the format's sorted value set).
* ``s``     -- fp32 scale, ``z`` -- integer zero point (asymmetric formats only).
* group     -- ``G`` consecutive input features sharing one ``(s, z)``; the last group of a
  row may be shorter when K is not a multiple of G (see :func:`LowBitSpec.num_groups`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class WeightFormat:
    """One weight format: its sorted integer value set, storage bits and scale rule."""

    name: str
    bits: int
    values: tuple[int, ...]
    asymmetric: bool

    @property
    def qmin(self) -> int:
        return self.values[0]

    @property
    def qmax(self) -> int:
        return self.values[-1]

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def num_codes(self) -> int:
        """Number of valid codes; codes >= this are corrupt data."""
        return len(self.values)

    def code_to_value_table(self) -> torch.Tensor:
        """int8 table mapping every possible code (0 .. 2**bits - 1) to its value q.

        Invalid codes (e.g. ternary code 3) map to 0; callers reject them beforehand.
        """
        table = torch.zeros(1 << self.bits, dtype=torch.int16)
        table[: self.num_codes] = torch.tensor(self.values, dtype=torch.int16)
        return table.to(torch.int8)

    def value_to_code_table(self) -> torch.Tensor:
        """int16 table indexed by ``q - qmin``; entries for values outside the set are -1."""
        table = torch.full((self.qmax - self.qmin + 1,), -1, dtype=torch.int16)
        for code, value in enumerate(self.values):
            table[value - self.qmin] = code
        return table


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("ternary", 2, (-1, 0, 1), asymmetric=False),
        WeightFormat("int1", 1, (-1, 1), asymmetric=False),
        WeightFormat("int2_sym", 2, (-2, -1, 0, 1), asymmetric=False),
        WeightFormat("int2_asym", 2, (0, 1, 2, 3), asymmetric=True),
        WeightFormat("int4_sym", 4, tuple(range(-8, 8)), asymmetric=False),
        WeightFormat("int4_asym", 4, tuple(range(0, 16)), asymmetric=True),
        WeightFormat("int8", 8, tuple(range(-128, 128)), asymmetric=False),
    )
}

#: Short names accepted by :class:`lowbit.QuantConfig`; the op and all metadata use canonical names.
WEIGHT_FORMAT_ALIASES = {"int2": "int2_asym", "int4": "int4_sym", "binary": "int1"}

# "int8_unit": the model quantized the activations itself (they hold integers in [-128, 127],
# e.g. a cast from int8); the kernels take them as int8 with scale 1 and the model rescales.
ACTIVATION_FORMATS = ("none", "int8", "int8_unit")
GRANULARITIES = ("tensor", "channel", "group")

#: Group sizes must be a positive multiple of this, so every group starts on a byte
#: boundary of the packed row for every format (1-bit packs 8 codes per byte).
GROUP_SIZE_MULTIPLE = 8

#: Floor applied to every weight scale, so all-zero groups quantize to q = 0 (or z).
WEIGHT_SCALE_EPS = 1e-8
#: Floor on max|x| in int8 activation quantization (BitNet a8).
ACT_ABSMAX_EPS = 1e-5


def canonical_weight_format(name: str) -> str:
    """Canonical format name for ``name`` (resolving aliases); ValueError if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"weight format must be a str, got {type(name).__name__}")
    name = WEIGHT_FORMAT_ALIASES.get(name, name)
    if name not in WEIGHT_FORMATS:
        known = sorted(WEIGHT_FORMATS) + sorted(WEIGHT_FORMAT_ALIASES)
        raise ValueError(f"unknown weight format {name!r}; known formats: {', '.join(known)}")
    return name


def get_weight_format(name: str) -> WeightFormat:
    """The :class:`WeightFormat` called ``name`` (aliases accepted)."""
    return WEIGHT_FORMATS[canonical_weight_format(name)]


@dataclass(frozen=True)
class LowBitSpec:
    """Everything the op needs to interpret a quantized linear, besides its tensors.

    These seven fields are exactly the non-tensor attributes of ``torch.ops.lowbit.linear``
    (in :meth:`op_attributes` order) and the per-layer metadata saved with a checkpoint.

    ``group_size`` is 0 unless ``granularity == "group"``; ``act_group_size`` is 0 for one
    activation scale per token, else the K-block size of per-block activation scales.
    """

    weight_format: str
    granularity: str
    group_size: int
    in_features: int
    out_features: int
    act_format: str = "none"
    act_group_size: int = 0

    def __post_init__(self) -> None:
        fmt = canonical_weight_format(self.weight_format)
        object.__setattr__(self, "weight_format", fmt)
        for field in ("group_size", "in_features", "out_features", "act_group_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{field} must be an int, got {value!r}")
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {self.in_features}, {self.out_features}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "tensor" and fmt != "ternary":
            raise ValueError(f"per-tensor scales are only defined for ternary weights, not {fmt}")
        if self.granularity == "group":
            _check_group_size("group_size", self.group_size)
        elif self.group_size != 0:
            raise ValueError(
                f"group_size must be 0 for granularity {self.granularity!r}, got {self.group_size}")
        if self.act_format not in ACTIVATION_FORMATS:
            raise ValueError(f"activation format must be one of {ACTIVATION_FORMATS}, got {self.act_format!r}")
        if self.act_group_size != 0:
            if self.act_format != "int8":
                raise ValueError("act_group_size is only meaningful with int8 activations")
            _check_group_size("act_group_size", self.act_group_size)

    @property
    def format(self) -> WeightFormat:
        return WEIGHT_FORMATS[self.weight_format]

    @property
    def group_width(self) -> int:
        """Number of input features per scale group (K for tensor/channel granularity)."""
        return self.group_size if self.granularity == "group" else self.in_features

    @property
    def num_groups(self) -> int:
        """Scale groups per row: ``ceil(K / G)``; the last one holds ``K - (num_groups-1)*G``."""
        return -(-self.in_features // self.group_width)

    @property
    def scale_shape(self) -> tuple[int, int]:
        if self.granularity == "tensor":
            return (1, 1)
        return (self.out_features, self.num_groups)

    @property
    def zero_point_shape(self) -> tuple[int, int] | None:
        return self.scale_shape if self.format.asymmetric else None

    @property
    def packed_shape(self) -> tuple[int, int]:
        return (self.out_features, packed_row_bytes(self.in_features, self.format))

    def op_attributes(self) -> tuple[str, str, int, int, int, str, int]:
        """The non-tensor arguments of ``torch.ops.lowbit.linear``, in schema order."""
        return (self.weight_format, self.granularity, self.group_size, self.in_features,
                self.out_features, self.act_format, self.act_group_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LowBitSpec":
        if not isinstance(data, dict):
            raise ValueError(f"lowbit layer metadata must be a JSON object, got {data!r}")
        expected = set(cls.__dataclass_fields__)
        if set(data) != expected:
            raise ValueError(
                f"lowbit layer metadata has keys {sorted(data)}, expected {sorted(expected)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """Short human-readable form, e.g. ``ternary/tensor a=int8``."""
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        act = self.act_format if self.act_group_size == 0 else f"{self.act_format}/block{self.act_group_size}"
        return f"{self.weight_format}/{gran} a={act}"


def packed_row_bytes(k: int, fmt: WeightFormat) -> int:
    """Bytes per packed row: ``ceil(K * bits / 8)``."""
    return -(-k * fmt.bits // 8)


def _check_group_size(name: str, value: int) -> None:
    if value < GROUP_SIZE_MULTIPLE or value % GROUP_SIZE_MULTIPLE:
        raise ValueError(
            f"{name} must be a positive multiple of {GROUP_SIZE_MULTIPLE} "
            f"(e.g. 32, 64, 128, 256), got {value}")
