"""Hugging Face helpers: make transformers' low-bit models compile, build small ones, load directories.

transformers is optional (``pip install 'lowbit[hf]'``); nothing here imports it at module
import time, and every function that needs it raises an ImportError that says how to get it.

- `prepare(model)` makes a transformers model traceable by an outer ``torch.compile`` (any
  backend). transformers' BitNet ``BitLinear`` carries methods decorated with a nested
  ``@torch.compile`` (``activation_quant``, ``post_quant_process``); dynamo 2.13 inlines them
  but fails building a guard on the wrapper's ``__defaults__`` ("object of type 'NoneType'
  has no len()"), before any backend is reached. `prepare` gives each affected module a
  subclass whose methods are the original, undecorated functions (the same code
  transformers wraps), so dynamo traces plain methods. The weights, ``isinstance`` checks
  and ``state_dict`` are unchanged; calling it again is a no-op.
- `compile(model, backend="lowbit")`: ``torch.compile`` of ``model.forward`` with the
  sequence dims marked dynamic on every call, so ``model.generate()`` compiles at most twice
  (prefill, decode) for every prompt length, with the static and the dynamic cache.
- `make_bitnet` / `make_llama` build ``BitNetForCausalLM`` (through transformers' own
  ``replace_with_bitnet_linear``: packed uint8 ternary weights, per-token int8 activations)
  and ``LlamaForCausalLM`` (QAT-style: fp weights that are exactly ternary times a
  power-of-two scale) from small configs with deterministic weights. No hub access.
- `save_pretrained` / `load_pretrained` write and read a model directory (``config.json`` +
  ``model.safetensors``; no pickle). `load_pretrained` also reads BitNet checkpoints without
  ``accelerate`` by replacing the linears with transformers' ``BitLinear`` itself.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.compiler.own_code import compile_entry

log = logging.getLogger("lowbit.hf")

_ORIG = "_torchdynamo_orig_callable"  # set by torch.compile on the functions it wraps
_PREPARED = "_lowbit_prepared"        # marks the subclasses made by `prepare`


def require_transformers():
    """Import transformers or raise an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this needs Hugging Face transformers: pip install 'lowbit[hf]' "
                          "(or pip install transformers with torch pinned)") from e
    return transformers


# ----------------------------------------------------------------------------- prepare
def _compiled_original(value: Any) -> Any | None:
    """The undecorated callable behind a nested ``torch.compile`` wrapper, else None."""
    if isinstance(value, (staticmethod, classmethod)):
        inner = _compiled_original(value.__func__)
        return None if inner is None else type(value)(inner)
    orig = getattr(value, _ORIG, None) if callable(value) else None
    if orig is None:
        return None
    # torch.compile of a torch.compile'd function: unwrap all the way.
    while callable(orig) and getattr(orig, _ORIG, None) is not None:
        orig = getattr(orig, _ORIG)
    return orig


_unwrapped_classes: dict[type, type] = {}


def _unwrapped_class(cls: type) -> type:
    if getattr(cls, _PREPARED, False):
        return cls
    if cls in _unwrapped_classes:
        return _unwrapped_classes[cls]
    namespace: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # most derived definition wins
        for name, value in vars(klass).items():
            orig = _compiled_original(value)
            if orig is not None:
                namespace[name] = orig
            elif name in namespace:
                del namespace[name]  # a subclass overrides a compiled method with a plain one
    new = cls
    if namespace:
        namespace[_PREPARED] = True
        namespace["__module__"] = cls.__module__
        namespace["__qualname__"] = cls.__qualname__
        new = type(cls.__name__, (cls,), namespace)
        log.debug("prepare: %s.%s: unwrapped nested torch.compile on %s", cls.__module__,
                  cls.__qualname__, ", ".join(sorted(k for k in namespace if not k.startswith("_"))))
    _unwrapped_classes[cls] = new
    return new


def _instance_wrappers(module: nn.Module) -> list[str]:
    """Names of instance attributes that are nested torch.compile wrappers of methods."""
    names = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if _compiled_original(getattr(value, "__func__", value)) is not None:
            names.append(name)
    return names


