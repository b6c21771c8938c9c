"""Replay of a compiled program's native calls: one C call per step instead of a Python walk.

A decode step of a compiled model is a fixed sequence of native calls (embedding, one call per
layer, head) whose arguments are the same buffers every step except the runtime inputs (token
ids, positions) and the fresh outputs. Walking the program in Python (graph code, argument
checks, output allocation, trap flags, write-back) costs ~0.7 ms per step, with every Python
object a cache miss after the weights streamed through (docs/generation.md).

`Replayer(inner, fixed)` wraps a bound program: `inner(*args, *fixed)`, where `fixed` are
tensors owned by the program (packed weights). Its first call runs `inner` while recording
every native call (`NativeFunction` reports the entry address and the argument words it
passes, the tensors behind them, and the trap flag checked around it). When the call was
nothing but native calls -- every argument word resolves to a caller argument, a fixed
tensor or an earlier call's output, every result to one of those, no eager ATen op other than
allocation and views ran, no copy was written back, every entry has a static signature --
that recording becomes a `Plan`; later calls replay it: the argument words of caller
arguments whose buffer moved and of fresh outputs are patched, and one runtime call
(`lowbit_rt_run_calls`) runs the entries in order, clearing and checking trap flags as the
Python path does. Intermediate results live in the plan (they are never visible to the
caller); every result the caller sees is a fresh tensor per call, as before.

Anything a plan cannot prove the same falls back to the Python path (and re-records):
another buffer of a caller argument that shares memory with another argument, a changed
shape, dtype or stride behind a moved buffer, a different non-tensor argument, a concurrent
call of the same program, a trap flag held by another thread. `LOWBIT_REPLAY=0` turns
replay off.
"""
from __future__ import annotations

import bisect
import ctypes
import logging
import operator
import threading
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit.compiler.threads import configure as configure_threads
from lowbit.runtime.library import load_runtime

log = logging.getLogger("lowbit.replay")

_TLS = threading.local()

# ATen ops a replayable call may run besides native calls: allocation of outputs and views.
_ALLOWED = {
    torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
    torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default,
    torch.ops.aten.as_strided.default, torch.ops.aten.select.int, torch.ops.aten.slice.Tensor,
    torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims, torch.ops.aten.squeeze.default,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default, torch.ops.aten.expand.default, torch.ops.aten.detach.default,
}

# Plans keep the program's intermediate results alive between calls: bounded.
MAX_INTERMEDIATE_BYTES = 64 << 20
# A program whose recording keeps failing to replay stops recording.
MAX_RECORDINGS = 4


def enabled() -> bool:
    from lowbit.compiler import env
    return env.get("LOWBIT_REPLAY")


def recorder() -> "Recorder | None":
    """The recording active on this thread (None almost always: checked per native call)."""
    return getattr(_TLS, "recorder", None)


class NotReplayable(Exception):
    """Why a recorded call cannot become a plan (logged, then the Python path is kept)."""


