"""`lowbit.aot`: compile a model once into an artifact directory; load and run it anywhere
lowbit's runtime is installed, without torch-mlir.

    import lowbit.aot
    lowbit.aot.compile(model, [(tokens, pos), (tokens1, pos1)], dynamic_shapes=({1: "T"}, {0: "T"}),
                       path="llama.lowbit")
    art = lowbit.aot.load("llama.lowbit")          # in any process; imports no MLIR
    logits = art(tokens, pos)

    lowbit.aot.compile_preset("demo", "demo.lowbit")   # the built-in Llama presets (`lowbit compile`)
    llama = lowbit.aot.load_llama("demo.lowbit")       # prefill / step / generate for those

`load` lives in `lowbit.runtime.artifact` and `compile` in `lowbit.compiler.aot`; this module
imports neither until used. docs/aot.md describes the workflow and the artifact format.
"""
from __future__ import annotations

import dataclasses
import os
import time
import types
from typing import Any, Sequence

import torch

__all__ = ["compile", "load", "compile_preset", "load_llama", "AOTLlama", "ArtifactError"]


def __getattr__(name: str):
    if name in ("ArtifactError", "CorruptArtifactError", "IncompatibleArtifactError", "UnserializableGraphError"):
        from lowbit.compiler import artifact_format
        return getattr(artifact_format, name)
    raise AttributeError(f"module 'lowbit.aot' has no attribute {name!r}")


def compile(model, example_inputs, dynamic_shapes=None, path: str | os.PathLike | None = None, **kwargs) -> str:
    """See `lowbit.compiler.aot.compile`."""
    from lowbit.compiler import aot

    return aot.compile(model, example_inputs, dynamic_shapes, path, **kwargs)


def load(path: str | os.PathLike, verify: str = "full"):
    """See `lowbit.runtime.artifact.load`."""
    from lowbit.runtime import artifact

    return artifact.load(path, verify=verify)


def llama_examples(prompt_len: int, max_seq_len: int) -> tuple[list[tuple], tuple]:
    """Example inputs of a `TinyLlama`: a prefill of `prompt_len` tokens (any length: dynamic)
    and one decode step; and the matching dynamic_shapes."""
    if not 2 <= prompt_len < max_seq_len:
        raise ValueError(f"prompt_len must be in [2, max_seq_len={max_seq_len}), got {prompt_len}")
    prefill = (torch.zeros(1, prompt_len, dtype=torch.int64), torch.arange(prompt_len))
    decode = (torch.zeros(1, 1, dtype=torch.int64), torch.tensor([prompt_len]))
    return [prefill, decode], ({1: "T"}, {0: "T"})


def compile_preset(preset, path: str | os.PathLike, *, max_seq_len: int = 256, seed: int = 0,
                   weights: str = "ternary", activations: str = "int8", target: str | None = None,
                   overwrite: bool = False, prompt_len: int = 8, fused: bool = True) -> str:
    """Build a `lowbit.generate` preset Llama (a name or a `LlamaConfig`; seeded weights, as
    `lowbit.generate` builds them: by default with q/k/v and w1/w3 fused into one linear each,
    the same outputs with fewer tensors to trace) and compile it to `path`."""
    from lowbit.generate import PRESETS, build_llama
    from lowbit.models import LlamaConfig

    if isinstance(preset, LlamaConfig):
        base, name = preset, next((k for k, v in PRESETS.items() if v == preset), "custom")
    elif preset in PRESETS:
        base, name = PRESETS[preset], preset
    else:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    cfg = dataclasses.replace(base, max_seq_len=max_seq_len, max_batch=1)
    t = time.perf_counter()
    model, _ = build_llama(cfg, seed, weights, activations, fused=fused)
    build_s = time.perf_counter() - t
    examples, dyn = llama_examples(prompt_len, max_seq_len)
    info = {"kind": "llama", "preset": name, "seed": seed, "weights": weights, "activations": activations,
            "fused": fused, "max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size, "dim": cfg.dim, "n_layers": cfg.n_layers, "build_s": round(build_s, 3)}
    return compile(model, examples, dyn, path, target=target, overwrite=overwrite, model_info=info)


class AOTLlama(torch.nn.Module):
    """A loaded Llama artifact (`compile_preset`, or any `TinyLlama` compiled with
    `model_info={"kind": "llama", "max_seq_len": ..., "vocab_size": ...}`) as a module called
    like `TinyLlama` (`forward(tokens, input_pos)`, `cfg.max_seq_len`, `cfg.vocab_size`), so
    `lowbit.generate`'s Llama runner drives it; plus reset / prefill / step / generate."""

    def __init__(self, artifact: Any):
        super().__init__()
        info = artifact.model_info
        if info.get("kind") != "llama":
            raise ValueError(f"{artifact.path} is not a Llama artifact (model info {info})")
        self.artifact = artifact
        self.max_len = int(info["max_seq_len"])
        self.vocab = int(info["vocab_size"])
        self.cfg = types.SimpleNamespace(max_seq_len=self.max_len, vocab_size=self.vocab)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        out = self.artifact(tokens, input_pos)  # the artifact computes every position's logits
        return out[:, -logits_to_keep:] if logits_to_keep else out

    def reset(self) -> None:
        self.artifact.reset()

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.artifact(tokens.view(1, -1), torch.arange(tokens.numel()))[0, -1]

    def step(self, token: int, pos: int) -> torch.Tensor:
        return self.artifact(torch.tensor([[token]]), torch.tensor([pos]))[0, -1]

    def generate(self, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy tokens after `prompt` (the KV cache is reset first)."""
        prompt = torch.as_tensor(prompt, dtype=torch.int64).reshape(-1)
        if prompt.numel() + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({prompt.numel()}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"artifact's KV cache ({self.max_len})")
        self.reset()
        nxt = int(self.prefill(prompt).argmax())
        out = [nxt]
        for i in range(max_new_tokens - 1):
            nxt = int(self.step(nxt, prompt.numel() + i).argmax())
            out.append(nxt)
        return out


def load_llama(path: str | os.PathLike, verify: str = "full") -> AOTLlama:
    return AOTLlama(load(path, verify=verify))
