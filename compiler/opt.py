"""`lowbit-opt`: run a pass pipeline (upstream MLIR + lowbit passes) over an .mlir file.

    lowbit-opt in.mlir --pass-pipeline='builtin.module(lowbit-..., canonicalize)'
    lowbit-opt --list-passes
    lowbit-opt in.mlir --split-input-file --pass-pipeline=...   # lit tests, one module per `// -----`
"""
from __future__ import annotations

import argparse
import sys

from torch_mlir import ir

from lowbit.compiler.passmanager import LowbitPassManager, PipelineError, new_context
from lowbit.passes.registry import PassError, registered_passes

SPLIT_MARKER = "// -----"


def _list_passes() -> str:
    lines = ["lowbit passes (usable in --pass-pipeline next to every upstream MLIR pass):"]
    for name, cls in registered_passes().items():
        lines.append(f"  {name}: {cls.summary()}")
        for f in cls.options():
            default = f.default if f.default is not f.default_factory else f.default_factory()  # type: ignore[misc]
            lines.append(f"      {f.name.replace('_', '-')}: {getattr(f.type, '__name__', f.type)} = {default}")
    return "\n".join(lines)


def _process(source: str, pipeline: str | None, name: str) -> str:
    ctx = new_context()
    with ctx:
        try:
            module = ir.Module.parse(source)
        except ir.MLIRError as e:
            raise SystemExit(f"{name}: cannot parse input: {e}")
        if pipeline:
            LowbitPassManager(pipeline, ctx).run(module)
        return str(module)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit-opt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", default="-", help="input .mlir file ('-' for stdin)")
    p.add_argument("--pass-pipeline", "-p", default=None, help="textual pass pipeline")
    p.add_argument("--split-input-file", action="store_true",
                   help=f"process each chunk separated by '{SPLIT_MARKER}' independently")
    p.add_argument("--list-passes", action="store_true", help="list lowbit passes and their options")
    p.add_argument("-o", dest="output", default="-", help="output file ('-' for stdout)")
    args = p.parse_args(argv)

    if args.list_passes:
        print(_list_passes())
        return 0
    source = sys.stdin.read() if args.input == "-" else open(args.input).read()
    chunks = source.split(SPLIT_MARKER) if args.split_input_file else [source]
    outputs, failed = [], False
    for i, chunk in enumerate(chunks):
        try:
            outputs.append(_process(chunk, args.pass_pipeline, args.input))
        except (PipelineError, ValueError) as e:
            print(f"lowbit-opt: {e}", file=sys.stderr)
            return 2
        except (PassError, ir.MLIRError) as e:
            print(f"{args.input}: chunk {i}: error: {e}", file=sys.stderr)
            outputs.append("")
            failed = True
    text = f"\n{SPLIT_MARKER}\n".join(outputs)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
