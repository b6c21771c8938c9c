"""A 2-bit model written in plain PyTorch, compiled by lowbit: its own packing, no lowbit ops.

The layer stores 2-bit codes packed 4 per byte (first code in the high bits) in a uint8
buffer and dequantizes in forward with shifts, masks, an offset and per-group scales. The
compiler evaluates that subgraph at compile time, proves the weight is exactly int2 x
scale, re-packs it for the microkernels, and prints what it recognised.

    python examples/packed_2bit_model.py
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.compiler.compile import ENTRY, CompiledGraph
from lowbit.compiler.frontend import capture, import_graph
from lowbit.compiler.jit import JitFunction
from lowbit.compiler.pipeline import Pipeline
from lowbit.passes.qlinear import read_report


class Packed2BitLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group: int = 64):
        super().__init__()
        codes = torch.randint(0, 4, (out_features, in_features), dtype=torch.uint8)
        c = codes.view(out_features, -1, 4)
        self.register_buffer("packed", (c[..., 0] << 6) | (c[..., 1] << 4) | (c[..., 2] << 2) | c[..., 3])
        self.register_buffer("scales", torch.rand(out_features, in_features // group) * 0.1 + 0.01)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.packed
        q = torch.stack([(p >> 6) & 3, (p >> 4) & 3, (p >> 2) & 3, p & 3], dim=-1).reshape(p.shape[0], -1)
        w = (q.to(torch.float32) - 2.0) * self.scales.repeat_interleave(self.group, dim=1)
        return F.linear(x, w)


class TinyMLP(nn.Module):
    def __init__(self, d: int = 256, hidden: int = 512):
        super().__init__()
        self.up = Packed2BitLinear(d, hidden)
        self.down = Packed2BitLinear(hidden, d)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


def compile_and_report(model: nn.Module, x: torch.Tensor):
    """Compile model(x) through the full pipeline; also return the recognition report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, (x,))
        pipeline = Pipeline()
        module = import_graph(captured, func_name=ENTRY)
        pipeline.run(module, stop="lowbit")
        report = read_report(module)
        pipeline.run(module, start="bufferize")
        jit = JitFunction(module, ENTRY, captured.input_specs, captured.output_specs)
    # Evidence that recognised layers run in the microkernels: call sites in the final IR.
    report.append({"kind": "kernels", "qgemm_call_sites": str(module).count("call @lowbit_qgemm_invoke")})
    return CompiledGraph(captured, jit, pipeline), report


def main() -> None:
    torch.manual_seed(0)
    model = TinyMLP().eval()
    x = torch.randn(4, 256)
    compiled, report = compile_and_report(model, x)
    print("lowbit recognition report:")
    for entry in report:
        if entry.get("kind") == "matmul":
            print(f"  {entry['shape']:>22}  {entry['result']:<15} {entry.get('format', '')}"
                  f"  origin={entry.get('origin', '')}  {entry.get('reason', '')}")
        if entry.get("kind") == "kernels":
            print(f"  lowbit_qgemm_invoke call sites in the compiled code: {entry['qgemm_call_sites']}")
    y, ref = compiled(x)[0], model(x)
    print(f"max |compiled - eager| = {(y - ref).abs().max().item():.3g}")
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    main()
