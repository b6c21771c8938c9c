"""Run a graph's pipeline stages in the compile worker and turn a crash into a fallback.

`run_isolated` sends the imported module to the worker (`lowbit.compiler.worker`) and
returns the lowered module parsed into the caller's context. A stage that fails normally
raises the same `StageError` as an in-process run (its message still names the FX nodes,
so the partitioner excludes their ops). A worker that dies raises `WorkerCrash`, a
`StageError` whose message names the ops that crash the same stages alone:

Each distinct call of the graph (op, operand shapes and dtypes, constant arguments) is
imported as a one-op graph and run through the stages up to the one that crashed, in the
worker; the calls whose probe kills it are the culprits, named as `lowbit.node:<node>`,
which `partition.rejected_ops` maps to their ops, so the next round runs those ops in
eager and compiles the rest. Probes cost a few tens of ms each plus a worker restart
(~2 s) per crashing one, and run only after a crash. When no single op crashes alone
(a crash that needs the context of several ops), the message names none and the whole
graph runs in eager, with the stage and the signal in the warning.
"""
from __future__ import annotations

import io
import logging
import operator
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from torch_mlir import ir

from lowbit.compiler.compile_log import PROGRESS_DELAY_S, counters
from lowbit.compiler.frontend import NODE_LOCATION_PREFIX, CapturedGraph, FrontendError, import_fx_graph
from lowbit.compiler.pipeline import Pipeline, Stage, StageError
from lowbit.compiler.worker import Crashed, StageFailed, WorkerUnavailable, shared_worker, signal_name

log = logging.getLogger("lowbit.compiler.isolation")

#: More distinct calls than this in a crashing graph: the whole graph falls back unsearched.
MAX_PROBES = 400

_warned_unavailable = False


class RemoteStageError(RuntimeError):
    """A stage's error raised in the compile worker (message as the stage raised it)."""

    def __init__(self, message: str, cause_type: str = ""):
        super().__init__(message)
        self.cause_type = cause_type


class WorkerCrash(StageError):
    """The compile worker died (SIGSEGV, SIGABRT, ...) running `stage`."""

    def __init__(self, stage: str, returncode: int | None, culprits: list[tuple[str, str]],
                 reproducer: Path, command: str):
        self.returncode, self.culprits = returncode, culprits
        if culprits:
            named = ", ".join(f"{op} ({NODE_LOCATION_PREFIX}{node})" for op, node in culprits)
            detail = f"ops that crash it alone: {named}"
        else:
            detail = "no single op crashes it alone"
        cause = RuntimeError(f"MLIR crashed ({signal_name(returncode)}) in the compile worker; {detail}")
        super().__init__(stage, cause, reproducer, command)


def run_isolated(pipeline: Pipeline, module: ir.Module, captured: CapturedGraph | None = None) -> ir.Module:
    """`pipeline`'s stages over `module` in the compile worker; the lowered module (in
    `module`'s context). Falls back to an in-process run if no worker can be started."""
    global _warned_unavailable
    counters["pipelines"] += 1
    stages = [(s.name, list(s.passes)) for s in pipeline.stages]
    bar = _progress(len(stages))
    try:
        result = shared_worker().run(
            _bytecode(module), stages, dump_dir=str(pipeline.dump_dir) if pipeline.dump_dir else None,
            dump_start=pipeline._dump_counter, dump_prefix=pipeline.dump_prefix, on_stage=(lambda _: bar.update(1)) if bar else None)
    except WorkerUnavailable as e:
        if not _warned_unavailable:
            _warned_unavailable = True
            log.warning("%s; compiling in-process (a crash inside MLIR will end the process)", e)
        counters["pipelines"] -= 1  # Pipeline.run counts it
        pipeline.run(module)
        return module
    except StageFailed as e:
        repro = Path(e.reproducer) if e.reproducer else _write_reproducer(module, pipeline)
        command = e.command or _command(repro, pipeline.stages)
        raise StageError(e.stage or "parse", RemoteStageError(e.message, e.cause_type), repro, command) from None
    except Crashed as e:
        stage = e.stage or "parse"
        through = _stages_through(pipeline.stages, e.stage)
        repro = _write_reproducer(module, pipeline, tag=f"crash-{stage}")
        culprits = find_crashing_ops(captured, through) if captured is not None else []
        raise WorkerCrash(stage, e.returncode, culprits, repro, _command(repro, through)) from None
    finally:
        if bar is not None:
            bar.close()
    pipeline._dump_counter += len(stages)
    pipeline.report = result.report
    return ir.Module.parse(result.module_bytes, module.context)


