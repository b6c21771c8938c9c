"""A checkpoint from quantization-aware training, stored as ordinary fp32 nn.Linear weights.

Every weight is exactly {-1, 0, +1} x a per-row scale, but nothing in the model says so.
The compiler detects it from the values, converts the layers losslessly to ternary
codes for the microkernels (bias included), keeps the activations in fp32, and prints
what it recognised. The last layer is a plain fp layer and stays on the dense path.

    python examples/qat_ternary_model.py
"""
from __future__ import annotations

import torch
import torch.nn as nn

from packed_2bit_model import compile_and_report


def ternary_(linear: nn.Linear) -> nn.Linear:
    """What a QAT export produces: W = round(clamp(W / s, -1, 1)) * s with s = mean |W| per row."""
    with torch.no_grad():
        s = linear.weight.abs().mean(dim=1, keepdim=True)
        linear.weight.copy_((linear.weight / s).round().clamp(-1, 1) * s)
    return linear


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ternary_(nn.Linear(128, 384)), nn.ReLU(), ternary_(nn.Linear(384, 128)),
                          nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(8, 128)
    compiled, report = compile_and_report(model, x)
    print("lowbit recognition report:")
    for entry in report:
        if entry.get("kind") == "matmul":
            print(f"  {entry['shape']:>18}  {entry['result']:<15} {entry.get('format', '')}"
                  f"  bias={entry.get('bias', '-')}  {entry.get('reason', '')[:90]}")
        if entry.get("kind") == "kernels":
            print(f"  lowbit_qgemm_invoke call sites in the compiled code: {entry['qgemm_call_sites']}")
    y, ref = compiled(x)[0], model(x)
    print(f"max |compiled - eager| = {(y - ref).abs().max().item():.3g}")
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    main()
