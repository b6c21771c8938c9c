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
allocation and views ran, every entry has a static signature (a mutated input copied back
after a call, e.g. a cache's step counter, is recorded as a copy entry at its place) --
that recording becomes a `Plan`; later calls replay it: the argument words of caller
arguments whose buffer moved and of fresh outputs are patched, and one runtime call
(`lowbit_rt_run_calls`) runs the entries in order, clearing and checking trap flags as the
Python path does. Intermediate results live in the plan (they are never visible to the
caller); every result the caller sees is a fresh tensor per call, as before.

Greedy decoding goes one step further (`Plan.decode`, `lowbit_rt_decode_calls`): the runtime
runs the recorded step, takes the argmax of the logits result, writes it into the token
argument and adds 1 to the position argument, and repeats, with only a token callback in
Python between steps (`lowbit.generate.greedy_decode`).

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
import math
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
        self.literals: dict[int, set[int]] = {}  # call -> argument slots that are values, not addresses
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

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A mutated input written back (contiguous, same layout): replayed as a native entry
        (`lowbit_rt_copy_entry`) at this point of the call sequence."""
        nbytes = dst.numel() * dst.element_size()
        self.calls.append((_copy_entry(), [dst.data_ptr(), src.data_ptr(), nbytes], None, [src], [dst]))
        self.literals[len(self.calls) - 1] = {2}

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
            literal = rec.literals.get(c, ())
            for slot, w in enumerate(words):
                if w == 0 or slot in literal:
                    continue  # an empty tensor's buffer, or a byte count
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
        plan.decode_calls = load_runtime().lowbit_rt_decode_calls
        return plan

    def run(self, args: Sequence) -> Any:
        """The results of replaying for `args`; `MISMATCH` when the plan cannot prove this
        call the same (record again), `BUSY` when another thread holds what it needs (take
        the Python path)."""
        held = self._enter(args)
        if not isinstance(held, list):
            return held
        try:
            fresh = self._fresh()
            configure_threads()
            bad = self.run_calls(self.n, self.fns, self.argv, self.flags)
            if bad >= 0:
                traps = self.traps[bad]
                raise traps.error(traps.flag.value)
        finally:
            self._leave(held)
        return [self._result(s, args, fresh) for s in self.out_spec]

    def decode(self, args: Sequence, token: int, pos: int, logits: int, steps: int,
               on_token: Callable[[int], bool] | None = None) -> Any:
        """Greedy decoding in one runtime call (`lowbit_rt_decode_calls`): up to `steps` calls
        for `args`, each feeding the argmax of result `logits` back into argument `token`
        (an int64 tensor of one element) and adding 1 to argument `pos` (likewise), both
        written in place. `on_token(t)` runs after each step; a true return stops there.
        Returns (tokens, results of the last call), or `MISMATCH` / `BUSY` as `run` does, or
        `MISMATCH` when the plan cannot feed itself (arguments it does not read, logits that
        are not one fresh contiguous fp32 / bf16 row)."""
        fed = self._feedback(args, token, pos, logits)
        if fed is None:
            return MISMATCH
        held = self._enter(args)
        if not isinstance(held, list):
            return held
        error: list[BaseException] = []

        def step_done(t: int) -> int:
            try:
                return 1 if on_token(t) else 0
            except BaseException as e:  # noqa: BLE001 (re-raised after the runtime call returns)
                error.append(e)
                return 1

        try:
            fresh = self._fresh()
            view, dtype = fed
            out = fresh[self.out_spec[logits][1]]
            out = out if view is None else out.as_strided(*view)
            tokens = (ctypes.c_int64 * steps)()
            trapped = ctypes.c_int64(-1)
            callback = _TOKEN_FN(step_done) if on_token is not None else None
            configure_threads()
            done = self.decode_calls(self.n, self.fns, self.argv, self.flags, steps, args[token].data_ptr(),
                                     args[pos].data_ptr(), out.data_ptr(), int(dtype == torch.bfloat16),
                                     out.numel(), tokens, callback, ctypes.byref(trapped))
            if trapped.value >= 0:
                traps = self.traps[trapped.value]
                raise traps.error(traps.flag.value)
        finally:
            self._leave(held)
        if error:
            raise error[0]
        return list(tokens[:done]), [self._result(s, args, fresh) for s in self.out_spec]

    def _feedback(self, args: Sequence, token: int, pos: int, logits: int):
        """(view, dtype) of the logits result when this plan can feed its own argmax back."""
        for i in (token, pos):
            t = args[i] if i < len(args) else None
            if (not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.numel() != 1
                    or i not in self.arg_positions or self.arg_positions.index(i) in self.unstable):
                return None
        if args[token].untyped_storage().data_ptr() == args[pos].untyped_storage().data_ptr():
            return None
        spec = self.out_spec[logits] if 0 <= logits < len(self.out_spec) else ("value",)
        if spec[0] != "fresh":
            return None
        shape, dtype = self.fresh[spec[1]]
        view = spec[2]
        if dtype not in (torch.float32, torch.bfloat16) or math.prod(shape if view is None else view[0]) < 1:
            return None
        if view is not None and not torch.empty_strided(view[0], view[1], device="meta").is_contiguous():
            return None
        return view, dtype

    def _enter(self, args: Sequence) -> Any:
        """Take the plan for `args` (the held locks), or MISMATCH / BUSY."""
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
        locked = [self.lock]
        for lk in self.trap_locks:
            if not lk.acquire(blocking=False):
                self._leave(locked)
                return BUSY
            locked.append(lk)
        if ptrs != self.ptrs and not self._rebind(srcs, ptrs):
            self._leave(locked)
            return MISMATCH
        return locked

    @staticmethod
    def _leave(locked: list) -> None:
        for lk in reversed(locked):
            lk.release()

    def _fresh(self) -> list[torch.Tensor]:
        """This call's fresh results, their addresses patched into the argument words."""
        fresh = [torch.empty(shape, dtype=dtype) for shape, dtype in self.fresh]
        for t, uses in zip(fresh, self.fresh_uses):
            p = t.data_ptr()
            for storage, slot, offset in uses:
                storage[slot] = p + offset
        return fresh

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


_TOKEN_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64)


def _copy_entry() -> int:
    """Address of `lowbit_rt_copy_entry` (a recorded write-back)."""
    return ctypes.cast(load_runtime().lowbit_rt_copy_entry, ctypes.c_void_p).value


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

    def decode(self, args: Sequence, token: int, pos: int, logits: int, steps: int,
               on_token: Callable[[int], bool] | None = None) -> Any:
        """`Plan.decode` with the recorded plan; `MISMATCH` when there is none (nothing
        recorded yet, replay off) or it cannot serve `args`."""
        plan = self.plan
        if plan is None or not enabled():
            return MISMATCH
        out = plan.decode(args, token, pos, logits, steps, on_token)
        if out is not MISMATCH and out is not BUSY:
            self.replays += len(out[0])
        return out

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
