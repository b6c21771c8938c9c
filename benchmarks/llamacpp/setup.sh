#!/usr/bin/env bash
# Creates the llama.cpp side of benchmarks/e2e.py: its own virtual environment, OUTSIDE the
# repository (default ~/.cache/lowbit/llamacpp-venv, override with LOWBIT_LLAMACPP_VENV), with
# llama-cpp-python built from source for this CPU (GGML_NATIVE=ON) and the `gguf` writer.
# torch is not installed there: the GGUF writer reads the benchmark's safetensors with numpy.
#
#   bash benchmarks/llamacpp/setup.sh          # idempotent: skips what is already installed
#
# The build compiles llama.cpp (several minutes on 2 cores); it runs under `nice -n 19`.
set -euo pipefail

VENV="${LOWBIT_LLAMACPP_VENV:-$HOME/.cache/lowbit/llamacpp-venv}"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
GGUF_VERSION="0.19.0"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

"$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! have gguf "$GGUF_VERSION"; then
    "$PY" -m pip install "gguf==$GGUF_VERSION" "numpy" "safetensors"
fi
if ! have llama_cpp_python "$LLAMA_CPP_PYTHON_VERSION"; then
    echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (GGML_NATIVE=ON) under nice; this takes minutes"
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        nice -n 19 "$PY" -m pip install --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi
"$PY" - <<'PYEOF'
import importlib.metadata as m
import llama_cpp, gguf  # noqa: F401  (the check is that both import)
print("llama-cpp-python", m.version("llama_cpp_python"), "gguf", m.version("gguf"),
      "system info:", llama_cpp.llama_print_system_info().decode(errors="replace").strip())
PYEOF
echo "$PY"
