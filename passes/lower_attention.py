"""lowbit-lower-attention: bufferized fused-attention functions -> runtime kernel calls.

Matches each function carrying `lowbit.attention` (made by lowbit-convert-attention) once it
is bufferized into out-param form `(q, k, v, [mask,] out)` on memrefs, and replaces its
placeholder body by

    rc = lowbit_attention_invoke(dtype, q, k, v, mask|0, out, B, H, Hkv, T, S, D,
                                 mask sizes (padded to 4), scale, flags, 0, 0)
    cf.assert rc == 0 {lowbit.trap}        // an empty range: only validates the arguments
    scf.if rc == 0 {
      scf.if B*H*T*S*D >= min-parallel-work {
        scf.forall (%bh) in (B*H) { lowbit_attention_invoke(..., bh, bh + 1) }   // OpenMP
      } else {
        lowbit_attention_invoke(..., 0, B*H)                                     // one thread
      }
    }

Sizes are read from the memrefs at run time (one compile for every B, T, S). A failed check
(a mask that does not broadcast) raises through lowbit-guard-traps' flag instead of
running the kernel. Small calls stay on the calling thread: waking OpenMP for a few
short decode heads costs more than the heads (docs/codegen.md, "Threads"). Pointers cross as i64
(`memref.extract_aligned_pointer_as_index`), as in lowbit-lower-qlinear.
"""
from __future__ import annotations

import dataclasses
import struct

from torch_mlir import ir

from lowbit.passes.convert_attention import FUNC_ATTR
from lowbit.passes.qlinear import add_report_entry
from lowbit.passes.registry import ModulePass, register_pass

INVOKE = "lowbit_attention_invoke"
SIGNATURE = "(i32, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, f32, i32, i64, i64) -> i32"
MESSAGE = "lowbit attention: the mask does not broadcast to [B, H, T, S]"
_DTYPE = {"f32": 2, "bf16": 3}


def _memref(t: ir.Type) -> str:
    return str(t)


def lowered_text(name: str, fn_type: ir.FunctionType, scale: float, causal: bool, min_work: int) -> str | None:
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
    emit("  %many = arith.cmpi sgt, %bh, %one : i64")
    emit("  %par = arith.andi %big, %many : i1")
    emit("  scf.if %ok {")
    emit("    scf.if %par {")
    emit("      %bh_i = arith.index_cast %bh : i64 to index")
    emit("      scf.forall (%i) in (%bh_i) {")
    emit("        %b0 = arith.index_cast %i : index to i64")
    emit("        %b1 = arith.addi %b0, %one : i64")
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
            text = lowered_text(name, fn_type, scale, causal, self.min_parallel_work)
            if text is None:
                continue  # not bufferized into (q, k, v, [mask,] out) form yet
            parsed = ir.Module.parse(f"func.func private @{INVOKE}{SIGNATURE}\n" + text)
            new_func = parsed.body.operations[1].operation
            new_func.attributes[FUNC_ATTR] = func.attributes[FUNC_ATTR]
            new_func.attributes["no_inline"] = ir.UnitAttr.get()
            new_func.attributes["lowbit.lowered"] = ir.UnitAttr.get()
            new_func.detach_from_parent()
            ir.InsertionPoint(func).insert(new_func)
            func.erase()
            add_report_entry(module, kind="attention", origin=name, result="fused kernel",
                             tiles=f"causal={causal} scale={scale:.6g}")
            lowered = True
        if lowered:
            existing = {ir.StringAttr(o.operation.attributes["sym_name"]).value
                        for o in body.operations if "sym_name" in o.operation.attributes}
            if INVOKE not in existing:
                parsed = ir.Module.parse(f"func.func private @{INVOKE}{SIGNATURE}")
                decl = parsed.body.operations[0].operation
                decl.detach_from_parent()
                body.append(decl)
