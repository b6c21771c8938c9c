"""Save and load quantized models as safetensors (no pickle), with format metadata and checksums.

File layout: every tensor of ``model.state_dict()`` under its usual key, plus four header
metadata entries (all strings, as safetensors requires):

* ``lowbit.format``  -- ``"lowbit-quantized/1"``
* ``lowbit.layers``  -- JSON ``{fqn: {"spec": LowBitSpec fields, "bias": bool}}`` for every LowBitLinear
* ``lowbit.sha256``  -- JSON ``{tensor key: sha256 hex of its raw little-endian bytes}``
* ``lowbit.header_sha256`` -- sha256 of the canonical JSON of every other metadata entry and
  every tensor's dtype and shape (so header edits that keep the byte checksums consistent,
  e.g. a dtype F32 -> I32 or ``act_format`` int8 -> none, are detected)

Loading checks, in order: the path is a readable file; safetensors can parse it; the lowbit
metadata is present and well formed; the tensor set equals the checksum table; every tensor
of every recorded layer has exactly the dtype and shape its spec implies (and no other
tensor lives under the layer); the header checksum; every data checksum; then, against the
model, every other tensor's dtype. Every failure is a `CheckpointError` naming the file.
Files without a header checksum (written before it existed, or stripped) are refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable, Union

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
HEADER_CHECKSUM_KEY = "lowbit.header_sha256"

#: torch dtype -> safetensors dtype name (the names the file header uses).
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _st in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                   ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _st
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, not a lowbit checkpoint, or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist or is not a regular file."""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (row-major, native little-endian)."""
    flat = t.detach().contiguous().reshape(-1)
    h = hashlib.sha256()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def header_sha256(metadata: dict[str, str], layout: dict[str, tuple[str, list[int]]]) -> str:
    """sha256 of the canonical JSON of the header: every metadata entry but the header
    checksum itself, and every tensor's safetensors dtype name and shape."""
    body = {
        "metadata": {k: v for k, v in metadata.items() if k != HEADER_CHECKSUM_KEY},
        "tensors": {k: [dtype, [int(d) for d in shape]] for k, (dtype, shape) in layout.items()},
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def layer_schema(fqn: str, spec: LowBitSpec, has_bias: bool) -> dict[str, tuple[str, list[int]]]:
    """The tensors a `LowBitLinear` of ``spec`` saves: ``{key: (safetensors dtype, shape)}``."""
    schema = {
        _join(fqn, "packed"): ("U8", list(spec.packed_shape)),
        _join(fqn, "scales"): ("F32", list(spec.scale_shape)),
    }
    if spec.zero_point_shape is not None:
        schema[_join(fqn, "zero_points")] = ("I8", list(spec.zero_point_shape))
    if has_bias:
        schema[_join(fqn, "bias")] = ("F32", [spec.out_features])
    return schema


def save_quantized(model: nn.Module, path: str | os.PathLike,
                   metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s state (packed weights, scales, other parameters) to a safetensors file.

    ``metadata`` adds user string entries to the header (keys starting with "lowbit." are reserved).
    """
    from .embedding import LowBitEmbedding
    embeddings = [fqn for fqn, m in model.named_modules() if isinstance(m, LowBitEmbedding)]
    if embeddings:
        raise NotImplementedError(f"save_quantized does not record LowBitEmbedding layers yet ({embeddings[0]!r}); "
                                  "save the model with a float embedding and quantize it after loading")
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
        if value.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot save state entry {key!r}: dtype {value.dtype} has no safetensors type")
        t = value.detach().contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in seen_storages and t.numel():
            t = t.clone()  # safetensors refuses tensors sharing memory (e.g. tied weights)
        seen_storages.add(storage)
        tensors[key] = t
    header = dict(metadata or {})
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in header.items()):
        raise TypeError("safetensors metadata keys and values must be str")
    if any(k.startswith("lowbit.") for k in header):
        raise ValueError("metadata keys starting with 'lowbit.' are reserved")
    header[FORMAT_KEY] = FORMAT_VALUE
    header[LAYERS_KEY] = json.dumps(layers, sort_keys=True)
    header[CHECKSUMS_KEY] = json.dumps({k: tensor_sha256(t) for k, t in tensors.items()}, sort_keys=True)
    layout = {k: (_ST_DTYPES[t.dtype], list(t.shape)) for k, t in tensors.items()}
    header[HEADER_CHECKSUM_KEY] = header_sha256(header, layout)
    save_file(tensors, os.fspath(path), metadata=header)


def _check_path(path: str | os.PathLike) -> str:
    try:
        path = os.fspath(path)
    except TypeError as e:
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}") from e
    if os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: is a directory; expected a safetensors file written by "
                                      "lowbit.save_quantized")
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file (lowbit checkpoint)")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: not a regular file (lowbit checkpoint)")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied reading the lowbit checkpoint")
    return path


def _parse_layers(path: str, header: dict[str, str]) -> tuple[dict[str, tuple[LowBitSpec, bool]], dict[str, str]]:
    """The recorded layers ``{fqn: (spec, has_bias)}`` and the checksum table, validated."""
    try:
        layers = json.loads(header[LAYERS_KEY])
        checksums = json.loads(header[CHECKSUMS_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed lowbit metadata ({type(e).__name__}: {e})") from e
    if not isinstance(layers, dict) or not isinstance(checksums, dict):
        raise CheckpointError(f"{path}: malformed lowbit metadata (expected JSON objects)")
    for key, digest in checksums.items():
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise CheckpointError(f"{path}: malformed checksum for tensor {key!r}: {digest!r}")
    parsed: dict[str, tuple[LowBitSpec, bool]] = {}
    for fqn, entry in layers.items():
        try:
            if not isinstance(entry, dict) or set(entry) != {"spec", "bias"}:
                raise ValueError(f"expected an object with keys 'spec' and 'bias', got {entry!r}")
            if not isinstance(entry["bias"], bool):
                raise ValueError(f"'bias' must be true or false, got {entry['bias']!r}")
            spec = LowBitSpec.from_dict(entry["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad metadata for layer {fqn!r}: {e}") from e
        parsed[fqn] = (spec, entry["bias"])
    return parsed, checksums


def _check_layer_schema(path: str, layers: dict[str, tuple[LowBitSpec, bool]],
                        layout: dict[str, tuple[str, list[int]]]) -> None:
    for fqn, (spec, has_bias) in layers.items():
        schema = layer_schema(fqn, spec, has_bias)
        for key, (dtype, shape) in schema.items():
            if key not in layout:
                raise CheckpointError(f"{path}: layer {fqn!r} ({spec.describe()}) needs tensor {key!r}, "
                                      "which the file does not hold")
            got_dtype, got_shape = layout[key]
            if got_dtype != dtype or list(got_shape) != shape:
                raise CheckpointError(
                    f"{path}: tensor {key!r} is {got_dtype} {list(got_shape)} but layer {fqn!r} "
                    f"({spec.describe()}, K={spec.in_features}, N={spec.out_features}) needs {dtype} {shape}")
        prefix = _join(fqn, "")
        for key in layout:
            if key.startswith(prefix) and key not in schema and "." not in key[len(prefix):]:
                raise CheckpointError(f"{path}: unexpected tensor {key!r} in quantized layer {fqn!r} "
                                      f"(expected {sorted(schema)})")


def read_quantized(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """Read and verify a checkpoint: (tensors, layers metadata, full header metadata).

    Raises CheckpointError for unreadable/corrupt files, missing or malformed lowbit
    metadata, tensors whose dtype/shape do not fit their layer, a header or data checksum
    mismatch; CheckpointNotFoundError (also a FileNotFoundError) for a missing file or a
    directory.
    """
    path = _check_path(path)
    try:
        with safe_open(path, framework="pt") as f:
            header = dict(f.metadata() or {})
            layout = {}
            for k in f.keys():
                sl = f.get_slice(k)
                layout[k] = (str(sl.get_dtype()), [int(d) for d in sl.get_shape()])
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers/data
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    version = header.get(FORMAT_KEY)
    if version != FORMAT_VALUE:
        raise CheckpointError(f"{path}: not a lowbit checkpoint ({FORMAT_KEY!r} is "
                              f"{version!r}, expected {FORMAT_VALUE!r})")
    layers, checksums = _parse_layers(path, header)
    if set(checksums) != set(layout):
        missing, extra = sorted(set(checksums) - set(layout)), sorted(set(layout) - set(checksums))
        raise CheckpointError(f"{path}: tensors do not match the checksum table "
                              f"(missing {missing}, unlisted {extra})")
    _check_layer_schema(path, layers, layout)
    if HEADER_CHECKSUM_KEY not in header:
        raise CheckpointError(f"{path}: no {HEADER_CHECKSUM_KEY!r} entry: the header is unprotected (written "
                              "by a lowbit older than the header checksum, or edited); re-save it with "
                              "lowbit.save_quantized")
    if header[HEADER_CHECKSUM_KEY] != header_sha256(header, layout):
        raise CheckpointError(f"{path}: header checksum mismatch: the metadata or a tensor's dtype/shape "
                              "was changed after saving (corrupt or edited file)")
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in layout}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    for key, t in tensors.items():
        if tensor_sha256(t) != checksums[key]:
            raise CheckpointError(f"{path}: checksum mismatch for tensor {key!r} (corrupt file)")
    layer_meta = {fqn: {"spec": spec.to_dict(), "bias": bias} for fqn, (spec, bias) in layers.items()}
    return tensors, layer_meta, header


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
    path = os.fspath(path)
    state: dict[str, object] = dict(tensors)
    for fqn, entry in layers.items():
        spec = LowBitSpec.from_dict(entry["spec"])  # validated by read_quantized
        _install_layer(model, fqn, spec, entry["bias"], path)
        state[_join(fqn, "_extra_state")] = model.get_submodule(fqn).get_extra_state()
    current = model.state_dict()
    for key, t in tensors.items():
        want = current.get(key)
        if isinstance(want, torch.Tensor) and want.dtype != t.dtype:
            # load_state_dict would silently convert (e.g. int32 bits into a float norm weight)
            raise CheckpointError(f"{path}: tensor {key!r} is {t.dtype} in the file but {want.dtype} "
                                  "in the model")
    if strict:
        unrecorded = [fqn for fqn, m in model.named_modules() if isinstance(m, LowBitLinear) and fqn not in layers]
        if unrecorded:
            raise CheckpointError(f"{path}: model has quantized layers {unrecorded} that the file does not record")
    try:
        model.load_state_dict(state, strict=strict)
    except (RuntimeError, ValueError, TypeError) as e:  # ValueError: LowBitLinear's validation
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
