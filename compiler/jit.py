"""JIT execution of a lowered module through the MLIR ExecutionEngine.

A call is: check the inputs against the compiled signature, allocate the outputs with
torch, write the arguments into this thread's argument array, and make one ctypes call of
the packed entry `_mlir_<name>(void **args)`. Inputs and outputs are shared with torch,
never copied, except that a non-contiguous input is made contiguous first (compiled code
assumes identity layout).

Two calling conventions:
- static shapes: the entry was lowered with bare pointers, one data pointer per tensor;
- dynamic shapes: MLIR's default convention, each tensor passed as its memref
  descriptor's fields `allocated, aligned, offset, sizes[r], strides[r]`. Per call the
  size symbols are bound from the input sizes (`TensorSpec` dims are sympy expressions),
  checked (equal symbols agree, every symbol within its compiled range), and the output
  shapes are evaluated. The checks and the argument list are one generated Python
  function per compiled signature (no sympy at call time).

Thread safety: argument arrays are per thread (`threading.local`); nothing a call writes
is shared with a concurrent call of the same function.

`NativeFunction` is the calling side alone (a C entry address plus its signature); it is what
an ahead-of-time artifact's loader uses, so this module imports torch-mlir only when a
`JitFunction` is built. While `emission(...)` is active (ahead-of-time compilation), every
`JitFunction` is built for that target's CPU features, as position-independent code, so its
object file can go into an artifact's shared library (`object_bytes`).
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import itertools
import operator
import os
import tempfile
import threading
from typing import Any, Sequence

import sympy
import torch
from torch.utils._sympy.printers import PythonPrinter

from lowbit.compiler.tensor_spec import TensorSpec
from lowbit.compiler.threads import configure as configure_threads
from lowbit.runtime.replay import recorder as _recorder
from lowbit.runtime.library import load_openmp, load_runtime, openmp_library_path, runtime_library_path


class InputError(TypeError):
    """A compiled function was called with inputs that do not match its signature."""


def _shared_libs() -> list[str]:
    load_openmp()
    load_runtime()
    libs = [str(runtime_library_path())]
    omp = openmp_library_path()
    if omp is not None:
        libs.append(str(omp))
    return libs


class _ArgumentArray:
    """`slots` int64 cells and the `void *args[]` array pointing at them (one thread's)."""

    __slots__ = ("storage", "packed")

    def __init__(self, slots: int):
        self.storage = (ctypes.c_int64 * max(slots, 1))()
        base = ctypes.addressof(self.storage)
        self.packed = (ctypes.c_void_p * max(slots, 1))(*[base + 8 * i for i in range(slots)])


# The active ahead-of-time emission settings (None: plain JIT for this host).
_EMISSION: contextvars.ContextVar["Emission | None"] = contextvars.ContextVar("lowbit_emission", default=None)


class Emission:
    """How `JitFunction`s built inside `emission(...)` are code-generated: `annotate(module,
    entry)` sets the target CPU/features on the lowered module's functions; code is PIC."""

    def __init__(self, key: str, annotate: Any):
        self.key = key              # part of every cache key of code built under it
        self.annotate = annotate


@contextlib.contextmanager
def emission(settings: Emission):
    token = _EMISSION.set(settings)
    try:
        yield settings
    finally:
        _EMISSION.reset(token)


def emission_key() -> str:
    """'' for plain JIT code, else the active emission's key (code differs per target)."""
    e = _EMISSION.get()
    return "" if e is None else e.key


class NativeFunction:
    """A compiled entry `func(inputs..., outputs...)` at a C address, called through its packed
    form `void f(void **args)` (see the module docstring). `owner` keeps the code alive."""

    def __init__(self, address: int, func_name: str, input_specs: Sequence["TensorSpec"],
                 output_specs: Sequence["TensorSpec"],
                 symbol_ranges: dict[str, tuple[int, int | None]] | None = None, owner: Any = None,
                 alias_outputs: dict[int, int] | None = None):
        self.func_name = func_name
        self.owner = owner
        # output index -> input index: the code updates that input in place and copies it to
        # the output only when given another buffer (passes/inplace_results.py), so the
        # input itself is passed as the output.
        self.alias_outputs = dict(alias_outputs or {})
        self.input_specs = list(input_specs)
        self.output_specs = list(output_specs)
        self.symbol_ranges = dict(symbol_ranges or {})
        self.dynamic = not all(s.is_static for s in self.input_specs + self.output_specs)
        if not address:
            raise ValueError(f"compiled entry {func_name!r} has no address: the JIT could not link the code "
                             "(an unresolved symbol, e.g. __truncsfbf2 for bf16 code built for a CPU without "
                             "AVX512-BF16)")
        self.address = address
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)
        self._n_in = len(self.input_specs)
        self._local = threading.local()
        if self.dynamic:
            self._slots = sum(3 + 2 * len(s.shape) for s in self.input_specs + self.output_specs)
            self._signature = _DynamicSignature(self.input_specs, self.output_specs, self.symbol_ranges)
        else:
            self._slots = len(self.input_specs) + len(self.output_specs)
            self._expected = [(torch.Size(s.shape), s.dtype) for s in self.input_specs]
            self._outputs = [(torch.Size(s.shape), s.dtype) for s in self.output_specs]
            self._shapes = [shape for shape, _ in self._expected]
            self._dtypes = [dtype for _, dtype in self._expected]

    def _arguments(self) -> _ArgumentArray:
        try:
            return self._local.args
        except AttributeError:
            args = self._local.args = _ArgumentArray(self._slots)
            if self.dynamic:
                for slot, value in self._signature.constant_slots:
                    args.storage[slot] = value
            return args

    # -- checking ---------------------------------------------------------------------
    def _mismatch(self, i: int, t) -> InputError:
        spec = self.input_specs[i]
        if not isinstance(t, torch.Tensor):
            return InputError(f"input {i}: expected a tensor {spec}, got {type(t).__name__}")
        if not t.is_cpu:
            return InputError(f"input {i}: expected a CPU tensor, got device '{t.device}'")
        if t.dtype != spec.dtype:
            return InputError(f"input {i}: expected dtype {spec.dtype}, got {t.dtype} "
                              "(a new dtype needs a new compilation)")
        shape = [str(d) for d in spec.shape]
        if t.dim() != len(spec.shape):
            return InputError(f"input {i}: expected rank {len(spec.shape)} (shape [{', '.join(shape)}]), "
                              f"got rank {t.dim()} (shape {list(t.shape)})")
        if self.dynamic:
            return self._signature.explain(i, t)
        return InputError(f"input {i}: expected shape {list(spec.shape)}, got {list(t.shape)}")

    def _diagnose(self, inputs: Sequence) -> InputError:
        if len(inputs) != self._n_in:
            return InputError(f"expected {self._n_in} tensor inputs, got {len(inputs)}")
        for i, t in enumerate(inputs):
            if (not isinstance(t, torch.Tensor) or not t.is_cpu or t.dtype != self.input_specs[i].dtype
                    or t.dim() != len(self.input_specs[i].shape)):
                return self._mismatch(i, t)
        if self.dynamic:
            return self._signature.explain_all(inputs)
        for i, t in enumerate(inputs):
            if t.shape != self._expected[i][0]:
                return self._mismatch(i, t)
        return InputError("inputs do not match the compiled signature")

    def accepts(self, inputs: Sequence) -> bool:
        """Whether `inputs` fit the compiled signature (dtypes, ranks, static sizes, and for
        dynamic signatures: equal symbols agree, each within its range); never raises."""
        if len(inputs) != self._n_in:
            return False
        if self.dynamic:
            return self._signature.bind(inputs) is not None
        return self._fits_static(inputs)

    def _fits_static(self, inputs: Sequence) -> bool:
        """Static signature: every input a CPU tensor of the compiled dtype and shape. Checked
        with C-level map()s: this runs per layer and token."""
        return (all(map(isinstance, inputs, _TENSOR)) and list(map(_DTYPE, inputs)) == self._dtypes
                and list(map(_SHAPE, inputs)) == self._shapes and all(map(_IS_CPU, inputs)))

    def check_inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The inputs as the compiled code reads them (contiguous), or `InputError`."""
        if len(inputs) != self._n_in:
            raise InputError(f"expected {self._n_in} tensor inputs, got {len(inputs)}")
        if self.dynamic:
            if self._signature.bind(inputs) is None:
                raise self._diagnose(inputs)
            return [t if t.is_contiguous() else t.contiguous() for t in inputs]
        if self._fits_static(inputs) and all(map(_IS_CONTIGUOUS, inputs)):
            return list(inputs)
        fixed = list(inputs)
        for i, (t, (shape, dtype)) in enumerate(zip(inputs, self._expected)):
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.shape != shape or not t.is_cpu:
                raise self._mismatch(i, t)
            if not t.is_contiguous():
                # Compiled code assumes the identity layout; a strided view is copied once.
                fixed[i] = t.contiguous()
        return fixed

    # -- calling ----------------------------------------------------------------------
    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if self.dynamic:
            return self._call_dynamic(inputs)
        inputs = self.check_inputs(inputs)
        aliased = self.alias_outputs
        if aliased:
            # An updated input is its own output buffer (allocating one to drop it would
            # cost a KV cache's worth of allocation per call).
            outputs = [None if k in aliased else torch.empty(shape, dtype=dtype)
                       for k, (shape, dtype) in enumerate(self._outputs)]
            self._alias(inputs, outputs)
        else:
            outputs = [torch.empty(shape, dtype=dtype) for shape, dtype in self._outputs]
        return self.call_unchecked(inputs, outputs)

    def _alias(self, inputs: list, outputs: list) -> None:
        """Pass each in-place updated input as its own output buffer. An input sharing
        memory with another input is replaced by a copy first: the code writes it in
        place, and the other input must still read the old values."""
        storages = list(map(_STORAGE_PTR, map(_UNTYPED_STORAGE, inputs)))
        for out, i in self.alias_outputs.items():
            if storages.count(storages[i]) > 1:
                inputs[i] = inputs[i].clone()
            outputs[out] = inputs[i]

    def _call_dynamic(self, inputs) -> list[torch.Tensor]:
        sig = self._signature
        if len(inputs) != self._n_in:
            raise InputError(f"expected {self._n_in} tensor inputs, got {len(inputs)}")
        symbols = sig.bind(inputs)
        if symbols is None:
            raise self._diagnose(inputs)
        inputs = [t if t.is_contiguous() else t.contiguous() for t in inputs]
        aliased = self.alias_outputs
        outputs = [None if k in aliased else torch.empty(shape, dtype=dtype)
                   for k, (shape, dtype) in enumerate(zip(sig.output_shapes(symbols), sig.out_dtypes))]
        if aliased:
            self._alias(inputs, outputs)
        args = self._arguments()
        sig.fill(args.storage, inputs, outputs, symbols)
        configure_threads()
        rec = _recorder()
        if rec is not None:  # runtime/replay.py
            rec.native(self.address, list(args.storage), False, inputs, outputs)
        self._fn(args.packed)
        return outputs

    def call_unchecked(self, inputs: Sequence[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Call with inputs already checked (and contiguous); `outputs` (of the shapes the
        signature gives for these inputs) are written in place."""
        args = self._arguments()
        if self.dynamic:
            args.storage[:] = _descriptor_fields(list(inputs) + list(outputs))
        else:
            ptrs = [*map(_DATA_PTR, inputs), *map(_DATA_PTR, outputs)]
            args.storage[:len(ptrs)] = ptrs
        configure_threads()  # compiled parallel loops run on libiomp5 with torch's thread count
        rec = _recorder()
        if rec is not None:  # runtime/replay.py
            rec.native(self.address, list(args.storage), not self.dynamic, inputs, outputs)
        self._fn(args.packed)
        return outputs



