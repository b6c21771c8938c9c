"""The compilation pipeline as named stages, each a textual pass pipeline.

    import            FX graph -> torch dialect (lowbit.compiler.frontend)
    lowbit-torch      our passes on torch IR (lowbit.linear -> qlinear functions)
    torch-to-linalg   torch dialect -> linalg on tensors (torch-mlir's backend pipelines)
    lowbit            our passes: recognise, pack, tile and fuse matmuls; vectorize the rest
    bufferize         tensors -> memrefs, results -> out-params, deallocation
    runtime-calls     microkernel dispatch/invoke calls replace what they implement
    lower-to-llvm     runtime calls, OpenMP, LLVM dialect

Every stage after import is a string that `lowbit-opt --pass-pipeline=...` replays, so any
stage can be run, printed and tested alone. `LOWBIT_DUMP_IR=<dir>` writes the IR after every
stage, its files prefixed with a hash of the graph's imported IR (a model's graphs and
regions are compiled one after another and each keeps its own files); a failing stage
raises `StageError` naming the stage, with a reproducer `.mlir` (the
IR before the stage) and the one-line `lowbit-opt` command that replays it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import tempfile
from pathlib import Path

from torch_mlir import ir

from lowbit.compiler.compile_log import counters, progress, timed
from lowbit.compiler.passmanager import LowbitPassManager


class StageError(RuntimeError):
    def __init__(self, stage: str, cause: BaseException, reproducer: Path, command: str):
        self.stage, self.cause, self.reproducer, self.command = stage, cause, reproducer, command
        super().__init__(
            f"lowbit pipeline stage '{stage}' failed: {cause}\n"
            f"  reproducer: {reproducer}\n  replay with: {command}")


@dataclasses.dataclass
class Stage:
    name: str
    passes: list[str]

    @property
    def pipeline(self) -> str:
        return "builtin.module(" + ", ".join(self.passes) + ")"


@dataclasses.dataclass
class CompileOptions:
    """Options that change what the pipeline emits."""

    # Threads for parallel loops in compiled code (0: torch.get_num_threads() at run time).
    num_threads: int = 0
    # Activation handling for low-bit matmuls: "none" keeps the model's fp activations;
    # "int8" opts in to dynamic per-token int8 activation quantization.
    activations: str = "none"
    # Module state: "bind" keeps parameters and buffers runtime inputs and binds recognised
    # low-bit weights as packed buffers (weights are data, not code); "freeze" makes them
    # constants of the compiled code (the earlier design, kept for IR-level tests).
    weights: str = "bind"
    # Structurally identical numbered modules (decoder layers) share one compiled function
    # (lowbit.compiler.regions); with weights bound only.
    regions: bool = True
    # Library weights dequantized in fp16/bf16 (GPTQ, hqq): "dequant-rounding" accepts codes x
    # the model's own scales within that dtype's rounding; "bit-exact" only exact proofs
    # (lowbit.compiler.dequant_match, docs/clients.md).
    dequant_numerics: str = "dequant-rounding"


# Passes on the imported torch dialect, before torch-mlir's pipelines (which reject
# custom ops such as torch.lowbit.linear).
LOWBIT_TORCH = [
    "lowbit-convert-linear-op",
    "lowbit-convert-index-put",
    "lowbit-convert-attention",
]

# torch-mlir's torch -> linalg pipelines, spelled out without the final
# `torch-verify-linalg-on-tensors-backend-contract`: the qlinear calls that
# lowbit-convert-linear-op introduces are outside that contract by design.
TORCH_TO_LINALG = [
    "func.func(torch-match-quantized-custom-ops)",
    "torchdynamo-export-to-torch-backend-pipeline",
    "func.func(torch-restructure-non-constant-axes)",
    "func.func(torch-fuse-quantized-ops)",
    "func.func(convert-torch-to-tmtensor{allow-non-finites=true})",
    "func.func(canonicalize)",
    "func.func(convert-torch-to-linalg{allow-non-finites=true})",
    "func.func(canonicalize)",
    "func.func(convert-torch-to-scf)",
    "func.func(convert-torch-to-arith)",
    "func.func(convert-torch-to-tensor)",
    "convert-torch-conversion-to-mlprogram",
    "func.func(memref-expand)",
    "func.func(canonicalize)",
    "func.func(resolve-shaped-type-result-dims)",
    "func.func(cse)",
    "torch-func-backend-type-conversion",
    "func.func(canonicalize)",
    "func.func(torch-finalizing-backend-type-conversion)",
]

# The lowbit stage: passes over linalg on tensors, in order. Each entry is one pipeline
# element (a lowbit pass with options, or an upstream pass).
LOWBIT_PASSES = [
    # Recognise low-bit matmuls: constant weights that are exactly low-bit (fp or
    # dequantized from packed codes) become qlinear calls, then a verified per-token int8
    # activation quantization around them is absorbed. Before elementwise fusion, which
    # would merge the activation quantization into the matmul's body.
    "lowbit-recognize-lowbit-weights",
    "lowbit-recognize-act-quant",
    # dense fp32/bf16 matmuls: pack constant B, tile into BRGEMM tiles (docs/dense.md).
    # Before elementwise fusion, which otherwise folds transposes, reshapes and even
    # whole activation functions (SiLU, exp) into the matmul's body, so that the body
    # recomputes them per multiply-add and no kernel matches it any more.
    "lowbit-dense-tile",
    "linalg-fuse-elementwise-ops",
    "canonicalize",
    "cse",
    # qlinear functions: merge siblings on one input (q/k/v, gate/up), fold a residual
    # add / activation that directly follows a layer into its kernel epilogue, choose
    # cache tiles, then pack weights for the kernels. Merging goes first: SwiGLU's
    # silu(gate) * up is no epilogue of either, and one call for both matters more; after
    # elementwise fusion, so that what follows a layer is one generic to read.
    "lowbit-merge-sibling-qlinear",
    "lowbit-fuse-qlinear-epilogue",
    "lowbit-tile-qlinear",
    "lowbit-pack-weights",
    # Codegen for everything that is not a matmul (docs/codegen.md); keep after the
    # matmul passes: these tile whatever linalg ops are still left at function level.
    "linalg-fold-unit-extent-dims",
    "lowbit-math-promote-bf16",
    "canonicalize",
    "lowbit-math-approx",
    "lowbit-fuse-parallel",
    "lowbit-vectorize",
    "canonicalize",
    "cse",
]

BUFFERIZE = [
    "lowbit-unique-returns",
    "one-shot-bufferize{bufferize-function-boundaries=1 function-boundary-type-conversion=identity-layout-map}",
    # A strided view passed to a kernel function is cast to the identity layout the kernel
    # computes addresses from: copy it instead (before canonicalize folds the cast away).
    "lowbit-contiguous-call-operands",
    "canonicalize",
    "cse",
    "drop-equivalent-buffer-results",
    "buffer-results-to-out-params{hoist-static-allocs=true modify-public-functions=true}",
    # An updated input returned as a result (a KV cache) is copied to its out-param only
    # when the caller passed a different buffer: the JIT passes the input itself.
    "lowbit-inplace-results",
    "canonicalize",
    "buffer-deallocation-pipeline",
    "canonicalize",
    "cse",
]

# After bufferization: linalg ops and qlinear bodies become microkernel calls.
RUNTIME_CALLS = [
    "lowbit-lower-qlinear",
    "lowbit-lower-attention",
    "lowbit-dense-brgemm-calls",
    # copies left between parallel loops (concatenations, results into out-params) run
    # on every thread; after the lowerings above, whose own copies sit in their loops
    "lowbit-parallel-copy",
    "symbol-dce",
]

LOWER_TO_LLVM = [
    # Integer division, data-dependent loads and per-element asserts set flags that the
    # caller turns into eager's exceptions, instead of trapping or aborting the process.
    "lowbit-guard-traps",
    # Zero-element entry arguments (`memref<5x0xf32>`) keep the bare-pointer convention.
    "lowbit-empty-memref-args",
    "func.func(convert-linalg-to-loops)",
    # scf.forall -> OpenMP (libiomp5 at run time; lowbit.compiler.threads sets the count).
    "scf-forall-to-parallel",
    "convert-scf-to-openmp",
    "lowbit-omp-schedule",
    "func.func(lower-vector-mask)",
    "func.func(lower-vector-multi-reduction)",
    "convert-vector-to-scf",
    "expand-strided-metadata",
    "lower-affine",
    "lowbit-math-approx",
    "func.func(convert-math-to-llvm)",
    "convert-math-to-libm",
    # memref.alloc -> the runtime's caching allocator (runtime/native/src/memref_alloc.cpp)
    "finalize-memref-to-llvm{use-generic-functions=1}",
    "convert-scf-to-cf",
    "lowbit-lower-scalar-transfers",
    "convert-vector-to-llvm{reassociate-fp-reductions=1}",
    "lowbit-legalize-vector-memory",
    "convert-func-to-llvm{use-bare-ptr-memref-call-conv=1}",
    "convert-to-llvm",
    "reconcile-unrealized-casts",
]


def disabled_passes() -> set[str]:
    """Passes named in `LOWBIT_DISABLE_PASSES` (comma separated), left out of the default
    stages -- for measuring what one pass buys (e.g. lowbit-fuse-qlinear-epilogue)."""
    names = {p.strip() for p in os.environ.get("LOWBIT_DISABLE_PASSES", "").split(",") if p.strip()}
    from lowbit.passes.registry import lookup_pass
    unknown = sorted(n for n in names if lookup_pass(n) is None)
    if unknown:
        raise ValueError(f"LOWBIT_DISABLE_PASSES names unknown lowbit passes: {', '.join(unknown)}")
    return names


def default_stages(options: CompileOptions | None = None) -> list[Stage]:
    options = options or CompileOptions()
    skip = disabled_passes()
    lowbit_passes = [p for p in LOWBIT_PASSES if p not in skip]
    if options.activations not in ("none", "int8"):
        raise ValueError(f"activations must be 'none' or 'int8', got {options.activations!r}")
    if options.activations == "int8":
        # The user opted in: low-bit layers found with fp activations quantize them to int8.
        lowbit_passes = [p + "{activations=int8}" if p == "lowbit-recognize-lowbit-weights" else p
                         for p in lowbit_passes]
    def keep(passes):
        return [p for p in passes if p.split("{")[0] not in skip]

    return [
        Stage("lowbit-torch", keep(LOWBIT_TORCH)),
        Stage("torch-to-linalg", keep(TORCH_TO_LINALG)),
        Stage("lowbit", keep(lowbit_passes)),
        Stage("bufferize", keep(BUFFERIZE)),
        Stage("runtime-calls", keep(RUNTIME_CALLS)),
        Stage("lower-to-llvm", keep(LOWER_TO_LLVM)),
    ]


class Pipeline:
    """Runs stages over a module, dumping IR and writing reproducers on failure."""

    def __init__(self, stages: list[Stage] | None = None, options: CompileOptions | None = None,
                 dump_dir: str | os.PathLike | None = None):
        self.options = options or CompileOptions()
        self.stages = stages if stages is not None else default_stages(self.options)
        dump = dump_dir if dump_dir is not None else os.environ.get("LOWBIT_DUMP_IR")
        self.dump_dir = Path(dump) if dump else None
        self._dump_counter = 0
        self.dump_prefix = ""  # set by the first dump: a hash of the module as imported
        self.report: list[dict] = []

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage '{name}' (stages: {[s.name for s in self.stages]})")

    def dump(self, module: ir.Module, stage_name: str, tag: str = "") -> Path | None:
        if self.dump_dir is None:
            return None
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        text = str(module)
        if not self.dump_prefix:
            self.dump_prefix = hashlib.sha256(text.encode()).hexdigest()[:10] + "-"
        path = self.dump_dir / f"{self.dump_prefix}{self._dump_counter:02d}-{stage_name}{tag}.mlir"
        self._dump_counter += 1
        path.write_text(text)
        return path

    def run_stage(self, module: ir.Module, name: str) -> None:
        stage = self.stage(name)
        before = str(module)
        try:
            with timed(f"stage {stage.name}"):
                LowbitPassManager(stage.pipeline, module.context).run(module)
        except Exception as e:
            raise self._stage_error(stage, before, e) from e
        self.dump(module, stage.name)
        if stage.name == "runtime-calls":
            from lowbit.compiler.report import collect_report
            self.report = collect_report(module)

    def run(self, module: ir.Module, start: str | None = None, stop: str | None = None) -> ir.Module:
        """Run stages from `start` through `stop` (inclusive; default: all)."""
        names = [s.name for s in self.stages]
        lo = names.index(start) if start else 0
        hi = names.index(stop) if stop else len(names) - 1
        counters["pipelines"] += 1
        for name in progress(names[lo:hi + 1], "lowbit: compiling"):
            self.run_stage(module, name)
        return module

    def _stage_error(self, stage: Stage, before: str, cause: BaseException) -> StageError:
        directory = self.dump_dir or Path(tempfile.mkdtemp(prefix="lowbit-repro-"))
        directory.mkdir(parents=True, exist_ok=True)
        repro = directory / f"repro-{stage.name}.mlir"
        repro.write_text(before)
        cmd = f"lowbit-opt {shlex.quote(str(repro))} --pass-pipeline={shlex.quote(stage.pipeline)}"
        return StageError(stage.name, cause, repro, cmd)