class Recorder(TorchDispatchMode):
    """Collects one call's native calls (and notices anything else it did)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, list[int], Any, list, list]] = []  # (address, words, traps, ins, outs)
        self.problem: str | None = None
        self._trap = None

    # -- what NativeFunction / Traps / write_back report --------------------------------
    def native(self, address: int, words: list[int], static: bool, inputs: Sequence, outputs: Sequence) -> None:
        if not static and self.problem is None:
            self.problem = "an entry with a dynamic signature"
        self.calls.append((address, words, self._trap, list(inputs), list(outputs)))
        self._trap = None

    def trap(self, traps) -> None:
        """The next native call is checked with `traps` (an object with `flag` and `lock`)."""
        self._trap = traps

    def side_effect(self, what: str) -> None:
        if self.problem is None:
            self.problem = what

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _ALLOWED and self.problem is None:
            self.problem = f"an eager op ({func})"
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        _TLS.recorder = self
        return super().__enter__()

    def __exit__(self, *exc):
        _TLS.recorder = None
        return super().__exit__(*exc)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class _Owners:
    """Maps an address to the tensor whose memory holds it: caller arguments, fixed tensors and
    native results, by storage (a view of a tensor resolves to it, plus an offset)."""

    def __init__(self):
        self.by_base: dict[int, tuple[int, list[tuple[str, int, torch.Tensor]]]] = {}
        self.bases: list[int] = []

    def add(self, kind: str, key: int, t: torch.Tensor) -> None:
        base, nbytes = _storage(t)
        entry = self.by_base.get(base)
        if entry is None:
            self.by_base[base] = (nbytes, [(kind, key, t)])
            bisect.insort(self.bases, base)
        else:
            entry[1].append((kind, key, t))

    def has_storage(self, t: torch.Tensor) -> bool:
        return _storage(t)[0] in self.by_base

    def resolve(self, ptr: int) -> tuple[str, int, torch.Tensor, int] | None:
        """(kind, key, owner, offset) of the owner of address `ptr`: the owner starting exactly
        there, else the closest one starting before it in the same storage."""
        i = bisect.bisect_right(self.bases, ptr) - 1
        if i < 0:
            return None
        base = self.bases[i]
        nbytes, owners = self.by_base[base]
        if not (ptr < base + nbytes or ptr == base):
            return None
        best = None
        for kind, key, t in owners:
            p = t.data_ptr()
            if p == ptr:
                return kind, key, t, 0
            if p < ptr and (best is None or p > best[2].data_ptr()):
                best = (kind, key, t)
        if best is None:
            return None
        return best[0], best[1], best[2], ptr - best[2].data_ptr()


_DATA_PTR = torch.Tensor.data_ptr
MISMATCH, BUSY = object(), object()


class Plan:
    """A recorded call, replayable (see the module docstring). Built by `Plan.build`."""

    def __init__(self):
        self.lock = threading.Lock()

    @staticmethod
    def build(rec: Recorder, args: Sequence, fixed: Sequence, outs: Any) -> "Plan":
        if rec.problem is not None:
            raise NotReplayable(rec.problem)
        if not rec.calls:
            raise NotReplayable("no native calls")
        if not isinstance(outs, (list, tuple)):
            raise NotReplayable(f"results of type {type(outs).__name__}")
        owners = _Owners()
        for i, t in enumerate(fixed):  # fixed first: preferred when a caller argument shares them
            owners.add("fixed", i, t)
        arg_tensors = {}
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if a.device.type != "cpu":
                    raise NotReplayable(f"argument {i} is on {a.device}")
                owners.add("arg", i, a)
                arg_tensors[i] = a
        results: list[torch.Tensor] = []
        for _, _, _, _, outputs in rec.calls:
            for t in outputs:
                if isinstance(t, torch.Tensor) and not owners.has_storage(t):
                    owners.add("result", len(results), t)
                    results.append(t)

        # Where every argument word comes from. Each entry gets argument cells of its own,
        # laid out as a NativeFunction's (`jit._ArgumentArray`), holding the recorded words.
        from lowbit.compiler.jit import _ArgumentArray
        plan = Plan()
        plan.words = []
        for _, words, _, _, _ in rec.calls:
            cells = _ArgumentArray(len(words))
            cells.storage[:len(words)] = words
            plan.words.append(cells)
        uses: dict[tuple[str, int], list[tuple[Any, int, int]]] = {}
        for c, (_, words, _, _, _) in enumerate(rec.calls):
            for slot, w in enumerate(words):
                if w == 0:
                    continue  # an empty tensor's buffer
                found = owners.resolve(w)
                if found is None:
                    raise NotReplayable(f"argument word {slot} of native call {c} points at memory "
                                        "no argument or earlier result owns")
                kind, key, _, offset = found
                if kind != "fixed":
                    uses.setdefault((kind, key), []).append((plan.words[c].storage, slot, offset))

        # Results the caller sees: fresh per call; the rest stay in the plan.
        out_spec: list[tuple] = []
        fresh: dict[int, int] = {}
        for o in outs:
            if not isinstance(o, torch.Tensor):
                if isinstance(o, (int, float, bool, type(None))):
                    out_spec.append(("value", o))
                    continue
                raise NotReplayable(f"a result of type {type(o).__name__}")
            found = owners.resolve(o.data_ptr()) if o.numel() else None
            if found is None:
                raise NotReplayable("a result not produced by a native call or passed in")
            kind, key, owner, offset = found
            if kind == "result":
                fresh.setdefault(key, len(fresh))
                key = fresh[key]
                kind = "fresh"
            view = None if (offset == 0 and o.shape == owner.shape and o.stride() == owner.stride()
                            and o.dtype == owner.dtype) else (o.shape, o.stride(), o.storage_offset())
            if view is not None and o.dtype != owner.dtype:
                raise NotReplayable("a result reinterprets another result's dtype")
            out_spec.append((kind, key, view))
        kept = [t for k, t in enumerate(results) if k not in fresh]
        kept_bytes = sum(t.untyped_storage().nbytes() for t in kept)
        if kept_bytes > MAX_INTERMEDIATE_BYTES:
            raise NotReplayable(f"{kept_bytes >> 20} MiB of intermediate results")

        plan.kept = kept
        plan.fresh = [None] * len(fresh)
        plan.fresh_uses = [[] for _ in fresh]
        for rk, fk in fresh.items():
            t = results[rk]
            plan.fresh[fk] = (tuple(t.shape), t.dtype)
            plan.fresh_uses[fk] = uses.get(("result", rk), [])
        plan.out_spec = out_spec
        plan.fixed = list(fixed)

        # Caller arguments the words (or results) depend on: their buffers are read per call.
        needed = sorted({key for kind, key in uses if kind == "arg"}
                        | {s[1] for s in out_spec if s[0] == "arg"})
        plan.n_args = len(args)
        plan.arg_positions = needed
        plan.pick = (operator.itemgetter(*needed) if len(needed) > 1
                     else (lambda a, i=needed[0]: (a[i],)) if needed else (lambda a: ()))
        plan.ptrs = [arg_tensors[i].data_ptr() for i in needed]
        plan.layouts = [(arg_tensors[i].shape, arg_tensors[i].stride(), arg_tensors[i].dtype) for i in needed]
        plan.arg_uses = [uses.get(("arg", i), []) for i in needed]
        bases = [_storage(arg_tensors[i])[0] for i in needed]
        plan.unstable = {k for k, base in enumerate(bases) if bases.count(base) > 1}
        plan.values = [(i, a) for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]

        n = len(rec.calls)
        plan.n = n
        plan.fns = (ctypes.c_void_p * n)(*[address for address, _, _, _, _ in rec.calls])
        plan.argv = (ctypes.c_void_p * n)(*[ctypes.addressof(w.packed) for w in plan.words])
        plan.traps = [traps for _, _, traps, _, _ in rec.calls]
        plan.flags = (ctypes.c_void_p * n)(*[ctypes.addressof(t.flag) if t is not None else None
                                               for t in plan.traps])
        plan.trap_locks = list({id(t.lock): t.lock for t in plan.traps if t is not None}.values())
        plan.run_calls = load_runtime().lowbit_rt_run_calls
        return plan

    def run(self, args: Sequence) -> Any:
        """The results of replaying for `args`; `MISMATCH` when the plan cannot prove this
        call the same (record again), `BUSY` when another thread holds what it needs (take
        the Python path)."""
        if len(args) != self.n_args:
            return MISMATCH
        srcs = self.pick(args)
        try:
            ptrs = list(map(_DATA_PTR, srcs))
        except TypeError:  # an argument that was a tensor is not one now
            return MISMATCH
        for i, v in self.values:
            a = args[i]
            if type(a) is not type(v) or a != v:
                return MISMATCH
        if not self.lock.acquire(blocking=False):
            return BUSY  # another thread is replaying this plan: its buffers are in use
        locked = []
        try:
            for lk in self.trap_locks:
                if not lk.acquire(blocking=False):
                    return BUSY
                locked.append(lk)
            if ptrs != self.ptrs and not self._rebind(srcs, ptrs):
                return MISMATCH
            fresh = [torch.empty(shape, dtype=dtype) for shape, dtype in self.fresh]
            for t, uses in zip(fresh, self.fresh_uses):
                p = t.data_ptr()
                for storage, slot, offset in uses:
                    storage[slot] = p + offset
            configure_threads()
            bad = self.run_calls(self.n, self.fns, self.argv, self.flags)
            if bad >= 0:
                traps = self.traps[bad]
                raise traps.error(traps.flag.value)
        finally:
            for lk in locked:
                lk.release()
            self.lock.release()
        return [self._result(s, args, fresh) for s in self.out_spec]

    def _rebind(self, srcs, ptrs) -> bool:
        """Patch the words of caller arguments whose buffer moved (same layout required)."""
        for k, (new, old) in enumerate(zip(ptrs, self.ptrs)):
            if new == old:
                continue
            t = srcs[k]
            if k in self.unstable or (t.shape, t.stride(), t.dtype) != self.layouts[k] or not t.is_cpu:
                return False
            for storage, slot, offset in self.arg_uses[k]:
                storage[slot] = new + offset
            self.ptrs[k] = new
        return True

    def _result(self, spec: tuple, args: Sequence, fresh: list) -> Any:
        kind = spec[0]
        if kind == "value":
            return spec[1]
        key, view = spec[1], spec[2]
        t = fresh[key] if kind == "fresh" else args[key] if kind == "arg" else self.fixed[key]
        return t if view is None else t.as_strided(*view)


class Replayer:
    """`inner(*args, *fixed)`, replayed when possible (module docstring)."""

    def __init__(self, inner: Callable, fixed: Sequence[torch.Tensor] = ()):
        self.inner = inner
        self.fixed = list(fixed)
        self.plan: Plan | None = None
        self.recordings = 0
        self.replays = 0

    def __call__(self, *args):
        plan = self.plan
        if plan is not None:
            outs = plan.run(args)
            if outs is BUSY:
                return self.inner(*args, *self.fixed)
            if outs is not MISMATCH:
                self.replays += 1
                return outs
            self.plan = None
        if self.recordings >= MAX_RECORDINGS or recorder() is not None or not enabled():
            return self.inner(*args, *self.fixed)
        return self._record(args)

    def _record(self, args):
        self.recordings += 1
        rec = Recorder()
        with rec:
            outs = self.inner(*args, *self.fixed)
        try:
            self.plan = Plan.build(rec, args, self.fixed, outs)
            log.debug("replay: %d native calls recorded", self.plan.n)
        except NotReplayable as e:
            self.recordings = MAX_RECORDINGS  # what the program does does not change
            log.debug("replay: not replayable: %s", e)
        return outs