_TENSOR = itertools.repeat(torch.Tensor)
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_IS_CPU = operator.attrgetter("is_cpu")
_IS_CONTIGUOUS = operator.methodcaller("is_contiguous")
_DATA_PTR = torch.Tensor.data_ptr
_UNTYPED_STORAGE = torch.Tensor.untyped_storage
_STORAGE_PTR = torch.UntypedStorage.data_ptr


def write_back(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for a mutated input (a KV cache), without torch's thread pool when
    both are contiguous and alike: a parallel `copy_` leaves torch's OpenMP workers
    spinning into the next compiled call, where they compete with lowbit's own threads
    (a third of a 2-thread decode step's CPU time went to libgomp's spin). Shared by the
    JIT's callers (`frontend.CapturedGraph.finish_call`) and the artifact loader."""
    if src is dst or (src.data_ptr() == dst.data_ptr() and src.stride() == dst.stride()
                      and src.shape == dst.shape and src.dtype == dst.dtype):
        return  # updated in place by the compiled code (passes/inplace_results.py)
    if (dst.dtype == src.dtype and dst.shape == src.shape and dst.device.type == "cpu"
            and src.device.type == "cpu" and dst.is_contiguous() and src.is_contiguous()):
        rec = _recorder()
        if rec is not None:
            rec.copy(dst, src)
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
    else:
        dst.copy_(src)


def alias_outputs_from_json(pairs, input_specs: Sequence["TensorSpec"], output_specs: Sequence["TensorSpec"],
                            where: str) -> dict[int, int]:
    """The ``alias_outputs`` of a stored entry (``[[output, input], ...]``), checked: indices
    in range and the two buffers alike (same dtype and shape), else ValueError naming `where`."""
    aliases: dict[int, int] = {}
    for pair in pairs or []:
        if (not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(v, int) for v in pair)
                or not 0 <= pair[0] < len(output_specs) or not 0 <= pair[1] < len(input_specs)):
            raise ValueError(f"{where}: invalid alias_outputs entry {pair!r}")
        out, inp = output_specs[pair[0]], input_specs[pair[1]]
        if out.dtype != inp.dtype or str(out.shape) != str(inp.shape):
            raise ValueError(f"{where}: alias_outputs pairs output {pair[0]} ({out}) with input {pair[1]} ({inp})")
        aliases[pair[0]] = pair[1]
    return aliases


