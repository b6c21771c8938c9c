"""Save and load quantized models as safetensors (no pickle), with format metadata and checksums.

File layout: every tensor of ``model.state_dict()`` under its usual key, plus three header
metadata entries (all strings, as safetensors requires):

* ``lowbit.format``  -- ``"lowbit-quantized/1"``
* ``lowbit.layers``  -- JSON ``{fqn: {"spec": LowBitSpec fields, "bias": bool}}`` for every LowBitLinear
* ``lowbit.sha256``  -- JSON ``{tensor key: sha256 hex of its raw little-endian bytes}``
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .formats import LowBitSpec
from .module import LowBitLinear

FORMAT_KEY = "lowbit.format"
FORMAT_VALUE = "lowbit-quantized/1"
LAYERS_KEY = "lowbit.layers"
CHECKSUMS_KEY = "lowbit.sha256"


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, not a lowbit checkpoint, or does not fit the model."""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (row-major, native little-endian)."""
    flat = t.detach().contiguous().reshape(-1)
    h = hashlib.sha256()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def save_quantized(model: nn.Module, path: str | os.PathLike,
                   metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s state (packed weights, scales, other parameters) to a safetensors file.

    ``metadata`` adds user string entries to the header (keys starting with "lowbit." are reserved).
    """
    layers = {fqn: {"spec": m.spec.to_dict(), "bias": m.bias is not None}
              for fqn, m in model.named_modules() if isinstance(m, LowBitLinear)}
    extra_keys = {_join(fqn, "_extra_state") for fqn in layers}
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in model.state_dict().items():
        if key in extra_keys:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot save state entry {key!r} of type {type(value).__name__}: only "
                            "tensors and LowBitLinear metadata can go into a safetensors file")
        t = value.detach().contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in seen_storages and t.numel():
            t = t.clone()  # safetensors refuses tensors sharing memory (e.g. tied weights)
        seen_storages.add(storage)
        tensors[key] = t
    header = dict(metadata or {})
    if any(k.startswith("lowbit.") for k in header):
        raise ValueError("metadata keys starting with 'lowbit.' are reserved")
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in header.items()):
        raise TypeError("safetensors metadata keys and values must be str")
    header[FORMAT_KEY] = FORMAT_VALUE
    header[LAYERS_KEY] = json.dumps(layers, sort_keys=True)
    header[CHECKSUMS_KEY] = json.dumps({k: tensor_sha256(t) for k, t in tensors.items()}, sort_keys=True)
    save_file(tensors, os.fspath(path), metadata=header)


def read_quantized(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """Read and verify a checkpoint: (tensors, layers metadata, full header metadata).

    Raises CheckpointError for unreadable/corrupt files, missing or malformed lowbit
    metadata, and any tensor whose bytes do not match its recorded checksum.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers/data
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if header.get(FORMAT_KEY) != FORMAT_VALUE:
        raise CheckpointError(f"{path}: not a lowbit checkpoint ({FORMAT_KEY!r} is "
                              f"{header.get(FORMAT_KEY)!r}, expected {FORMAT_VALUE!r})")
    try:
        layers = json.loads(header[LAYERS_KEY])
        checksums = json.loads(header[CHECKSUMS_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed lowbit metadata ({e})") from e
    if not isinstance(layers, dict) or not isinstance(checksums, dict):
        raise CheckpointError(f"{path}: malformed lowbit metadata (expected JSON objects)")
    if set(checksums) != set(tensors):
        missing, extra = sorted(set(checksums) - set(tensors)), sorted(set(tensors) - set(checksums))
        raise CheckpointError(f"{path}: tensors do not match the checksum table "
                              f"(missing {missing}, unlisted {extra})")
    for key, t in tensors.items():
        if tensor_sha256(t) != checksums[key]:
            raise CheckpointError(f"{path}: checksum mismatch for tensor {key!r} (corrupt file)")
    return tensors, layers, header


ModelOrFactory = Union[nn.Module, Callable[[], nn.Module]]


def load_quantized(model_or_factory: ModelOrFactory, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into a model and return it.

    ``model_or_factory`` is a model (float or already quantized) or a zero-argument callable
    building one. ``nn.Linear`` layers recorded as quantized in the file are replaced by
    `LowBitLinear` modules of the recorded format; layers that are already `LowBitLinear`
    must have exactly the recorded format. Then the state dict is loaded (``strict``).
    """
    tensors, layers, _ = read_quantized(path)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory returned {type(model).__name__}, expected an nn.Module")
    state: dict[str, object] = dict(tensors)
    for fqn, entry in layers.items():
        try:
            spec = LowBitSpec.from_dict(entry["spec"])
            has_bias = entry["bias"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad metadata for layer {fqn!r}: {e}") from e
        _install_layer(model, fqn, spec, bool(has_bias), path)
        state[_join(fqn, "_extra_state")] = model.get_submodule(fqn).get_extra_state()
    if strict:
        unrecorded = [fqn for fqn, m in model.named_modules() if isinstance(m, LowBitLinear) and fqn not in layers]
        if unrecorded:
            raise CheckpointError(f"{path}: model has quantized layers {unrecorded} that the file does not record")
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model: {e}") from e
    return model


def _install_layer(model: nn.Module, fqn: str, spec: LowBitSpec, has_bias: bool, path: str) -> None:
    try:
        current = model.get_submodule(fqn)
    except AttributeError as e:
        raise CheckpointError(f"{path}: layer {fqn!r} recorded in the file does not exist in the model") from e
    if isinstance(current, LowBitLinear):
        if current.spec != spec:
            raise CheckpointError(f"{path}: layer {fqn!r} is {current.spec.describe()} in the model "
                                  f"but {spec.describe()} in the file")
        return
    if type(current) is not nn.Linear:
        raise CheckpointError(f"{path}: layer {fqn!r} is a {type(current).__name__}, expected nn.Linear")
    if (current.in_features, current.out_features) != (spec.in_features, spec.out_features):
        raise CheckpointError(
            f"{path}: layer {fqn!r} is Linear({current.in_features}, {current.out_features}) in the "
            f"model but ({spec.in_features}, {spec.out_features}) in the file")
    replacement = LowBitLinear.from_spec(spec, bias=has_bias)
    parent_name, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, name, replacement)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
