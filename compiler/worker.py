"""The compile worker: MLIR pipeline stages in a separate process, so a crash is contained.

torch-mlir and upstream MLIR passes can die with SIGSEGV/SIGABRT on inputs they do not
expect (torch-to-linalg on an int8 `mm`, every static zero-K product, a stack overflow in
the parser); in-process no Python fallback can catch that. So the parent imports the FX
graph to torch-dialect MLIR (the Python importer) and sends it, as MLIR bytecode, to one
persistent worker process that runs the pipeline stages and returns the LLVM-dialect module
(bytecode), the compile report and its log records. The parent JITs the result.

    parent                                     worker (python -m lowbit.compiler.worker)
    capture -> import ---- run request ---->   parse; for each stage: "stage" event, run
    JIT <----------------- done / error ----   bytecode of the lowered module, report, logs
                           (EOF: it died)

When the worker dies, the parent knows the stage it had announced last and raises
`WorkerCrash` (a `StageError`); the next request starts a new worker. The worker is a
fresh interpreter (`subprocess`, i.e. fork + exec: nothing of the parent's OpenMP or torch
threads is inherited), started in the background as soon as lowbit captures a graph
(`prestart`), so its start-up (~2 s: it imports torch, torch-mlir and the passes) overlaps
capture and weight binding. Requests are serialized (one lock). Messages are frames of a
JSON header and raw bytes; nothing is pickled.

Per request the parent sends what the passes read from the process: every `LOWBIT_*`
variable and the runtime's current ISA (`lowbit.runtime.set_isa` in the parent applies).
`LOWBIT_COMPILE_WORKER=0` runs the stages in-process instead (no isolation).
"""
from __future__ import annotations

import atexit
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from typing import Any, Callable, Sequence

log = logging.getLogger("lowbit.compiler.worker")

_HEADER = struct.Struct("<IQ")  # JSON header length, payload length
_MAX_HEADER = 1 << 30


class WorkerUnavailable(RuntimeError):
    """The worker process could not be started (the parent then compiles in-process)."""


def _write_frame(stream, header: dict, payload: bytes = b"") -> None:
    data = json.dumps(header, default=str).encode()
    stream.write(_HEADER.pack(len(data), len(payload)))
    stream.write(data)
    if payload:
        stream.write(payload)
    stream.flush()


