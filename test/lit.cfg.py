# lit configuration: `lit test/` runs the pass tests (test/passes), pipeline tests
# (test/pipeline) and integration tests (test/integration) with the project's drivers.
import os
import shlex
import sys

import lit.formats

config.name = "lowbit"
config.test_format = lit.formats.ShTest(execute_external=False)
config.suffixes = [".mlir", ".py"]
config.excludes = ["lit.cfg.py", "python", "Output", "__pycache__", "conftest.py"]
config.test_source_root = os.path.dirname(__file__)
config.test_exec_root = os.path.join(config.test_source_root, "Output")

python = shlex.quote(sys.executable)
config.substitutions.append(("%PYTHON", python))
config.substitutions.append(("lowbit-opt", f"{python} -m lowbit.compiler.opt"))
config.substitutions.append(("filecheck", f"{python} -m filecheck"))

for var in ("PATH", "HOME", "LOWBIT_ISA", "LOWBIT_NUM_THREADS", "OMP_NUM_THREADS", "PYTHONPATH"):
    if var in os.environ:
        config.environment[var] = os.environ[var]
