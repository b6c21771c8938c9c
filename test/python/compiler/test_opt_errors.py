"""lowbit-opt on bad input: a clear one-line error and a non-zero exit, never a traceback or a crash.

Each case runs the real console script in a subprocess (a crash must not take pytest down).
Before: raw tracebacks for binary/missing/directory input and an unwritable output, SIGSEGV
for 5000 nested regions, `<dataclasses._MISSING_TYPE object ...>` in --list-passes.
"""
from __future__ import annotations

import resource
import shutil
import subprocess
import sys

import pytest

from lowbit.compiler.opt import MAX_NESTING, max_nesting

OPT = [shutil.which("lowbit-opt") or "lowbit-opt"] if shutil.which("lowbit-opt") else \
    [sys.executable, "-m", "lowbit.compiler.opt"]


def run(*args, stdin: bytes | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(OPT + [str(a) for a in args], input=stdin, capture_output=True, timeout=600,
                          preexec_fn=preexec_fn)


def assert_clean_error(proc, *must_contain: str, code: int = 2) -> None:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit-opt: error: "), err
    for text in must_contain:
        assert text in lines[0], (text, lines[0])


def nested_modules(depth: int) -> str:
    return "module {" * depth + "}" * depth + "\n"


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.mlir"
    path.write_text(nested_modules(3))
    return path


def test_binary_input(tmp_path):
    path = tmp_path / "a.out"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    assert_clean_error(run(path), str(path), "binary file")


def test_non_utf8_input(tmp_path):
    path = tmp_path / "latin1.mlir"
    path.write_bytes("module { // caf\xe9\n}".encode("latin-1"))
    assert_clean_error(run(path), str(path), "not UTF-8")


def test_missing_and_directory_input(tmp_path):
    assert_clean_error(run(tmp_path / "nope.mlir"), "nope.mlir", "No such file")
    assert_clean_error(run(tmp_path), str(tmp_path), "is a directory")


def test_unwritable_output(tmp_path, good):
    assert_clean_error(run(good, "-o", tmp_path), str(tmp_path), "is a directory")
    assert_clean_error(run(good, "-o", tmp_path / "no" / "such" / "dir.mlir"), "does not exist")
    # a path that cannot be written even as root: found when writing, after the pipeline
    assert_clean_error(run(good, "-o", "/proc/version"), "/proc/version", "cannot write")


@pytest.mark.parametrize("text,what", [
    (nested_modules(5000), "5000 levels"),                                         # SIGSEGV before
    ("module attributes {x = " + "[" * 20000 + "]" * 20000 + "} {}\n", "20001 levels"),  # SIGSEGV before
    (nested_modules(MAX_NESTING + 1), f"{MAX_NESTING + 1} levels"),
])
def test_deep_nesting_is_refused_before_parsing(tmp_path, text, what):
    path = tmp_path / "deep.mlir"
    path.write_text(text)
    assert_clean_error(run(path), f"{path}:1:", what, f"at most {MAX_NESTING}")
    if "5000" in what:
        assert_clean_error(run("-", stdin=text.encode()), what)


def test_nesting_at_the_bound_parses_even_with_a_small_stack(tmp_path):
    """Parsing runs on a thread with its own large stack: a 1 MiB `ulimit -s` does not matter."""
    path = tmp_path / "ok.mlir"
    path.write_text(nested_modules(MAX_NESTING))

    def small_stack():
        resource.setrlimit(resource.RLIMIT_STACK, (1 << 20, resource.getrlimit(resource.RLIMIT_STACK)[1]))
    proc = run(path, "-o", tmp_path / "out.mlir", preexec_fn=small_stack)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert (tmp_path / "out.mlir").read_text().count("module") == MAX_NESTING


def test_nesting_counts_brackets_not_strings_or_comments():
    src = 'module {\n  // {{{{ ((( [[[\n  "x{{{\\"{"() : () -> ()\n  func.func @f(%a: i32) { return }\n}\n'
    assert max_nesting(src) == (2, 3)  # `module {` + `(` of the op on line 3
    assert max_nesting("") == (0, 1)
    assert max_nesting("}}}{") == (1, 1)  # unbalanced input is MLIR's error to report


def test_parse_error_is_not_a_traceback(tmp_path):
    path = tmp_path / "bad.mlir"
    path.write_text("module { this is not mlir }\n")
    proc = run(path)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err and "cannot parse input" in err


def test_list_passes_shows_real_defaults():
    proc = run("--list-passes")
    out = proc.stdout.decode()
    assert proc.returncode == 0 and "lowbit-" in out
    assert "_MISSING_TYPE" not in out and "object at 0x" not in out
