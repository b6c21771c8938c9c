"""lowbit-omp-schedule: hand out microkernel tasks to threads as they finish, not in fixed halves.

Matches `omp.wsloop` ops (what `convert-scf-to-openmp` makes of every `scf.forall`) whose
loop body calls one of the runtime's task kernels (`lowbit_qgemm_invoke`,
`lowbit_brgemm_invoke`, `lowbit_attention_invoke`: a weight panel or a group of heads per
iteration), and produces the same loop with `schedule(dynamic)`: each thread takes the next
task when it has finished its last one.

Why: the OpenMP default is a static schedule (thread t runs iterations [t*n/T, (t+1)*n/T)),
balanced only when every core runs at the same speed. They do not: a core's vector or AMX
units and its clock are shared with whatever else the host runs, and a thread preempted for
a millisecond holds the whole layer back at the closing barrier. These tasks are whole
weight panels or heads (tens of microseconds and more), so taking them one at a time costs
one atomic increment each. Loops of generated code (elementwise chains, row reductions,
the activation quantization's row blocks) keep the static schedule: their tasks are small
and many.

Runs right after `convert-scf-to-openmp`. A loop that already has a schedule is left alone.
"""
from __future__ import annotations

import dataclasses

from torch_mlir import ir

from lowbit.passes.registry import ModulePass, PassError, register_pass
from lowbit.passes.vectorize_support import walk

KINDS = ("static", "dynamic", "guided")
TASK_KERNELS = ("lowbit_qgemm_invoke", "lowbit_brgemm_invoke", "lowbit_attention_invoke")


def _calls_any(op: ir.Operation, callees: set[str]) -> bool:
    return any(inner.name == "func.call" and ir.FlatSymbolRefAttr(inner.attributes["callee"]).value in callees
               for inner in walk(op))


@register_pass
@dataclasses.dataclass
class OmpSchedule(ModulePass):
    """Give OpenMP loops whose iterations call runtime task kernels a dynamic schedule.

    Options: `kind` (dynamic | guided | static; static leaves every loop as it is),
    `kernels` (the callees that make a loop's iterations tasks).
    """

    NAME = "lowbit-omp-schedule"
    kind: str = "dynamic"
    kernels: list[str] = dataclasses.field(default_factory=lambda: list(TASK_KERNELS))

    def run(self, module: ir.Operation) -> None:
        if self.kind not in KINDS:
            raise PassError(f"{self.NAME}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "static":
            return
        attr = ir.Attribute.parse(f"#omp<schedulekind {self.kind}>")
        callees = set(self.kernels)
        for loop in walk(module):
            if (loop.name == "omp.wsloop" and "schedule_kind" not in loop.attributes
                    and _calls_any(loop, callees)):
                loop.attributes["schedule_kind"] = attr
