"""Artifacts for another target than this CPU's best (AVX2, portable SSE2) contain no wider
instructions and compute the same; eager-fallback ops are serialized as ATen calls; ops that
only this process knows are refused at compile time."""
import re
import subprocess

import pytest
import torch

import lowbit.aot
from lowbit.compiler.aot_target import TARGETS, missing_features
from lowbit.compiler.artifact_format import UnserializableGraphError

from conftest import run_without_compiler

SIZES = (1, 3, 17, 64)


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(96, 67, generator=g) / 8)
        self.w2 = torch.nn.Parameter(torch.randn(33, 96, generator=g) / 10)

    def forward(self, x):
        h = torch.nn.functional.silu(x @ self.w1.t())
        return torch.erfinv(torch.tanh(h @ self.w2.t()) * 0.5) + 1.0   # erfinv: an eager fallback


COMPILE = """
    import json, sys, torch, warnings
    sys.path.insert(0, {here!r})
    import lowbit.aot, lowbit.runtime
    from test_targets import Mlp, SIZES
    from lowbit.compiler.artifact_format import write_safetensors
    model = Mlp().eval()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        lowbit.aot.compile(model, (torch.randn(5, 67),), ({{0: "B"}},), {path!r}, target={target!r})
    xs = {{f"x{{n}}": torch.randn(n, 67, generator=torch.Generator().manual_seed(n)) for n in SIZES}}
    with torch.no_grad():
        ys = {{f"y{{n}}": model(xs[f"x{{n}}"]) for n in SIZES}}
    write_safetensors({path!r} + ".io", {{**xs, **ys}})
    print(json.dumps({{"isa": lowbit.runtime.current_isa()}}))
"""

RUN = """
    import json, torch
    import lowbit.aot, lowbit.runtime
    from lowbit.compiler.artifact_format import MappedTensors
    io = MappedTensors({path!r} + ".io")
    art = lowbit.aot.load({path!r})
    errs = []
    for n in {sizes!r}:
        x, y = io.get(f"x{{n}}"), io.get(f"y{{n}}")
        got = art(x)
        errs.append(float((got - y).abs().max()))
    print(json.dumps({{"errs": errs, "isa": lowbit.runtime.current_isa(), "target": art.target}}))
"""


def _registers(so) -> set[str]:
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True).stdout
    return set(re.findall(r"%([xyz]mm)\d+", text))


@pytest.mark.parametrize("target,isa,banned", [("avx2", "avx2", {"zmm"}), ("portable", "scalar", {"zmm", "ymm"})])
def test_target_emits_no_wider_code(target, isa, banned, tmp_path):
    if missing_features(TARGETS[target]):
        pytest.skip(f"this CPU cannot run {target} code")
    import pathlib
    path = str(tmp_path / f"mlp_{target}.lowbit")
    env = {"LOWBIT_ISA": isa}   # the runtime's kernels on that ISA too, as on such a CPU
    # compiling needs the compiler: plain interpreter (the blocker is for the loader)
    here = str(pathlib.Path(__file__).parent)
    code = COMPILE.format(here=here, path=path, target=target)
    script = tmp_path / "compile.py"
    import textwrap, sys, os, json
    script.write_text(textwrap.dedent(code))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env={**os.environ, **env},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["isa"] == isa
    manifest = json.loads(open(f"{path}/manifest.json").read())
    assert manifest["target"]["name"] == target and manifest["build"]["runtime_isa"] == isa
    regs = _registers(f"{path}/code.so")
    assert regs and not (regs & banned), regs
    got = run_without_compiler(RUN.format(path=path, sizes=SIZES), tmp_path, env=env)
    assert got["isa"] == isa and got["target"] == target
    assert max(got["errs"]) < 1e-4, got["errs"]


def test_host_target_uses_avx512_when_present(tmp_path):
    if missing_features(TARGETS["avx512"]):
        pytest.skip("no AVX-512 here")
    path = lowbit.aot.compile(Mlp().eval(), (torch.randn(4, 67),), None, tmp_path / "a")
    assert "zmm" in _registers(path + "/code.so")
    x = torch.randn(4, 67)
    with torch.no_grad():
        torch.testing.assert_close(lowbit.aot.load(path)(x), Mlp().eval()(x), rtol=1e-4, atol=1e-4)


def test_process_local_op_is_refused(tmp_path):
    lib = torch.library.Library("aottest", "FRAGMENT")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    lib.impl("twice", lambda x: torch.empty_like(x), "Meta")

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aottest.twice(x + 1) - 1

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnserializableGraphError, match="aottest::twice.default runs in eager"):
            lowbit.aot.compile(M(), (torch.randn(3, 5),), None, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_api_errors(tmp_path):
    from lowbit.compiler.artifact_format import ArtifactError
    with pytest.raises(ArtifactError, match="unknown target 'avx9'"):
        lowbit.aot.compile(Mlp(), (torch.randn(2, 67),), None, tmp_path / "x", target="avx9")
    with pytest.raises(ArtifactError, match="needs path="):
        lowbit.aot.compile(Mlp(), (torch.randn(2, 67),))
    with pytest.raises(ArtifactError, match="example_inputs must be"):
        lowbit.aot.compile(Mlp(), torch.randn(2, 67), None, tmp_path / "x")
    with pytest.raises(ArtifactError, match="dim 5 is not a dim"):
        lowbit.aot.compile(Mlp(), (torch.randn(2, 67),), ({5: "B"},), tmp_path / "x")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ArtifactError, match="exists"):
        lowbit.aot.compile(Mlp(), (torch.randn(2, 67),), None, tmp_path / "exists")


class IntDiv(torch.nn.Module):
    def forward(self, x, y):
        return (x * 3) // y + 1


def test_run_time_checks_survive_in_artifacts(tmp_path):
    x, y = torch.randint(-50, 50, (2, 9)), torch.randint(1, 7, (2, 9))
    path = lowbit.aot.compile(IntDiv(), (x, y), ({1: "N"}, {1: "N"}), tmp_path / "div")
    manifest = __import__("json").loads((tmp_path / "div" / "manifest.json").read_text())
    assert any(e["traps"] for e in manifest["entries"].values())
    art = lowbit.aot.load(path)
    for n in (2, 9, 31):
        x, y = torch.randint(-50, 50, (2, n)), torch.randint(1, 7, (2, n))
        torch.testing.assert_close(art(x, y), IntDiv()(x, y))
    y[1, 3] = 0
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        IntDiv()(x, y)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        art(x, y)


def test_bf16_model(tmp_path):
    if missing_features(TARGETS["avx512-bf16"]):
        pytest.skip("bf16 code needs AVX512-BF16 (see aot_target)")
    model = Mlp().to(torch.bfloat16).eval()
    path = lowbit.aot.compile(model, (torch.randn(5, 67, dtype=torch.bfloat16),), ({0: "B"},), tmp_path / "bf16")
    art = lowbit.aot.load(path)
    assert art.target == "avx512-bf16"
    for n in SIZES:
        x = torch.randn(n, 67, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = model(x).float()
        got = art(x)
        assert got.dtype == torch.bfloat16
        # a few bf16 roundings apart (eager rounds after every op, compiled code less often)
        assert float((got.float() - want).abs().max()) <= 2 ** -5 * float(want.abs().max())