def _bytecode(module: ir.Module) -> bytes:
    buf = io.BytesIO()
    module.operation.write_bytecode(buf)
    return buf.getvalue()


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="lowbit: compiling", delay=PROGRESS_DELAY_S, leave=False, file=sys.stderr,
                disable=None)


def _stages_through(stages: list[Stage], name: str | None) -> list[Stage]:
    if name is None:
        return []
    names = [s.name for s in stages]
    return stages[:names.index(name) + 1] if name in names else list(stages)


def _command(repro: Path, stages: list[Stage]) -> str:
    passes = [p for s in stages for p in s.passes]
    return f"lowbit-opt {shlex.quote(str(repro))} --pass-pipeline={shlex.quote('builtin.module(' + ', '.join(passes) + ')')}"


def _write_reproducer(module: ir.Module, pipeline: Pipeline, tag: str = "import") -> Path:
    directory = pipeline.dump_dir or Path(tempfile.mkdtemp(prefix="lowbit-repro-"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"repro-{tag}.mlir"
    path.write_text(str(module))
    return path


# --------------------------------------------------------------------------- culprits
def find_crashing_ops(captured: CapturedGraph, stages: list[Stage]) -> list[tuple[str, str]]:
    """(op, node name) of the graph's calls that crash `stages` on their own."""
    from lowbit.compiler.partition import node_op_name

    probes = _distinct_calls(captured.graph_module.graph)
    if not stages or len(probes) > MAX_PROBES:
        return []
    worker = shared_worker()
    found = []
    passes = [(s.name, list(s.passes)) for s in stages]
    for node in probes:
        try:
            module = import_fx_graph(_one_op_graph(node), "probe")
        except (FrontendError, KeyError, TypeError, ValueError, RuntimeError) as e:
            log.debug("crash search: %s does not import alone (%s)", node.name, e)
            continue
        try:
            worker.run(_bytecode(module), passes)
        except Crashed:
            found.append((node_op_name(node) or str(node.target), node.name))
        except (StageFailed, WorkerUnavailable):
            continue
    log.info("crash search over %d distinct calls: %s", len(probes), found or "none crashes alone")
    return found


def _signature(value) -> object:
    if isinstance(value, torch.fx.Node):
        val = value.meta.get("val")
        if isinstance(val, torch.Tensor):
            return ("T", tuple(str(s) for s in val.shape), val.dtype)
        return ("N", str(val))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return repr(value)


def _distinct_calls(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    seen, out = set(), []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        key = (str(node.target), _signature(node.args), _signature(tuple(sorted(node.kwargs.items()))))
        if key not in seen:
            seen.add(key)
            out.append(node)
    return out


def _one_op_graph(node: torch.fx.Node) -> torch.fx.Graph:
    """`node` alone: its node operands become placeholders (same `meta`), its results outputs."""
    graph = torch.fx.Graph()
    inputs: dict[torch.fx.Node, torch.fx.Node] = {}

    def placeholder(n: torch.fx.Node) -> torch.fx.Node:
        if n not in inputs:
            p = graph.placeholder(f"in{len(inputs)}")
            p.meta = dict(n.meta)
            inputs[n] = p
        return inputs[n]

    args = torch.fx.map_arg(node.args, placeholder)
    kwargs = torch.fx.map_arg(node.kwargs, placeholder)
    call = graph.call_function(node.target, args, kwargs)
    call.meta = dict(node.meta)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        outs = []
        for i, v in enumerate(val):
            if isinstance(v, torch.Tensor):
                item = graph.call_function(operator.getitem, (call, i))
                item.meta = {"val": v}
                outs.append(item)
        graph.output(tuple(outs))
    else:
        graph.output((call,))
    return graph
