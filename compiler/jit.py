"""JIT execution of a lowered module through the MLIR ExecutionEngine.

The entry point is compiled with the bare-pointer memref calling convention (shapes are
static), so a call is: check the inputs against the compiled signature, allocate the
outputs with torch, write data pointers into a preallocated argument array, and make one
ctypes call. Inputs and outputs are shared with torch, never copied, except that a
non-contiguous input is made contiguous first (compiled code assumes identity layout).
"""
from __future__ import annotations

import ctypes
from typing import Sequence

import torch
from torch_mlir import ir
from torch_mlir.execution_engine import ExecutionEngine

from lowbit.compiler.frontend import TensorSpec
from lowbit.compiler.threads import configure as configure_threads
from lowbit.runtime.library import load_openmp, load_runtime, openmp_library_path, runtime_library_path


class InputError(TypeError):
    """A compiled function was called with inputs that do not match its signature."""


def _shared_libs() -> list[str]:
    load_openmp()
    load_runtime()
    libs = [str(runtime_library_path())]
    omp = openmp_library_path()
    if omp is not None:
        libs.append(str(omp))
    return libs


class JitFunction:
    """A JIT-compiled entry `func(inputs..., outputs...)` over bare data pointers."""

    def __init__(self, module: ir.Module, func_name: str, input_specs: Sequence[TensorSpec],
                 output_specs: Sequence[TensorSpec], opt_level: int = 3):
        self.func_name = func_name
        self.input_specs = list(input_specs)
        self.output_specs = list(output_specs)
        self.engine = ExecutionEngine(module, opt_level=opt_level, shared_libs=_shared_libs())
        self.engine.initialize()
        n = len(self.input_specs) + len(self.output_specs)
        # `_mlir_<name>(void **args)`: args[i] points at the i-th argument's storage.
        self._storage = (ctypes.c_void_p * max(n, 1))()
        base = ctypes.addressof(self._storage)
        size = ctypes.sizeof(ctypes.c_void_p)
        self._packed = (ctypes.c_void_p * max(n, 1))(*[base + i * size for i in range(n)])
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(self.engine.raw_lookup(func_name))
        self._expected = [(torch.Size(s.shape), s.dtype) for s in self.input_specs]
        self._outputs = [(torch.Size(s.shape), s.dtype) for s in self.output_specs]
        self._n_in = len(self.input_specs)

    def _mismatch(self, i: int, t) -> InputError:
        spec = self.input_specs[i]
        if not isinstance(t, torch.Tensor):
            return InputError(f"input {i}: expected a tensor {spec}, got {type(t).__name__}")
        if not t.is_cpu:
            return InputError(f"input {i}: expected a CPU tensor, got device '{t.device}'")
        if t.dtype != spec.dtype:
            return InputError(f"input {i}: expected dtype {spec.dtype}, got {t.dtype} "
                              "(a new dtype needs a new compilation)")
        if t.dim() != len(spec.shape):
            return InputError(f"input {i}: expected rank {len(spec.shape)} (shape {list(spec.shape)}), "
                              f"got rank {t.dim()} (shape {list(t.shape)})")
        return InputError(f"input {i}: expected shape {list(spec.shape)}, got {list(t.shape)}")

    def check_inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The inputs as the compiled code reads them (contiguous), or `InputError`."""
        if len(inputs) != self._n_in:
            raise InputError(f"expected {self._n_in} tensor inputs, got {len(inputs)}")
        fixed = list(inputs)
        for i, (t, (shape, dtype)) in enumerate(zip(inputs, self._expected)):
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.shape != shape or not t.is_cpu:
                raise self._mismatch(i, t)
            if not t.is_contiguous():
                # Compiled code assumes the identity layout; a strided view is copied once.
                fixed[i] = t.contiguous()
        return fixed

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        inputs = self.check_inputs(inputs)
        outputs = [torch.empty(shape, dtype=dtype) for shape, dtype in self._outputs]
        return self.call_unchecked(inputs, outputs)

    def call_unchecked(self, inputs: Sequence[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Call with inputs already checked; `outputs` are written in place."""
        storage = self._storage
        i = 0
        for t in inputs:
            storage[i] = t.data_ptr()
            i += 1
        for t in outputs:
            storage[i] = t.data_ptr()
            i += 1
        configure_threads()  # compiled parallel loops run on libiomp5 with torch's thread count
        self._fn(self._packed)
        return outputs

    def dump_object(self, path: str) -> None:
        self.engine.dump_to_object_file(path)
