#!/usr/bin/env bash
# Runs every test: lit (pass, pipeline and integration tests) then pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import lit.main; lit.main.main()" -q test/
lit_rc=$?
# Two workers (pytest-xdist, one test file per worker at a time): most tests compile, and a
# compile is single-threaded Python + MLIR, so the suite's wall time halves on 2 cores.
# --durations: the slowest tests in every log, to keep the suite within its 20-minute budget.
"$PY" -m pytest -q -n 2 --dist loadfile --durations=15 test/python "$@"
py_rc=$?
if [ $lit_rc -ne 0 ]; then echo "lit failed (exit $lit_rc)"; fi
exit $(( lit_rc != 0 || py_rc != 0 ))
