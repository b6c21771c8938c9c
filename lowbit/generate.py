"""`lowbit.generate`: greedy text generation with a compiled low-bit model, with llama.cpp-style figures.

    import lowbit
    result = lowbit.generate("demo", prompt_tokens=32, max_new_tokens=32)   # a preset, random weights
    print(result.summary())
    result = lowbit.generate("path/to/hf-model-dir", [1, 15043, 29892], 64)  # a Hugging Face directory

What it takes (``model_or_config``):
- a preset name (`PRESETS`: ``tiny``, ``demo``, ``1b``, ``2b4t``) or a `lowbit.models.LlamaConfig`:
  a Llama-style model (`lowbit.models.TinyLlama`, static KV cache) with deterministic
  QAT-style weights: every decoder linear is exactly ternary times one power-of-two scale,
  embedding and head are seeded floats. It is built one layer at a time and each layer is
  quantized (``lowbit.quantize_``) before the next is made, so the fp32 model never exists
  whole in memory;
- a Hugging Face model directory (``config.json`` + ``*.safetensors``; needs transformers),
  BitNet checkpoints included (see `lowbit.hf.load_pretrained`);
- an ``nn.Module`` already built: a `TinyLlama` or a transformers causal LM.

Then: quantize (``weights``/``activations``, through `lowbit.quantize_`), compile
(``backend="lowbit"``; ``"inductor"`` or ``"eager"`` for comparisons; a callable backend is
used as is), run the warm-up (prefill + one decode step, twice; this is where compiling
happens; its time is reported as the compile time), then the timed greedy generation: one prefill of
the prompt and ``max_new_tokens - 1`` decode steps. Each new token is passed to
``on_token`` as soon as it is known.

Figures (`GenerationResult`): load, quantize and compile seconds, prefill and decode
tokens per second (llama.cpp's "prompt eval" and "eval": the prefill call produces the first
new token, each decode step one more), peak RSS of the process, and the compile counts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import logging
import math
import os
import resource
import threading
import time
import zlib
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lowbit.compiler.own_code import compile_entry
from lowbit.models import DecoderBlock, LlamaConfig, TinyLlama, fuse_projections_, reset_caches

log = logging.getLogger("lowbit.generate")

#: Built-in Llama-style configurations (``max_seq_len`` is set per run to prompt + new tokens).
PRESETS: dict[str, LlamaConfig] = {
    # the tests' size: compiles in seconds
    "tiny": LlamaConfig(dim=256, n_heads=8, n_kv_heads=2, hidden_dim=688, vocab_size=512, n_layers=2),
    # the README demo's model (examples/demo.py defaults)
    "demo": LlamaConfig(dim=1024, n_heads=16, n_kv_heads=4, hidden_dim=2688, vocab_size=4096, n_layers=2),
    # the 953M ternary Llama of issues 9 and 10
    "1b": LlamaConfig(dim=2048, n_heads=16, n_kv_heads=16, hidden_dim=5632, vocab_size=32000, n_layers=16),
    # BitNet-b1.58-2B4T's sizes in a Llama (SwiGLU) architecture
    "2b4t": LlamaConfig(dim=2560, n_heads=20, n_kv_heads=5, hidden_dim=6912, vocab_size=128256, n_layers=30,
                        rope_theta=500000.0),
}

BACKENDS = ("lowbit", "inductor", "eager")
WEIGHT_CHOICES = ("none", "ternary", "int1", "int2", "int2_sym", "int4", "int4_asym", "int8")
ACTIVATION_CHOICES = ("none", "int8")
#: Output head formats (``head=``): "none" keeps it fp; the others quantize it through
#: ``lowbit.quantize_`` (per-channel int8 / per-group-of-32 int4 weights, int8 per-token
#: activations), so it runs on the integer kernels. At 1B the fp32 head streams more bytes per
#: token than all ternary layers together (llama.cpp ships a Q6_K head with TQ2_0).
HEAD_CHOICES = ("none", "int8", "int4")
#: Embedding table formats (``embedding=``): "none" keeps it fp; "int8" (per row) and "int4"
#: (groups of 32) make it a `lowbit.quant.LowBitEmbedding` (weight-only; one row is read per
#: token, so this saves memory, not time: llama.cpp ships a Q4_K embedding with TQ2_0).
EMBEDDING_CHOICES = ("none", "int8", "int4")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class GenerationError(RuntimeError):
    """Generation could not run (bad model input, a failing backend, ...)."""


# ----------------------------------------------------------------------------- weights
def _generator(seed: int, name: str) -> torch.Generator:
    """One generator per tensor name: weights do not depend on build order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))


def ternary_scale(fan_in: int) -> float:
    """The per-tensor scale of a preset's ternary linear: a power of two near 1/sqrt(fan_in).

    A power of two is exact in fp32/bf16/fp16, so the same tensor is exact in every dtype and
    in llama.cpp's TQ1_0/TQ2_0 (one fp16 scale per 256-block).
    """
    return 2.0 ** -round(math.log2(math.sqrt(fan_in)))


