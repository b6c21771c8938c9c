"""Every ``LOWBIT_*`` environment variable: what it does, what it accepts, one parser each.

This module is the one place that reads and validates lowbit's environment. Each variable
has a parser; :func:`get` parses the current value (cached per raw value, so a value is
validated once) and raises :class:`EnvironmentVariableError` -- a ``ValueError`` whose
message names the variable, its value and the accepted values -- instead of letting a bad
value fail somewhere deep inside a compile (a malformed ``LOWBIT_TARGET`` used to surface
as "invalid literal for int() with base 10: 'ABC'" and send the whole graph to eager) or
abort the process (``LOWBIT_NUM_THREADS=99999``: libiomp5's ``OMP: Error #34`` at the first
compiled call). :func:`validate` checks every variable lowbit reads at compile or run time;
lowbit's backend entry is meant to call it before compiling, outside its eager fallback
(``target.host_target`` and ``threads`` already read through :func:`get`). ``python -m lowbit.compiler.env`` prints the table
and checks the current environment.

Variables read by native code (``LOWBIT_ISA``, ``LOWBIT_ALLOC_CACHE_MB``) are validated
here too, with the rules the native side applies; build-time and benchmark variables are
listed for reference (``validate`` skips them).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["EnvironmentVariableError", "VARIABLES", "Variable", "describe", "get", "max_num_threads",
           "parse_size", "parse_target_spec", "validate"]


class EnvironmentVariableError(ValueError):
    """A ``LOWBIT_*`` variable holds a value outside what it accepts (the message names both)."""


class _Reject(Exception):
    """Raised by a parser: why the value is not accepted (wrapped with the variable's name)."""


@dataclasses.dataclass(frozen=True)
class Variable:
    name: str
    accepted: str                          # the accepted values, for messages and docs
    doc: str                               # what it does
    parse: Callable[[str], Any]            # raw (stripped, non-empty) -> value; raises _Reject
    default: Any = None                    # value when unset or empty
    when: str = "compile/run"              # "compile/run" (validated), "build" or "benchmarks"


# --------------------------------------------------------------------------- parsers
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?", re.IGNORECASE)
#: Cache sizes above this are typos (1 TiB).
_MAX_SIZE = 1 << 40
_TARGET_KEYS = {"l1": "l1d", "l1d": "l1d", "l2": "l2", "l3": "l3", "cores": "cores"}
_MAX_CORES = 1 << 16


def parse_size(text: str) -> int:
    """Bytes of ``"48K"``, ``"1M"``, ``"1.5MiB"``, ``"32768"``; ValueError naming the text otherwise."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text.strip()!r} is not a size (a number with an optional K, M or G suffix, "
                         "e.g. 48K, 1M, 1.5M)")
    value = int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if not 0 < value <= _MAX_SIZE:
        raise ValueError(f"size {text.strip()!r} must be > 0 and at most 1 TiB")
    return value


def parse_target_spec(spec: str) -> dict[str, int]:
    """``"l1=48K,l2=1M,l3=32M,cores=2"`` (any subset, each key once) -> ``{"l1d": .., "cores": ..}``."""
    out: dict[str, int] = {}
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key.lower() not in _TARGET_KEYS:
            raise ValueError(f"bad item {item!r}: expected key=value with key one of l1, l2, l3, cores")
        field = _TARGET_KEYS[key.lower()]
        if field in out:
            raise ValueError(f"{key} is given twice")
        if field == "cores":
            if not re.fullmatch(r"\d+", value) or not 0 < int(value) <= _MAX_CORES:
                raise ValueError(f"cores={value!r} must be an integer in [1, {_MAX_CORES}]")
            out[field] = int(value)
        else:
            out[field] = parse_size(value)
    return out


def _target(raw: str) -> dict[str, int]:
    try:
        return parse_target_spec(raw)
    except ValueError as e:
        raise _Reject(str(e)) from None


@functools.lru_cache(maxsize=None)
def max_num_threads() -> int:
    """The largest accepted thread count: max(1024, 4 x the CPUs of this machine).

    libiomp5 itself accepts any count (its thread limit is INT_MAX) and aborts the process
    (``OMP: Error #34 ... Resource temporarily unavailable``) when creating the threads
    fails: measured on a 2-CPU machine, 16384 threads started, 32768 and 99999 aborted
    (kernel.pid_max = 32768). No CPU lowbit targets gains from more than a few threads per
    core, so the bound sits far below where thread creation fails.
    """
    return max(1024, 4 * (os.cpu_count() or 1))


def _num_threads(raw: str) -> int | None:
    if not re.fullmatch(r"[+]?\d+", raw):
        raise _Reject("not a non-negative integer")
    n = int(raw)
    if n > max_num_threads():
        raise _Reject(f"{n} threads is more than the maximum {max_num_threads()} (OpenMP would abort "
                      "the process creating them)")
    return n or None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise _Reject("not a boolean")


def _dump_dir(raw: str) -> Path:
    path = Path(raw).expanduser()
    if path.exists() and not path.is_dir():
        raise _Reject("exists and is not a directory")
    return path


def _pass_names(raw: str) -> frozenset[str]:
    names = frozenset(p.strip() for p in raw.split(",") if p.strip())
    from lowbit.passes.registry import lookup_pass
    unknown = sorted(n for n in names if lookup_pass(n) is None)
    if unknown:
        raise _Reject(f"unknown lowbit pass(es) {', '.join(unknown)} (lowbit-opt --list-passes lists them)")
    return names


def _cache_mb(raw: str) -> int:
    # The native allocator reads this with atol(): "abc" or "-5" silently disabled the cache.
    if not re.fullmatch(r"[+]?\d+", raw) or int(raw) > (1 << 20):
        raise _Reject("not an integer in [0, 1048576]")
    return int(raw)


_ISAS = ("scalar", "avx2", "avx512", "amx")


def _isa(raw: str) -> str:
    # Syntax only; whether this CPU (and build) has the ISA is lowbit.runtime's check.
    if raw.lower() not in _ISAS:
        raise _Reject("not an ISA lowbit knows")
    return raw.lower()


def _log(raw: str) -> str:
    if raw.lower() not in ("compile", "info", "debug"):
        raise _Reject("not a log selection")
    return raw.lower()


def _cache_size(raw: str) -> int:
    # The rules of compile_cache.max_bytes: a number with an optional K/M/G/T (KiB, MB...) suffix.
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = raw.upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in units else ""
    try:
        value = int(float(text[:len(text) - len(unit)]) * units[unit])
    except ValueError:
        value = -1
    if value < 0:
        raise _Reject("not a size")
    return value


def _existing_file(raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_file():
        raise _Reject("no such file")
    return path


def _any_path(raw: str) -> Path:
    return Path(raw).expanduser()


def _build_type(raw: str) -> str:
    if raw not in ("Release", "Debug", "RelWithDebInfo", "MinSizeRel"):
        raise _Reject("not a CMake build type")
    return raw


def _text(raw: str) -> str:
    return raw


VARIABLES: dict[str, Variable] = {v.name: v for v in (
    Variable("LOWBIT_TARGET", "comma-separated l1=SIZE, l2=SIZE, l3=SIZE, cores=N (any subset, each once; "
             "SIZE like 48K, 1M, 32M)",
             "overrides the cache sizes / core count read from sysfs that tiling uses", _target, {}),
    Variable("LOWBIT_NUM_THREADS", f"an integer in [0, max(1024, 4 x CPUs)] (0 or unset: follow "
             "torch.get_num_threads())",
             "threads of compiled code (OpenMP)", _num_threads),
    Variable("LOWBIT_ISA", "scalar, avx2, avx512, amx (case-insensitive)",
             "forces the microkernel ISA (checked against the CPU by lowbit.runtime; amx = AVX-512 "
             "plus AMX-INT8 tiles for int8 GEMMs of >= 8 rows and K-blocks of >= 64)", _isa),
    Variable("LOWBIT_DUMP_IR", "a directory (created if missing)", "writes the IR after every pipeline stage, one set of files per graph",
             _dump_dir),
    Variable("LOWBIT_REPORT", "1/true/yes/on or 0/false/no/off", "prints the report of every compiled graph",
             _flag, False),
    Variable("LOWBIT_DISABLE_PASSES", "comma-separated lowbit pass names",
             "leaves those passes out of the default pipeline", _pass_names, frozenset()),
    Variable("LOWBIT_LOG", "compile, info or debug (case-insensitive)",
             "logs compile timings (compile) or every lowbit logger at INFO/DEBUG to stderr", _log),
    Variable("LOWBIT_COMPILE_WORKER", "1/true/yes/on or 0/false/no/off (default on)",
             "runs the MLIR pipeline in a worker process, so that a crash inside MLIR becomes an eager "
             "fallback instead of killing the process (off: in-process, no isolation)", _flag, True),
    Variable("LOWBIT_REPLAY", "1/true/yes/on or 0/false/no/off (default on)",
             "replay a compiled program's native calls in one runtime call when it is nothing but "
             "them (runtime/replay.py)", _flag, True),
    Variable("LOWBIT_CACHE", "1/true/yes/on or 0/false/no/off (default on)",
             "the persistent compile cache of backend='lowbit' (compiler/compile_cache.py)", _flag, True),
    Variable("LOWBIT_CACHE_DIR", "a directory (created if missing; default $XDG_CACHE_HOME/lowbit or "
             "~/.cache/lowbit)", "where the persistent compile cache lives", _dump_dir),
    Variable("LOWBIT_CACHE_SIZE", "a size such as 500M or 2G (K/M/G/T suffixes; default 2G)",
             "bound of the persistent compile cache (least recently used entries are removed)", _cache_size,
             2 << 30),
    Variable("LOWBIT_ALLOC_CACHE_MB", "an integer in [0, 1048576] (default 1024; 0 disables the cache)",
             "size of the native runtime's buffer cache", _cache_mb, 1024),
    Variable("LOWBIT_RUNTIME_LIB", "path of an existing liblowbit_runtime shared library",
             "loads this runtime library instead of the packaged one", _existing_file),
    Variable("LOWBIT_OPENMP_LIB", "path of an existing OpenMP runtime (libiomp5 / libomp)",
             "loads this OpenMP runtime instead of the packaged libiomp5", _existing_file),
    Variable("LOWBIT_BUILD_TYPE", "Release, Debug, RelWithDebInfo, MinSizeRel",
             "CMake build type of the native runtime (setup.py)", _build_type, "Release", when="build"),
    Variable("LOWBIT_SANITIZE", "a -fsanitize= list, e.g. address,undefined",
             "builds the native runtime with sanitizers (setup.py)", _text, when="build"),
    Variable("LOWBIT_BENCH_CACHE", "a directory", "cache of benchmarks/e2e.py", _any_path, when="benchmarks"),
    Variable("LOWBIT_LLAMACPP_VENV", "a directory", "llama.cpp virtual environment of benchmarks/e2e.py",
             _any_path, when="benchmarks"),
    Variable("LOWBIT_BENCH_ATTN_UNITS", "'heads' or unset", "set by benchmarks/attention.py for a worker "
             "that lowers attention one head per work unit (the before side of an A/B)", _text,
             when="benchmarks"),
)}

_parsed: dict[tuple[str, str], Any] = {}


def get(name: str) -> Any:
    """The parsed value of ``name`` now (its default when unset or blank).

    Raises EnvironmentVariableError naming the variable, its value and the accepted values.
    """
    var = VARIABLES[name]
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return var.default
    key = (name, raw)
    if key in _parsed:
        return _parsed[key]
    try:
        value = var.parse(raw.strip())
    except _Reject as e:
        raise EnvironmentVariableError(f"{name}={raw!r} is not valid: {e}. Accepted: {var.accepted}") from None
    _parsed[key] = value
    return value


def validate(names: list[str] | None = None) -> dict[str, Any]:
    """Parse every compile/run-time variable (or ``names``); the values, or the first error."""
    names = names if names is not None else [n for n, v in VARIABLES.items() if v.when == "compile/run"]
    return {n: get(n) for n in names}


def describe() -> str:
    """A markdown table of every variable."""
    rows = ["| variable | when | accepted | what |", "|---|---|---|---|"]
    for v in VARIABLES.values():
        rows.append(f"| `{v.name}` | {v.when} | {v.accepted} | {v.doc} |")
    return "\n".join(rows)


def _main() -> int:
    print(describe())
    try:
        values = validate()
    except EnvironmentVariableError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    set_now = {n: v for n, v in values.items() if os.environ.get(n, "").strip()}
    print("\ncurrent environment: " + (", ".join(f"{n}={v!r}" for n, v in set_now.items()) or "no LOWBIT_* set"))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
