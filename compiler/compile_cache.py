"""A persistent cache of compiled code for `torch.compile(backend="lowbit")`, across processes.

What is cached: the machine code of each compiled graph part (what `compile_captured` makes
of one captured graph: a whole graph, a region, a partition), as a one-entry shared library
built like an artifact's (`aot.link`), plus its signature and pipeline report. Capture,
weight binding, regions and partitioning still run in every process (they are cheap and
they bind the model's own tensors); a hit skips the MLIR pipeline and LLVM code generation.

The key (sha256) covers everything the code depends on and nothing else:
- the captured FX graph's code (ops, wiring, constant arguments, the bound layers' formats
  and tilings as `lowbit.packed_linear` arguments), input/output specs with their size
  symbols and ranges, specialised scalars, and the bytes of any tensor frozen into the code;
- `CompileOptions`, `LOWBIT_TARGET`, `LOWBIT_DISABLE_PASSES`, the runtime's ISA, this CPU's
  model name and flags (the JIT tunes for the host);
- lowbit, torch, torch-mlir versions, the runtime ABI and this cache's format version, and a
  sha256 of lowbit's compiler/passes/quant sources and runtime library (a development
  checkout changes code generation without a version change).
Weights are not in the key: bound weights are runtime buffers, so one entry serves every
model with the same structure (and different weights).

Where: `$LOWBIT_CACHE_DIR`, else `$XDG_CACHE_HOME/lowbit`, else `~/.cache/lowbit` (subdirectory
`compile-v1`). `LOWBIT_CACHE=0` (or false/no/off) turns it off. `LOWBIT_CACHE_SIZE` bounds it
(default 2G; K/M/G suffixes): after each store the least recently used entries (by the time
of their last hit) are removed until it fits. Writes are atomic (temporary file + rename, the
library before its JSON, so a JSON means a complete entry); stores and evictions hold an
exclusive `flock` on `<dir>/.lock`, so concurrent processes neither corrupt nor half-delete
entries. An entry that fails its checksum or does not load is deleted and recompiled.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

log = logging.getLogger("lowbit.cache")

CACHE_FORMAT = 2
DEFAULT_MAX_BYTES = 2 << 30
_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


class CacheConfigError(ValueError):
    """LOWBIT_CACHE or LOWBIT_CACHE_SIZE holds a value they do not accept."""


def enabled() -> bool:
    raw = os.environ.get("LOWBIT_CACHE", "").strip().lower()
    if raw in _OFF:
        return False
    if raw in _ON:
        return True
    raise CacheConfigError(f"LOWBIT_CACHE={os.environ['LOWBIT_CACHE']!r}: expected 1/true/yes/on or "
                           "0/false/no/off")


def cache_dir() -> Path:
    base = os.environ.get("LOWBIT_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg, "lowbit") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    return Path(base) / f"compile-v{CACHE_FORMAT}"


def max_bytes() -> int:
    raw = os.environ.get("LOWBIT_CACHE_SIZE", "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = raw.upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in units else ""
    try:
        value = int(float(text[: len(text) - len(unit)]) * units[unit])
    except ValueError:
        value = -1
    if value < 0:
        raise CacheConfigError(f"LOWBIT_CACHE_SIZE={raw!r}: expected a size such as 500M or 2G")
    return value


# ----------------------------------------------------------------------------- key
def _context() -> dict:
    from lowbit.compiler.aot import versions
    from lowbit.compiler.aot_target import cpu_flags
    from lowbit.runtime import current_isa

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"versions": versions(), "source": source_fingerprint(), "isa": current_isa(), "cpu": model,
            "flags": sorted(cpu_flags()),
            "LOWBIT_TARGET": os.environ.get("LOWBIT_TARGET", ""),
            "LOWBIT_DISABLE_PASSES": os.environ.get("LOWBIT_DISABLE_PASSES", ""), "format": CACHE_FORMAT}


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """sha256 of lowbit's compiler, passes and quant sources and of the runtime library: a
    development checkout changes code generation without changing `lowbit.__version__`."""
    import lowbit
    from lowbit.runtime.library import runtime_library_path

    root = Path(lowbit.compiler.__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in ("compiler", "passes", "quant"):
        for f in sorted((root / sub).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    h.update(Path(runtime_library_path()).read_bytes())
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    if not t.numel():
        return f"empty{tuple(t.shape)}{t.dtype}"
    raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    return hashlib.sha256(memoryview(raw.reshape(-1).numpy())).hexdigest() + f"{tuple(t.shape)}{t.dtype}"


def key(captured: Any, options: Any) -> str:
    gm = captured.graph_module
    consts = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = getattr(gm, node.target, None)
        consts[node.target] = _tensor_digest(value) if isinstance(value, torch.Tensor) else repr(value)
    payload = {
        "context": _context(),
        "options": repr(options),
        "code": gm.code,
        "inputs": [str(s) for s in captured.input_specs],
        "outputs": [str(s) for s in captured.output_specs],
        "unique_outputs": [str(s) for s in captured.unique_output_specs()],
        "ranges": {k: list(v) for k, v in sorted(captured.symbol_ranges.items())},
        "specialized": {str(k): repr(v) for k, v in captured.specialized.items()},
        "frozen": {str(k): _tensor_digest(v) for k, v in captured.frozen.items()},
        "constants": consts,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- storage
@contextlib.contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _drop(directory: Path, k: str) -> None:
    for suffix in (".json", ".so", ".safetensors"):
        with contextlib.suppress(OSError):
            (directory / f"{k}{suffix}").unlink()


class _Loaded:
    """What a hit gives: the entry (a `NativeFunction`) and its pipeline report."""

    def __init__(self, fn, report: list, traps=None):
        self.fn, self.report, self.traps = fn, report, traps


def _read_meta(k: str):
    """(cache directory, path, parsed JSON) of entry `k`'s metadata; None if absent or unreadable."""
    directory = cache_dir()
    meta_path = directory / f"{k}.json"
    try:
        return directory, meta_path, json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None


