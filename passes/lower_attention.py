"""lowbit-lower-attention: bufferized fused-attention functions -> runtime kernel calls.

Matches each function carrying `lowbit.attention` (made by lowbit-convert-attention) once it
is bufferized into out-param form `(q, k, v, [mask,] out)` on memrefs, and replaces its
placeholder body by

    rc = lowbit_attention_invoke(dtype, q, k, v, mask|0, out, B, H, Hkv, T, S, D,
                                 mask sizes (padded to 4), scale, flags, 0, 0)
    cf.assert rc == 0 {lowbit.trap}        // an empty range: only validates the arguments
    scf.if rc == 0 {
      G = H / Hkv                          // query heads per KV head
      c = T <= max-group-queries ? min(G, ceil(threads / (B*Hkv))) : G
      scf.if B*H*T*S*D >= min-parallel-work && B*Hkv*c > 1 {
        scf.forall (%u) in (B*Hkv*c) {     // OpenMP; unit u: part j = u % c of group u / c
          lowbit_attention_invoke(..., (u / c)*G + j*G/c, (u / c)*G + (j+1)*G/c)
        }
      } else {
        lowbit_attention_invoke(..., 0, B*H)                                     // one thread
      }
    }

Work units are KV-head groups: one call covers the G query heads that read one KV head, so
the kernel's one pass over that head's K/V rows serves all of them (GQA decode: G heads per
row read instead of one; c = 1). A group is split into c parts only when there are fewer
groups than threads (`threads` = `omp_get_max_threads()`, the team the forall gets), so that
every thread still has work; c = G is one head per unit, as for MHA (G = 1). Sharing only
pays while a query block of the kernel spans several heads (T <= 4: 1.3-2x per group on one
core); for longer T (prefill) the units are single heads, which balance better over threads
(20 heads / 5 groups on 2 threads: 10 + 10 heads rather than 12 + 8).

Sizes are read from the memrefs at run time (one compile for every B, T, S). A failed check
(a mask that does not broadcast, H not a multiple of Hkv) raises through lowbit-guard-traps'
flag instead of running the kernel; the unit arithmetic (a division by Hkv) runs only after
it passed. Small calls stay on the calling thread: waking OpenMP for a few short decode heads
costs more than the heads (docs/codegen.md, "Threads"). Pointers cross as i64
(`memref.extract_aligned_pointer_as_index`), as in lowbit-lower-qlinear.
"""
from __future__ import annotations

import dataclasses
import struct

from torch_mlir import ir

from lowbit.passes.convert_attention import FUNC_ATTR
from lowbit.passes.qlinear import add_report_entry, declare_functions
from lowbit.passes.registry import ModulePass, register_pass

INVOKE = "lowbit_attention_invoke"
THREADS = "omp_get_max_threads"    # the OpenMP team size a parallel region gets (libiomp5)
SIGNATURE = "(i32, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, f32, i32, i64, i64) -> i32"
MESSAGE = "lowbit attention: the mask does not broadcast to [B, H, T, S]"
_DTYPE = {"f32": 2, "bf16": 3}


def _memref(t: ir.Type) -> str:
    return str(t)


