"""The CPU the compiler tiles for: cache sizes and core count.

Read from sysfs at compile time; `LOWBIT_TARGET="l1=48K,l2=1M,l3=32M,cores=2"` (any subset)
overrides it, so tile choices are reproducible on another machine or in tests. The syntax
is parsed and validated by `lowbit.compiler.env` (a bad value raises
`EnvironmentVariableError` naming the variable and the accepted form).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lowbit.compiler import env
from lowbit.compiler.env import parse_size, parse_target_spec  # noqa: F401  (parse_size re-exported)


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
        """``base`` with the fields of ``"l1=48K,l2=1M,l3=32M,cores=2"`` (any subset) replaced;
        ValueError naming the bad item otherwise."""
        try:
            fields = parse_target_spec(spec)
        except ValueError as e:
            raise ValueError(f"bad target description {spec!r}: {e}") from None
        return dataclasses.replace(base or Target(), **fields)


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
    """This machine's caches and cores, with `LOWBIT_TARGET`'s fields replacing them.

    Raises `lowbit.compiler.env.EnvironmentVariableError` for a malformed LOWBIT_TARGET.
    """
    overrides = env.get("LOWBIT_TARGET")
    return dataclasses.replace(Target(**_sysfs_caches(), cores=os.cpu_count() or 1), **overrides)