def lookup(k: str) -> _Loaded | None:
    from lowbit.compiler.artifact_format import spec_from_json
    from lowbit.compiler.jit import NativeFunction, alias_outputs_from_json
    from lowbit.runtime.library import load_openmp, load_runtime

    found = _read_meta(k)
    if found is None:
        return None
    directory, meta_path, meta = found
    so = directory / f"{k}.so"
    try:
        data = so.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError("checksum mismatch")
        load_openmp()
        load_runtime()
        lib = ctypes.CDLL(str(so), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        address = ctypes.cast(getattr(lib, meta["symbol"]), ctypes.c_void_p).value
        syms: dict = {}
        inputs = [spec_from_json(s, syms) for s in meta["inputs"]]
        outputs = [spec_from_json(s, syms) for s in meta["outputs"]]
        fn = NativeFunction(address, meta["func"], inputs, outputs,
                            {n: (lo, hi) for n, (lo, hi) in meta["symbol_ranges"].items()}, owner=lib,
                            alias_outputs=alias_outputs_from_json(meta.get("alias_outputs"), inputs, outputs, str(so)))
        traps = None
        if meta.get("traps"):
            from lowbit.compiler.compile import Traps

            flag = ctypes.cast(getattr(lib, meta["traps"]["symbol"]), ctypes.c_void_p).value
            traps = Traps(flag, list(meta["traps"]["messages"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("compile cache entry %s is damaged (%s); removing it", so, e)
        with _locked(directory):
            _drop(directory, k)
        return None
    with contextlib.suppress(OSError):
        os.utime(meta_path)  # LRU: the last hit
    return _Loaded(fn, list(meta.get("report", [])), traps)


def store(k: str, jit: Any, report: list, traps: Any = None) -> bool:
    """Link `jit`'s object code into the cache under `k`; False if that failed (never raises:
    a failed store only logs, the compiled code in this process is unaffected)."""
    from lowbit.compiler.aot import _entry_manifest, link, traps_manifest

    try:
        report_json = json.loads(json.dumps(report))
    except (TypeError, ValueError):
        log.info("compile cache: report of %s is not JSON; not cached", k[:12])
        return False
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
            obj = os.path.join(tmp, "entry.o")
            jit.dump_object(obj)

            class _Entry:
                func_name = jit.func_name
                object_bytes = Path(obj).read_bytes()

            so_tmp = os.path.join(tmp, "entry.so")
            # JIT code is not position independent: the library keeps text relocations.
            (symbol,) = link([_Entry], so_tmp, extra_flags=["-Wl,-z,notext"])
            data = Path(so_tmp).read_bytes()
        meta = _entry_manifest(jit)
        meta.update(symbol=symbol, traps=traps_manifest(traps, "lowbit_traps_0"), sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), report=report_json,
                    created=time.time())
        with _locked(directory):
            _atomic_write(directory / f"{k}.so", data)
            _atomic_write(directory / f"{k}.json", json.dumps(meta).encode())
            _evict(directory, max_bytes())
        return True
    except Exception as e:  # the cache is an optimisation: never fail a compile for it
        log.warning("compile cache: storing %s failed: %s", k[:12], e)
        return False


def _evict(directory: Path, limit: int) -> None:
    entries = []
    total = 0
    for meta in directory.glob("*.json"):
        try:
            size = sum(f.stat().st_size for f in directory.glob(meta.stem + ".*"))
            entries.append((meta.stat().st_mtime, meta.stem, size))
        except OSError:
            continue
        total += size
    entries.sort()
    while total > limit and entries:
        _, k, size = entries.pop(0)
        log.info("compile cache: evicting %s (%d bytes; cache %d > %d bytes)", k[:12], size, total, limit)
        _drop(directory, k)
        total -= size


def entries() -> list[str]:
    """Keys of the compiled parts currently in the cache."""
    return sorted(p.stem for p in cache_dir().glob("*.json") if p.with_suffix(".so").exists())


def programs() -> list[str]:
    """Keys of the whole programs currently in the cache."""
    return sorted(p.stem for p in cache_dir().glob("*.json") if p.with_suffix(".safetensors").exists())


# ----------------------------------------------------------------------------- whole programs
# A dynamo graph's whole compiled program (what the backend returns for one signature), keyed
# by the graph, its inputs' signature and the bytes of the module state (packed weights are
# derived from them): a hit skips capture, binding and regions too, not only code generation.
# The program refers to its compiled parts by their part keys (above) and stores the derived
# packed tensors in `<key>.safetensors`.

def _graph_code(gm: Any) -> str:
    """The graph's Python code without the placeholders' type annotations. Generated from the
    graph, not read from `gm.code`: on dynamo's lazy graph modules that property also compiles
    the code (an `exec`), which a hit never runs. Annotations name the Python class of each
    input (`torch.nn.parameter.Parameter`, or the subclass lowbit switches module state to
    while a compiled graph watches it, `module_state.watch_data_writes`): not part of what is
    compiled, and they would make the same graph traced before and after another compile
    differ. Inputs' dtypes, shapes and which are module state are keyed separately."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    saved = [n.type for n in placeholders]
    try:
        for n in placeholders:
            n.type = None
        return gm.graph.python_code(root_module="self").src
    finally:
        for n, t in zip(placeholders, saved):
            n.type = t


def graph_code(gm: Any) -> str:
    """What a program key says of a dynamo graph: its code (`_graph_code`) and that of every
    graph module nested in it (the subgraphs of `torch.compiler.nested_compile_region` calls),
    by attribute name. The backend takes it before inlining those calls
    (`frontend.inline_nested_regions`): the flat graph is a function of these codes, and
    ~390 + ~100 nodes cost a third of the 1650 inlined ones (the 1b preset's prefill graph)."""
    parts = [_graph_code(gm)]
    for name, mod in gm.named_modules():
        if mod is not gm and isinstance(mod, torch.fx.GraphModule):
            parts.append(f"# nested graph module {name}\n{_graph_code(mod)}")
    return "\n".join(parts)


def program_key(gm: Any, args: Any, freezable: Any, dynamic_dims: Any, size_inputs: Any, options: Any,
                code: str | None = None) -> str:
    """The key of a whole program. Module state the program writes (KV caches) is left out of
    the weights digest: its contents at compile time do not change the program. Which positions
    those are is only known after a compile; it is kept per graph in `<pre-key>.mutable`.
    `code`: the graph's `graph_code` taken before inlining (the backend's); else `gm`'s now."""
    h = hashlib.sha256()
    code = graph_code(gm) if code is None else code
    h.update(json.dumps({"context": _context(), "options": repr(options), "code": code,
                         "freezable": list(freezable), "dynamic": repr(sorted((k, sorted(v.items()))
                                                                              for k, v in dynamic_dims.items())),
                         }, sort_keys=True, default=str).encode())
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            dyn = dynamic_dims.get(i, {})
            h.update(repr((i, [None if d in dyn else s for d, s in enumerate(a.shape)], str(a.dtype),
                           a.requires_grad)).encode())
        elif i in size_inputs:
            h.update(repr((i, "size")).encode())
        else:
            h.update(repr((i, type(a).__name__, a if isinstance(a, (int, float, bool, str, type(None))) else "?")).encode())
    return "p" + h.hexdigest()


def _mutable_positions(pre: str) -> list[int] | None:
    try:
        return [int(i) for i in json.loads((cache_dir() / f"{pre}.mutable").read_text())]
    except (OSError, ValueError, TypeError):
        return None


# The module state's digest in program keys: a fast non-cryptographic 128-bit hash (two
# XXH64 of the bytes, native code in the runtime library, ~16 GB/s on one core against sha256's
# ~2 GB/s). The key detects any change of the weights short of a crafted collision, which
# the cache need not resist: a program's packed buffers come from the weights that key it,
# so whoever could choose colliding weights already chooses the model's outputs.
_SEEDS = (0x6C6F77626974, 0x636163686531)  # "lowbit", "cache1"


@functools.lru_cache(maxsize=1)
def _digest_fn():
    from lowbit.runtime.library import load_runtime

    fn = load_runtime().lowbit_artifact_digest128
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64,
                   ctypes.POINTER(ctypes.c_uint64)]
    return fn


def fast_digest(data: Any, nbytes: int | None = None) -> str:
    """The 128-bit digest (hex) of a contiguous byte range: a `bytes`-like object, or an address
    and `nbytes`."""
    out = (ctypes.c_uint64 * 2)()
    if isinstance(data, int):
        if nbytes is None or nbytes < 0:
            raise ValueError("fast_digest(address, nbytes): nbytes must be a non-negative int")
        _digest_fn()(data, nbytes, _SEEDS[0], _SEEDS[1], out)
    else:
        view = memoryview(data).cast("B")
        buf = (ctypes.c_char * len(view)).from_buffer_copy(view) if view.readonly else \
            (ctypes.c_char * len(view)).from_buffer(view)
        _digest_fn()(ctypes.addressof(buf), len(view), _SEEDS[0], _SEEDS[1], out)
    return f"{out[0]:016x}{out[1]:016x}"


def _state_bytes_digest(t: torch.Tensor) -> str:
    """Digest of a module-state tensor's contents (logical order), dtype and shape."""
    if t.device.type != "cpu" or t.layout != torch.strided or is_traceable_wrapper_subclass(t):
        return _tensor_digest(t)  # wrapper subclasses, other devices: the portable sha256 path
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if not t.numel():
        return f"empty{tuple(t.shape)}{t.dtype}"
    return "x" + fast_digest(t.data_ptr(), t.numel() * t.element_size()) + f"{tuple(t.shape)}{t.dtype}"


# id(tensor) -> (weak reference, identity, digest): the module state is hashed once per process,
# not once per graph (prefill and decode graphs read the same weights). Reused only while the
# same tensor object is alive with the same version counter (every in-place op through the
# tensor or a view of it bumps it), data pointer, storage, shape, strides and dtype. Inference
# tensors have no version counter: they are hashed every time. (A write through `.data` moves
# the tensor's counter only while lowbit watches it, `module_state`; the memo sees exactly what
# the run-time version-counter guards see.)
_DIGESTS: dict[int, tuple] = {}


def _identity(t: torch.Tensor) -> tuple:
    return (t._version, t.data_ptr(), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(),
            t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _state_digest(t: torch.Tensor) -> str:
    if t.is_inference():
        return _state_bytes_digest(t)  # no version counter: nothing proves it unchanged
    hit = _DIGESTS.get(id(t))
    try:
        ident = _identity(t)
    except (RuntimeError, NotImplementedError, TypeError):  # no storage of its own: no memo
        return _state_bytes_digest(t)
    if hit is not None and hit[0]() is t and hit[1] == ident:
        return hit[2]
    digest = _state_bytes_digest(t)
    if len(_DIGESTS) > 100_000:
        _DIGESTS.clear()
    _DIGESTS[id(t)] = (weakref.ref(t), ident, digest)
    return digest


# Digests started ahead (`prefetch_state_digests`): threads hashing module state into the memo
# above while dynamo finishes the graph (guards, bytecode); `program_weights_key` joins them.
_PREFETCH: list[threading.Thread] = []
_PREFETCH_LOCK = threading.Lock()


def prefetch_state_digests(tensors: Any) -> None:
    """Start hashing these module-state tensors in a background thread (the native digest runs
    without the GIL), so that the program lookup at the graph's first call finds them in the
    memo. The backend calls it when dynamo hands it a graph: dynamo still builds the graph's
    guards and bytecode before that first call (for the 953M preset's prefill graph, ~0.1 s
    of Python against a 1.3 GB digest of ~0.07 s). The memo's rules are unchanged: a digest is
    reused only while the tensor has the identity it was hashed with (an in-place write during
    or after hashing changes the version counter, and the lookup hashes again)."""
    # plain CPU tensors only (native digest; no tensor-subclass dispatch off the main thread)
    todo = [t for t in tensors if isinstance(t, torch.Tensor) and not t.is_inference() and t.device.type == "cpu"
            and t.layout == torch.strided and not is_traceable_wrapper_subclass(t)]
    if not todo:
        return
    thread = threading.Thread(target=_digest_all, args=(todo,), name="lowbit-state-digest", daemon=True)
    with _PREFETCH_LOCK:
        _PREFETCH.append(thread)
    thread.start()


def _digest_all(tensors: list) -> None:
    for t in tensors:
        try:
            _state_digest(t)
        except Exception as e:  # noqa: BLE001 (the lookup hashes it again and reports what fails)
            log.debug("compile cache: digest prefetch of a %s tensor failed: %s", tuple(t.shape), e)


def _join_prefetch() -> None:
    with _PREFETCH_LOCK:
        pending = list(_PREFETCH)
        _PREFETCH.clear()
    for thread in pending:
        thread.join()


def program_weights_key(pre: str, args: Any, freezable: Any, mutable: list[int]) -> str:
    _join_prefetch()
    h = hashlib.sha256(pre.encode())
    skip = set(mutable)
    for i in sorted(freezable):
        if i not in skip and isinstance(args[i], torch.Tensor):
            h.update(f"{i}:{_state_digest(args[i])}".encode())
    return "p" + h.hexdigest()


class _ProgramWriter:
    """`aot._Writer` whose compiled entries are compile-cache parts (by key), not objects."""

    def __new__(cls):
        from lowbit.compiler.aot import _Writer

        class W(_Writer):
            def callable(self, obj):
                from lowbit.compiler.aot import contract
                from lowbit.compiler.artifact_format import UnserializableGraphError
                from lowbit.compiler.compile import CompiledGraph

                if isinstance(obj, CompiledGraph):
                    k = getattr(obj, "cache_key", None)
                    if k is None:
                        raise UnserializableGraphError("a compiled part is not in the cache")
                    return {"kind": "compiled", "entry": k, "contract": contract(obj.captured)}
                return super().callable(obj)
        return W()


def store_program(pre: str, args: Any, freezable: Any, compiled: Any) -> bool:
    from lowbit.compiler.artifact_format import write_safetensors
    from lowbit.compiler.partition import BoundGraph

    if not isinstance(compiled, BoundGraph) or getattr(compiled.inner, "captured", None) is None:
        return False
    try:
        mutable = sorted(i for i in compiled.inner.captured.mutated_inputs if i < len(args))
        k = program_weights_key(pre, args, freezable, mutable)
        writer = _ProgramWriter()
        body = writer.callable(compiled)
        meta = {"body": body, "sources": list(compiled.binding.sources),
                "state_positions": list(compiled.binding.state_positions),
                "report": json.loads(json.dumps(compiled.report)), "created": time.time()}
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{k}.safetensors.")
        os.close(fd)
        try:
            write_safetensors(tmp, writer.tensors)
            with _locked(directory):
                os.replace(tmp, directory / f"{k}.safetensors")
                _atomic_write(directory / f"{k}.json", json.dumps(meta).encode())
                _atomic_write(directory / f"{pre}.mutable", json.dumps(mutable).encode())
                _evict(directory, max_bytes())
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return True
    except Exception as e:  # noqa: BLE001 (an optimisation: never fail a compile for it)
        log.info("compile cache: program %s not stored: %s", pre[:12], e)
        return False


class CachedProgram:
    """A whole program from the cache, with the interface `backend.LowbitCallable` expects of
    a `partition.BoundGraph` (guards on the tensors the packed buffers came from)."""

    def __init__(self, body, binding, args, report: list, weights):
        from lowbit.compiler.compile import FrozenGuard

        self.inner = body.inner
        self._body = body
        self.binding = binding
        self.captured = None
        self.report = report
        self._weights = weights  # keeps the mapping alive
        self.frozen_guard = FrozenGuard({p: args[p] for p in binding.sources if isinstance(args[p], torch.Tensor)})
        self._source_ptrs = [(p, args[p].data_ptr()) for p in binding.sources if isinstance(args[p], torch.Tensor)]

    def frozen_inputs_changed(self, args):
        return self.frozen_guard.changed(args)

    @property
    def guarded(self) -> bool:
        return bool(self.binding.sources)

    def state_replaced(self, args) -> bool:
        return all(args[p].data_ptr() != ptr for p, ptr in self._source_ptrs)

    @property
    def replayer(self):
        return getattr(self._body, "replayer", None)

    def __call__(self, *args):
        return self._body(*args)


def lookup_program(pre: str, args: Any, freezable: Any) -> CachedProgram | None:
    import types

    from lowbit.compiler.artifact_format import MappedTensors
    from lowbit.runtime.artifact import build_part

    mutable = _mutable_positions(pre)
    if mutable is None:
        return None
    k = program_weights_key(pre, args, freezable, mutable)
    found = _read_meta(k)
    if found is None:
        return None
    directory, meta_path, meta = found
    try:
        weights = MappedTensors(directory / f"{k}.safetensors")
        parts: dict[str, Any] = {}

        def entry(name):
            if name not in parts:
                hit = lookup(name)
                if hit is None:
                    raise KeyError(f"part {name[:12]} is no longer cached")
                parts[name] = (hit.fn, hit.traps)
            return parts[name]
        body = build_part(meta["body"], entry, weights.get, str(meta_path))
        binding = types.SimpleNamespace(derived=list(body.derived), sources=list(meta["sources"]),
                                        state_positions=list(meta["state_positions"]))
        program = CachedProgram(body, binding, args, list(meta.get("report", [])), weights)
    except Exception as e:  # noqa: BLE001 (damaged or partly evicted: compile again)
        log.info("compile cache: program %s unusable (%s); compiling", k[:12], e)
        with _locked(directory):
            _drop(directory, k)
        return None
    with contextlib.suppress(OSError):
        os.utime(meta_path)
    return program