def lowered_text(name: str, fn_type: ir.FunctionType, scale: float, causal: bool, min_work: int,
                 max_group_queries: int = 4) -> str | None:
    ins = list(fn_type.inputs)
    if fn_type.results or len(ins) not in (4, 5) or not all(isinstance(t, ir.MemRefType) for t in ins):
        return None
    has_mask = len(ins) == 5
    q_t, k_t = ir.MemRefType(ins[0]), ir.MemRefType(ins[1])
    elem = str(q_t.element_type)
    if elem not in _DTYPE or q_t.rank != 4 or k_t.rank != 4:
        return None
    names = ["q", "k", "v"] + (["mask"] if has_mask else []) + ["out"]
    types = {n: _memref(t) for n, t in zip(names, ins)}
    lines = []
    emit = lines.append
    emit(f"func.func private @{name}({', '.join(f'%{n}: {types[n]}' for n in names)}) {{")
    for i in range(4):
        emit(f"  %c{i} = arith.constant {i} : index")
    for var, src, d in (("B", "q", 0), ("H", "q", 1), ("T", "q", 2), ("D", "q", 3), ("Hkv", "k", 1), ("S", "k", 2)):
        emit(f"  %{var}_i = memref.dim %{src}, %c{d} : {types[src]}")
        emit(f"  %{var} = arith.index_cast %{var}_i : index to i64")
    for var in [n for n in names if n != "mask"] + (["mask"] if has_mask else []):
        emit(f"  %{var}p_i = memref.extract_aligned_pointer_as_index %{var} : {types[var]} -> index")
        emit(f"  %{var}p = arith.index_cast %{var}p_i : index to i64")
    emit("  %zero = arith.constant 0 : i64")
    emit("  %one = arith.constant 1 : i64")
    mask_sizes = ["%one"] * 4
    mask_ptr = "%zero"
    if has_mask:
        mask_ptr = "%maskp"
        rank = ir.MemRefType(ins[3]).rank
        for j in range(rank):
            emit(f"  %m{j}_i = memref.dim %mask, %c{j} : {types['mask']}")
            emit(f"  %m{j} = arith.index_cast %m{j}_i : index to i64")
            mask_sizes[4 - rank + j] = f"%m{j}"
    bits = struct.unpack("<I", struct.pack("<f", scale))[0]
    emit(f"  %dtype = arith.constant {_DTYPE[elem]} : i32")
    emit(f"  %scale = arith.constant 0x{bits:08X} : f32")
    emit(f"  %flags = arith.constant {1 if causal else 0} : i32")
    head = f"%dtype, %qp, %kp, %vp, {mask_ptr}, %outp, %B, %H, %Hkv, %T, %S, %D, {', '.join(mask_sizes)}, %scale, %flags"
    emit(f"  %rc = func.call @{INVOKE}({head}, %zero, %zero) : {SIGNATURE}")
    emit("  %rc0 = arith.constant 0 : i32")
    emit("  %ok = arith.cmpi eq, %rc, %rc0 : i32")
    emit(f'  cf.assert %ok, "{MESSAGE}" {{lowbit.trap}}')
    emit("  %bh = arith.muli %B, %H : i64")
    emit("  %w1 = arith.muli %bh, %T : i64")
    emit("  %w2 = arith.muli %w1, %S : i64")
    emit("  %work = arith.muli %w2, %D : i64")
    emit(f"  %min_work = arith.constant {min_work} : i64")
    emit("  %big = arith.cmpi sge, %work, %min_work : i64")
    emit("  scf.if %ok {")
    # Work units (see the module docstring): c parts of each of the B*Hkv KV-head groups.
    emit("    %G = arith.divsi %H, %Hkv : i64")
    emit("    %groups = arith.muli %B, %Hkv : i64")
    emit(f"    %nt32 = func.call @{THREADS}() : () -> i32")
    emit("    %nt = arith.extsi %nt32 : i32 to i64")
    emit("    %groups1 = arith.maxsi %groups, %one : i64")   # B = 0: no unit, and no division by 0
    emit("    %nt_up = arith.addi %nt, %groups1 : i64")
    emit("    %nt_up1 = arith.subi %nt_up, %one : i64")
    emit("    %fill = arith.divsi %nt_up1, %groups1 : i64")
    emit("    %cg = arith.minsi %fill, %G : i64")
    emit(f"    %max_gq = arith.constant {max_group_queries} : i64")
    emit("    %short = arith.cmpi sle, %T, %max_gq : i64")
    emit("    %c = arith.select %short, %cg, %G : i64")
    emit("    %units = arith.muli %groups, %c : i64")
    emit("    %many = arith.cmpi sgt, %units, %one : i64")
    emit("    %par = arith.andi %big, %many : i1")
    emit("    scf.if %par {")
    emit("      %units_i = arith.index_cast %units : i64 to index")
    emit("      scf.forall (%u_i) in (%units_i) {")
    emit("        %u = arith.index_cast %u_i : index to i64")
    emit("        %grp = arith.divsi %u, %c : i64")
    emit("        %part = arith.remsi %u, %c : i64")
    emit("        %g0 = arith.muli %grp, %G : i64")
    emit("        %p0 = arith.muli %part, %G : i64")
    emit("        %o0 = arith.divsi %p0, %c : i64")
    emit("        %part1 = arith.addi %part, %one : i64")
    emit("        %p1 = arith.muli %part1, %G : i64")
    emit("        %o1 = arith.divsi %p1, %c : i64")
    emit("        %b0 = arith.addi %g0, %o0 : i64")
    emit("        %b1 = arith.addi %g0, %o1 : i64")
    emit(f"        %r1 = func.call @{INVOKE}({head}, %b0, %b1) : {SIGNATURE}")
    emit("      }")
    emit("    } else {")
    emit(f"      %r2 = func.call @{INVOKE}({head}, %zero, %bh) : {SIGNATURE}")
    emit("    }")
    emit("  }")
    emit("  return")
    emit("}")
    return "\n".join(lines)


