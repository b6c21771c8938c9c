"""`lowbit-opt`: run a pass pipeline (upstream MLIR + lowbit passes) over an .mlir file.

    lowbit-opt in.mlir --pass-pipeline='builtin.module(lowbit-..., canonicalize)'
    lowbit-opt --list-passes
    lowbit-opt in.mlir --split-input-file --pass-pipeline=...   # lit tests, one module per `// -----`

Bad input is a one-line error and a non-zero exit, never a traceback or a crash: a missing,
unreadable, binary or directory input and an unwritable output exit with status 2; input
nested deeper than MAX_NESTING brackets is refused before MLIR parses it (MLIR's recursive
parser overflows the stack: nested regions crashed between 3000 and 5000 levels, nested
attribute brackets by 20000, with an 8 MiB stack). Parsing and passes also run on a thread
with a STACK_BYTES stack, so the bound holds whatever `ulimit -s` is.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import threading

from torch_mlir import ir

from lowbit.compiler.passmanager import LowbitPassManager, PipelineError, new_context
from lowbit.passes.registry import PassError, registered_passes

SPLIT_MARKER = "// -----"

#: Deepest bracket nesting ({, ( and [ together) accepted; real IR stays far below 100.
MAX_NESTING = 1000
#: Stack of the thread that parses and runs passes (virtual; only touched pages are used).
STACK_BYTES = 256 << 20

# Tokens that matter for nesting: string literals (skipped whole; dense_resource blobs live
# in them), line comments (skipped), and brackets.
_NESTING_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"|//[^\n]*|[{}()\[\]]')


class InputError(Exception):
    """A one-line problem with the input or output (printed as `lowbit-opt: error: ...`)."""


def max_nesting(source: str) -> tuple[int, int]:
    """(deepest bracket nesting, 1-based line where it is first reached)."""
    depth = deepest = 0
    where = 0
    for m in _NESTING_TOKENS.finditer(source):
        tok = m.group()
        if tok in "{([":
            depth += 1
            if depth > deepest:
                deepest, where = depth, m.start()
        elif tok in "})]":
            depth = max(0, depth - 1)
    return deepest, source.count("\n", 0, where) + 1


def _read_input(path: str) -> str:
    if path == "-":
        data = sys.stdin.buffer.read()
        name = "<stdin>"
    else:
        name = path
        if os.path.isdir(path):
            raise InputError(f"cannot read {path!r}: is a directory")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InputError(f"cannot read {path!r}: {e.strerror or e}") from None
    if b"\0" in data:
        raise InputError(f"{name} is a binary file (it contains NUL bytes), not MLIR text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name} is not UTF-8 text (byte {e.start}: {data[e.start]:#04x}); "
                         "lowbit-opt reads MLIR text") from None


def _write_output(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    if os.path.isdir(path):
        raise InputError(f"cannot write {path!r}: is a directory")
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise InputError(f"cannot write {path!r}: {e.strerror or e}") from None


def _check_output_writable(path: str) -> None:
    """Fail before the (possibly long) pipeline if the output cannot be created."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise InputError(f"cannot write {path!r}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"cannot write {path!r}: directory {parent!r} does not exist")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise InputError(f"cannot write {path!r}: permission denied")


def _list_passes() -> str:
    lines = ["lowbit passes (usable in --pass-pipeline next to every upstream MLIR pass):"]
    for name, cls in registered_passes().items():
        lines.append(f"  {name}: {cls.summary()}")
        for f in cls.options():
            if f.default is not dataclasses.MISSING:
                default = f" = {f.default!r}"
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f" = {f.default_factory()!r}"  # type: ignore[misc]
            else:
                default = " (required)"
            lines.append(f"      {f.name.replace('_', '-')}: {getattr(f.type, '__name__', f.type)}{default}")
    return "\n".join(lines)


class _ParseError(Exception):
    pass


def _process(source: str, pipeline: str | None, name: str) -> str:
    depth, line = max_nesting(source)
    if depth > MAX_NESTING:
        raise InputError(f"{name}:{line}: input nests {depth} levels of brackets/regions deep; lowbit-opt "
                         f"accepts at most {MAX_NESTING} (deeper input would overflow MLIR's recursive parser)")
    ctx = new_context()
    with ctx:
        try:
            module = ir.Module.parse(source)
        except ir.MLIRError as e:
            raise _ParseError(f"{name}: cannot parse input: {e}") from None
        if pipeline:
            LowbitPassManager(pipeline, ctx).run(module)
        return str(module)


def _on_big_stack(fn, *args):
    """``fn(*args)`` on a thread with a STACK_BYTES stack; its result, or its exception re-raised."""
    result: list = []
    error: list = []

    def run():
        try:
            result.append(fn(*args))
        except BaseException as e:  # re-raised in the caller
            error.append(e)

    old = threading.stack_size()
    try:
        threading.stack_size(STACK_BYTES)
        worker = threading.Thread(target=run, name="lowbit-opt")
        worker.start()
    finally:
        threading.stack_size(old)
    worker.join()
    if error:
        raise error[0]
    return result[0]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # e.g. `lowbit-opt --list-passes | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("lowbit-opt: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
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
    try:
        source = _read_input(args.input)
        _check_output_writable(args.output)
    except InputError as e:
        print(f"lowbit-opt: error: {e}", file=sys.stderr)
        return 2
    chunks = source.split(SPLIT_MARKER) if args.split_input_file else [source]
    outputs, failed = [], False
    for i, chunk in enumerate(chunks):
        try:
            outputs.append(_on_big_stack(_process, chunk, args.pass_pipeline, args.input))
        except InputError as e:
            print(f"lowbit-opt: error: {e}", file=sys.stderr)
            return 2
        except _ParseError as e:
            print(e, file=sys.stderr)
            return 1
        except (PipelineError, ValueError) as e:
            print(f"lowbit-opt: {e}", file=sys.stderr)
            return 2
        except (PassError, ir.MLIRError) as e:
            print(f"{args.input}: chunk {i}: error: {e}", file=sys.stderr)
            outputs.append("")
            failed = True
    text = f"\n{SPLIT_MARKER}\n".join(outputs)
    try:
        _write_output(args.output, text)
    except InputError as e:
        print(f"lowbit-opt: error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