def _read_exact(stream, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(stream) -> tuple[dict, bytes] | None:
    head = _read_exact(stream, _HEADER.size)
    if head is None:
        return None
    n_header, n_payload = _HEADER.unpack(head)
    if n_header > _MAX_HEADER:
        raise RuntimeError(f"compile worker protocol error: header of {n_header} bytes")
    header = _read_exact(stream, n_header)
    payload = _read_exact(stream, n_payload) if n_payload else b""
    if header is None or payload is None:
        return None
    return json.loads(header), payload


def signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


# --------------------------------------------------------------------------- parent side
class StageFailed(Exception):
    """A stage raised in the worker (a normal compile error, not a crash)."""

    def __init__(self, stage: str | None, message: str, cause_type: str, reproducer: str | None,
                 command: str | None):
        super().__init__(message)
        self.stage, self.message, self.cause_type = stage, message, cause_type
        self.reproducer, self.command = reproducer, command


class Crashed(Exception):
    """The worker died while running `stage` (None: while parsing the input)."""

    def __init__(self, stage: str | None, returncode: int | None):
        self.stage, self.returncode = stage, returncode
        super().__init__(f"the compile worker died with {signal_name(returncode)}"
                         + (f" in stage '{stage}'" if stage else " parsing its input"))


class RemoteResult:
    def __init__(self, module_bytes: bytes, report: list[dict]):
        self.module_bytes, self.report = module_bytes, report


class CompileWorker:
    """One worker process, started on demand and restarted after it died."""

    def __init__(self, argv: Sequence[str] | None = None):
        self.argv = list(argv) if argv else [sys.executable, "-m", "lowbit.compiler.worker"]
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._lock = threading.Lock()        # one request at a time
        self._start_lock = threading.Lock()  # prestart() may race with a request
        self.starts = 0  # how many processes were started (tests, diagnostics)
        self._owner = os.getpid()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the process if none is running (returns at once: it imports in the background)."""
        with self._start_lock:
            self._start()

    def _start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._ready = False
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=None, start_new_session=True, close_fds=True)
        except OSError as e:
            self._proc = None
            raise WorkerUnavailable(f"cannot start the compile worker ({e})") from e
        self.starts += 1

    def _await_ready(self) -> None:
        if self._ready:
            return
        frame = _read_frame(self._proc.stdout)
        if frame is None or frame[0].get("event") != "ready":
            code = self._reap()
            raise WorkerUnavailable(f"the compile worker exited while starting ({signal_name(code)}); "
                                    "see its stderr above")
        self._ready = True

    def stop(self) -> None:
        if self._owner != os.getpid():
            return  # a forked child: the worker is its parent's
        proc, self._proc, self._ready = self._proc, None, False
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _close_pipes(proc)

    def run(self, module_bytes: bytes, stages: Sequence[tuple[str, str]], *, dump_dir: str | None = None,
            dump_start: int = 0, dump_prefix: str = "", on_stage: Callable[[str], None] | None = None) -> RemoteResult:
        """Run `stages` ((name, [pipeline elements]) pairs) over the module; `StageFailed`, `Crashed`
        or `WorkerUnavailable` otherwise."""
        from lowbit.compiler.compile_log import configure_from_env
        from lowbit.runtime import current_isa

        configure_from_env()
        request = {
            "op": "run", "stages": [list(s) for s in stages], "dump_dir": dump_dir, "dump_start": dump_start,
            "dump_prefix": dump_prefix,
            "env": {k: v for k, v in os.environ.items() if k.startswith("LOWBIT_")},
            "isa": current_isa(),
            "log_level": _lowest_lowbit_level(),
        }
        with self._lock:
            self.start()
            stage = None
            try:
                self._await_ready()
                _write_frame(self._proc.stdin, request, module_bytes)
                while True:
                    frame = _read_frame(self._proc.stdout)
                    if frame is None:
                        raise Crashed(stage, self._reap())
                    header, payload = frame
                    event = header.get("event")
                    if event == "stage":
                        stage = header["name"]
                        if on_stage is not None:
                            on_stage(stage)
                        continue
                    _replay_logs(header.get("logs", ()))
                    if event == "done":
                        return RemoteResult(payload, header.get("report", []))
                    if event == "error":
                        raise StageFailed(header.get("stage"), header["message"], header.get("type", ""),
                                          header.get("reproducer"), header.get("command"))
                    raise RuntimeError(f"compile worker protocol error: unexpected event {event!r}")
            except BrokenPipeError:
                raise Crashed(stage, self._reap()) from None
            except (Crashed, StageFailed, WorkerUnavailable):
                raise
            except BaseException:
                # Interrupted mid-request (KeyboardInterrupt, protocol error): the stream is out
                # of step, so this process is no longer usable.
                self._kill()
                raise

    def _reap(self) -> int | None:
        proc, self._proc, self._ready = self._proc, None, False
        if proc is None:
            return None
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        _close_pipes(proc)
        return code

    def _kill(self) -> None:
        proc, self._proc, self._ready = self._proc, None, False
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _close_pipes(proc)


def _close_pipes(proc: subprocess.Popen) -> None:
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass


def _lowest_lowbit_level() -> int:
    """The most verbose level any `lowbit*` logger of this process listens at (the worker
    collects records from that level on; replaying them applies this process's filters)."""
    names = ["lowbit"] + [n for n in logging.Logger.manager.loggerDict if n.startswith("lowbit.")]
    return min(logging.getLogger(n).getEffectiveLevel() for n in names)


def _replay_logs(records) -> None:
    for name, level, message in records:
        logging.getLogger(name).log(level, "%s", message)


_worker: CompileWorker | None = None
_worker_pid: int | None = None
_worker_lock = threading.Lock()


def shared_worker() -> CompileWorker:
    """This process's worker. A forked child gets its own (the pipes it inherited belong to
    its parent's requests)."""
    global _worker, _worker_pid
    with _worker_lock:
        if _worker is None or _worker_pid != os.getpid():
            _worker, _worker_pid = CompileWorker(), os.getpid()
            atexit.register(_worker.stop)
        return _worker


def enabled() -> bool:
    from lowbit.compiler import env
    return bool(env.get("LOWBIT_COMPILE_WORKER"))


def prestart() -> None:
    """Start the shared worker in the background if isolation is on (a no-op otherwise)."""
    try:
        if enabled():
            shared_worker().start()
    except WorkerUnavailable as e:
        log.warning("%s", e)


# --------------------------------------------------------------------------- worker side
class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.name, record.levelno, record.getMessage()))
        except Exception:  # a malformed record must not take the worker down
            pass