@register_pass
@dataclasses.dataclass
class LowerAttention(ModulePass):
    """Replace bufferized fused-attention placeholder bodies by runtime kernel calls."""

    NAME = "lowbit-lower-attention"
    # B*H*T*S*D multiply-adds (of QK^T) below which the heads run on the calling thread.
    # A decode step's attention (T = 1) is bound by reading the K/V cache, which one core
    # streams at about half the machine's rate: at 1b size (16 heads x 128 positions x 128)
    # that is ~30-40 us per layer on one thread against a few us to wake the OpenMP team.
    min_parallel_work: int = 1 << 16
    # Largest T (queries per head) whose work units are whole KV-head groups; above it, single
    # heads (the kernel's 4-query blocks then stay inside one head, so grouping shares little:
    # <= 5% per group at T = 8-32 on one core, less than the thread imbalance it can cause).
    max_group_queries: int = 4

    def run(self, module: ir.Operation) -> None:
        body = module.regions[0].blocks[0]
        lowered = False
        for op in list(body.operations):
            func = op.operation
            if func.name != "func.func" or FUNC_ATTR not in func.attributes or "lowbit.lowered" in func.attributes:
                continue
            name = ir.StringAttr(func.attributes["sym_name"]).value
            info = ir.DictAttr(func.attributes[FUNC_ATTR])
            scale = ir.FloatAttr(info["scale"]).value
            causal = ir.BoolAttr(info["causal"]).value
            fn_type = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value)
            text = lowered_text(name, fn_type, scale, causal, self.min_parallel_work, self.max_group_queries)
            if text is None:
                continue  # not bufferized into (q, k, v, [mask,] out) form yet
            parsed = ir.Module.parse(f"func.func private @{INVOKE}{SIGNATURE}\n"
                                     f"func.func private @{THREADS}() -> i32\n" + text)
            new_func = parsed.body.operations[2].operation
            new_func.attributes[FUNC_ATTR] = func.attributes[FUNC_ATTR]
            new_func.attributes["no_inline"] = ir.UnitAttr.get()
            new_func.attributes["lowbit.lowered"] = ir.UnitAttr.get()
            new_func.detach_from_parent()
            ir.InsertionPoint(func).insert(new_func)
            func.erase()
            h, hkv = (ir.ShapedType(fn_type.inputs[i]).shape[1] for i in (0, 1))
            add_report_entry(module, kind="attention", origin=name, result="fused kernel",
                             tiles=f"causal={causal} scale={scale:.6g}", heads=f"{h} query / {hkv} kv")
            lowered = True
        if lowered:
            declare_functions(module, {INVOKE: SIGNATURE, THREADS: "() -> i32"})