class JitFunction(NativeFunction):
    """A lowered MLIR module JIT-compiled by the ExecutionEngine; calls its entry `func_name`."""

    def __init__(self, module, func_name: str, input_specs: Sequence["TensorSpec"],
                 output_specs: Sequence["TensorSpec"], opt_level: int = 3,
                 symbol_ranges: dict[str, tuple[int, int | None]] | None = None,
                 alias_outputs: dict[int, int] | None = None):
        from torch_mlir.execution_engine import ExecutionEngine

        settings = _EMISSION.get()
        self.emission_key = "" if settings is None else settings.key
        if settings is not None:
            settings.annotate(module, func_name)
        self.engine = ExecutionEngine(module, opt_level=opt_level, shared_libs=_shared_libs(),
                                      enable_pic=settings is not None)
        self.engine.initialize()
        super().__init__(self.engine.raw_lookup(func_name), func_name, input_specs, output_specs,
                         symbol_ranges, owner=self.engine, alias_outputs=alias_outputs)
        # The object code, taken now (ahead-of-time builds only): the engine's object buffer is
        # what a later artifact links.
        self.object_bytes: bytes | None = self._object_bytes() if settings is not None else None

    def _object_bytes(self) -> bytes:
        fd, path = tempfile.mkstemp(suffix=".o", prefix="lowbit-entry-")
        os.close(fd)
        try:
            self.engine.dump_to_object_file(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)

    def dump_object(self, path: str) -> None:
        self.engine.dump_to_object_file(path)


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return strides[::-1]


