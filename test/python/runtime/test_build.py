"""The runtime library is installed by rename, so rebuilding never rewrites a mapped file."""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lowbit.runtime import runtime_library_path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "runtime" / "native" / "cmake" / "atomic_install.cmake"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_atomic_install_replaces_a_mapped_library_by_rename(tmp_path):
    lib = runtime_library_path()
    dst = tmp_path / "sub" / lib.name
    dst.parent.mkdir()
    shutil.copy(lib, dst)
    before = os.stat(dst).st_ino
    # Map the destination the way a running process does (dlopen by this path).
    old = ctypes.CDLL(str(dst))
    old.lowbit_rt_abi_version.restype = ctypes.c_int32
    assert old.lowbit_rt_abi_version() >= 1

    subprocess.run(["cmake", f"-DSRC={lib}", f"-DDST={dst}", "-P", str(SCRIPT)], check=True,
                   capture_output=True)

    assert os.stat(dst).st_ino != before, "the installed file was written in place"
    assert dst.read_bytes() == lib.read_bytes()
    assert old.lowbit_rt_abi_version() >= 1  # the mapped copy still runs
    assert sorted(p.name for p in dst.parent.iterdir()) == [lib.name], "temporary file left over"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_atomic_install_creates_the_destination_directory(tmp_path):
    lib = runtime_library_path()
    dst = tmp_path / "a" / "b" / "lib.so"
    subprocess.run(["cmake", f"-DSRC={lib}", f"-DDST={dst}", "-P", str(SCRIPT)], check=True,
                   capture_output=True)
    assert dst.read_bytes() == lib.read_bytes()


def _setup_py_atomic_copy():
    # setup.py calls setup() when executed; take just its atomic_copy function.
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "atomic_copy")
    ns = {"os": os, "Path": Path}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
    return ns["atomic_copy"]


def test_setup_py_copies_the_editable_library_by_rename(tmp_path):
    # Editable installs copy the library into the source tree; setuptools' copy_file would
    # truncate and rewrite it under processes that have it mapped.
    assert "atomic_copy(" in (ROOT / "setup.py").read_text().split("def copy_extensions_to_source")[1]
    atomic_copy = _setup_py_atomic_copy()
    lib = runtime_library_path()
    dst = tmp_path / lib.name
    shutil.copy(lib, dst)
    before = os.stat(dst).st_ino
    old = ctypes.CDLL(str(dst))
    old.lowbit_rt_abi_version.restype = ctypes.c_int32
    atomic_copy(lib, dst)
    assert os.stat(dst).st_ino != before
    assert dst.read_bytes() == lib.read_bytes() and os.access(dst, os.X_OK)
    assert old.lowbit_rt_abi_version() >= 1
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]
