"""Models whose layers are `torch.compiler.nested_compile_region`s (dynamo's `invoke_subgraph`).

Dynamo traces a marked region once and stamps out one `invoke_subgraph` call per use; the
lowbit backend inlines those calls (`frontend.inline_nested_regions`) before capture, so
binding, regions and the compile cache see the flat graph they always saw. Covered: a region
that mutates its module's buffers (a KV cache's `index_copy_`, a counter), a region nested in
a region, layers whose module stacks name their own layer after inlining, the Llama of
`lowbit.models` (whose block is marked) against eager over prefill and decode, and the
persistent compile cache hitting in a second process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compiler.compile_log import counters
from lowbit.compiler.frontend import inline_nested_regions
from lowbit.compiler.partition import UnsupportedOpWarning, forget_warnings
from lowbit.compiler.regions import find_regions, region_of
from lowbit.models import LlamaConfig, make_tiny_llama, reset_caches

INVOKE = torch.ops.higher_order.invoke_subgraph


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@torch.compiler.nested_compile_region
def _gate(a: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """A region called from inside a region."""
    return a * torch.sigmoid(cache.sum(0))


class Block(nn.Module):
    """A layer that writes its input's rows into a cache buffer and counts its calls."""

    def __init__(self, dim: int, seq: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Linear(dim, dim)
        self.w2 = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / dim ** 0.5)
        self.register_buffer("cache", torch.zeros(seq, dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    @torch.compiler.nested_compile_region
    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.w1(x))
        self.cache.index_copy_(0, pos, h)
        self.calls.add_(1)
        return x + _gate(self.w2(h), self.cache)


class Net(nn.Module):
    def __init__(self, dim: int = 32, seq: int = 16, layers: int = 3):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(Block(dim, seq, seed=i) for i in range(layers))
        self.out = nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, pos)
        return self.out(h)


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval().requires_grad_(False)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def _zero_state(model: nn.Module) -> None:
    for b in model.buffers():
        b.zero_()


def _calls():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 32, generator=g), torch.arange(4)),
            (torch.randn(1, 32, generator=g), torch.tensor([4])),
            (torch.randn(1, 32, generator=g), torch.tensor([5]))]


def test_dynamo_reuses_the_mutating_region_and_inlining_flattens_it():
    model = _net()
    seen = {}

    def backend(gm, example_inputs):
        seen["invokes"] = sum(len(m.graph.find_nodes(op="call_function", target=INVOKE))
                              for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        seen["bodies"] = len({str(n.args[1]) for n in gm.graph.find_nodes(op="call_function", target=INVOKE)})
        seen["inlined"] = inline_nested_regions(gm)
        seen["gm"] = gm
        return gm.forward

    x, pos = _calls()[0]
    with torch.no_grad():
        y = torch.compile(model, backend=backend, fullgraph=True)(x, pos)
        after = _state(model)
        _zero_state(model)
        ref = model(x, pos)
    # one body for the three layers (the buffer mutation does not prevent reuse), one call each
    assert seen["bodies"] == 1 and seen["inlined"] == 3, seen
    gm = seen["gm"]
    assert not [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                for n in m.graph.find_nodes(op="call_function", target=INVOKE)]
    assert not any(isinstance(m, torch.fx.GraphModule) for _, m in gm.named_children())
    # the inlined graph computes what eager computes, buffers included
    torch.testing.assert_close(y, ref)
    for k, v in _state(model).items():
        torch.testing.assert_close(after[k], v, msg=k)
    assert int(model.layers[2].calls) == 1
    # every inlined node names its own layer: one region per layer, in program order
    regions = [r for r in (region_of(n) for n in gm.graph.nodes if n.op == "call_function") if r]
    order = list(dict.fromkeys(regions))
    assert order == [f"L['self'].layers.{i}" for i in range(3)], order
    assert len(find_regions(gm)) == 5  # glue, 3 layers, glue
    nested = {path for n in gm.graph.nodes for path, _ in (n.meta.get("nn_module_stack") or {}).values()}
    assert "L['self'].layers.2.w2" in nested and "L['self'].layers.0.w2" in nested


def test_graph_without_regions_is_untouched():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    code = gm.code
    assert inline_nested_regions(gm) == 0 and gm.code == code


def _compiled_vs_eager(model, calls, compiled):
    forget_warnings()
    outs = []
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _zero_state(model)
        for x, pos in calls:
            outs.append(compiled(x, pos))
        got = _state(model)
        _zero_state(model)
        refs = [model(x, pos) for x, pos in calls]
        want = _state(model)
    fallback = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert not fallback, fallback  # eager gives eager's numbers: the comparison would prove nothing
    for y, ref in zip(outs, refs):
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4, msg=k)


def test_lowbit_compiles_regions_that_mutate_buffers():
    model = _net()
    before = counters.copy()
    _compiled_vs_eager(model, _calls(), torch.compile(model, backend="lowbit"))
    assert counters["backend_compiles"] > before["backend_compiles"]
    assert int(model.layers[0].calls) == 3


def test_tiny_llama_block_is_a_region_and_matches_eager_tokens():
    cfg = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=24, vocab_size=96, n_layers=3)
    model = make_tiny_llama(cfg, seed=11)
    lowbit.quantize_(model.layers, lowbit.QuantConfig(weights="ternary", activations="int8"))
    invokes = []

    def backend(gm, example_inputs):
        invokes.append(len(gm.graph.find_nodes(op="call_function", target=INVOKE)))
        from lowbit.compiler.backend import lowbit_backend
        return lowbit_backend(gm, example_inputs)

    compiled = torch.compile(model, backend=backend)
    prompt = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    before = counters.copy()

    def greedy(fn):
        reset_caches(model)
        tokens, logits = [], []
        ids, pos = prompt, torch.arange(prompt.shape[1])
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        torch._dynamo.maybe_mark_dynamic(pos, 0)
        for step in range(4):
            out = fn(ids, pos)
            logits.append(out[0, -1])
            tokens.append(int(out[0, -1].argmax()))
            ids, pos = torch.tensor([[tokens[-1]]]), torch.tensor([prompt.shape[1] + step])
        return tokens, logits, [layer.attention.cache.k.clone() for layer in model.layers]

    forget_warnings()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = greedy(compiled)
        want = greedy(model)
    assert not [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert invokes == [3, 3], invokes  # prefill and decode graphs: each layer an invoke_subgraph
    assert got[0] == want[0]
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    # the repeated layers are still compiled once per graph
    assert counters["region_reuses"] - before["region_reuses"] == 4


CACHE_SCRIPT = """
import json, torch, lowbit
from lowbit.compiler.compile_log import counters
from lowbit.models import LlamaConfig
cfg = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=24, vocab_size=96, n_layers=3)
r = lowbit.generate(cfg, torch.arange(1, 7), 4, backend="lowbit")
print(json.dumps({"tokens": r.tokens, "programs": counters["program_cache_hits"],
                  "pipelines": counters["pipelines"]}))
"""


def test_compile_cache_hits_in_a_second_process(tmp_path):
    env = {**os.environ, "LOWBIT_CACHE": "1", "LOWBIT_CACHE_DIR": str(tmp_path / "cache")}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(CACHE_SCRIPT)], capture_output=True,
                           text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["pipelines"] > 0 and cold["programs"] == 0, cold
    assert warm["pipelines"] == 0 and warm["programs"] == 2, warm  # prefill and decode programs
    assert warm["tokens"] == cold["tokens"]