def prepare(model: nn.Module) -> nn.Module:
    """Make ``model`` safe to wrap in an outer ``torch.compile`` (any backend); returns it.

    Every module whose class (or instance) carries methods wrapped in a nested
    ``torch.compile`` gets them back undecorated (see the module docstring for the dynamo
    failure this avoids). Nothing else changes: parameters, buffers, ``isinstance``,
    ``state_dict``. Idempotent; ``lowbit.generate`` calls it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects an nn.Module, got {type(model).__name__}")
    changed = 0
    for module in model.modules():
        cls = type(module)
        new = _unwrapped_class(cls)
        if new is not cls:
            module.__class__ = new
            changed += 1
        for name in _instance_wrappers(module):
            value = vars(module)[name]
            func = getattr(value, "__func__", None)
            orig = _compiled_original(func if func is not None else value)
            bound = orig.__get__(module, type(module)) if func is not None else orig
            setattr(module, name, bound)
            changed += 1
    if changed:
        log.info("prepare: unwrapped nested torch.compile helpers on %d module(s)", changed)
    return model


def patch_transformers() -> list[str]:
    """Unwrap the nested ``torch.compile`` helpers on transformers' BitNet classes themselves.

    `prepare` fixes one model; this fixes every BitNet model made afterwards (and before) in
    the process, for code paths that never see the model before dynamo does (e.g. a user's own
    ``torch.compile(model.forward)``). It changes transformers' classes in place: in eager
    mode the helpers then run uncompiled (same arithmetic). Returns ``Class.method`` names
    unwrapped; a no-op when transformers is missing or already patched.
    """
    try:
        from transformers.integrations import bitnet
    except ImportError:
        return []
    done = []
    for cls in vars(bitnet).values():
        if not isinstance(cls, type) or not issubclass(cls, (nn.Module, torch.autograd.Function)):
            continue
        for name, value in list(vars(cls).items()):
            orig = _compiled_original(value)
            if orig is not None:
                setattr(cls, name, orig)
                done.append(f"{cls.__name__}.{name}")
    if done:
        log.info("patch_transformers: unwrapped %s", ", ".join(done))
    return done


def nested_compiled_helpers(model: nn.Module) -> list[str]:
    """``module.method`` for every method of ``model`` still wrapped in a nested ``torch.compile``."""
    import inspect
    found = set()
    for fqn, module in model.named_modules():
        cls = type(module)
        names = {n for klass in cls.__mro__ for n in vars(klass)}
        for name in names:
            if _compiled_original(inspect.getattr_static(cls, name, None)) is not None:
                found.add(f"{fqn or '<root>'}.{name}")
        found.update(f"{fqn or '<root>'}.{n}" for n in _instance_wrappers(module))
    return sorted(found)


# ----------------------------------------------------------------------------- compile
# Inputs of a transformers causal LM's forward whose dim grows with the sequence.
_SEQ_DIMS = {"input_ids": (1,), "inputs_embeds": (1,), "position_ids": (-1,), "cache_position": (0,),
             "attention_mask": (-1,)}


def mark_seq_dims(kwargs: dict[str, Any]) -> None:
    """Mark the sequence dims of a forward call's tensors dynamic (see `compile`).

    With a static cache of length L, the query length gets the range [2, L - 1]: transformers'
    mask code takes another branch when the query fills the whole cache (``q_len == L``), and
    a range that holds L makes torch.export reject the graph (a guard ``q_len != L`` it
    cannot express). A prefill that fills the cache leaves no room for a new token anyway.
    """
    from lowbit.generate import mark_seq_dynamic
    caches = [kwargs.get(name) for name in ("past_key_values", "cache")]
    static_len = min((int(layer.max_cache_len) for c in caches for layer in getattr(c, "layers", ()) or ()
                      if not _is_dynamic_layer(layer) and isinstance(getattr(layer, "max_cache_len", None), int)),
                     default=None)
    for name, dims in _SEQ_DIMS.items():
        t = kwargs.get(name)
        if not isinstance(t, torch.Tensor) or not t.ndim:
            continue
        for d in dims:
            d %= t.ndim
            if static_len is not None and name != "attention_mask" and 2 <= t.shape[d] < static_len:
                torch._dynamo.mark_dynamic(t, d, min=2, max=static_len - 1)
            else:
                mark_seq_dynamic(t, d)
    for cache in caches:
        for layer in getattr(cache, "layers", ()) or ():
            # Only caches that grow (DynamicLayer and subclasses): a static cache keeps its size.
            if _is_dynamic_layer(layer):
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor) and t.ndim >= 2:
                        mark_seq_dynamic(t, t.ndim - 2)


def _is_dynamic_layer(layer: Any) -> bool:
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        return False
    return isinstance(layer, DynamicLayer)


class _DynamicSeqForward:
    """``model.forward`` replacement: marks sequence dims dynamic, then calls the compiled forward."""

    def __init__(self, compiled: Any, original: Any):
        self.compiled, self.original = compiled, original
        import functools
        functools.update_wrapper(self, original)  # generate() inspects forward's signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # positional input_ids (a user calling model(ids))
            kwargs = {"input_ids": args[0], **kwargs}
            args = args[1:]
        mark_seq_dims(kwargs)
        return self.compiled(*args, **kwargs)


def compile(model: nn.Module, backend: Any = "lowbit", **compile_kwargs: Any) -> nn.Module:
    """Compile a transformers causal LM for ``generate()``: at most two compiles for all lengths.

    ``model.forward = torch.compile(model.forward, backend=...)`` as transformers documents it
    works, but dynamo then traces the first prompt length static, the first decode step with
    the cache length static, and recompiles shape-generic when a length changes (with the
    default dynamic cache the key/value length changes every step: one more compile for the
    second step, one for the second prompt length). This marks every sequence dim dynamic
    before each call (``input_ids``, ``attention_mask``, ``position_ids``, ``cache_position``
    and a growing cache's keys/values; `lowbit.generate.mark_seq_dynamic`), so prefill of any
    length is one graph and decode one more, with the static and the dynamic cache. The marks
    are set on the call's tensors only; dynamo's global configuration is untouched.

    Also runs `prepare` (nested ``torch.compile`` helpers of BitNet). Returns ``model`` with
    ``model.forward`` replaced; ``model.forward.original`` is the uncompiled forward.
    """
    import torch._dynamo  # noqa: F401  (mark_dynamic)
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile expects an nn.Module, got {type(model).__name__}")
    prepare(model)
    # lowbit's capture makes torch.compiler.is_exporting thread-aware by replacing its code
    # object on first use; transformers' mask code calls it, so dynamo guards on that code
    # object and the first graph traced before the replacement would be recompiled once.
    # Doing the replacement now, before any trace, keeps the count at two.
    from lowbit.compiler.frontend import _install_thread_aware_readers
    _install_thread_aware_readers()
    forward = model.forward
    if isinstance(forward, _DynamicSeqForward):
        forward = forward.original
    if backend == "lowbit":
        from lowbit.compiler.backend import lowbit_backend as backend  # noqa: F811
    # Through a code object of its own: every transformers model's forward shares the code of
    # transformers' deprecate_kwarg wrapper, on which dynamo would otherwise gather every
    # compiled model's entries until it stops compiling (lowbit.compiler.own_code).
    model.forward = _DynamicSeqForward(compile_entry(forward, backend=backend, **compile_kwargs), forward)
    return model


# ----------------------------------------------------------------------------- building
def _pow2_scale(fan_in: int) -> float:
    """A power of two near 1/sqrt(fan_in): ternary * this keeps activations O(1), exactly in fp16/bf16."""
    return 2.0 ** -round(math.log2(math.sqrt(fan_in)))


def _ternary(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)


def _fill_float_(p: torch.Tensor, name: str, gen: torch.Generator) -> None:
    if p.ndim >= 2:
        std = 1.0 if "embed" in name else 1.0 / math.sqrt(p.shape[-1])
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    elif p.dtype.is_floating_point:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def bitnet_config(**overrides):
    """A small ``BitNetConfig`` (2 layers, hidden 128, vocab 256) with ``overrides`` applied.

    It carries a BitNet ``quantization_config`` (``lm_head`` stays fp), so a directory saved
    from it loads as a BitNet checkpoint.
    """
    transformers = require_transformers()
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    kw.update(overrides)
    config = transformers.BitNetConfig(**kw)
    config.quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear",
                                  "quantization_mode": "offline", "modules_to_not_convert": ["lm_head"]}
    return config


def llama_config(**overrides):
    """A small ``LlamaConfig`` (2 layers, hidden 128, vocab 256) with ``overrides`` applied."""
    transformers = require_transformers()
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def _bitnet_quant_config(config):
    from transformers.utils.quantization_config import BitNetQuantConfig
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return BitNetQuantConfig(modules_to_not_convert=["lm_head"])
    if isinstance(qc, dict):
        qc = {k: v for k, v in qc.items() if k != "quant_method"}
        return BitNetQuantConfig(**qc)
    return qc


def _empty_model(config, dtype: torch.dtype):
    """``AutoModelForCausalLM.from_config`` without running the (slow, memory-touching) init."""
    transformers = require_transformers()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if _is_bitnet_quantized(config):
        from transformers.integrations.bitnet import replace_with_bitnet_linear
        qc = _bitnet_quant_config(config)
        replace_with_bitnet_linear(model, modules_to_not_convert=qc.modules_to_not_convert or ["lm_head"],
                                   quantization_config=qc)
    return model


def _is_bitnet_quantized(config) -> bool:
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitnet"


def make_bitnet(config=None, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``BitNetForCausalLM`` with random ternary weights, ready to run (eval, no grad).

    The decoder linears are transformers' ``BitLinear`` (made by its own
    ``replace_with_bitnet_linear``): uint8-packed ternary codes and a ``weight_scale`` that is
    a power of two (``y = (int8(x) @ q) / (s_x * weight_scale)``). Embedding, norms and
    ``lm_head`` are seeded floats. Same ``config`` and ``seed`` -> same weights.
    """
    require_transformers()
    from transformers.integrations.bitnet import BitLinear, pack_weights
    config = config if config is not None else bitnet_config()
    if not _is_bitnet_quantized(config):
        config.quantization_config = bitnet_config().quantization_config
    model = _empty_model(config, dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bitlinear = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
        for name, m in sorted(model.named_modules()):
            if name in bitlinear:
                q = _ternary((m.out_features, m.in_features), gen)
                m.weight.copy_(pack_weights(q.clone()))
                m.weight_scale.fill_(1.0 / _pow2_scale(m.in_features))
                if m.bias is not None:
                    m.bias.zero_()
        for name, p in sorted(model.named_parameters()):
            owner = name.rsplit(".", 1)[0]
            if owner not in bitlinear:
                _fill_float_(p, name, gen)
    _finish_buffers(model, config, dtype)
    return model.eval().requires_grad_(False)


def make_llama(config=None, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``LlamaForCausalLM`` whose decoder linears hold exact ternary fp weights (QAT export).

    Each ``q/k/v/o/gate/up/down_proj`` weight is ``q * s`` with ternary ``q`` and one
    power-of-two ``s`` per tensor, so ``lowbit.quantize_`` / the compiler recognise it
    losslessly; embedding, norms and ``lm_head`` are seeded floats.
    """
    require_transformers()
    config = config if config is not None else llama_config()
    model = _empty_model(config, dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                q = _ternary(tuple(p.shape), gen)
                p.copy_(q.to(torch.float32) * _pow2_scale(p.shape[1]))
            else:
                _fill_float_(p, name, gen)
    _finish_buffers(model, config, dtype)
    return model.eval().requires_grad_(False)


def _finish_buffers(model: nn.Module, config, dtype: torch.dtype) -> None:
    """Recompute buffers that ``no_init_weights`` may have left uninitialised (rotary tables)."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=config)
            for bname, buf in fresh.named_buffers(recurse=False):
                setattr(module, bname, buf)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()


# ----------------------------------------------------------------------------- directories
def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (tied weights stored once)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(path / "config.json"))
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and getattr(model.config, "tie_word_embeddings", False):
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM from a local directory (``config.json`` + ``*.safetensors``), eval, no grad.

    BitNet checkpoints (``quantization_config.quant_method == "bitnet"``) get transformers'
    ``BitLinear`` layers first, so their packed uint8 weights load as they are. Tensors must
    match the model exactly (missing or unexpected names raise ValueError); only safetensors
    are read.
    """
    transformers = require_transformers()
    from safetensors.torch import load_file
    path = Path(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (pickle checkpoints are not read)")
    config = transformers.AutoConfig.from_pretrained(str(path))
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    model = _empty_model(config, dtype)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match {type(model).__name__}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, t in state.items():
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"{path}: {name} has shape {list(t.shape)}, the model expects {list(want.shape)}")
        if t.dtype != want.dtype:
            state[name] = t.to(want.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    _finish_buffers(model, config, dtype)
    log.info("loaded %s from %s (%d tensors)", type(model).__name__, path, len(state))
    return model.eval().requires_grad_(False)


def load_tokenizer(path: str | os.PathLike):
    """The directory's tokenizer if it has one (``tokenizer.json`` / ``tokenizer_config.json``), else None."""
    p = Path(path)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # a broken tokenizer should not stop token-id generation
        log.warning("could not load the tokenizer in %s: %s", p, e)
        return None


def config_summary(config) -> dict[str, Any]:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


def dumps_config(config) -> str:
    return json.dumps(config_summary(config))
