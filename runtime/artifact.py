"""Load and run an ahead-of-time artifact (`lowbit.aot.compile`) without the compiler.

This module and what it imports never import torch-mlir or MLIR: it needs torch, sympy,
numpy, lowbit's runtime library and OpenMP. Loading (`load`) checks, in order and before
any compiled code is mapped:

1. `manifest.json`: readable JSON, its own checksum (`manifest_sha256` over the rest),
   format version, lowbit / torch versions and the runtime library's ABI version;
2. the target: this CPU has every flag the code may use (else `IncompatibleArtifactError`:
   never SIGILL);
3. every file's size and sha256 (`verify="full"`, the default). `verify="fast"` checks the
   code's sha256 and the weights' size and header only (the weights' bytes are then not
   read at load: a flipped bit in them goes unnoticed);

then opens `code.so` (RTLD_NOW: a missing symbol fails here) and maps the weights (one
private copy-on-write mapping: pages are read when used, writes never reach the file).

A loaded artifact is called like the model: `art(tokens, pos)` with torch tensors or numpy
arrays (numpy in, numpy out). Every call picks the first program whose input guard accepts
the inputs (static signatures first), runs it, and writes mutable state (KV caches) in
place; `reset()` restores the state's initial values.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import operator
import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import sympy
import torch

from lowbit.compiler.artifact_format import (CODE, FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, ArtifactError,
                                             CorruptArtifactError, IncompatibleArtifactError, MappedTensors,
                                             canonical_json, dtype_of, expr_from_json, sha256_file,
                                             spec_from_json, value_from_json)
from lowbit.compiler.jit import InputError, NativeFunction, _DynamicSignature, alias_outputs_from_json, write_back
from lowbit.runtime.replay import Replayer, recorder

log = logging.getLogger("lowbit.artifact")

__all__ = ["load", "LoadedArtifact", "ArtifactError", "CorruptArtifactError", "IncompatibleArtifactError",
           "InputError"]


# ----------------------------------------------------------------------------- checks
def _read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not an artifact directory")
    try:
        with open(mpath, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CorruptArtifactError(f"{mpath}: cannot read the manifest ({e.strerror})") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptArtifactError(f"{mpath}: not valid JSON ({e}); truncated or edited") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptArtifactError(f"{mpath}: not a lowbit artifact manifest")
    claimed = manifest.pop("manifest_sha256", None)
    if claimed != hashlib.sha256(canonical_json(manifest)).hexdigest():
        raise CorruptArtifactError(f"{mpath}: checksum mismatch (the manifest was edited or damaged)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IncompatibleArtifactError(f"{mpath}: artifact format version {manifest.get('format_version')}, "
                                        f"this lowbit reads version {FORMAT_VERSION}")
    return manifest


def _check_versions(path: str, manifest: dict) -> None:
    import lowbit
    from lowbit.runtime.library import load_runtime

    v = manifest.get("versions", {})
    mpath = os.path.join(path, MANIFEST)
    have = {"lowbit": lowbit.__version__, "torch": torch.__version__}
    for key, now in have.items():
        if v.get(key) != now:
            raise IncompatibleArtifactError(f"{mpath}: built with {key} {v.get(key)}, this process has {key} {now}; "
                                            "recompile the artifact")
    abi = int(load_runtime().lowbit_rt_abi_version())
    if v.get("runtime_abi") != abi:
        raise IncompatibleArtifactError(f"{mpath}: built against lowbit runtime ABI {v.get('runtime_abi')}, the "
                                        f"loaded runtime library has ABI {abi}")


def _check_target(path: str, manifest: dict) -> None:
    from lowbit.compiler.aot_target import CodeTarget, check_runs_here

    t = manifest.get("target") or {}
    try:
        target = CodeTarget(t["name"], t["cpu"], tuple(t["features"]), tuple(t["requires"]))
    except (KeyError, TypeError):
        raise CorruptArtifactError(f"{os.path.join(path, MANIFEST)}: no valid target") from None
    check_runs_here(target, os.path.join(path, CODE))


def _check_files(path: str, manifest: dict, verify: str) -> None:
    files = manifest.get("files") or {}
    for name in (CODE, WEIGHTS):
        fpath = os.path.join(path, name)
        info = files.get(name)
        if not isinstance(info, dict):
            raise CorruptArtifactError(f"{os.path.join(path, MANIFEST)}: no entry for {name}")
        try:
            size = os.path.getsize(fpath)
        except OSError:
            raise CorruptArtifactError(f"{fpath}: missing") from None
        if size != info.get("bytes"):
            raise CorruptArtifactError(f"{fpath}: {size} bytes, the manifest says {info.get('bytes')} "
                                       "(truncated or replaced)")
        if verify == "full" or name == CODE:
            if sha256_file(fpath) != info.get("sha256"):
                raise CorruptArtifactError(f"{fpath}: sha256 mismatch (the file was altered or damaged)")


# ----------------------------------------------------------------------------- program pieces
_OPERATORS = {n: getattr(operator, n) for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod",
                                                  "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge")}


def _resolve_op(name: str) -> Callable:
    if name.startswith("operator."):
        fn = _OPERATORS.get(name[len("operator."):])
        if fn is None:
            raise CorruptArtifactError(f"unknown operator function {name!r}")
        return fn
    try:
        ns, rest = name.split("::", 1)
        op, overload = rest.split(".", 1) if "." in rest else (rest, "default")
    except ValueError:
        raise CorruptArtifactError(f"bad op name {name!r}") from None
    if ns == "lowbit":
        import lowbit.compiler.index_put_rows  # noqa: F401  (registers lowbit.index_put_rows)
        import lowbit.compiler.packed_linear  # noqa: F401  (registers lowbit.packed_linear / packed_matmul)
        import lowbit.quant  # noqa: F401  (registers lowbit.linear)
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError):
        raise IncompatibleArtifactError(f"op {name} does not exist in this torch ({torch.__version__})") from None


def _zeros(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros without torch's parallel fill (its thread pool's start-up dominated loading
    32 small KV caches: 0.67 s)."""
    t = torch.empty(shape, dtype=dtype)
    ctypes.memset(t.data_ptr(), 0, t.numel() * t.element_size())
    return t