def _apply_environment(env: dict[str, str]) -> None:
    for key in [k for k in os.environ if k.startswith("LOWBIT_") and k not in env]:
        del os.environ[key]
    os.environ.update(env)


def _handle_run(header: dict, payload: bytes, out) -> None:
    from torch_mlir import ir

    from lowbit.compiler.passmanager import new_context
    from lowbit.compiler.pipeline import Pipeline, Stage, StageError
    from lowbit.runtime import current_isa, set_isa

    _apply_environment(header.get("env", {}))
    collect = _Collect()
    lowbit_logger = logging.getLogger("lowbit")
    lowbit_logger.handlers = [collect]
    lowbit_logger.propagate = False
    lowbit_logger.setLevel(header.get("log_level", logging.WARNING))
    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("lowbit.")]:
        logging.getLogger(name).setLevel(logging.NOTSET)  # all follow the parent's lowest level
    stage_name = None
    try:
        if header.get("isa") and header["isa"] != current_isa():
            set_isa(header["isa"])
        context = new_context()
        module = ir.Module.parse(payload, context)
        pipeline = Pipeline(stages=[Stage(name, list(passes)) for name, passes in header["stages"]],
                            dump_dir=header.get("dump_dir"))
        pipeline._dump_counter = int(header.get("dump_start", 0))
        pipeline.dump_prefix = header.get("dump_prefix") or ""
        for stage in pipeline.stages:
            stage_name = stage.name
            _write_frame(out, {"event": "stage", "name": stage.name})
            pipeline.run_stage(module, stage.name)
        buf = io.BytesIO()
        module.operation.write_bytecode(buf)
        _write_frame(out, {"event": "done", "report": pipeline.report, "logs": collect.records}, buf.getvalue())
    except StageError as e:
        _write_frame(out, {"event": "error", "stage": e.stage, "message": str(e.cause),
                           "type": type(e.cause).__name__, "reproducer": str(e.reproducer),
                           "command": e.command, "logs": collect.records})
    except Exception as e:
        _write_frame(out, {"event": "error", "stage": stage_name, "message": f"{type(e).__name__}: {e}",
                           "type": type(e).__name__, "logs": collect.records})


def main() -> int:
    # The protocol owns the original stdout; anything else printed (MLIR, a library) goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a compile stops
    import lowbit.compiler.compile_log as compile_log
    compile_log._configured = True  # records go to the parent, which applies LOWBIT_LOG
    import lowbit.compiler.pipeline  # noqa: F401  (imports torch-mlir and registers the passes)
    import lowbit.passes.registry as registry
    registry.lookup_pass("lowbit-vectorize")
    _write_frame(out, {"event": "ready", "pid": os.getpid()})
    while True:
        frame = _read_frame(inp)
        if frame is None:
            return 0
        header, payload = frame
        if header.get("op") == "run":
            _handle_run(header, payload, out)
        else:
            _write_frame(out, {"event": "error", "stage": None, "message": f"unknown request {header.get('op')!r}",
                               "type": "RuntimeError"})


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BrokenPipeError, KeyboardInterrupt):  # the parent went away: nothing to report to
        sys.exit(0)
