"""`TensorSpec`: shape and dtype of a compiled graph's input or output.

Its own module, free of torch-mlir, so that the artifact loader (`lowbit.runtime.artifact`,
through `lowbit.compiler.artifact_format`) reads the same signatures the JIT checks.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a graph input or output. A dim is an int, or (dynamic graphs) a
    sympy expression over the graph's size symbols, e.g. `T` or `2*T`."""

    shape: tuple
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> "TensorSpec":
        return TensorSpec(tuple(t.shape), t.dtype)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def symbols(self) -> set[str]:
        return {str(x) for d in self.shape if not isinstance(d, int) for x in d.free_symbols}

    def __str__(self) -> str:
        return f"{str(self.dtype).replace('torch.', '')}[{', '.join(str(d) for d in self.shape)}]"
