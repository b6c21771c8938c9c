"""Runtime and execution: per-signature cache, zero-copy I/O, strided inputs, freezing.

(Call overhead is measured in benchmarks/compiler.py, not here.)
"""
from __future__ import annotations

import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.compiler.backend import LowbitCallable, lowbit_backend
from lowbit.compiler.compile import compile_function


def _recording_compile(model):
    made = []

    def backend(gm, example_inputs):
        fn = lowbit_backend(gm, example_inputs)
        made.append(fn)
        return fn

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=False), made


def test_outputs_are_torch_tensors_written_in_place_by_native_code():
    x = torch.randn(4, 6)
    compiled = compile_function(lambda x: torch.tanh(x) * 3, (x,))
    outs = [torch.empty(4, 6)]
    ptr = outs[0].data_ptr()
    result = compiled.jit.call_unchecked([x], outs)
    assert result[0].data_ptr() == ptr           # no copy between native code and torch
    torch.testing.assert_close(outs[0], torch.tanh(x) * 3)


STRIDED = compile_function(lambda x, y: x * 2 + y.sum(-1, keepdim=True), (torch.randn(5, 7), torch.randn(5, 3)))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_strided_view_of_the_right_shape_reads_correctly(data):
    """Transposes, slices with steps, offsets and expands: never read as if contiguous."""
    def view(shape):
        kind = data.draw(st.sampled_from(["transpose", "step", "offset", "expand", "contiguous"]))
        r, c = shape
        if kind == "transpose":
            return torch.randn(c, r).t()
        if kind == "step":
            step = data.draw(st.integers(2, 4))
            return torch.randn(r * step, c * step)[::step, ::step]
        if kind == "offset":
            return torch.randn(r + 2, c + 3)[1:r + 1, 2:c + 2]
        if kind == "expand":
            return torch.randn(1, c).expand(r, c)
        return torch.randn(r, c)

    x, y = view((5, 7)), view((5, 3))
    torch.testing.assert_close(STRIDED(x, y)[0], x * 2 + y.sum(-1, keepdim=True))


def test_one_compilation_per_input_signature():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.SiLU()).eval()
    compiled, made = _recording_compile(model)
    with torch.no_grad():
        for rows in (3, 3, 5, 3, 5):
            x = torch.randn(rows, 6)
            torch.testing.assert_close(compiled(x), model(x))
    entries = sum(len(fn.cache) for fn in made if isinstance(fn, LowbitCallable))
    assert entries == 2


def test_automatic_dynamic_shapes_still_compile_static_specialisations():
    """Without dynamic=False dynamo passes sizes as ints after a shape change."""
    def f(x):
        return torch.softmax(x.view(x.shape[0], -1) * 2, -1)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="lowbit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in (2, 3, 17, 1):
            x = torch.randn(rows, 4, 3)
            torch.testing.assert_close(compiled(x), f(x))
    assert not [w for w in caught if "cannot compile" in str(w.message)]


def test_changed_weight_is_noticed_and_recompiled():
    # The constant-weight design on purpose (weights bound as buffers: test_bind.py).
    model = torch.nn.Linear(5, 3).eval()
    compiled, made = _recording_compile(model)
    x = torch.randn(2, 5)
    with torch.no_grad(), lowbit.options(weights="freeze"):
        torch.testing.assert_close(compiled(x), model(x))
        model.weight.mul_(-2)                      # in-place update after compilation
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.testing.assert_close(compiled(x), model(x))
        assert any("changed after compilation" in str(w.message) for w in caught)
        torch.testing.assert_close(compiled(x), model(x))


def test_kv_cache_buffers_are_not_frozen():
    """Mutated buffers stay runtime inputs (written back), unmutated ones are constants."""
    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.zeros(4, 2))
            self.register_buffer("scale", torch.full((2,), 3.0))

        def forward(self, pos, v):
            self.cache.index_copy_(0, pos, v * self.scale)
            return self.cache.sum(0)

    model, ref = Cached(), Cached()
    compiled, made = _recording_compile(model)
    with lowbit.options(weights="freeze"):  # the constant-weight design on purpose
        for p in (0, 3, 1):
            pos, v = torch.tensor([p]), torch.randn(1, 2)
            torch.testing.assert_close(compiled(pos, v), ref(pos, v))
            torch.testing.assert_close(model.cache, ref.cache)
    entry = next(iter(made[0].cache.values()))
    assert len(entry.captured.frozen) == 1 and len(entry.captured.mutated_inputs) == 1


def test_training_graphs_run_in_eager():
    model = torch.nn.Linear(3, 2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowbit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(torch.randn(4, 3))
    out.sum().backward()
    assert model.weight.grad is not None
    assert any("requires autograd" in str(w.message) for w in caught)


def test_write_back_of_mutated_inputs():
    from lowbit.compiler.frontend import write_back

    src = torch.randn(4, 8, 16)
    dst = torch.zeros(4, 8, 16)
    write_back(dst, src)  # contiguous: a plain memmove, no torch thread pool
    assert torch.equal(dst, src)
    wide = torch.zeros(4, 16, 16)
    view = wide[:, ::2]  # non-contiguous destination: falls back to copy_
    write_back(view, src)
    assert torch.equal(wide[:, ::2], src) and torch.count_nonzero(wide[:, 1::2]) == 0
    half = torch.zeros(4, 8, 16, dtype=torch.bfloat16)
    write_back(half, src)  # dtype differs: copy_ converts
    assert torch.equal(half, src.bfloat16())


def test_dump_ir_keeps_one_set_of_files_per_graph(tmp_path, monkeypatch):
    # A model's graphs compile one after another; each keeps its own stage files.
    monkeypatch.setenv("LOWBIT_DUMP_IR", str(tmp_path))
    compile_function(lambda x: x * 2, [torch.randn(4)])
    compile_function(lambda x: x + 1, [torch.randn(3, 5)])
    imports = sorted(tmp_path.glob("*-00-import.mlir"))
    assert len(imports) == 2
    texts = [p.read_text() for p in imports]
    assert any("4xf32" in t or "[4]" in t for t in texts) and any("[3,5]" in t for t in texts)
    for p in imports:
        prefix = p.name[: -len("00-import.mlir")]
        assert len(list(tmp_path.glob(prefix + "*-lower-to-llvm.mlir"))) == 1
