"""Fixtures of the ahead-of-time tests: one small Llama artifact per session, and a runner for
scripts in a fresh interpreter where importing torch-mlir or MLIR fails."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

# The compile cache (lowbit.compiler.compile_cache) must never write to the user's home from tests.
os.environ.setdefault("LOWBIT_CACHE", "0")

BLOCKER = textwrap.dedent('''
    import sys
    class _NoCompiler:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch_mlir", "mlir"):
                raise ImportError(f"{name} is blocked: the artifact loader must not import the compiler")
            return None
    sys.meta_path.insert(0, _NoCompiler())
''')

PRESET_SEQ = 32
PROMPT = [3, 141, 59, 26, 5]


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    import lowbit.aot

    path = tmp_path_factory.mktemp("aot") / "tiny.lowbit"
    lowbit.aot.compile_preset("tiny", path, max_seq_len=PRESET_SEQ)
    return path


def run_without_compiler(code: str, tmp_path, env: dict | None = None, timeout: int = 600) -> dict:
    """Run `code` (which prints one JSON line last) in a fresh interpreter that cannot import
    torch-mlir; returns the parsed JSON."""
    script = tmp_path / "blocked_script.py"
    script.write_text(BLOCKER + textwrap.dedent(code) + "\nassert 'torch_mlir' not in sys.modules\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"subprocess failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])
