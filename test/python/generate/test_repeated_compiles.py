"""Many compiled models in one process: lowbit's entry points stay compiled and let go.

Dynamo keeps compiled graphs per code object and gives up on a code object after
`recompile_limit` entries (it then runs the function in eager behind one warning). Every
model of a class shares its forward's code, so before `lowbit.compiler.own_code` the fifth
`lowbit.generate` of a process ran in eager (~300x slower) and every earlier call's programs
stayed alive. The tests here run more calls than the limit allows, without resetting dynamo
between them.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lowbit import hf
from lowbit.compiler.backend import LowbitCallable
from lowbit.compiler.own_code import compile_entry, with_own_code
from lowbit.generate import CompileCounter, build_llama, generate, greedy_reference
from lowbit.models import LlamaConfig

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(autouse=True)
def small_recompile_limit():
    """Dynamo's limit lowered from 8 to 2: the tests still go past it, with 3 compiled models
    instead of 9 (the slowest test of the suite took 96 s on 2 cores)."""
    with torch._dynamo.config.patch(recompile_limit=2):
        yield

SMALL = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=128, n_layers=1, max_seq_len=16)


def _calls_past_the_limit() -> int:
    # two graphs (prefill, decode) per call
    return torch._dynamo.config.recompile_limit // 2 + 2


def _live_programs() -> int:
    gc.collect()
    return sum(isinstance(o, LowbitCallable) for o in gc.get_objects())


def test_generate_calls_past_dynamos_limit_all_compile_and_release_their_programs():
    before = _live_programs()
    models = []
    for seed in range(_calls_past_the_limit()):
        model, _ = build_llama(SMALL, seed, "ternary", "int8")
        models.append(weakref.ref(model))
        prompt = [1 + seed, 2, 3, 4]
        r = generate(model, prompt, 4)
        # the graphs reached lowbit (dynamo did not give up on the forward and run it in eager)
        assert r.compile_counts["graphs"] == 2, (seed, r.compile_counts)
        assert r.tokens == greedy_reference(model, torch.tensor(prompt), 4)
        del model, r
    assert all(m() is None for m in models)
    assert _live_programs() == before  # no earlier call's compiled program kept alive


def test_hf_compile_of_many_models_keeps_compiling():
    tiny = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    for seed in range(torch._dynamo.config.recompile_limit + 1):  # one graph per model
        model = hf.make_bitnet(hf.bitnet_config(**tiny), seed=seed).eval()
        counter = CompileCounter("lowbit")
        hf.compile(model, backend=counter)
        with torch.no_grad():
            got = model(input_ids=ids).logits
            want = model.forward.original(input_ids=ids).logits
        assert counter.graphs >= 1, seed
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_with_own_code_is_the_same_function_with_a_new_code_object():
    scale = 3

    def f(x, y=2, *, z=5):
        """doc"""
        return (x + y + z) * scale

    g = with_own_code(f)
    assert g.__code__ is not f.__code__ and g.__code__ == f.__code__
    assert (g(1), g(1, 0, z=0)) == (f(1), f(1, 0, z=0))
    assert (g.__name__, g.__qualname__, g.__doc__, g.__module__) == (f.__name__, f.__qualname__, f.__doc__,
                                                                      f.__module__)

    class M(torch.nn.Module):
        def forward(self, x):
            return x * 2

    m = M()
    bound = with_own_code(m)
    assert bound.__self__ is m and bound.__func__.__code__ is not M.forward.__code__
    assert torch.equal(bound(torch.ones(2)), torch.full((2,), 2.0))
    assert with_own_code(len) is len  # not a Python function: as it is


def test_a_module_with_hooks_is_compiled_as_the_module():
    m = torch.nn.Linear(4, 4)
    seen = []
    m.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    compiled = compile_entry(m, backend="eager")
    compiled(torch.randn(2, 4))
    assert seen == [torch.Size([2, 4])]