def block_linear_names(cfg: LlamaConfig, layer: int) -> dict[str, tuple[int, int]]:
    """``layers.{i}.<path>.weight`` -> (out, in) for the seven linears of a decoder block."""
    hd, kv = cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    p = f"layers.{layer}."
    return {
        p + "attention.wq.weight": (cfg.n_heads * hd, cfg.dim),
        p + "attention.wk.weight": (kv, cfg.dim),
        p + "attention.wv.weight": (kv, cfg.dim),
        p + "attention.wo.weight": (cfg.dim, cfg.n_heads * hd),
        p + "feed_forward.w1.weight": (cfg.hidden_dim, cfg.dim),
        p + "feed_forward.w3.weight": (cfg.hidden_dim, cfg.dim),
        p + "feed_forward.w2.weight": (cfg.dim, cfg.hidden_dim),
    }


def ternary_codes(name: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """The int8 ternary codes of one preset linear (uniform over -1, 0, 1)."""
    return torch.randint(-1, 2, shape, generator=_generator(seed, name), dtype=torch.int8)


def float_tensor(name: str, shape: tuple[int, ...], seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Seeded fp32 tensors: N(0, 1) embedding, N(0, 1/dim) head, 1 +- 0.1 norm weights.

    With `out` (an fp32 tensor of `shape`) the values are generated in place: a 2B4T-sized
    embedding is 1.3 GB, and a temporary plus its scaled copy was the build's memory peak."""
    gen = _generator(seed, name)
    t = torch.empty(shape) if out is None else out
    t.normal_(generator=gen)  # the same draws as torch.randn(shape, generator=gen)
    if len(shape) == 1:
        return t.mul_(0.1).add_(1.0)
    std = 1.0 if "embeddings" in name else 1.0 / math.sqrt(shape[1])
    return t.mul_(std)


def outer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the embedding, final norm and output head."""
    return {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,),
            "output.weight": (cfg.vocab_size, cfg.dim)}


def block_tensors(cfg: LlamaConfig, layer: int, seed: int) -> dict[str, tuple[torch.Tensor, float] | torch.Tensor]:
    """One decoder block's weights: linears as (int8 codes, scale), norms as fp32 tensors."""
    out: dict[str, Any] = {}
    for name, shape in block_linear_names(cfg, layer).items():
        out[name] = (ternary_codes(name, shape, seed), ternary_scale(shape[1]))
    for norm in ("attention_norm", "ffn_norm"):
        name = f"layers.{layer}.{norm}.weight"
        out[name] = float_tensor(name, (cfg.dim,), seed)
    return out


def outer_tensors(cfg: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output head (fp32)."""
    return {name: float_tensor(name, shape, seed) for name, shape in outer_shapes(cfg).items()}


def _quant_config(weights: str, activations: str):
    import lowbit
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if activations not in ACTIVATION_CHOICES:
        raise ValueError(f"activations must be one of {ACTIVATION_CHOICES}, got {activations!r}")
    if weights == "none":
        if activations != "none":
            raise ValueError("activations='int8' needs low-bit weights (weights='none' keeps fp layers)")
        return None
    return lowbit.QuantConfig(weights=weights, activations=activations)


def head_config(head: str):
    """The `QuantConfig` of the output head for a ``head=`` choice (None: keep it fp)."""
    import lowbit
    if head not in HEAD_CHOICES:
        raise ValueError(f"head must be one of {HEAD_CHOICES}, got {head!r}")
    if head == "none":
        return None
    if head == "int4":
        return lowbit.QuantConfig(weights="int4_sym", group_size=32, activations="int8")
    return lowbit.QuantConfig(weights="int8", activations="int8")


def embedding_config(embedding: str):
    """The `QuantConfig` of the embedding table for an ``embedding=`` choice (None: keep it fp)."""
    import lowbit
    if embedding not in EMBEDDING_CHOICES:
        raise ValueError(f"embedding must be one of {EMBEDDING_CHOICES}, got {embedding!r}")
    if embedding == "none":
        return None
    if embedding == "int4":
        return lowbit.QuantConfig(weights="int4_sym", group_size=32)
    return lowbit.QuantConfig(weights="int8", granularity="channel")


def build_llama(cfg: LlamaConfig, seed: int = 0, weights: str = "ternary", activations: str = "int8",
                dtype: torch.dtype = torch.float32, head: str = "none",
                embedding: str = "none", fused: bool = False) -> tuple[TinyLlama, float]:
    """The preset model with `block_tensors` weights; returns (model, seconds spent in quantize_).

    Layers are made and quantized one at a time (peak memory: the quantized model plus one
    fp layer). ``weights="none"`` keeps the exact-ternary fp weights (QAT-style) in ``dtype``.
    ``head``: see `HEAD_CHOICES` (quantized in fp32, before any cast to ``dtype``);
    ``embedding``: see `EMBEDDING_CHOICES` (likewise).
    ``fused``: quantized layers' q/k/v and w1/w3 as one linear each (`lowbit.models.fuse_projections_`):
    the same outputs, fewer tensors for dynamo to trace (`generate` builds presets fused).
    """
    import lowbit
    qconfig = _quant_config(weights, activations)
    hconfig = head_config(head)
    econfig = embedding_config(embedding)
    model = TinyLlama(dataclasses.replace(cfg, n_layers=0), dtype)
    model.cfg = cfg
    quantize_s = 0.0
    with torch.no_grad():
        for name, shape in outer_shapes(cfg).items():
            param = model.get_parameter(name)
            if param.dtype == torch.float32 and param.is_contiguous():
                float_tensor(name, shape, seed, out=param)
            else:
                param.copy_(float_tensor(name, shape, seed))
        for i in range(cfg.n_layers):
            block = DecoderBlock(cfg, dtype)
            for name, value in block_tensors(cfg, i, seed).items():
                local = name[len(f"layers.{i}."):]
                if isinstance(value, tuple):
                    codes, scale = value
                    block.get_parameter(local).copy_(codes.to(torch.float32) * scale)
                else:
                    block.get_parameter(local).copy_(value)
            if qconfig is not None:
                t = time.perf_counter()
                lowbit.quantize_(block, qconfig)
                quantize_s += time.perf_counter() - t
                if fused:
                    fuse_projections_(block)
            _cast_float_params_(block, dtype)
            model.layers.append(block)
        if hconfig is not None:
            t = time.perf_counter()
            lowbit.quantize_(model, hconfig, filter_fn=lambda m, fqn: fqn == "output")
            quantize_s += time.perf_counter() - t
        if econfig is not None:
            t = time.perf_counter()
            lowbit.quantize_(model, econfig, filter_fn=lambda m, fqn: fqn == "tok_embeddings")
            quantize_s += time.perf_counter() - t
        for m in (model.tok_embeddings, model.norm, model.output):
            _cast_float_params_(m, dtype)
    return model.eval().requires_grad_(False), quantize_s


def _cast_float_params_(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast float parameters (not buffers: rotary tables stay fp32) except LowBitLinear's scales."""
    import lowbit
    for m in module.modules():
        if isinstance(m, lowbit.LowBitLinear):
            continue
        for p in m.parameters(recurse=False):
            if p.dtype.is_floating_point and p.dtype != dtype:
                p.data = p.data.to(dtype)


# ----------------------------------------------------------------------------- compile counting
class CompileCounter:
    """A dynamo backend that counts what it compiles and delegates to ``backend``.

    ``graphs``: graphs dynamo handed to the backend (one per traced frame / recompile).
    ``compiles``: compilations the backend itself ran; for lowbit's per-signature callable
    each new input signature is one (counted at its compile entry), for other backends
    one per graph. ``seconds``: time spent inside those compilations (lowbit compiles
    lazily on a graph's first call, so this includes that first run).
    """

    def __init__(self, backend: str | Callable = "lowbit"):
        self.backend = resolve_backend(backend)
        self.graphs = 0
        self.compiles = 0
        self.seconds = 0.0
        self._taps = threading.local()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs):
        self.graphs += 1
        t = time.perf_counter()
        compiled = self.backend(gm, example_inputs, **kwargs)
        entry = getattr(compiled, "_compile_entry", None)
        if callable(entry):
            def counted(*a, _entry=entry, **kw):
                t0 = time.perf_counter()
                try:
                    return _entry(*a, **kw)
                finally:
                    self.compiles += 1
                    self.seconds += time.perf_counter() - t0
            compiled._compile_entry = counted
        else:
            self.compiles += 1
        self.seconds += time.perf_counter() - t
        return _Tapped(compiled, self._taps)

    def as_dict(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "compiles": self.compiles, "seconds": round(self.seconds, 3)}

    @contextlib.contextmanager
    def tap(self):
        """The compiled graphs' calls made on this thread inside the block, as
        ``(callable, args, result)`` (what `_DirectStep` replays)."""
        calls: list[tuple[Callable, tuple, Any]] = []
        self._taps.calls = calls
        try:
            yield calls
        finally:
            self._taps.calls = None


class _Tapped:
    """A backend's compiled graph as dynamo calls it, reporting each call to an open
    `CompileCounter.tap()` on the calling thread."""

    def __init__(self, inner: Callable, taps: threading.local):
        self.inner, self.taps = inner, taps

    def __call__(self, *args):
        out = self.inner(*args)
        calls = getattr(self.taps, "calls", None)
        if calls is not None:
            calls.append((self.inner, args, out))
        return out


class _DirectStep:
    """A decode step called straight into its compiled graph, past dynamo's per-call frame and
    guards (the way vLLM's custom dispatcher calls its compiled model).

    Made from the one graph call of a step that went through dynamo (`CompileCounter.tap()`):
    its callable and argument list, with the step's own input tensors (token, position, ...)
    found by identity and its result found in the graph's outputs. It serves the following
    steps of the same sequence only (the runner drops it at `reset()`), in the grad mode it
    was made in: within one generation nothing that dynamo's guards check changes (same
    module objects, parameters and cache buffers, same shapes). What the compiled graph
    checks itself still runs (lowbit: frozen weights' versions, input signatures, run-time
    checks). The runner must know that dynamo's code around the graph has no side effects
    that a direct call would skip (see `_HFRunner.step`).
    """

    def __init__(self, fn: Callable, args: tuple, slots: list[int | None], k_out: int):
        self.fn, self.args, self.slots, self.k_out = fn, list(args), slots, k_out
        self.grad = torch.is_grad_enabled()

    @staticmethod
    def of(calls: list, inputs: Sequence[torch.Tensor], result: Any) -> "_DirectStep | None":
        if len(calls) != 1:  # graph breaks or nothing compiled: keep going through dynamo
            return None
        fn, args, out = calls[0]
        slots: list[int | None] = []
        for t in inputs:
            found = [i for i, a in enumerate(args) if a is t]
            if len(found) > 1:
                return None
            slots.append(found[0] if found else None)
        # An input that is not a graph input of its own must alias one that is (dynamo passes
        # one of two views of a buffer, e.g. HF's position_ids = cache_position.view(1, -1),
        # and derives the other): the graph then reads it through that one.
        passed = {inputs[k].untyped_storage().data_ptr() for k, slot in enumerate(slots) if slot is not None}
        if any(slot is None and t.untyped_storage().data_ptr() not in passed for t, slot in zip(inputs, slots)):
            return None
        if not isinstance(out, (list, tuple)):
            return None
        k_out = [k for k, o in enumerate(out) if o is result]
        if len(k_out) != 1:  # dynamo's code did more than pick a graph output
            return None
        return _DirectStep(fn, args, slots, k_out[0])

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | None:
        if torch.is_grad_enabled() != self.grad:
            return None
        args = self.args
        for slot, t in zip(self.slots, inputs):
            if slot is not None:
                args[slot] = t
        return self.fn(*args)[self.k_out]

    def decode(self, inputs: Sequence[torch.Tensor], steps: int, on_token: Callable[[int], None] | None,
               trust_on_token: bool = False) -> list[int] | None:
        """Up to `steps` greedy tokens in one native loop (`runtime.replay.Plan.decode`), fed
        from `inputs` (token ids `[[t]]`, then the positions; written in place), or None when
        the compiled graph cannot run so (another backend, no replay plan). Between steps
        only `on_token` runs; after it the graph's frozen-tensor check runs too (unless
        `trust_on_token`), and a change stops the loop (the next step goes through the
        graph's own checks)."""
        if torch.is_grad_enabled() != self.grad or self.slots[0] is None:
            return None
        pos = next((s for s in self.slots[1:] if s is not None), None)
        find = getattr(self.fn, "replayer", None)
        if pos is None or find is None:
            return None
        args = self.args
        for slot, t in zip(self.slots, inputs):
            if slot is not None:
                args[slot] = t
        found = find(args)
        if found is None:
            return None
        replayer, check = found
        callback = None
        if on_token is not None:
            def callback(t: int) -> bool:
                on_token(t)
                return not trust_on_token and check is not None and bool(check(args))
        from lowbit.runtime.replay import BUSY, MISMATCH
        out = replayer.decode(args, self.slots[0], pos, self.k_out, steps, callback)
        if out is MISMATCH or out is BUSY:
            return None
        return out[0] or None


def greedy_decode(runner: Any, token: int, pos: int, steps: int,
                  on_token: Callable[[int], None] | None = None, trust_on_token: bool = False) -> list[int]:
    """`steps` greedy tokens after `token` (at position `pos`), each passed to `on_token` as
    soon as it is known. Once a step has gone direct (`_DirectStep`), the rest run in one
    native loop when the compiled graph allows it: no Python between steps but `on_token`
    (`LOWBIT_REPLAY=0` or another backend: one `step` per token). `trust_on_token`: the
    callback changes no tensor of the model (see `generate`)."""
    out: list[int] = []
    while len(out) < steps:
        direct = runner._direct
        if direct is not None:
            got = direct.decode(runner._step_inputs(token, pos), steps - len(out), on_token, trust_on_token)
            if got:
                out += got
                token, pos = got[-1], pos + len(got)
                continue
        token = int(runner.step(token, pos).argmax())
        pos += 1
        out.append(token)
        if on_token is not None:
            on_token(token)
    return out


def resolve_backend(backend: str | Callable) -> Callable:
    if callable(backend):
        return backend
    if backend == "lowbit":
        from lowbit.compiler.backend import lowbit_backend
        return lowbit_backend
    import torch._dynamo
    return torch._dynamo.lookup_backend(backend)


# ----------------------------------------------------------------------------- runners
def mark_seq_dynamic(t: torch.Tensor, dim: int, max_len: int | None = None) -> torch.Tensor:
    """Tell dynamo that ``t``'s ``dim`` is a sequence length: symbolic from the first trace.

    Without it dynamo compiles the first prompt length static and recompiles shape-generic at
    the second one (automatic dynamic shapes), i.e. one compile more than needed. Only sizes
    >= 2 are marked: dynamo specialises 0 and 1 anyway (decode, T=1, is its own graph).
    The mark lives on this tensor object only; nothing global changes.
    """
    if t.shape[dim] >= 2:
        torch._dynamo.maybe_mark_dynamic(t, dim)
    return t


def _takes(fn: Callable, name: str) -> bool:
    """Whether `fn` -- a module, a function, or either compiled by torch.compile -- has a
    parameter `name`."""
    target = getattr(fn, "_orig_mod", fn)
    if isinstance(target, nn.Module):
        target = target.forward
    try:
        return name in inspect.signature(inspect.unwrap(target)).parameters
    except (TypeError, ValueError):
        return False


class _LlamaRunner:
    """`lowbit.models.TinyLlama`: ``forward(tokens, input_pos)`` with its static KV cache.

    ``dynamic``: mark the prompt length symbolic (`mark_seq_dynamic`), so that prefill of every
    length is one compiled graph and decode one more. Off for backends that are best with one
    specialisation per shape (inductor ``dynamic=False`` in the benchmarks).
    """

    kind = "lowbit.models.TinyLlama"

    def __init__(self, model: TinyLlama, fn: Callable, dynamic: bool = True,
                 counter: CompileCounter | None = None):
        self.model, self.fn, self.dynamic = model, fn, dynamic
        self.max_len = model.cfg.max_seq_len
        self.vocab = model.cfg.vocab_size
        self.counter = counter  # the backend `fn` compiles with: decode steps go direct (`_DirectStep`)
        self._direct: _DirectStep | None = None
        # only when what `fn` calls takes it (a wrapper or subclass may keep forward(tokens, pos))
        self.keep_arg = {"logits_to_keep": 1} if _takes(fn, "logits_to_keep") else {}

    def reset(self) -> None:
        reset_caches(self.model)
        self._direct = None

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        ids, pos = tokens.view(1, -1), torch.arange(tokens.numel())
        if self.dynamic:
            mark_seq_dynamic(ids, 1)
            mark_seq_dynamic(pos, 0)
        # the head for the last position only: with a 32000-token vocabulary it was 7% of a
        # 128-token prefill's MACs and, on an fp32 head, about a quarter of its time
        return self.fn(ids, pos, **self.keep_arg)[0, -1]

    def decode(self, token: int, pos: int, steps: int, on_token: Callable[[int], None] | None = None,
               trust_on_token: bool = False) -> list[int]:
        """`greedy_decode` of this runner."""
        return greedy_decode(self, token, pos, steps, on_token, trust_on_token)

    def _step_inputs(self, token: int, pos: int) -> tuple[torch.Tensor, ...]:
        return torch.tensor([[token]]), torch.tensor([pos])

    def step(self, token: int, pos: int) -> torch.Tensor:
        ids, p = self._step_inputs(token, pos)
        if self._direct is not None:
            out = self._direct(ids, p)
            if out is not None:
                return out[0, -1]
        # the prefill's `logits_to_keep` too: a one-token prompt and a decode step stay one graph
        if self.counter is None:
            return self.fn(ids, p, **self.keep_arg)[0, -1]
        with self.counter.tap() as calls:
            out = self.fn(ids, p, **self.keep_arg)
        self._direct = _DirectStep.of(calls, (ids, p), out)
        return out[0, -1]


class _HFRunner:
    """A transformers causal LM called as ``generate()`` calls it: ``past_key_values`` + ``cache_position``."""

    kind = "transformers"

    def __init__(self, model: nn.Module, fn: Callable, cache: str, max_len: int, dynamic: bool = True,
                 counter: CompileCounter | None = None):
        if cache not in ("static", "dynamic"):
            raise ValueError(f"cache must be 'static' or 'dynamic', got {cache!r}")
        self.model, self.fn, self.cache_kind, self.max_len = model, fn, cache, max_len
        self.dynamic = dynamic  # mark sequence dims dynamic (`lowbit.hf.mark_seq_dims`)
        self.counter = counter  # the backend `fn` compiles with: static-cache decode steps go direct
        self._direct: _DirectStep | None = None
        self.vocab = model.config.get_text_config().vocab_size
        self.cache = None
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x renamed `past_key_values` to `cache` (the old name warns)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_arg = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache, StaticCache
        self._direct = None
        if self.cache_kind == "static":
            if self.cache is None:
                self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
                self._initialize_static_cache()
            else:
                self.cache.reset()
        else:
            self.cache = DynamicCache(config=self.model.config)

    def _initialize_static_cache(self) -> None:
        """Allocate the static cache's tensors now: lazily allocated, the first prefill would be
        a graph of its own for dynamo (uninitialised cache) that no later call reuses."""
        shape = getattr(self.model, "_get_static_cache_init_shape", lambda: None)()
        if shape is None or not hasattr(self.cache, "early_initialization"):
            return
        self.cache.early_initialization(batch_size=1, num_heads=shape[0], head_dim=shape[1],
                                        dtype=getattr(self.model, "dtype", torch.float32),
                                        device=getattr(self.model, "device", torch.device("cpu")))

    def _kwargs(self, ids: torch.Tensor, pos: torch.Tensor) -> dict:
        kwargs = dict(input_ids=ids, cache_position=pos, position_ids=pos.view(1, -1), use_cache=True,
                      **{self.cache_arg: self.cache}, **self.keep_arg)
        if self.dynamic:
            from lowbit.hf import mark_seq_dims
            mark_seq_dims(kwargs)
        return kwargs

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.view(1, -1)
        return self.fn(**self._kwargs(ids, torch.arange(ids.shape[1]))).logits[0, -1]

    def decode(self, token: int, pos: int, steps: int, on_token: Callable[[int], None] | None = None,
               trust_on_token: bool = False) -> list[int]:
        """`greedy_decode` of this runner."""
        return greedy_decode(self, token, pos, steps, on_token, trust_on_token)

    def _step_inputs(self, token: int, pos: int) -> tuple[torch.Tensor, ...]:
        p = torch.tensor([pos])
        return torch.tensor([[token]]), p, p.view(1, -1)

    def step(self, token: int, pos: int) -> torch.Tensor:
        ids, p, p_row = self._step_inputs(token, pos)
        if self._direct is not None:
            out = self._direct(ids, p, p_row)
            if out is not None:
                return out[0, -1]
        kwargs = self._kwargs(ids, p)
        # Direct steps need dynamo's code around the graph to be free of side effects. A
        # DynamicCache grows by Python list updates there; a StaticCache's state is tensors
        # the graph updates in place, which is checked here: its Python-level attributes
        # must come out of a step as they went in.
        if self.counter is None or self.cache_kind != "static":
            return self.fn(**kwargs).logits[0, -1]
        before = _python_state(self.cache)
        with self.counter.tap() as calls:
            out = self.fn(**kwargs)
        if _python_state(self.cache) == before:
            self._direct = _DirectStep.of(calls, (ids, p, kwargs["position_ids"]), out.logits)
        return out.logits[0, -1]


def _python_state(cache: Any) -> list:
    """The non-tensor attributes of a transformers cache and of its layers (what a decode
    step could change outside the compiled graph)."""
    def plain(obj):
        return sorted((k, repr(v)) for k, v in vars(obj).items()
                      if not isinstance(v, (torch.Tensor, list, tuple, dict)))
    return [plain(cache)] + [plain(layer) for layer in getattr(cache, "layers", [])]


# ----------------------------------------------------------------------------- results
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass
class GenerationResult:
    tokens: list[int]                  # the new tokens, in order
    prompt_tokens: list[int]
    model: str                         # what ran (preset / directory / class and sizes)
    backend: str
    weights: str
    activations: str
    dtype: str
    threads: int
    load_s: float                      # building or reading the model (without quantize)
    quantize_s: float
    compile_s: float | None            # warm-up (2x prefill + decode step) incl. compiling (None: eager)
    prefill_s: float                   # the timed prefill call (prompt -> first new token)
    decode_s: float                    # the timed decode steps (len(tokens) - 1 of them)
    peak_rss_bytes: int
    compile_counts: dict[str, Any] | None = None
    text: str | None = None            # decoded new tokens when a tokenizer is known
    isa: str | None = None
    head: str = "none"                 # output head format (HEAD_CHOICES)
    embedding: str = "none"            # embedding table format (EMBEDDING_CHOICES)

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_steps(self) -> int:
        return max(0, len(self.tokens) - 1)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 and self.decode_steps else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s, decode_steps=self.decode_steps)
        return d

    def summary(self) -> str:
        """llama.cpp-style timing lines."""
        comp = "eager, nothing compiled" if self.compile_s is None else f"{self.compile_s:8.2f} s"
        counts = ""
        if self.compile_counts:
            counts = f" ({self.compile_counts['graphs']} graph(s), {self.compile_counts['compiles']} compile(s))"
        n_p, n_d = len(self.prompt_tokens), self.decode_steps
        lines = [
            f"model: {self.model}; weights {self.weights}, activations {self.activations}, head {self.head}, "
            + (f"embedding {self.embedding}, " if self.embedding != "none" else "") +
            f"{self.dtype}; "
            f"backend {self.backend}; {self.threads} threads" + (f"; ISA {self.isa}" if self.isa else ""),
            f"load time     = {self.load_s:8.2f} s",
            f"quantize time = {self.quantize_s:8.2f} s",
            f"compile time  = {comp}{counts}  (warm-up: 2x prefill + 1 decode step included)",
            f"prompt eval   = {self.prefill_s * 1e3:10.2f} ms / {n_p:4d} tokens "
            f"({self.prefill_s * 1e3 / max(n_p, 1):8.2f} ms per token, {self.prefill_tok_s:9.2f} tokens per second)",
            f"eval time     = {self.decode_s * 1e3:10.2f} ms / {n_d:4d} runs   "
            f"({self.decode_s * 1e3 / max(n_d, 1):8.2f} ms per token, {self.decode_tok_s:9.2f} tokens per second)",
            f"peak RSS      = {self.peak_rss_bytes / 2 ** 20:8.1f} MiB",
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point
def _as_prompt(prompt_tokens, vocab: int, seed: int, tokenizer=None) -> torch.Tensor:
    if isinstance(prompt_tokens, bool):
        raise TypeError("prompt_tokens must be token ids, a length or text, not a bool")
    if isinstance(prompt_tokens, int):
        if prompt_tokens < 1:
            raise ValueError(f"prompt length must be >= 1, got {prompt_tokens}")
        gen = torch.Generator().manual_seed(seed + 1)
        return torch.randint(0, vocab, (prompt_tokens,), generator=gen)
    if isinstance(prompt_tokens, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (a Hugging Face directory that has one); "
                             "pass token ids or a prompt length instead")
        ids = tokenizer(prompt_tokens, return_tensors="pt")["input_ids"][0]
        return ids.to(torch.int64)
    t = torch.as_tensor(prompt_tokens)
    if t.numel() == 0:
        raise ValueError("prompt_tokens is empty")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"prompt_tokens must be integer token ids, got {t.dtype}")
    t = t.reshape(-1).to(torch.int64)
    if t.numel() == 0:
        raise ValueError("prompt_tokens is empty")
    if int(t.min()) < 0 or int(t.max()) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got min {int(t.min())} max {int(t.max())}")
    return t


def _describe_cfg(cfg: LlamaConfig) -> str:
    return (f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, ffn {cfg.hidden_dim}, "
            f"vocab {cfg.vocab_size}")


def _compile(fn: Callable, backend: str | Callable, counter: CompileCounter | None) -> Callable:
    if backend == "eager":
        return fn
    if backend == "lowbit":
        # Before any trace: see `lowbit.hf.compile` (a guard on torch.compiler.is_exporting's
        # code object would otherwise cost one recompile of a graph that calls it).
        from lowbit.compiler.frontend import _install_thread_aware_readers
        _install_thread_aware_readers()
    # inductor's best case: static shapes, one specialization per shape (prefill, decode)
    kwargs = {"dynamic": False} if backend == "inductor" else {}
    # A code object of its own: repeated calls (new models of one class) must not pile up
    # entries on the class's forward until dynamo gives up on it (lowbit.compiler.own_code).
    return compile_entry(fn, backend=counter if counter is not None else backend, **kwargs)


def generate(model_or_config: str | os.PathLike | LlamaConfig | nn.Module,
             prompt_tokens: Sequence[int] | torch.Tensor | int | str = 32,
             max_new_tokens: int = 32, *,
             weights: str | None = None, activations: str | None = None,
             backend: str | Callable = "lowbit", dtype: str | torch.dtype = torch.float32,
             threads: int | None = None, seed: int = 0, cache: str = "static", head: str = "none",
             embedding: str = "none", on_token: Callable[[int], None] | None = None,
             trust_on_token: bool = False, count_compiles: bool = True) -> GenerationResult:
    """Greedy generation with figures; see the module docstring.

    Args:
        model_or_config: preset name, `LlamaConfig`, Hugging Face directory or module.
        prompt_tokens: token ids, or a length (seeded random ids), or text (needs a tokenizer).
        max_new_tokens: new tokens to produce (>= 1).
        weights / activations: what ``lowbit.quantize_`` applies to the decoder linears
            (defaults: ``ternary`` / ``int8`` for presets and configs; ``none`` / ``none`` for
            Hugging Face models and modules, which run with the weights they have:
            BitNet's BitLinear is compiled as it is).
        backend: ``"lowbit"``, ``"inductor"``, ``"eager"`` (no torch.compile) or a backend callable.
        dtype: of the model's float weights and activations (``float32`` / ``bfloat16``).
        threads: torch and compiled-code threads (None: leave as is).
        cache: for Hugging Face models, ``"static"`` (``StaticCache``) or ``"dynamic"``.
        head: the output head's format (`HEAD_CHOICES`; presets, configs and TinyLlama modules).
        embedding: the embedding table's format (`EMBEDDING_CHOICES`; likewise).
        on_token: called with each new token id as soon as it is produced. Decode steps run
            in one native loop (no Python between steps but this callback); after each call
            of it the compiled weights' sources are checked for changes (~0.1-0.2 ms per token
            at 1B), so that a callback that changes the model is still seen by the next step.
        trust_on_token: ``on_token`` changes no tensor of the model: skip that check.
        count_compiles: wrap the backend in a `CompileCounter` (reported in the result).
    """
    import lowbit
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    head_config(head)  # validates
    embedding_config(embedding)
    if isinstance(backend, str) and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a callable, got {backend!r}")
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)

    tokenizer = None
    t_load = time.perf_counter()
    quantize_s = 0.0
    hf_model = None
    if isinstance(model_or_config, (str, os.PathLike)) and str(model_or_config) in PRESETS:
        model_or_config = PRESETS[str(model_or_config)]
    if isinstance(model_or_config, (str, os.PathLike)):
        from lowbit import hf
        if not hf.is_model_dir(model_or_config):
            raise ValueError(f"{str(model_or_config)!r} is neither a preset ({', '.join(PRESETS)}) "
                             "nor a Hugging Face model directory (with config.json)")
        hf_model = hf.load_pretrained(model_or_config, dtype=dtype)
        tokenizer = hf.load_tokenizer(model_or_config)
        described = f"{model_or_config} ({type(hf_model).__name__})"
    elif isinstance(model_or_config, LlamaConfig):
        cfg = model_or_config
        weights = "ternary" if weights is None else weights
        activations = ("int8" if weights == "ternary" else "none") if activations is None else activations
        _quant_config(weights, activations)  # validate before building
        vocab = cfg.vocab_size
        prompt = _as_prompt(prompt_tokens, vocab, seed)
        cfg = dataclasses.replace(cfg, max_seq_len=prompt.numel() + max_new_tokens, max_batch=1)
        model, quantize_s = build_llama(cfg, seed, weights, activations, dtype, head=head, embedding=embedding,
                                        fused=True)
        described = _describe_cfg(cfg)
    elif isinstance(model_or_config, TinyLlama):
        model = model_or_config
        described = f"TinyLlama ({_describe_cfg(model.cfg)})"
    elif isinstance(model_or_config, nn.Module) and hasattr(model_or_config, "config"):
        hf_model = model_or_config
        described = type(hf_model).__name__
    else:
        raise TypeError("model_or_config must be a preset name, a LlamaConfig, a Hugging Face model directory "
                        f"or an nn.Module, got {type(model_or_config).__name__}")

    if hf_model is not None or isinstance(model_or_config, TinyLlama):
        weights = "none" if weights is None else weights
        activations = "none" if activations is None else activations
        qconfig = _quant_config(weights, activations)
        target = hf_model if hf_model is not None else model_or_config
        t = time.perf_counter()
        if qconfig is not None:
            prefix = "model.layers." if hf_model is not None else "layers."
            lowbit.quantize_(target, qconfig, filter_fn=lambda m, fqn: fqn.startswith(prefix))
        hconfig = head_config(head)
        if hconfig is not None:
            name = "lm_head" if hf_model is not None else "output"
            lowbit.quantize_(target, hconfig, filter_fn=lambda m, fqn: fqn == name)
        econfig = embedding_config(embedding)
        if econfig is not None:
            name = "model.embed_tokens" if hf_model is not None else "tok_embeddings"
            lowbit.quantize_(target, econfig, filter_fn=lambda m, fqn: fqn == name)
        quantize_s = time.perf_counter() - t
    load_s = time.perf_counter() - t_load - quantize_s

    counter = CompileCounter(backend) if count_compiles and backend != "eager" else None
    if hf_model is not None:
        from lowbit import hf
        hf.prepare(hf_model)
        hf_model.eval().requires_grad_(False)
        vocab = hf_model.config.get_text_config().vocab_size
        prompt = _as_prompt(prompt_tokens, vocab, seed, tokenizer)
        fn = _compile(hf_model.forward, backend, counter)
        runner: Any = _HFRunner(hf_model, fn, cache, prompt.numel() + max_new_tokens,
                                dynamic=backend not in ("inductor", "eager"), counter=counter)
    else:
        model = model_or_config if isinstance(model_or_config, TinyLlama) else model
        prompt = _as_prompt(prompt_tokens, model.cfg.vocab_size, seed)
        if prompt.numel() + max_new_tokens > model.cfg.max_seq_len:
            raise ValueError(f"prompt ({prompt.numel()}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"KV cache (max_seq_len {model.cfg.max_seq_len})")
        runner = _LlamaRunner(model, _compile(model, backend, counter), dynamic=backend not in ("inductor", "eager"),
                              counter=counter)

    n_prompt = prompt.numel()
    # The objects alive now (the model and all before it) stay alive while it generates:
    # frozen, the cyclic collector does not walk them again (a full collection during tracing
    # took ~0.23 s of a warm compile of the 1b preset, ~0.04 s frozen). Unfrozen afterwards,
    # so that nothing stays exempt from collection once generate returns.
    gc.freeze()
    try:
        with torch.no_grad():
            compile_s = None
            t = time.perf_counter()
            # Twice: a fresh model's first call can take another path than the steady state
            # (e.g. transformers' StaticCache initializes its tensors lazily on first use, so
            # the call after a reset is a different graph for dynamo).
            for _ in range(2):
                runner.reset()
                first = int(runner.prefill(prompt).argmax())
                if max_new_tokens > 1:
                    runner.step(first, n_prompt)
            warm = time.perf_counter() - t
            if backend != "eager":
                compile_s = warm
            log.info("warm-up (compile) %.2f s", warm)

            runner.reset()
            tokens: list[int] = []
            t = time.perf_counter()
            logits = runner.prefill(prompt)
            nxt = int(logits.argmax())
            prefill_s = time.perf_counter() - t
            tokens.append(nxt)
            if on_token is not None:
                on_token(nxt)
            t = time.perf_counter()
            tokens += runner.decode(nxt, n_prompt, max_new_tokens - 1, on_token, trust_on_token)
            decode_s = time.perf_counter() - t
    except Exception as e:
        raise GenerationError(f"generation with backend {backend!r} failed: {type(e).__name__}: {e}") from e
    finally:
        gc.unfreeze()

    isa = None
    if backend == "lowbit":
        try:
            import lowbit.runtime
            isa = lowbit.runtime.current_isa()
        except Exception:  # the figure is informative only
            isa = None
    text = tokenizer.decode(tokens) if tokenizer is not None else None
    return GenerationResult(
        tokens=tokens, prompt_tokens=prompt.tolist(), model=described,
        backend=backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend)),
        weights=weights, activations=activations, dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(), load_s=load_s, quantize_s=quantize_s, compile_s=compile_s,
        prefill_s=prefill_s, decode_s=decode_s, peak_rss_bytes=peak_rss_bytes(),
        compile_counts=counter.as_dict() if counter is not None else None, text=text, isa=isa, head=head,
        embedding=embedding)


def greedy_reference(model: nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    """Eager greedy tokens of a `TinyLlama` (for tests and benchmarks)."""
    runner = _LlamaRunner(model, model)
    with torch.no_grad():
        runner.reset()
        nxt = int(runner.prefill(prompt).argmax())
        out = [nxt]
        for i in range(n - 1):
            nxt = int(runner.step(nxt, prompt.numel() + i).argmax())
            out.append(nxt)
    return out


def iter_presets() -> Iterable[tuple[str, LlamaConfig]]:
    return PRESETS.items()


class _CallableModule(type(os)):
    """``lowbit.generate`` is both this module and the function: importing the submodule
    rebinds the package attribute to the module, so the module forwards calls to `generate`."""

    def __call__(self, *args, **kwargs) -> GenerationResult:
        return generate(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
