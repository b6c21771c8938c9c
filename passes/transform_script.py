"""Run transform-dialect scripts from Python passes (shared by the codegen and dense passes)."""
from __future__ import annotations

from torch_mlir import ir
from torch_mlir.dialects.transform import interpreter

from lowbit.passes.registry import PassError

_SCRIPT = """module attributes {{transform.with_named_sequence}} {{
  transform.named_sequence @__transform_main(%root: !transform.any_op {{transform.readonly}}) {{
{body}
    transform.yield
  }}
}}"""


def run_transform(module: ir.Operation, body: str, what: str) -> None:
    """Apply a transform script (the body of `__transform_main`, root handle `%root`)."""
    text = _SCRIPT.format(body=body)
    try:
        script = ir.Module.parse(text, context=module.context)
    except ir.MLIRError as e:  # a bug in the pass that wrote the script
        raise PassError(f"{what}: invalid transform script: {e}\n{text}") from None
    try:
        interpreter.apply_named_sequence(module, script.body.operations[0], script)
    except (ir.MLIRError, ValueError) as e:
        raise PassError(f"{what}: transform failed: {e}") from None
