#!/usr/bin/env bash
# Installs everything lowbit needs on a fresh machine: torch (CPU build, pinned, first so that
# nothing pulls a CUDA build), then the package itself (CMake builds the native runtime) with
# its test tools. The OpenMP runtime comes from the intel-openmp wheel (a dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
# torch==2.13.0 again on this line: the quantization libraries of the `clients` extra
# (test/python/clients) must resolve against the pinned build, never replace it.
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,clients]" "torch==2.13.0"
"$PY" -c "import lowbit.runtime as r; print('lowbit runtime:', r.runtime_library_path().name, 'ISA', r.current_isa())"
