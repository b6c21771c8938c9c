"""The on-disk pieces of an ahead-of-time artifact, shared by the writer and the loader.

Nothing here imports torch-mlir or MLIR: the loader (`lowbit.runtime.artifact`) runs in
processes that have neither. What lives here:

* `ArtifactError` and its kinds (every problem names the file and what is wrong);
* JSON forms of dtypes, size expressions (a small tree of whitelisted sympy nodes: never
  `eval`), tensor signatures (`TensorSpec`) and FX argument values;
* an aligned safetensors writer and a zero-copy reader (every tensor starts on a 64-byte
  boundary; gaps are filled by `__pad__.*` byte tensors, so the file stays a valid
  safetensors file with no holes), and sha256 of files.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from typing import Any

import sympy
import torch

from lowbit.compiler.tensor_spec import TensorSpec

FORMAT = "lowbit-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CODE = "code.so"
WEIGHTS = "weights.safetensors"
ALIGN = 64


class ArtifactError(ValueError):
    """An artifact cannot be written or loaded; the message names the file and the problem."""


class CorruptArtifactError(ArtifactError):
    """A file of the artifact is missing, truncated or altered (checksum, size or format)."""


class IncompatibleArtifactError(ArtifactError):
    """The artifact was built for another lowbit/torch/runtime version or another CPU."""


class UnserializableGraphError(ArtifactError):
    """Part of the compiled program has no serialized form (named in the message)."""


# ----------------------------------------------------------------------------- dtypes
_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# safetensors' names for the same dtypes
_ST_NAMES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int8": "I8",
             "uint8": "U8", "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL"}
_ST_DTYPES = {v: _DTYPES[k] for k, v in _ST_NAMES.items()}
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in _DTYPES.values()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise UnserializableGraphError(f"dtype {dtype} has no serialized form") from None


def dtype_of(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise CorruptArtifactError(f"unknown dtype {name!r}") from None


# ----------------------------------------------------------------------------- size expressions
def _sympy_functions() -> dict[str, Any]:
    from torch.utils._sympy import functions as F

    names = {"Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow, "Max": sympy.Max, "Min": sympy.Min,
             "Mod": sympy.Mod}
    for n in ("FloorDiv", "CeilDiv", "CleanDiv", "ModularIndexing", "PythonMod", "Mod", "IntTrueDiv",
              "FloorToInt", "CeilToInt"):
        if hasattr(F, n):
            names[n] = getattr(F, n)
    return names


def expr_to_json(e: Any) -> Any:
    """An int or sympy size expression -> JSON (ints stay ints)."""
    if isinstance(e, int):
        return e
    if isinstance(e, sympy.Integer) or (isinstance(e, sympy.Basic) and e.is_Integer):
        return int(e)
    if isinstance(e, sympy.Rational):
        return {"q": [int(e.p), int(e.q)]}
    if isinstance(e, sympy.Symbol):
        return {"s": e.name}
    name = type(e).__name__
    if name not in _sympy_functions():
        raise UnserializableGraphError(f"size expression {e} uses {name}, which has no serialized form")
    return {"f": name, "a": [expr_to_json(a) for a in e.args]}


def expr_from_json(j: Any, symbols: dict[str, sympy.Symbol] | None = None) -> Any:
    symbols = {} if symbols is None else symbols
    if isinstance(j, bool):
        raise CorruptArtifactError(f"bad size expression {j!r}")
    if isinstance(j, int):
        return j
    if not isinstance(j, dict):
        raise CorruptArtifactError(f"bad size expression {j!r}")
    if "s" in j:
        name = j["s"]
        if name not in symbols:
            symbols[name] = sympy.Symbol(name, integer=True, positive=True)
        return symbols[name]
    if "q" in j:
        return sympy.Rational(*j["q"])
    fn = _sympy_functions().get(j.get("f"))
    if fn is None:
        raise CorruptArtifactError(f"size expression uses unknown function {j.get('f')!r}")
    return fn(*[expr_from_json(a, symbols) for a in j["a"]])


def spec_to_json(spec: Any) -> dict:
    return {"dtype": dtype_name(spec.dtype), "shape": [expr_to_json(d) for d in spec.shape]}


def spec_from_json(j: dict, symbols: dict[str, sympy.Symbol]) -> TensorSpec:
    return TensorSpec(tuple(expr_from_json(d, symbols) for d in j["shape"]), dtype_of(j["dtype"]))


# ----------------------------------------------------------------------------- files
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """A safetensors file with every tensor 64-byte aligned in the file (so a mapping of the
    file gives aligned tensors)."""
    names = sorted(tensors)
    # The header's length is not known before the offsets, and the offsets depend on it:
    # fix the data start by reserving generous padding in the header.
    layout: list[tuple[str, torch.Tensor, int]] = []
    offset = 0
    entries: dict[str, Any] = {}
    pads = 0
    for name in names:
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise ArtifactError(f"{path}: tensor {name!r} is not a CPU tensor")
        if offset % ALIGN:
            gap = ALIGN - offset % ALIGN
            entries[f"__pad__.{pads}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            pads += 1
            offset += gap
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_NAMES[dtype_name(t.dtype)], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        layout.append((name, t, offset))
        offset += nbytes
    if metadata:
        entries["__metadata__"] = dict(metadata)
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * ((-(8 + len(header))) % ALIGN)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        base = f.tell()
        for name, t, off in layout:
            pos = base + off
            cur = f.tell()
            if cur < pos:
                f.write(b"\0" * (pos - cur))
            t = t.detach().contiguous()
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.dtype != torch.bool
                        else t.to(torch.uint8).reshape(-1).numpy().tobytes())
        end = base + offset
        if f.tell() < end:
            f.write(b"\0" * (end - f.tell()))
    os.replace(tmp, path)


class MappedTensors:
    """The tensors of a safetensors file, as views of one private (copy-on-write) mapping:
    nothing is read before it is used, and writing a tensor never changes the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        size = os.path.getsize(self.path)
        if size < 8:
            raise CorruptArtifactError(f"{self.path}: truncated ({size} bytes; not a safetensors file)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 1 << 28:
                raise CorruptArtifactError(f"{self.path}: header length {n} exceeds the file ({size} bytes): "
                                           "truncated or not a safetensors file")
            try:
                self.header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CorruptArtifactError(f"{self.path}: unreadable header ({e})") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
        self.data_start = 8 + n
        self.metadata = self.header.pop("__metadata__", {}) if isinstance(self.header, dict) else {}
        if not isinstance(self.header, dict):
            raise CorruptArtifactError(f"{self.path}: header is not a JSON object")
        for name, e in self.header.items():
            try:
                begin, end = e["data_offsets"]
                dtype = _ST_DTYPES[e["dtype"]]
                count = 1
                for d in e["shape"]:
                    count *= int(d)
            except (KeyError, TypeError, ValueError):
                raise CorruptArtifactError(f"{self.path}: bad header entry for {name!r}") from None
            if end - begin != count * _ITEMSIZE[dtype] or self.data_start + end > size:
                raise CorruptArtifactError(f"{self.path}: tensor {name!r} lies outside the file or has a "
                                           f"size that does not match its shape (file is {size} bytes)")

    def names(self) -> list[str]:
        return [n for n in self.header if not n.startswith("__pad__.")]

    def get(self, name: str) -> torch.Tensor:
        e = self.header.get(name)
        if e is None:
            raise CorruptArtifactError(f"{self.path}: no tensor {name!r}")
        dtype = _ST_DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        shape = [int(d) for d in e["shape"]]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
        return flat.view(dtype).view(shape)


# ----------------------------------------------------------------------------- FX argument values
_SIMPLE = (int, float, bool, str, type(None))


def value_to_json(v: Any, ref) -> Any:
    """An FX node argument -> JSON. `ref(node)` gives a node's JSON reference."""
    import torch.fx

    if isinstance(v, torch.fx.Node):
        return {"n": ref(v)}
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return {"float": repr(v)}
        return {"float": v}
    if isinstance(v, (list, tuple)):
        return {"list" if isinstance(v, list) else "tuple": [value_to_json(x, ref) for x in v]}
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise UnserializableGraphError(f"a dict argument with non-string keys: {v!r}")
        return {"dict": {k: value_to_json(x, ref) for k, x in v.items()}}
    if isinstance(v, torch.dtype):
        return {"dtype": dtype_name(v)}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).replace("torch.", "")}
    if isinstance(v, torch.layout):
        return {"layout": str(v).replace("torch.", "")}
    raise UnserializableGraphError(f"an argument of type {type(v).__name__} ({v!r}) has no serialized form")


def value_from_json(j: Any, env) -> Any:
    if j is None or isinstance(j, (bool, int, str)):
        return j
    if isinstance(j, dict) and len(j) == 1:
        (k, v), = j.items()
        if k == "n":
            return env(v)
        if k == "float":
            return float(v)
        if k == "list":
            return [value_from_json(x, env) for x in v]
        if k == "tuple":
            return tuple(value_from_json(x, env) for x in v)
        if k == "dict":
            return {a: value_from_json(x, env) for a, x in v.items()}
        if k == "dtype":
            return dtype_of(v)
        if k == "device":
            return torch.device(v)
        if k == "memory_format" and v in ("contiguous_format", "channels_last", "preserve_format",
                                          "channels_last_3d"):
            return getattr(torch, v)
        if k == "layout" and v in ("strided", "sparse_coo"):
            return getattr(torch, v)
    raise CorruptArtifactError(f"bad argument value {j!r}")