class _Contract:
    """A captured graph's argument selection and `finish_call` (see `frontend.CapturedGraph`)."""

    def __init__(self, j: dict):
        self.input_indices = list(j["input_indices"])
        self.mutated = list(j["mutated_inputs"])
        self.n_outputs = int(j["n_outputs"])
        self.num_user_outputs = int(j["num_user_outputs"])
        self.repeated = {int(k): int(v) for k, v in j["repeated_outputs"].items()}
        self.constants = {int(k): value_from_json(v, _no_nodes) for k, v in j["constant_outputs"].items()}
        syms: dict[str, sympy.Symbol] = {}
        self.sizes = {int(k): expr_from_json(v, syms) for k, v in j["size_outputs"].items()}
        self.size_sources = {k: tuple(v) for k, v in j["size_sources"].items()}
        self.specialized = {int(k): value_from_json(v, _no_nodes) for k, v in j["specialized"].items()}

    def check(self, args) -> None:
        for pos, value in self.specialized.items():
            a = args[pos]
            if type(a) is not type(value) or a != value:
                raise InputError(f"input {pos}: the compiled graph is specialised to the value {value!r}, got {a!r}")

    def select(self, args) -> list:
        return [args[i] for i in self.input_indices]

    def finish(self, args, outs: list) -> list:
        if self.repeated:
            full, it = [], iter(outs)
            for i in range(self.n_outputs):
                full.append(full[self.repeated[i]].clone() if i in self.repeated else next(it))
            outs = full
        n_mut = len(self.mutated)
        for pos, new in zip(self.mutated, outs[:n_mut]):
            write_back(args[pos], new)
        user = list(outs[n_mut:])
        if not self.constants and not self.sizes:
            return user
        result, it = [], iter(user)
        for i in range(self.num_user_outputs):
            if i in self.constants:
                result.append(self.constants[i])
            elif i in self.sizes:
                expr = self.sizes[i]
                values = {s: int(args[self.size_sources[str(s)][0]].shape[self.size_sources[str(s)][1]])
                          for s in expr.free_symbols} if not isinstance(expr, int) else {}
                result.append(int(expr.xreplace(values)) if values else int(expr))
            else:
                result.append(next(it))
        return result


