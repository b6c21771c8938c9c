"""The CPUs an ahead-of-time artifact can be built for, and the check that this CPU runs one.

The JIT tunes code for the host. An artifact names a target instead; its code is generated
for that target by setting LLVM's per-function `target-cpu` / `target-features` attributes
on every `llvm.func` of the lowered module before the ExecutionEngine compiles it (a
function's attributes replace the engine's host CPU and features for that function, and
OpenMP's outlined bodies inherit them). So the MLIR Python ExecutionEngine itself emits
AVX2-only or SSE2-only objects on an AVX-512 machine; no other code generator is needed.

| target     | LLVM CPU    | needs (/proc/cpuinfo flags)                                   |
|------------|-------------|---------------------------------------------------------------|
| `avx512-bf16` | x86-64-v4 + VNNI + VBMI + BF16 | `avx512`'s + avx512_bf16              |
| `avx512`   | x86-64-v4 + VNNI + VBMI | x86-64-v3's + avx512f/bw/cd/dq/vl, avx512_vnni, avx512vbmi |
| `avx2`     | x86-64-v3   | avx, avx2, bmi1, bmi2, f16c, fma, abm (lzcnt), movbe          |
| `portable` | x86-64      | sse2                                                          |

bf16 <-> fp32 conversions need AVX512-BF16 instructions or compiler-rt's `__truncsfbf2`, which
the ExecutionEngine cannot resolve: bf16 models compile for `avx512-bf16` (the default where the
CPU has it) but not for the other targets (the compile fails, naming the missing symbol).

The runtime's own kernels pick their ISA at run time (`lowbit.runtime.current_isa`), so the
packed weights are the same for every target.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from lowbit.compiler.artifact_format import ArtifactError, IncompatibleArtifactError


@dataclasses.dataclass(frozen=True)
class CodeTarget:
    name: str
    cpu: str
    features: tuple[str, ...]   # LLVM feature string items (never empty: see module docstring)
    requires: tuple[str, ...]   # /proc/cpuinfo flags the code may use


_V3 = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe")
_V4 = _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni", "avx512vbmi")
TARGETS = {
    "avx512-bf16": CodeTarget("avx512-bf16", "x86-64-v4", ("+avx512vnni", "+avx512vbmi", "+avx512bf16"),
                              _V4 + ("avx512_bf16",)),
    "avx512": CodeTarget("avx512", "x86-64-v4", ("+avx512vnni", "+avx512vbmi"), _V4),
    "avx2": CodeTarget("avx2", "x86-64-v3", ("-avx512f",), _V3),
    "portable": CodeTarget("portable", "x86-64", ("-avx",), ("sse2",)),
}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's flags as /proc/cpuinfo lists them (what the kernel enabled)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def missing_features(target: CodeTarget) -> list[str]:
    have = cpu_flags()
    return [f for f in target.requires if f not in have]


def get(name: str) -> CodeTarget:
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        raise ArtifactError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}") from None


def best_for_host() -> CodeTarget:
    for name in ("avx512-bf16", "avx512", "avx2", "portable"):
        if not missing_features(TARGETS[name]):
            return TARGETS[name]
    return TARGETS["portable"]


def check_runs_here(target: CodeTarget, what: str) -> None:
    """IncompatibleArtifactError naming `what` and the missing flags if this CPU cannot run
    code built for `target` (before any of it runs: never SIGILL)."""
    missing = missing_features(target)
    if missing:
        raise IncompatibleArtifactError(
            f"{what}: built for target {target.name!r} ({target.cpu}), but this CPU lacks "
            f"{', '.join(missing)}; rebuild it with --target avx2 or --target portable")


def annotate(target: CodeTarget):
    """A function setting `target`'s CPU and features on every llvm.func of a lowered module.

    The entry is also marked `noinline`: the ExecutionEngine adds the packed wrapper
    `_mlir_<entry>` itself, without these attributes (so for the host CPU), and LLVM may inline
    a callee whose features are a subset of the caller's -- the entry's whole body would then
    be compiled for the host. Kept out of line, the wrapper only loads the argument pointers."""
    def apply(module: Any, entry: str) -> None:
        from torch_mlir import ir

        with module.context:
            cpu = ir.StringAttr.get(target.cpu)
            feats = ir.Attribute.parse("#llvm.target_features<[" + ", ".join(f'"{f}"' for f in target.features) + "]>")
            for op in module.body.operations:
                if op.operation.name == "llvm.func":
                    op.attributes["target_cpu"] = cpu
                    op.attributes["target_features"] = feats
                    if ir.StringAttr(op.attributes["sym_name"]).value == entry:
                        op.attributes["no_inline"] = ir.UnitAttr.get()
    return apply