def _descriptor_fields(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Memref descriptor fields of contiguous tensors, concatenated (generic, slower path)."""
    out = []
    for t in tensors:
        p = t.data_ptr()
        out += [p, p, 0, *t.shape, *_contiguous_strides(t.shape)]
    return out


class _DynamicSignature:
    """The per-call work of a dynamic signature, generated as Python code once.

    `bind(inputs)` returns the symbols' values (a tuple in `self.names` order) or None when
    anything does not match (then `explain*` says what); `output_shapes(values)` gives the
    outputs' shapes and `fill(storage, inputs, outputs, values)` writes the descriptor fields
    that change per call (the rest are `constant_slots`).
    """

    def __init__(self, input_specs: list["TensorSpec"], output_specs: list["TensorSpec"],
                 ranges: dict[str, tuple[int, int | None]]):
        self.input_specs, self.output_specs, self.ranges = input_specs, output_specs, ranges
        self.out_dtypes = [s.dtype for s in output_specs]
        # Where each symbol is first read: (input, dim) of its first plain occurrence.
        self.sources: dict[str, tuple[int, int]] = {}
        for i, spec in enumerate(input_specs):
            for d, dim in enumerate(spec.shape):
                if isinstance(dim, sympy.Symbol) and str(dim) not in self.sources:
                    self.sources[str(dim)] = (i, d)
        every = set().union(*(s.symbols for s in input_specs + output_specs))
        unbound = every - set(self.sources)
        if unbound:
            raise ValueError(f"size symbols {sorted(unbound)} are not the size of any input dim; "
                             "cannot bind them at call time")
        self.names = sorted(self.sources)
        var = {n: f"_s{k}" for k, n in enumerate(self.names)}
        printer = PythonPrinter()

        def expr(dim) -> str:
            if isinstance(dim, int):
                return str(dim)
            return "(" + printer.doprint(dim.xreplace({s: sympy.Symbol(var[str(s)]) for s in dim.free_symbols})) + ")"

        lines = ["def bind(inputs):"]
        lines.append(f"    {', '.join(f'_x{i}' for i in range(len(input_specs)))}{',' if len(input_specs) == 1 else ''} = inputs")
        conditions = []
        for i, spec in enumerate(input_specs):
            lines.append(f"    _t = _x{i}")
            lines.append(f"    if _t.__class__ is not _Tensor and not isinstance(_t, _Tensor): return None")
            lines.append(f"    if _t.dtype is not _dt{i} or not _t.is_cpu: return None")
            lines.append(f"    _z{i} = _t.shape")
            lines.append(f"    if len(_z{i}) != {len(spec.shape)}: return None")
            for d, dim in enumerate(spec.shape):
                if isinstance(dim, sympy.Symbol) and self.sources[str(dim)] == (i, d):
                    lines.append(f"    {var[str(dim)]} = _z{i}[{d}]")
                else:
                    conditions.append(f"_z{i}[{d}] == {expr(dim)}")
        for n in self.names:
            lo, hi = ranges.get(n, (0, None))
            conditions.append(f"{var[n]} >= {lo}" + (f" and {var[n]} <= {hi}" if hi is not None else ""))
        if conditions:
            lines.append(f"    if not ({' and '.join(conditions)}): return None")
        lines.append(f"    return ({''.join(var[n] + ', ' for n in self.names)})")

        unpack = f"    {''.join(var[n] + ', ' for n in self.names)}= values" if self.names else "    pass"
        lines.append("def output_shapes(values):")
        lines.append(unpack)
        lines.append("    return (" + "".join("(" + "".join(expr(d) + ", " for d in s.shape) + "), "
                                          for s in output_specs) + ")")
        # Descriptor fields: constant ones (offsets, static sizes and strides) are written
        # once per thread array (`constant_slots`), the rest per call by `fill`.
        lines.append("def fill(st, inputs, outputs, values):")
        lines.append(unpack)
        self.constant_slots: list[tuple[int, int]] = []
        slot = 0
        for group, specs in (("inputs", input_specs), ("outputs", output_specs)):
            for k, spec in enumerate(specs):
                lines.append(f"    st[{slot}] = st[{slot + 1}] = {group}[{k}].data_ptr()")
                self.constant_slots.append((slot + 2, 0))
                slot += 3
                strides, step = [], sympy.Integer(1)
                for d in reversed(spec.shape):
                    strides.append(step)
                    step = step * d
                for value in [*spec.shape, *reversed(strides)]:
                    if isinstance(value, int) or value.is_number:
                        self.constant_slots.append((slot, int(value)))
                    else:
                        lines.append(f"    st[{slot}] = {expr(value)}")
                    slot += 1
        self.source = "\n".join(lines) + "\n"
        namespace = {"_Tensor": torch.Tensor, **{f"_dt{i}": s.dtype for i, s in enumerate(input_specs)}}
        exec(compile(self.source, f"<lowbit dynamic signature {id(self):x}>", "exec"), namespace)
        self.bind = namespace["bind"]
        self.output_shapes = namespace["output_shapes"]
        self.fill = namespace["fill"]

    def _where(self, name: str) -> str:
        i, d = self.sources[name]
        return f"input {i} dim {d}"

    def explain(self, i: int, t: torch.Tensor) -> InputError:
        """Why input `i` (right type, dtype and rank) does not fit, given earlier inputs'
        bindings are not known: checks what input `i` alone can violate."""
        return self.explain_all(None, only=(i, t))

    def explain_all(self, inputs, only=None) -> InputError:
        values: dict[str, int] = {}
        items = [only] if only is not None else list(enumerate(inputs))
        # Bind first (from the sources), then check every dim against its expression.
        for name, (i, d) in self.sources.items():
            for k, t in items:
                if k == i:
                    values[name] = int(t.shape[d])
        for name, value in values.items():
            lo, hi = self.ranges.get(name, (0, None))
            if value < lo or (hi is not None and value > hi):
                bound = f"{lo} <= {name}" + (f" <= {hi}" if hi is not None else "")
                return InputError(f"{self._where(name)}: {name} = {value} is outside the compiled range "
                                  f"{bound}")
        for k, t in items:
            spec = self.input_specs[k]
            shape = "[" + ", ".join(str(x) for x in spec.shape) + "]"
            for d, dim in enumerate(spec.shape):
                got = int(t.shape[d])
                if isinstance(dim, int):
                    if got != dim:
                        return InputError(f"input {k}: expected shape {shape}, got {list(t.shape)} "
                                          f"(dim {d} must be {dim})")
                    continue
                if not {str(s) for s in dim.free_symbols} <= set(values):
                    continue
                want = int(dim.xreplace({s: values[str(s)] for s in dim.free_symbols}))
                if got != want:
                    sources = ", ".join(f"{n} = {values[n]} from {self._where(n)}"
                                        for n in sorted(str(s) for s in dim.free_symbols))
                    return InputError(f"input {k} dim {d}: expected {dim} = {want} ({sources}) "
                                      f"for shape {shape}, got {got} (shape {list(t.shape)})")
        return InputError("inputs do not match the compiled signature "
                          f"{', '.join(str(s) for s in self.input_specs)}")