def _no_nodes(_):
    raise CorruptArtifactError("a constant refers to a graph node")


class _Traps:
    """The run-time checks of an entry: compiled code or-s a bit into its flag word when a
    division by zero or an out-of-range index happens; the call then raises what eager raises
    (`lowbit.passes.guard_traps`; calls of one entry with checks are serialized)."""

    def __init__(self, address: int, messages: list[str], kinds: list[str]):
        self.flag = ctypes.c_int32.from_address(address)
        self.messages, self.kinds = messages, kinds
        self.lock = threading.Lock()

    def call(self, fn: NativeFunction, inputs: list) -> list:
        with self.lock:
            self.flag.value = 0
            rec = recorder()
            if rec is not None:
                rec.trap(self)
            outs = fn(*inputs)
            bits = self.flag.value
        if bits:
            raise self.error(bits)
        return outs

    def error(self, bits: int) -> Exception:
        raised = [i for i in range(len(self.messages)) if bits & (1 << i)]
        if any(self.kinds[i] == "zero" for i in raised):
            return RuntimeError("ZeroDivisionError")
        detail = "; ".join(self.messages[i] for i in raised)
        if any(self.kinds[i] == "index" for i in raised):
            return IndexError(f"index out of range in compiled code ({detail}); eager raises here too")
        return RuntimeError(f"a run-time check of compiled code failed: {detail}")


class _Compiled:
    def __init__(self, fn: NativeFunction, contract: _Contract, traps: _Traps | None):
        self.fn, self.contract, self.traps = fn, contract, traps

    def accepts(self, args) -> bool:
        c = self.contract
        if any(type(args[p]) is not type(v) or args[p] != v for p, v in c.specialized.items()):
            return False
        return self.fn.accepts(c.select(args))

    def __call__(self, *args):
        c = self.contract
        if c.specialized:
            c.check(args)
        if self.traps is not None:
            return c.finish(args, self.traps.call(self.fn, c.select(args)))
        return c.finish(args, self.fn(*c.select(args)))


class _Partitioned:
    def __init__(self, graph: "_Graph", contract: _Contract):
        self.graph, self.contract = graph, contract

    def __call__(self, *args):
        outs = self.graph(*self.contract.select(args))
        return self.contract.finish(args, list(outs) if isinstance(outs, (tuple, list)) else [outs])


class _Bound:
    def __init__(self, inner: Callable, derived: list[torch.Tensor]):
        self.inner, self.derived = inner, derived
        self._replay = Replayer(inner, derived)

    @property
    def replayer(self) -> Replayer:
        return self._replay

    def __call__(self, *args):
        return self._replay(*args)


class _Runner:
    def __init__(self, inner: Callable, single: bool):
        self.inner, self.single = inner, single

    def __call__(self, *args):
        outs = self.inner(*args)
        if self.single:
            return outs[0] if isinstance(outs, (list, tuple)) else outs
        return tuple(outs)


class _Ref:
    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


def _template(j: Any) -> Any:
    """An argument's JSON -> Python values with `_Ref`s where nodes are read."""
    return value_from_json(j, _Ref)


def _has_ref(t: Any) -> bool:
    if isinstance(t, _Ref):
        return True
    if isinstance(t, (list, tuple)):
        return any(_has_ref(x) for x in t)
    if isinstance(t, dict):
        return any(_has_ref(x) for x in t.values())
    return False


