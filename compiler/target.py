"""The CPU the compiler tiles for: cache sizes and core count.

Read from sysfs at compile time; `LOWBIT_TARGET="l1=48K,l2=1M,l3=32M,cores=2"` (any subset)
overrides it, so tile choices are reproducible on another machine or in tests.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in _SUFFIX:
        return int(float(text[:-1]) * _SUFFIX[text[-1]])
    return int(text)


@dataclasses.dataclass(frozen=True)
class Target:
    l1d: int = 32 << 10
    l2: int = 1 << 20
    l3: int = 32 << 20
    cores: int = 1

    def describe(self) -> str:
        return f"l1d={self.l1d >> 10}K l2={self.l2 >> 10}K l3={self.l3 >> 20}M cores={self.cores}"

    @staticmethod
    def from_spec(spec: str, base: "Target | None" = None) -> "Target":
        values = dataclasses.asdict(base or Target())
        keys = {"l1": "l1d", "l1d": "l1d", "l2": "l2", "l3": "l3", "cores": "cores"}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in keys:
                raise ValueError(f"bad target description item {item!r}; expected l1=, l2=, l3=, cores=")
            field = keys[key.strip()]
            values[field] = int(value) if field == "cores" else parse_size(value)
        return Target(**values)


def _sysfs_caches() -> dict[str, int]:
    found = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if level == "1" and kind in ("Data", "Unified"):
            found["l1d"] = size
        elif level == "2":
            found["l2"] = size
        elif level == "3":
            found["l3"] = size
    return found


def host_target() -> Target:
    t = Target(**_sysfs_caches(), cores=os.cpu_count() or 1)
    spec = os.environ.get("LOWBIT_TARGET")
    return Target.from_spec(spec, t) if spec else t
