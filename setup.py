"""Builds the native runtime (runtime/native, CMake) into the `lowbit.runtime` package.

The runtime is a plain C-ABI shared library loaded with ctypes by the JIT and linked
into AOT artifacts, so it is built as a setuptools extension only to get it placed
next to `lowbit/runtime/*.py` in both wheels and editable installs.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("LOWBIT_BUILD_TYPE", "Release")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DLOWBIT_RUNTIME_OUTPUT={out}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        if os.environ.get("LOWBIT_SANITIZE"):
            configure.append(f"-DLOWBIT_SANITIZE={os.environ['LOWBIT_SANITIZE']}")
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)

    def copy_extensions_to_source(self) -> None:
        # Editable installs copy the built library into the source tree. setuptools writes the
        # destination in place, which corrupts the library under any process that has it
        # mapped; copy to a temporary name in the same directory and rename it over instead.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            atomic_copy(Path(regular_file), Path(inplace_file))


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` so that `dst` is replaced by one rename(2): readers and processes
    that mapped the old file keep its (unchanged) inode."""
    import shutil
    import tempfile

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
        shutil.copymode(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


setup(
    ext_modules=[CMakeExtension("lowbit.runtime._lowbit_rt")],
    cmdclass={"build_ext": CMakeBuild},
)