class _Graph:
    """An FX node list run without FX: ops resolved once, and the node list turned into one
    straight-line Python function (as FX's own codegen does), so that a call costs one
    Python call per node and no interpretation. A whole-model graph has hundreds of
    placeholders (every weight) and a decode step runs it with caches cold from streaming
    the weights, where every interpreted step is felt."""

    def __init__(self, j: dict, build: Callable[[dict], Callable], tensor: Callable[[str], torch.Tensor]):
        names: dict[str, Any] = {}  # objects the generated code refers to

        def obj(x: Any) -> str:
            name = f"_k{len(names)}"
            names[name] = x
            return name

        def expr(t: Any) -> str:
            if isinstance(t, _Ref):
                if not 0 <= t.i < k:
                    raise CorruptArtifactError(f"graph node {k}: reads node {t.i}, which is not before it")
                return f"_v{t.i}"
            if isinstance(t, list):
                return "[" + "".join(expr(x) + ", " for x in t) + "]"
            if isinstance(t, tuple):
                return "(" + "".join(expr(x) + ", " for x in t) + ")"
            if isinstance(t, dict) and _has_ref(t):
                return "{" + "".join(f"{obj(a)}: {expr(x)}, " for a, x in t.items()) + "}"
            return obj(t)

        inputs: list[str] = []
        body: list[str] = []
        out = None
        for k, n in enumerate(j["nodes"]):
            op = n.get("op")
            if op == "placeholder":
                inputs.append(f"_v{k}")
            elif op == "constant":
                body.append(f"    _v{k} = {obj(tensor(n['tensor']))}")
            elif op in ("call", "module"):
                fn = _resolve_op(n["target"]) if op == "call" else build(n["body"])
                args = _template(n["args"])
                kwargs = _template(n["kwargs"])
                if not isinstance(args, list) or not isinstance(kwargs, dict):
                    raise CorruptArtifactError(f"graph node {k}: bad arguments")
                call = "".join(expr(a) + ", " for a in args)
                if kwargs:
                    call += f"**{expr(dict(kwargs)) if _has_ref(kwargs) else obj(kwargs)}"
                body.append(f"    _v{k} = {obj(fn)}({call})")
            elif op == "output":
                out = expr(_template(n["value"]))
                break
            else:
                raise CorruptArtifactError(f"graph node {k}: unknown op {op!r}")
        if out is None:
            raise CorruptArtifactError("graph without output")
        self.n_inputs = len(inputs)
        src = [f"def run({''.join(v + ', ' for v in inputs)}*_rest):", *body, f"    return {out}"]
        code = compile("\n".join(src) + "\n", f"<lowbit artifact graph {id(self):x}>", "exec")
        exec(code, names)
        self._run = names["run"]

    def __call__(self, *args):
        if len(args) < self.n_inputs:
            raise TypeError(f"the program takes {self.n_inputs} arguments, got {len(args)}")
        return self._run(*args)


def build_part(j: dict, entry: Callable[[str], tuple], tensor: Callable[[str], torch.Tensor],
               where: str) -> Callable:
    """A callable for a serialized program part (`compiler/aot.py`'s `_Writer.callable`).
    `entry(name)` gives an entry's (NativeFunction, traps or None), `tensor(name)` a stored
    tensor; `where` names the file in errors."""
    def build(j: dict) -> Callable:
        kind = j.get("kind")
        if kind == "compiled":
            fn, traps = entry(j["entry"])
            return _Compiled(fn, _Contract(j["contract"]), traps)
        if kind == "partitioned":
            return _Partitioned(_Graph(j["graph"], build, tensor), _Contract(j["contract"]))
        if kind == "bound":
            return _Bound(build(j["inner"]), [tensor(n) for n in j["derived"]])
        if kind == "graph":
            return _Graph(j["graph"], build, tensor)
        if kind == "runner":
            return _Runner(build(j["inner"]), bool(j["single"]))
        raise CorruptArtifactError(f"{where}: unknown program part {kind!r}")
    return build(j)


class _Program:
    def __init__(self, j: dict, art: "LoadedArtifact"):
        syms: dict[str, sympy.Symbol] = {}
        guard = j["guard"]
        specs = [spec_from_json(s, syms) for s in guard["inputs"]]
        ranges = {k: (lo, hi) for k, (lo, hi) in guard["symbol_ranges"].items()}
        self.guard = _DynamicSignature(specs, [], ranges)
        self.specs = specs
        self.dynamic = bool(j["dynamic"])
        self.sources = j["args"]
        self.body = art._build(j["body"])
        self.tree = torch.utils._pytree.treespec_loads(j["output_tree"])
        # The argument list with state and constants in place (the same tensors every call:
        # state is updated in place, also by `reset`); per call only inputs and sizes are set.
        self._template: list[Any] = []
        self._inputs: list[tuple[int, int]] = []
        self._sizes: list[tuple[int, int, int]] = []
        for i, s in enumerate(self.sources):
            if s is not None and "input" in s:
                self._inputs.append((i, s["input"]))
            elif s is not None and "size" in s:
                self._sizes.append((i, s["size"][0], s["size"][1]))
            self._template.append(None if s is None or "input" in s or "size" in s else
                                  art.state[s["state"]] if "state" in s else art._tensor(s["constant"]))

    def accepts(self, inputs: Sequence[torch.Tensor]) -> bool:
        return self.guard.bind(inputs) is not None

    def __call__(self, inputs: Sequence[torch.Tensor]):
        args = list(self._template)
        for i, k in self._inputs:
            args[i] = inputs[k]
        for i, k, d in self._sizes:
            args[i] = int(inputs[k].shape[d])
        outs = self.body(*args)
        return torch.utils._pytree.tree_unflatten(list(outs), self.tree)


class LoadedArtifact:
    """A loaded artifact: call it like the model it was compiled from (see module docstring)."""

    def __init__(self, path: str, manifest: dict, weights: MappedTensors, lib: ctypes.CDLL):
        self.path, self.manifest, self.weights, self._lib = path, manifest, weights, lib
        self.model_info = manifest.get("model", {})
        self.target = manifest["target"]["name"]
        self.entries: dict[str, NativeFunction] = {}
        self.traps: dict[str, _Traps] = {}
        for name, e in manifest["entries"].items():
            syms: dict[str, sympy.Symbol] = {}
            try:
                address = ctypes.cast(getattr(lib, e["symbol"]), ctypes.c_void_p).value
            except AttributeError:
                raise CorruptArtifactError(f"{os.path.join(path, CODE)}: no entry symbol {e['symbol']!r} "
                                           "(the library does not match the manifest)") from None
            inputs = [spec_from_json(s, syms) for s in e["inputs"]]
            outputs = [spec_from_json(s, syms) for s in e["outputs"]]
            try:
                aliases = alias_outputs_from_json(e.get("alias_outputs"), inputs, outputs,
                                                  f"{os.path.join(path, MANIFEST)} entry {name!r}")
            except ValueError as err:
                raise CorruptArtifactError(str(err)) from None
            self.entries[name] = NativeFunction(
                address, e["symbol"], inputs, outputs,
                {k: (lo, hi) for k, (lo, hi) in e["symbol_ranges"].items()}, owner=lib, alias_outputs=aliases)
            t = e.get("traps")
            if t is not None:
                try:
                    flag = ctypes.cast(getattr(lib, t["symbol"]), ctypes.c_void_p).value
                except AttributeError:
                    raise CorruptArtifactError(f"{os.path.join(path, CODE)}: no trap flag {t['symbol']!r} "
                                               "(the library does not match the manifest)") from None
                self.traps[name] = _Traps(flag, list(t["messages"]), list(t["kinds"]))
        self._initial: dict[str, torch.Tensor | None] = {}
        self.state: dict[str, torch.Tensor] = {}
        for name, s in manifest["state"].items():
            dtype, shape = dtype_of(s["dtype"]), [int(d) for d in s["shape"]]
            if s["tensor"] is None:
                t = _zeros(shape, dtype)
                self._initial[name] = None
            else:
                t = self._tensor(s["tensor"])
                if list(t.shape) != shape or t.dtype != dtype:
                    raise CorruptArtifactError(f"{weights.path}: {s['tensor']} is {t.dtype}{list(t.shape)}, the "
                                               f"manifest says {dtype}{shape}")
                if s["mutable"]:
                    self._initial[name] = t
                    t = t.clone()
            self.state[name] = t
        self.programs = [_Program(p, self) for p in manifest["programs"]]
        self.inputs = manifest["inputs"]

    def _tensor(self, name: str) -> torch.Tensor:
        return self.weights.get(name)

    def _build(self, j: dict) -> Callable:
        return build_part(j, self._entry, self._tensor, os.path.join(self.path, MANIFEST))

    def _entry(self, name: str):
        fn = self.entries.get(name)
        if fn is None:
            raise CorruptArtifactError(f"{os.path.join(self.path, MANIFEST)}: unknown entry {name!r}")
        return fn, self.traps.get(name)

    def reset(self) -> None:
        """Restore mutable state (KV caches) to its initial values."""
        for name, init in self._initial.items():
            t = self.state[name]
            if init is None:
                ctypes.memset(t.data_ptr(), 0, t.numel() * t.element_size())
            else:
                write_back(t, init)

    def __call__(self, *inputs):
        as_numpy = bool(inputs) and isinstance(inputs[0], np.ndarray)
        tensors = []
        for i, x in enumerate(inputs):
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            elif not isinstance(x, torch.Tensor):
                raise InputError(f"input {i}: expected a torch tensor or a numpy array, got {type(x).__name__}")
            tensors.append(x)
        if len(tensors) != len(self.inputs):
            raise InputError(f"expected {len(self.inputs)} inputs, got {len(tensors)}")
        for program in self.programs:
            if program.accepts(tensors):
                with torch.no_grad():
                    out = program(tensors)
                if as_numpy:
                    out = torch.utils._pytree.tree_map(lambda t: t.numpy() if isinstance(t, torch.Tensor) else t, out)
                return out
        raise self._mismatch(tensors)

    def _mismatch(self, tensors) -> InputError:
        expected = "; ".join("(" + ", ".join(str(s) for s in p.specs) + ")" for p in self.programs)
        got = ", ".join(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in tensors)
        return InputError(f"no compiled signature of {self.path} accepts inputs ({got}); compiled: {expected}")

    def describe(self) -> str:
        files = self.manifest["files"]
        return (f"{self.path}: target {self.target}, {len(self.programs)} program(s), {len(self.entries)} "
                f"compiled entries, code {files[CODE]['bytes'] / 2**20:.2f} MiB, weights "
                f"{files[WEIGHTS]['bytes'] / 2**20:.1f} MiB")


def load(path: str | os.PathLike, verify: str = "full") -> LoadedArtifact:
    """Load an artifact directory (see the module docstring for what is checked)."""
    if verify not in ("full", "fast"):
        raise ValueError(f"verify must be 'full' or 'fast', got {verify!r}")
    path = os.fspath(path)
    t0 = time.perf_counter()
    manifest = _read_manifest(path)
    _check_versions(path, manifest)
    _check_target(path, manifest)
    _check_files(path, manifest, verify)
    from lowbit.runtime.library import load_openmp, load_runtime

    load_openmp()
    load_runtime()
    try:
        lib = ctypes.CDLL(os.path.join(path, CODE), mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as e:
        raise CorruptArtifactError(f"{os.path.join(path, CODE)}: cannot be loaded ({e})") from None
    weights = MappedTensors(os.path.join(path, WEIGHTS))
    try:
        art = LoadedArtifact(path, manifest, weights, lib)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise CorruptArtifactError(f"{os.path.join(path, MANIFEST)}: malformed ({type(e).__name__}: {e})") from None
    log.info("loaded %s in %.3f s", art.describe(), time.perf_counter() - t0)
    return art
